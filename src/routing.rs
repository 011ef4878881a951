//! The routing table: one immutable snapshot of the config joined with runtime state.
//!
//! A [`Routing`] is built from a validated [`Config`] and the [`Registry`], and lives in
//! one `ArcSwap` (see `lib.rs`). A connection loads it once and keeps its `Arc` for its
//! whole life, so the backend it picked stays meaningful even if a reload swaps in a new
//! snapshot meanwhile. The snapshot holds config and balancers; everything that changes
//! while it is in use (live counts, health, drain) is in the shared runtime state.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::{self, Balancer, Candidate, WEIGHT_SCALE};
use crate::config::{BackendConfig, Config, ListenerConfig};
use crate::state::{BackendState, Health, ListenerState, Registry};

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
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let new_backends = if generation > 1 && l.health.is_some() {
                    Health::Checking
                } else {
                    Health::Up
                };
                Arc::new(ListenerRoute::build(l.clone(), registry, new_backends))
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

/// A listener's part of the routing table.
#[derive(Debug)]
pub struct ListenerRoute {
    pub config: ListenerConfig,
    pub state: Arc<ListenerState>,
    pub backends: Vec<BackendRoute>,
    balancer: Box<dyn Balancer>,
}

/// A backend as configured, with its runtime state.
#[derive(Debug)]
pub struct BackendRoute {
    pub config: BackendConfig,
    pub state: Arc<BackendState>,
}

/// What an operator sees as a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendStatus {
    Up,
    Down,
    Draining,
    /// New, waiting for its first health check.
    Checking,
}

impl BackendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Up => "up",
            BackendStatus::Down => "down",
            BackendStatus::Draining => "draining",
            BackendStatus::Checking => "checking",
        }
    }
}

impl BackendRoute {
    /// Draining: drained by an operator or configured with `max_conns = 0`.
    pub fn is_draining(&self) -> bool {
        self.state.is_drained() || self.state.is_removed() || self.config.max_conns == Some(0)
    }

    pub fn status(&self) -> BackendStatus {
        if self.is_draining() {
            BackendStatus::Draining
        } else {
            match self.state.health() {
                Health::Up => BackendStatus::Up,
                Health::Down => BackendStatus::Down,
                Health::Checking => BackendStatus::Checking,
            }
        }
    }

    /// Up, not draining and below its `max_conns`: may get a new connection.
    pub fn is_available(&self) -> bool {
        self.state.is_up() && self.has_room()
    }

    /// Not draining and below its `max_conns`, whatever its health.
    fn has_room(&self) -> bool {
        !self.is_draining()
            && self
                .config
                .max_conns
                .is_none_or(|max| self.state.active() < max)
    }

    /// The weight a strategy should use now, reduced while the backend is in slow start.
    fn effective_weight(&self, slow_start: Option<Duration>) -> u64 {
        let full = u64::from(self.config.weight) * WEIGHT_SCALE;
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
        if config.health.is_none() {
            backends.iter().for_each(|b| b.state.set_up_unchecked());
        }
        ListenerRoute {
            state: registry.listener(&config.name),
            config,
            backends,
            balancer,
        }
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
                if b.state.health() == Health::Checking && b.has_room() && !tried.contains(&i) {
                    candidates[i].available = true;
                }
            }
        }
        candidates
    }

    /// The largest `active / fair share` among available backends, where the fair share
    /// of a backend is `total_active * weight / sum(weights of available backends)`,
    /// capped by its `max_conns`. 1 is perfectly even; 1 also when nothing is open.
    pub fn imbalance(&self) -> f64 {
        let available: Vec<&BackendRoute> = self
            .backends
            .iter()
            .filter(|b| !b.is_draining() && b.state.is_up())
            .collect();
        let total: u64 = available.iter().map(|b| b.state.active()).sum();
        let weights: u64 = available.iter().map(|b| u64::from(b.config.weight)).sum();
        if total == 0 || weights == 0 {
            return 1.0;
        }
        available
            .iter()
            .map(|b| {
                let mut fair = total as f64 * f64::from(b.config.weight) / weights as f64;
                if let Some(max) = b.config.max_conns {
                    fair = fair.min(max as f64);
                }
                b.state.active() as f64 / fair.max(f64::MIN_POSITIVE)
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
