//! Backends from DNS: `discover = "dns:host:port"` (one backend per A/AAAA record) and
//! `discover = "srv:_service._proto.name"` (one per SRV target address, with its port
//! and weight); and the host names of backends written as `addr = "host:port"`.
//!
//! Every `resolve_interval`, and at once after a reload, each listener's entries and
//! host names are asked again (of its `resolver`, or the system's). A backend whose host
//! name now resolves elsewhere keeps its name and state; new connections go to the new
//! address. What they found is runtime state
//! ([`crate::state::Registry::discovered`]), and a change swaps in a routing snapshot
//! built with it, as a reload does: an address that appears becomes a backend (checking
//! first where the listener has health checks; slow start applies), one that disappears
//! drains like a removed backend, keeping its live count until its last connection ends.
//! A failed or empty answer changes nothing: it is logged when an entry starts failing
//! and when it answers again, and counted in `ballast_discovery_resolutions_total`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Config, Discover, Found, ListenerConfig};
use crate::routing::Routing;
use crate::state::Health;
use crate::Ballast;

/// The longest one name's answer is waited for.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// The longest the first pass may hold up serving when DNS does not answer.
const MAX_FIRST_PASS: Duration = Duration::from_secs(3);

/// The most backends one entry may find; more are left out (and logged).
const MAX_FOUND: usize = 1000;

/// The longest the loop sleeps, so that a reload that adds entries is seen quickly even
/// if its wake-up is missed.
const MAX_NAP: Duration = Duration::from_secs(1);

/// Resolves every entry and host name of every listener once, before serving: a
/// listener whose backends all come from DNS then has them from its first connection.
/// Bounded: when DNS does not answer, serving starts with what is known.
pub async fn first_pass(ballast: &Ballast) {
    let routing = ballast.routing();
    let listeners: Vec<&ListenerConfig> = routing.config.listeners.iter().collect();
    let answers = ask_within(ballast, &routing.config, &listeners).await;
    apply(ballast, routing.generation, answers, Health::Up);
}

/// The answers for `listeners` that arrive within [`MAX_FIRST_PASS`]: a name that does
/// not answer costs the others nothing (it is asked again by the loop).
async fn ask_within(
    ballast: &Ballast,
    config: &Config,
    listeners: &[&ListenerConfig],
) -> Vec<Answer> {
    let mut dns = Dns::default();
    let mut answers = Vec::new();
    let pass = async {
        for l in listeners {
            for answer in dns.ask(ballast, config, l).await {
                answers.push(answer);
            }
        }
    };
    if tokio::time::timeout(MAX_FIRST_PASS, pass).await.is_err() {
        warn!("DNS did not answer within {MAX_FIRST_PASS:?}: going on with the answers that came");
    }
    answers
}

/// Resolves the `discover` entries that `config` (about to be applied by a reload) adds
/// or changes, before it is applied: a listener whose entry changed then never goes
/// without backends. Blocking, on a thread of its own; bounded as the first pass.
/// Called by the reload, which holds the reload lock.
pub(crate) fn resolve_new_entries(ballast: &Ballast, config: &Config) {
    let registry = ballast.registry();
    let new: Vec<ListenerConfig> = config
        .listeners
        .iter()
        .filter_map(|l| {
            let discover: Vec<_> = l
                .discover
                .iter()
                .filter(|d| registry.discovered(&l.name, &d.target).is_empty())
                .cloned()
                .collect();
            (!discover.is_empty()).then(|| ListenerConfig {
                discover,
                backends: Vec::new(),
                ..l.clone()
            })
        })
        .collect();
    if new.is_empty() {
        return;
    }
    let answers = std::thread::scope(|scope| {
        let asked = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let listeners: Vec<&ListenerConfig> = new.iter().collect();
            Some(runtime.block_on(ask_within(ballast, config, &listeners)))
        });
        asked.join().ok().flatten()
    });
    for answer in answers.unwrap_or_default() {
        if let Answer::Discovered {
            listener,
            target,
            found,
        } = answer
        {
            registry.set_discovered(&listener, &target, found);
        }
    }
}

