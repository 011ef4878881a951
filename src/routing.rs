//! The routing table: one immutable snapshot of the config joined with runtime state.
//!
//! A [`Routing`] is built from a validated [`Config`] and the [`Registry`], and lives in
//! one `ArcSwap` (see `lib.rs`). A connection loads it once and keeps its `Arc` for its
//! whole life, so the backend it picked stays meaningful even if a reload swaps in a new
//! snapshot meanwhile. The snapshot holds config and balancers; everything that changes
//! while it is in use (live counts, health, drain) is in the shared runtime state.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::balancer::{self, Balancer, Candidate, WEIGHT_SCALE};
use crate::config::{BackendConfig, Config, ListenerConfig};
use crate::proxy_protocol::ReadHeader;
use crate::stage::Stage;
use crate::state::RuntimeWeight;
use crate::state::{BackendGuard, BackendState, Health, ListenerState, Phase, Registry};

/// One generation of the whole routing table.
#[derive(Debug)]
pub struct Routing {
    /// 1 for the config loaded at start, +1 at every successful reload.
    pub generation: u64,
    pub config: Arc<Config>,
    pub listeners: Vec<Arc<ListenerRoute>>,
}

impl Routing {
    /// The snapshot of `config` as generation `generation`. Backends new to the registry
    /// start up at generation 1 (as HAProxy's servers do), and `checking` when a reload
    /// adds them to a listener with health checks.
    pub fn build(config: Config, generation: u64, registry: &Registry) -> Routing {
        let new_backends = if generation > 1 {
            Health::Checking
        } else {
            Health::Up
        };
        Routing::build_with(config, generation, registry, new_backends)
    }

    /// The snapshot of `config`, with the backends its `discover` entries last found
    /// (see [`Registry::discovered`]); backends new to the registry start with health
    /// `new_backends` where their listener has health checks, up elsewhere.
    pub fn build_with(
        config: Config,
        generation: u64,
        registry: &Registry,
        new_backends: Health,
    ) -> Routing {
        Routing::assemble(config, generation, registry, new_backends, Built::Load)
    }

    /// `old` again, with what DNS answers now (see [`Registry::discovered`] and
    /// [`Registry::resolved`]). Nothing was reloaded: kept backends keep every setting
    /// made at run time (an API weight lasts until the next reload).
    pub fn build_dns(old: &Routing, registry: &Registry, new_backends: Health) -> Routing {
        let config = (*old.config).clone();
        Routing::assemble(config, old.generation, registry, new_backends, Built::Dns)
    }

    fn assemble(
        config: Config,
        generation: u64,
        registry: &Registry,
        new_backends: Health,
        built: Built,
    ) -> Routing {
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let new_backends = match l.health {
                    Some(_) => new_backends,
                    None => Health::Up,
                };
                Arc::new(ListenerRoute::assemble(
                    l.clone(),
                    registry,
                    new_backends,
                    built,
                ))
            })
            .collect();
        Routing {
            generation,
            config: Arc::new(config),
            listeners,
        }
    }

    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerRoute>> {
        self.listeners.iter().find(|l| l.config.name == name)
    }
}

/// Why a snapshot is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Built {
    /// From a config loaded or reloaded: run-time settings a reload drops are dropped.
    Load,
    /// From the same config, with new DNS answers: nothing is dropped.
    Dns,
}

/// `config` with a backend for every address its `discover` entries last found, after
/// the ones written with an address (at the address their host name resolves to now).
/// A name already taken (two entries finding the same address, or a backend written with
/// that name) keeps its first owner.
fn with_discovered(mut config: ListenerConfig, registry: &Registry) -> ListenerConfig {
    for b in &mut config.backends {
        if let Some(addr) = registry.resolved(&config.name, &b.name) {
            b.addr = addr;
        }
    }
    for entry in &config.discover {
        for found in registry.discovered(&config.name, &entry.target) {
            let backend = entry.backend(&found);
            if !config.backends.iter().any(|b| b.name == backend.name) {
                config.backends.push(backend);
            }
        }
    }
    config
}

/// A listener's part of the routing table.
#[derive(Debug)]
pub struct ListenerRoute {
    pub config: ListenerConfig,
    pub state: Arc<ListenerState>,
    pub backends: Vec<BackendRoute>,
    /// What the listener reads of a connection before the pick, if anything.
    pub stage: Option<Arc<dyn Stage>>,
    balancer: Box<dyn Balancer>,
    /// Held by every pick and the count it adds, so that each pick sees all before it.
    pick_lock: Mutex<()>,
    /// Held by each ejection, so that the cap on ejected backends holds.
    eject_lock: Mutex<()>,
}

