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

use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{BackendConfig, Discover, Found, ListenerConfig};
use crate::state::Health;
use crate::Ballast;

/// The longest one entry's answer is waited for.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// The longest the loop sleeps, so that a reload that adds entries is seen quickly even
/// if its wake-up is missed.
const MAX_NAP: Duration = Duration::from_secs(1);

/// Resolves every entry of every listener once, before serving: a listener whose
/// backends all come from DNS then has them from its first connection.
pub async fn first_pass(ballast: &Ballast) {
    let routing = ballast.routing();
    let mut resolvers = Resolvers::default();
    let mut failing = Failing::new();
    let mut changed = false;
    for l in &routing.config.listeners {
        changed |= resolve_listener(ballast, l, &mut resolvers, &mut failing).await;
    }
    if changed {
        ballast.rebuild_routing(Health::Up);
    }
}

/// Runs until `stopped` turns true.
pub async fn run(ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    let mut resolvers = Resolvers::default();
    let mut failing = Failing::new();
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let routing = ballast.routing();
        let now = Instant::now();
        let mut wake = now + MAX_NAP;
        let mut changed = false;
        let mut next_due = HashMap::new();
        for l in routing
            .config
            .listeners
            .iter()
            .filter(|l| !l.discover.is_empty())
        {
            let mut at = due
                .get(&l.name)
                .copied()
                .unwrap_or(now + l.resolve_interval);
            if at <= now {
                changed |= resolve_listener(&ballast, l, &mut resolvers, &mut failing).await;
                at = Instant::now() + l.resolve_interval;
            }
            wake = wake.min(at);
            next_due.insert(l.name.clone(), at);
        }
        due = next_due;
        drop(routing);
        if changed {
            ballast.rebuild_routing(Health::Checking);
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            () = ballast.resolve_asked() => due.clear(),
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// What was asked and failed (listener, what), so that an outage is logged once.
type Failing = HashSet<(String, String)>;

/// Asks again for every `discover` entry of listener `l`, and for the host name of each
/// backend written with one; `true` when what one found changed.
async fn resolve_listener(
    ballast: &Ballast,
    l: &ListenerConfig,
    resolvers: &mut Resolvers,
    failing: &mut Failing,
) -> bool {
    let named: Vec<(&BackendConfig, &str, u16)> = l
        .backends
        .iter()
        .filter_map(|b| host_name(&b.addr_text).map(|(host, port)| (b, host, port)))
        .collect();
    if l.discover.is_empty() && named.is_empty() {
        return false;
    }
    let Some(resolver) = resolvers.get(l.resolver) else {
        return false;
    };
    let registry = ballast.registry();
    let mut changed = false;
    for entry in &l.discover {
        let what = entry.target.to_string();
        let answer = within(MAX_WAIT, lookup(&resolver, &entry.target)).await;
        let Some(found) = answered(ballast, l, &what, answer, failing) else {
            continue;
        };
        if registry.set_discovered(&l.name, &entry.target, found.clone()) {
            let shown: Vec<String> = found.iter().map(|f| f.addr.to_string()).collect();
            info!(
                listener = %l.name, discover = %what,
                addresses = %shown.join(","), "discovery: the backends changed"
            );
            changed = true;
        }
    }
    for (backend, host, port) in named {
        let answer = within(MAX_WAIT, addresses(&resolver, host)).await;
        let Some(ips) = answered(ballast, l, &backend.addr_text, answer, failing) else {
            continue;
        };
        // As at load: the first IPv4 address, else the first.
        let ip = ips.iter().find(|ip| ip.is_ipv4()).unwrap_or(&ips[0]);
        let addr = SocketAddr::new(*ip, port);
        if registry.set_resolved(&l.name, &backend.name, addr, backend.addr) {
            info!(
                listener = %l.name, backend = %backend.name, host = %backend.addr_text,
                %addr, "backend address changed: new connections go to the new one"
            );
            changed = true;
        }
    }
    changed
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

/// Counts and logs an answer to `what` of listener `l`: what it found, or `None` when it
/// failed or found nothing (then nothing changes).
fn answered<T>(
    ballast: &Ballast,
    l: &ListenerConfig,
    what: &str,
    answer: Result<Vec<T>, String>,
    failing: &mut Failing,
) -> Option<Vec<T>> {
    let answer = answer.and_then(|found| match found.is_empty() {
        true => Err("the answer has no address".to_string()),
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
            if failing.remove(&key) {
                info!(listener = %l.name, name = %what, "DNS answers again");
            }
            Some(found)
        }
        Err(why) => {
            if failing.insert(key) {
                warn!(
                    listener = %l.name, name = %what, error = %why,
                    "DNS failed: the backends stay as they were"
                );
            }
            None
        }
    }
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

/// The A and AAAA records of `host`.
async fn addresses(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, String> {
    let answer = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    Ok(answer.iter().collect())
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
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.timeout = MAX_WAIT / 2;
    options.attempts = 1;
    builder.build().map_err(|e| e.to_string())
}