/// Runs until `stopped` turns true.
pub async fn run(ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    let mut dns = Dns::default();
    let mut due: HashMap<String, Instant> = HashMap::new();
    // A reload asked for every name at once; so does a start (its first pass may have
    // run out of time with names unanswered).
    let mut asked = true;
    loop {
        let routing = ballast.routing();
        let now = Instant::now();
        let mut wake = now + MAX_NAP;
        let mut answers = Vec::new();
        let mut next_due = HashMap::new();
        for l in routing.config.listeners.iter().filter(|l| has_names(l)) {
            let mut at = match (asked, due.get(&l.name)) {
                (true, _) => now,
                (false, Some(at)) => *at,
                // First seen: the first pass (or the reload that added it) asked already.
                (false, None) => now + l.resolve_interval,
            };
            if at <= now {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    found = dns.ask(&ballast, &routing.config, l) => answers.extend(found),
                }
                at = Instant::now() + l.resolve_interval;
            }
            wake = wake.min(at);
            next_due.insert(l.name.clone(), at);
        }
        due = next_due;
        asked = false;
        let generation = routing.generation;
        drop(routing);
        if !answers.is_empty() {
            // The reload lock is a blocking one: taken off the control runtime's thread.
            let ballast = ballast.clone();
            let _ = tokio::task::spawn_blocking(move || {
                apply(&ballast, generation, answers, Health::Checking)
            })
            .await;
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            () = ballast.resolve_asked() => asked = true,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// One name's answer, to be stored in the registry.
#[derive(Debug)]
enum Answer {
    /// A `discover` entry of `listener` found these addresses.
    Discovered {
        listener: String,
        target: Discover,
        found: Vec<Found>,
    },
    /// Backend `backend` of `listener`, at `loaded` when the config was loaded, is at
    /// `addr` now.
    Resolved {
        listener: String,
        backend: String,
        addr: SocketAddr,
        loaded: SocketAddr,
    },
}

/// Stores `answers` (given for routing generation `generation`) and, when one changes
/// what is known, swaps in a routing snapshot built with them: backends no longer found
/// drain as removed ones; new ones start `new_backends` where there are health checks.
/// Answers for an older generation are dropped: a reload came between, and the pass it
/// asked for follows.
fn apply(ballast: &Ballast, generation: u64, answers: Vec<Answer>, new_backends: Health) {
    let _one_at_a_time = ballast.lock_reload();
    let old = ballast.routing();
    if old.generation != generation || answers.is_empty() {
        return;
    }
    let registry = ballast.registry();
    let mut changed = false;
    for answer in answers {
        match answer {
            Answer::Discovered {
                listener,
                target,
                found,
            } => {
                let shown: Vec<String> = found.iter().map(|f| f.addr.to_string()).collect();
                if registry.set_discovered(&listener, &target, found) {
                    info!(
                        %listener, discover = %target, addresses = %shown.join(","),
                        "discovery: the backends changed"
                    );
                    changed = true;
                }
            }
            Answer::Resolved {
                listener,
                backend,
                addr,
                loaded,
            } => {
                if registry.set_resolved(&listener, &backend, addr, loaded) {
                    info!(
                        %listener, %backend, %addr,
                        "backend address changed: new connections go to the new one"
                    );
                    changed = true;
                }
            }
        }
    }
    if changed {
        let routing = Routing::build_dns(&old, registry, new_backends);
        ballast.swap_in(&old, routing);
    }
}

/// Whether listener `l` has anything to ask DNS: `discover` entries, or backends written
/// with a host name.
fn has_names(l: &ListenerConfig) -> bool {
    !l.discover.is_empty() || l.backends.iter().any(|b| host_name(&b.addr_text).is_some())
}

/// What was asked and failed (listener, what), so that an outage is logged once.
type Failing = HashSet<(String, String)>;

/// The resolvers, and what is failing.
#[derive(Default)]
struct Dns {
    resolvers: Resolvers,
    failing: Failing,
}

impl Dns {
    /// Asks for every `discover` entry of listener `l`, and for the host name of each
    /// backend written with one: the answers that found something.
    async fn ask(&mut self, ballast: &Ballast, config: &Config, l: &ListenerConfig) -> Vec<Answer> {
        if !has_names(l) {
            return Vec::new();
        }
        let Some(resolver) = self.resolvers.get(l.resolver) else {
            return Vec::new();
        };
        let mut answers = Vec::new();
        for entry in &l.discover {
            let what = entry.target.to_string();
            let answer = within(MAX_WAIT, lookup(&resolver, &entry.target)).await;
            let answer = answer.map(|found| usable(config, l, &what, found));
            let Some(found) = self.answered(ballast, l, &what, answer) else {
                continue;
            };
            answers.push(Answer::Discovered {
                listener: l.name.clone(),
                target: entry.target.clone(),
                found,
            });
        }
        let registry = ballast.registry();
        for b in &l.backends {
            let Some((host, port)) = host_name(&b.addr_text) else {
                continue;
            };
            let answer = within(MAX_WAIT, addresses(&resolver, host))
                .await
                .map(|ips| {
                    // As at load: no address that cannot be a backend.
                    let can_be = |ip: &IpAddr| {
                        let addr = SocketAddr::new(*ip, port);
                        crate::config::unreachable(addr).is_none() && !config.loops_back(addr)
                    };
                    ips.into_iter().filter(can_be).collect::<Vec<_>>()
                });
            let Some(ips) = self.answered(ballast, l, &b.addr_text, answer) else {
                continue;
            };
            // Where it is now, while the answer still has it (records rotate); else, as at
            // load, the first IPv4 address, or the first.
            let now = registry.resolved(&l.name, &b.name).unwrap_or(b.addr);
            let ip = match ips.contains(&now.ip()) {
                true => now.ip(),
                false => *ips.iter().find(|ip| ip.is_ipv4()).unwrap_or(&ips[0]),
            };
            answers.push(Answer::Resolved {
                listener: l.name.clone(),
                backend: b.name.clone(),
                addr: SocketAddr::new(ip, port),
                loaded: b.addr,
            });
        }
        answers
    }

    /// Counts and logs an answer to `what` of listener `l`: what it found, or `None` when
    /// it failed or found nothing (then nothing changes).
    fn answered<T>(
        &mut self,
        ballast: &Ballast,
        l: &ListenerConfig,
        what: &str,
        answer: Result<Vec<T>, String>,
    ) -> Option<Vec<T>> {
        let answer = answer.and_then(|found| match found.is_empty() {
            true => Err("the answer has no usable address".to_string()),
            false => Ok(found),
        });
        let result = if answer.is_ok() { "success" } else { "failure" };
        ballast
            .registry()
            .metrics()
            .discovery_resolutions
            .with_label_values(&[&l.name, result])
            .inc();
        let key = (l.name.clone(), what.to_string());
        match answer {
            Ok(found) => {
                if self.failing.remove(&key) {
                    info!(listener = %l.name, name = %what, "DNS answers again");
                }
                Some(found)
            }
            Err(why) => {
                if self.failing.insert(key) {
                    warn!(
                        listener = %l.name, name = %what, error = %why,
                        "DNS failed: the backends stay as they were"
                    );
                }
                None
            }
        }
    }
}

/// What of `found` can be a backend: no address that cannot be connected to (port 0,
/// any-address, multicast, broadcast) or that leads back into ballast, and at most
/// [`MAX_FOUND`]. What is left out is logged.
fn usable(config: &Config, l: &ListenerConfig, what: &str, mut found: Vec<Found>) -> Vec<Found> {
    let before = found.len();
    found.retain(|f| crate::config::unreachable(f.addr).is_none() && !config.loops_back(f.addr));
    if found.len() < before {
        warn!(
            listener = %l.name, name = %what, left_out = before - found.len(),
            "DNS named addresses that cannot be backends (unreachable, or ballast itself)"
        );
    }
    if found.len() > MAX_FOUND {
        warn!(
            listener = %l.name, name = %what, found = found.len(),
            "DNS named more than {MAX_FOUND} addresses: the first {MAX_FOUND} are used"
        );
        found.sort_unstable();
        found.truncate(MAX_FOUND);
    }
    found
}

/// `future`'s answer, or an error if it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    future: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// The host name and port of an address written as `host:port`; `None` for an IP
/// address, which needs no resolving.
fn host_name(addr_text: &str) -> Option<(&str, u16)> {
    if addr_text.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let (host, port) = addr_text.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

/// What `target` resolves to now (asked of the server, not a cache).
async fn lookup(resolver: &TokioResolver, target: &Discover) -> Result<Vec<Found>, String> {
    resolver.clear_cache();
    match target {
        Discover::Dns { host, port } => Ok(addresses(resolver, host)
            .await?
            .into_iter()
            .map(|ip| Found {
                addr: SocketAddr::new(ip, *port),
                weight: None,
            })
            .collect()),
        Discover::Srv { name } => {
            let answer = resolver
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let records: Vec<_> = answer
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some(srv.clone()),
                    _ => None,
                })
                .collect();
            // The lowest priority only: higher ones are backups (RFC 2782).
            let Some(first) = records.iter().map(|s| s.priority).min() else {
                return Ok(Vec::new());
            };
            let mut found = Vec::new();
            for srv in records.iter().filter(|s| s.priority == first) {
                let target = srv.target.to_string();
                for ip in addresses(resolver, &target).await? {
                    found.push(Found {
                        addr: SocketAddr::new(ip, srv.port),
                        weight: Some(u32::from(srv.weight.max(1))),
                    });
                }
            }
            Ok(found)
        }
    }
}

/// The A and AAAA records of `host`, asked separately: a name without records of one
/// family is fine, but a failure of either query fails the whole answer (a lost packet
/// must not make half the backends drain).
async fn addresses(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, String> {
    let failed = |e: hickory_resolver::net::NetError| format!("{host}: {e}");
    let mut ips: Vec<IpAddr> = match resolver.ipv4_lookup(host).await {
        Ok(answer) => answer
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_no_records_found() => Vec::new(),
        Err(e) => return Err(failed(e)),
    };
    match resolver.ipv6_lookup(host).await {
        Ok(answer) => ips.extend(answer.answers().iter().filter_map(|r| match &r.data {
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })),
        Err(e) if e.is_no_records_found() => {}
        Err(e) => return Err(failed(e)),
    }
    Ok(ips)
}

/// One resolver per DNS server asked (`None`: the system's), made on first use.
#[derive(Default)]
struct Resolvers {
    by_server: HashMap<Option<SocketAddr>, TokioResolver>,
    /// Servers whose resolver could not be made (logged once).
    broken: HashMap<Option<SocketAddr>, ()>,
}

impl Resolvers {
    fn get(&mut self, server: Option<SocketAddr>) -> Option<TokioResolver> {
        if let Some(r) = self.by_server.get(&server) {
            return Some(r.clone());
        }
        match resolver(server) {
            Ok(r) => {
                self.broken.remove(&server);
                self.by_server.insert(server, r.clone());
                Some(r)
            }
            Err(e) => {
                if self.broken.insert(server, ()).is_none() {
                    warn!(error = %e, "discovery: no DNS resolver; backends found before stay");
                }
                None
            }
        }
    }
}

/// A resolver that asks `server` (UDP, then TCP for long answers), or the system's.
fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match server {
        None => TokioResolver::builder(provider).map_err(|e| e.to_string())?,
        Some(server) => {
            let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut name_server.connections {
                connection.port = server.port();
            }
            let config = ResolverConfig::from_name_servers(vec![name_server]);
            TokioResolver::builder_with_config(config, provider)
        }
    };
    let options: &mut ResolverOpts = builder.options_mut();
    options.timeout = MAX_WAIT / 2;
    options.attempts = 1;
    builder.build().map_err(|e| e.to_string())
}