/// A backend as configured, with its runtime state.
#[derive(Debug)]
pub struct BackendRoute {
    pub config: BackendConfig,
    pub state: Arc<BackendState>,
}

impl BackendRoute {
    /// The backend's state, in one word (see [`Phase`]).
    pub fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// Out of service: drained, `max_conns = 0` or removed.
    pub fn is_draining(&self) -> bool {
        self.phase().is_draining()
    }

    /// The one answer to "may it get a new connection": up, in service and below its
    /// `max_conns`.
    pub fn is_available(&self) -> bool {
        self.phase() == Phase::Up && self.has_room()
    }

    /// Below its `max_conns` (and the one its agent reported), with a weight above 0.
    fn has_room(&self) -> bool {
        self.max_conns().is_none_or(|max| self.state.active() < max) && self.weight_scaled() > 0
    }

    /// The cap on its live connections: its `max_conns`, or its agent's, the lower.
    pub fn max_conns(&self) -> Option<u64> {
        match (self.config.max_conns, self.state.agent_max_conns()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The weight in force, in [`WEIGHT_SCALE`] units: set at run time (admin API,
    /// agent's percentage of the configured one), else configured.
    pub fn weight_scaled(&self) -> u64 {
        let configured = u64::from(self.config.weight) * WEIGHT_SCALE;
        match self.state.runtime_weight() {
            None => configured,
            Some(RuntimeWeight::Api(weight)) => u64::from(weight) * WEIGHT_SCALE,
            Some(RuntimeWeight::AgentPercent(percent)) => configured * u64::from(percent) / 100,
        }
    }

    /// Its live connections cluster-wide: here and through the other instances.
    pub fn cluster_active(&self) -> u64 {
        self.state.active().saturating_add(self.state.peer_active())
    }

    /// The weight a strategy should use now, reduced while the backend is in slow start.
    pub fn effective_weight(&self, slow_start: Option<Duration>) -> u64 {
        let full = self.weight_scaled();
        match slow_start {
            Some(window) => {
                let elapsed = self.state.in_service_for();
                if elapsed >= window {
                    full
                } else {
                    // Ramp linearly from 5% of the weight to all of it.
                    let frac = elapsed.as_secs_f64() / window.as_secs_f64();
                    ((full as f64) * (0.05 + 0.95 * frac)).max(1.0) as u64
                }
            }
            None => full,
        }
    }
}

impl ListenerRoute {
    pub fn build(
        config: ListenerConfig,
        registry: &Registry,
        new_backends: Health,
    ) -> ListenerRoute {
        ListenerRoute::assemble(config, registry, new_backends, Built::Load)
    }

    fn assemble(
        config: ListenerConfig,
        registry: &Registry,
        new_backends: Health,
        built: Built,
    ) -> ListenerRoute {
        let config = with_discovered(config, registry);
        let names: Vec<(&str, u32)> = config
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight))
            .collect();
        let balancer = balancer::build(config.strategy, &names);
        let backends = config
            .backends
            .iter()
            .map(|b| BackendRoute {
                config: b.clone(),
                state: registry.backend(&config.name, &b.name, new_backends),
            })
            .collect::<Vec<_>>();
        for b in &backends {
            // A backend in the config is not removed, whatever an earlier reload did.
            b.state.set_removed(false);
            if built == Built::Load {
                b.state.after_reload(config.agent_of(&b.config).is_some());
            }
            if config.outlier.is_none() {
                b.state.clear_ejection();
            }
            if config.health.is_none() {
                b.state.set_up_unchecked();
            }
            b.state.set_config_drained(b.config.max_conns == Some(0));
        }
        let stage = config.accept_proxy.as_ref().map(|(accept, trusted)| {
            Arc::new(ReadHeader::new(*accept, trusted.clone())) as Arc<dyn Stage>
        });
        ListenerRoute {
            state: registry.listener(&config.name),
            config,
            backends,
            stage,
            balancer,
            pick_lock: Mutex::new(()),
            eject_lock: Mutex::new(()),
        }
    }

    /// Passive ejection: what a connection to backend `index` showed of it. A failure
    /// (connect refused or timed out, reset before its first byte) counts towards
    /// `consecutive_failures`; the backend's first byte reaching a client starts the
    /// count over. Nothing is kept without `[listeners.outlier]`.
    pub fn observe(&self, index: usize, failed: bool) {
        let Some(outlier) = &self.config.outlier else {
            return;
        };
        let backend = &self.backends[index];
        if !failed {
            return backend.state.record_success();
        }
        let failures = backend.state.record_failure();
        if failures < outlier.consecutive_failures {
            return;
        }
        let _serialised = self.eject_lock.lock().unwrap_or_else(|e| e.into_inner());
        if backend.state.is_ejected() {
            return;
        }
        let ejected = self
            .backends
            .iter()
            .filter(|b| b.state.is_ejected())
            .count();
        let cap = self.backends.len() * outlier.max_ejected_percent as usize;
        if (ejected + 1) * 100 > cap {
            if failures > outlier.consecutive_failures {
                // Said once, when it first reached the count.
                return;
            }
            return tracing::warn!(
                listener = %self.config.name, backend = %backend.config.name, ejected,
                "backend failing but not ejected: max_ejected_percent = {} is reached",
                outlier.max_ejected_percent
            );
        }
        let length = backend
            .state
            .eject(outlier.base_ejection, outlier.max_ejection);
        tracing::warn!(
            listener = %self.config.name, backend = %backend.config.name,
            failures = outlier.consecutive_failures, ejected_for = ?length,
            "backend ejected: its connections failed in a row"
        );
    }

    /// Picks the backend for a new connection from `client`, leaving out the backends
    /// in `tried` (already failed for this client). `None` when nothing is available.
    pub fn pick(&self, client: IpAddr, tried: &[usize]) -> Option<usize> {
        let candidates = self.candidates(tried);
        if tried.is_empty() {
            self.balancer.pick(&candidates, client)
        } else {
            self.balancer.retry(&candidates, client)
        }
    }

    /// Picks as [`ListenerRoute::pick`] does and counts the connection against the
    /// backend before any other pick of this listener can look.
    pub fn pick_and_acquire(
        &self,
        client: IpAddr,
        tried: &[usize],
    ) -> Option<(usize, BackendGuard)> {
        let _serialised = self.pick_lock.lock().unwrap_or_else(|e| e.into_inner());
        let index = self.pick(client, tried)?;
        Some((index, self.backends[index].state.acquire()))
    }

    /// Where a new connection from `client` would go now, without opening one or
    /// advancing any rotation.
    pub fn peek(&self, client: IpAddr) -> Option<usize> {
        self.balancer.peek(&self.candidates(&[]), client)
    }

    fn candidates(&self, tried: &[usize]) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Candidate {
                available: b.is_available() && !tried.contains(&i),
                weight: b.effective_weight(self.config.slow_start),
                active: b.state.active(),
                peers: b.state.peer_active(),
            })
            .collect();
        // The second scan runs only when no candidate is available: never on the way of a
        // connection that has somewhere to go.
        if !candidates.iter().any(|c| c.available)
            && !self.backends.iter().any(|b| b.is_available())
        {
            // No backend is up with room (tried or not): backends still waiting for their
            // first check are tried rather than refusing the client (Envoy's panic
            // routing). A reload that replaces every backend, or renames a listener, must
            // refuse no connection. Up backends that are full or failed for this client
            // do not open this door.
            for (i, b) in self.backends.iter().enumerate() {
                if b.phase() == Phase::Checking && b.has_room() && !tried.contains(&i) {
                    candidates[i].available = true;
                }
            }
        }
        candidates
    }

    /// The largest `active / fair share` among available backends (live counts
    /// cluster-wide, peers' included), where the fair share
    /// of a backend is `total_active * weight / sum(weights of available backends)`,
    /// capped by its `max_conns`. 1 is perfectly even; 1 also when nothing is open.
    pub fn imbalance(&self) -> f64 {
        let available: Vec<&BackendRoute> = self
            .backends
            .iter()
            .filter(|b| b.phase() == Phase::Up && b.weight_scaled() > 0)
            .collect();
        let total: u64 = available.iter().map(|b| b.cluster_active()).sum();
        let weights: u64 = available.iter().map(|b| b.weight_scaled()).sum();
        if total == 0 || weights == 0 {
            return 1.0;
        }
        available
            .iter()
            .map(|b| {
                let mut fair = total as f64 * b.weight_scaled() as f64 / weights as f64;
                if let Some(max) = b.max_conns() {
                    fair = fair.min(max as f64);
                }
                b.cluster_active() as f64 / fair.max(f64::MIN_POSITIVE)
            })
            .fold(0.0, f64::max)
    }

    pub fn backend(&self, name: &str) -> Option<&BackendRoute> {
        self.backends.iter().find(|b| b.config.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn listener(backends: &[&str]) -> ListenerConfig {
        let text = format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n{}",
            backends
                .iter()
                .enumerate()
                .map(|(i, name)| format!(
                    "[[listeners.backends]]\nname = \"{name}\"\naddr = \"127.0.0.1:{}\"\n",
                    3001 + i
                ))
                .collect::<String>()
        );
        Config::parse(&text, "test.toml").unwrap().listeners[0].clone()
    }

    fn with_outlier(backends: &[&str], percent: u32) -> ListenerRoute {
        let mut config = listener(backends);
        config.outlier = Some(crate::config::OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: percent,
        });
        ListenerRoute::build(config, &Registry::default(), Health::Up)
    }

    #[test]
    fn failures_eject_only_in_a_row_and_a_first_byte_starts_the_count_over() {
        let route = with_outlier(&["a", "b"], 50);
        for failed in [true, true, false, true, true] {
            route.observe(0, failed);
        }
        assert!(!route.backends[0].state.is_ejected());
        route.observe(0, true);
        assert!(route.backends[0].state.is_ejected());
        assert_eq!(route.backends[0].phase().as_str(), "ejected");
        assert!((0..4).all(|_| route.pick(CLIENT, &[]) == Some(1)));
        // The cap: b may not follow while a is out (2 of 2 > 50%).
        (0..5).for_each(|_| route.observe(1, true));
        assert!(!route.backends[1].state.is_ejected());
    }

    #[test]
    fn a_listener_s_only_backend_is_ejected_only_at_100_percent() {
        for (percent, ejected) in [(99, false), (100, true)] {
            let route = with_outlier(&["a"], percent);
            (0..3).for_each(|_| route.observe(0, true));
            assert_eq!(route.backends[0].state.is_ejected(), ejected, "{percent}%");
        }
    }

    #[test]
    fn a_backend_whose_host_moved_keeps_its_state_at_its_new_address() {
        let registry = Registry::default();
        let config = listener(&["a", "b"]);
        let before = ListenerRoute::build(config.clone(), &registry, Health::Up);
        let _open = before.backends[0].state.acquire();
        let loaded = before.backends[0].config.addr;
        let moved: std::net::SocketAddr = "127.0.0.9:3001".parse().unwrap();
        assert!(registry.set_resolved("web", "a", moved, loaded));
        assert!(
            !registry.set_resolved("web", "a", moved, loaded),
            "no change twice"
        );
        let after = ListenerRoute::build(config.clone(), &registry, Health::Up);
        assert_eq!(after.backends[0].config.addr, moved);
        assert_eq!(after.backends[0].state.active(), 1, "the same backend");
        assert_eq!(
            after.backends[1].config.addr,
            before.backends[1].config.addr
        );
        // Back where it was loaded: no override left.
        assert!(registry.set_resolved("web", "a", loaded, loaded));
        assert_eq!(registry.resolved("web", "a"), None);
    }

    #[test]
    fn discovered_addresses_become_backends_named_after_their_entry() {
        let registry = Registry::default();
        let mut config = listener(&["a"]);
        let target = crate::config::Discover::Dns {
            host: "app.test".into(),
            port: 3000,
        };
        config.discover.push(crate::config::DiscoverConfig {
            name: "app".into(),
            target: target.clone(),
            weight: 2,
            max_conns: Some(7),
            send_proxy: None,
        });
        let found = |ip: &str| crate::config::Found {
            addr: std::net::SocketAddr::new(ip.parse().unwrap(), 3000),
            weight: None,
        };
        assert!(registry.set_discovered(
            "web",
            &target,
            vec![found("10.0.0.2"), found("10.0.0.1")]
        ));
        assert!(!registry.set_discovered(
            "web",
            &target,
            vec![found("10.0.0.1"), found("10.0.0.2")]
        ));
        let route = ListenerRoute::build(config, &registry, Health::Up);
        let names: Vec<(&str, u32, Option<u64>)> = route
            .backends
            .iter()
            .map(|b| (b.config.name.as_str(), b.config.weight, b.config.max_conns))
            .collect();
        assert_eq!(
            names,
            [
                ("a", 1, None),
                ("app@10.0.0.1", 2, Some(7)),
                ("app@10.0.0.2", 2, Some(7))
            ]
        );
    }

    #[test]
    fn checking_backends_get_nothing_while_another_is_up_and_are_tried_when_none_is() {
        let registry = Registry::default();
        let route = ListenerRoute::build(listener(&["up", "new"]), &registry, Health::Up);
        route.backends[1].state.set_checking();
        assert!((0..4).all(|_| route.pick(CLIENT, &[]) == Some(0)));
        route.backends[0].state.set_drained(true);
        assert_eq!(
            route.pick(CLIENT, &[]),
            Some(1),
            "rather than refusing the client"
        );
        assert_eq!(
            route.pick(CLIENT, &[1]),
            None,
            "unless it was tried already"
        );
        route.backends[0].state.set_drained(false);
        assert_eq!(
            route.pick(CLIENT, &[0]),
            None,
            "an up backend that failed for this client opens no door to a checking one"
        );
        route.backends[0].state.set_drained(true);
        route.backends[1].state.set_drained(true);
        assert_eq!(route.pick(CLIENT, &[]), None, "a drained one never");
    }
}
