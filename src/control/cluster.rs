//! Cluster-wide live counts (`[cluster]`): several instances share their counts through
//! Redis, so that least_conn, rebalance, the imbalance gauge and the pick route see the
//! whole cluster's connections and not only their own.
//!
//! Every `report_interval` one script runs in Redis (one round trip): it writes this
//! instance's report — its live count per (listener, backend), and which listeners are
//! settling after a migration — under the instance's own key with a TTL of `peer_ttl`,
//! notes the instance in an index of reporters, and returns every peer's report with its
//! age (by Redis's clock, so no two hosts' clocks are compared). There is no peer list to
//! maintain: a dead instance's key expires, and the index forgets it after `peer_ttl`.
//!
//! The peers' counts are stored in each backend's state ([`BackendState::peer_active`]):
//! between reports the local part of a count stays exact, and a pick reads one more
//! number per backend, never Redis. When Redis does not answer (every call is bounded by
//! a timeout) the peers' counts are dropped and ballast balances on its own counts, with
//! no connection failed; the outage is logged once and `ballast_cluster_up` is 0 until
//! Redis answers again.
//!
//! [`BackendState::peer_active`]: crate::state::BackendState::peer_active

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::ClusterConfig;
use crate::routing::Routing;
use crate::Ballast;

/// Keys in Redis: each instance's report, and the index of instances that reported.
const KEY_PREFIX: &str = "ballast:instance:";
const INDEX_KEY: &str = "ballast:instances";

/// The longest one round (connect and script) may take.
const MAX_ROUND: Duration = Duration::from_secs(2);

/// The longest taking this instance's report out may take.
pub const WITHDRAW_WAIT: Duration = Duration::from_millis(500);

/// How long after a migration a listener counts as settling: its clients are still
/// reconnecting, so its counts understate the total.
pub const SETTLE: Duration = Duration::from_millis(250);

/// Writes this instance's report, forgets reporters older than the TTL and returns
/// Redis's time (ms), the report this one replaced ("" if none), and each fresh peer's
/// name, report time (ms) and report. (`replicate_commands` lets a Redis older than 5
/// write after reading the time; newer ones do so anyway.)
const ROUND: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local before = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
local ids = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local out = { tostring(now), before or '' }
for i = 1, #ids, 2 do
  if ids[i] ~= ARGV[3] then
    local report = redis.call('GET', ARGV[4] .. ids[i])
    if report then
      table.insert(out, ids[i])
      table.insert(out, ids[i + 1])
      table.insert(out, report)
    end
  end
end
return out
"#;

/// The cluster as this instance last saw it; `None` in the view without `[cluster]`.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Redis answered the latest round.
    pub up: bool,
    /// The peers whose latest report is fresh.
    pub peers: Vec<Peer>,
}

/// One other instance, as its latest report says.
#[derive(Debug, Clone)]
pub struct Peer {
    pub instance: String,
    /// When it wrote the report, on this host's clock.
    pub written: Instant,
    /// Per listener: live count per backend, and whether it is settling.
    pub listeners: HashMap<String, PeerListener>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerListener {
    pub backends: HashMap<String, u64>,
    /// It migrated connections moments ago (or some are still ending): its counts are
    /// about to change.
    pub settling: bool,
}

impl ClusterView {
    /// Each peer's live count of `backend` of `listener`, by instance.
    pub fn holders<'a>(
        &'a self,
        listener: &'a str,
        backend: &'a str,
    ) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        self.peers.iter().filter_map(move |p| {
            let n = *p.listeners.get(listener)?.backends.get(backend)?;
            Some((p.instance.as_str(), n))
        })
    }
}

/// Where a shutting-down instance is in taking its report out of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    Staying,
    /// Shutdown is done with connections: the report goes now (see [`Ballast::shutdown`]).
    Asked,
    /// The report is gone, or could not be taken out within [`WITHDRAW_WAIT`].
    Done,
}

/// Runs until `stopped` turns true, or shutdown asks it to leave; then takes this
/// instance's report out of Redis, so that peers stop counting connections that are gone
/// without waiting for `peer_ttl`.
pub async fn run(ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    // rediss:// URLs: rustls needs its cryptography chosen once per process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let token = process_token();
    let mut leave = ballast.leave_signal();
    let mut link: Option<Link> = None;
    let mut outage = false;
    // The name and Redis this instance last reported as, and how many rounds in a row
    // found another process's report under its name.
    let mut reporting_as: Option<(String, String)> = None;
    let mut shared_rounds = 0u32;
    loop {
        let routing = ballast.routing();
        let config = routing.config.cluster.clone();
        if let Some((url, instance)) = reporting_as.take() {
            let same = config
                .as_ref()
                .is_some_and(|c| c.redis == url && c.instance == instance);
            if same {
                reporting_as = Some((url, instance));
            } else {
                // Left the cluster, or renamed: the old report goes now, not at its TTL.
                withdraw(&mut link, &instance, &token).await;
                link = None;
            }
        }
        let Some(config) = config else {
            if ballast.cluster_view().is_some() {
                forget_peers(&routing);
                ballast.set_cluster_view(None);
                ballast.registry().metrics().drop_cluster();
            }
            drop(routing);
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                _ = leave.wait_for(|l| *l != Leave::Staying) => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let started = tokio::time::Instant::now();
        let limit = MAX_ROUND.min(config.report_interval);
        let result = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = leave.wait_for(|l| *l != Leave::Staying) => break,
            answer = tokio::time::timeout(limit, round(&mut link, &config, &routing, &ballast, &token)) => {
                answer.unwrap_or_else(|_| Err(format!("Redis did not answer within {limit:?}")))
            }
        };
        let metrics = ballast.registry().metrics().cluster();
        match result {
            Ok(answer) => {
                if outage {
                    info!(peers = answer.peers.len(), "cluster: Redis answers again");
                    outage = false;
                }
                shared_rounds = if answer.shared { shared_rounds + 1 } else { 0 };
                if shared_rounds == 2 {
                    warn!(
                        instance = %config.instance,
                        "cluster: another process reports under this instance's name; give each instance its own [cluster] instance"
                    );
                }
                reporting_as = Some((config.redis.clone(), config.instance.clone()));
                store_peers(&routing, &answer.peers);
                metrics.up.set(1);
                metrics.peers.set(answer.peers.len() as i64);
                ballast.set_cluster_view(Some(ClusterView {
                    up: true,
                    peers: answer.peers,
                }));
            }
            Err(why) => {
                link = None;
                if !outage {
                    warn!(
                        error = %why,
                        "cluster: Redis does not answer; peers' last reports count until they are stale, then this instance's own counts; rebalance waits"
                    );
                    outage = true;
                }
                // The peers' last reports still count while they are fresh.
                let fresh_for = fresh_for(&config);
                let mut peers = ballast.cluster_view().unwrap_or_default().peers;
                peers.retain(|p| p.written.elapsed() <= fresh_for);
                store_peers(&routing, &peers);
                metrics.up.set(0);
                metrics.peers.set(peers.len() as i64);
                ballast.set_cluster_view(Some(ClusterView { up: false, peers }));
            }
        }
        drop(routing);
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = leave.wait_for(|l| *l != Leave::Staying) => break,
            _ = tokio::time::sleep_until(started + config.report_interval) => {}
        }
    }
    if let Some((_, instance)) = reporting_as {
        withdraw(&mut link, &instance, &token).await;
    }
    ballast.left();
}

/// Takes `instance`'s report out of Redis if this process wrote it (another process
/// under the same name, such as the new one of an upgrade, keeps its own). Bounded: a
/// Redis that does not answer lets it expire by itself.
async fn withdraw(link: &mut Option<Link>, instance: &str, token: &str) {
    let Some(link) = link.as_mut() else {
        return;
    };
    let script = Script::new(WITHDRAW);
    let mut call = script.prepare_invoke();
    call.key(format!("{KEY_PREFIX}{instance}"))
        .key(INDEX_KEY)
        .arg(format!("\"token\":\"{token}\""))
        .arg(instance);
    let remove = call.invoke_async::<i64>(&mut link.connection);
    let _ = tokio::time::timeout(WITHDRAW_WAIT, remove).await;
}

/// Deletes the report in KEYS[1] and its index entry if it holds ARGV[1] (the token).
const WITHDRAW: &str = r#"
local report = redis.call('GET', KEYS[1])
if report and string.find(report, ARGV[1], 1, true) then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// How old a peer's report may be and still count: a live peer's is at most about a
/// report interval old; one older than `peer_ttl - report_interval` is not counted, so
/// that a dead instance's counts are gone from the view within `peer_ttl` of its last
/// report (the config keeps `peer_ttl` at least three report intervals).
fn fresh_for(config: &ClusterConfig) -> Duration {
    config
        .peer_ttl
        .saturating_sub(config.report_interval)
        .max(config.report_interval)
}

/// A token of this process, in its reports, to tell another process that reports under
/// the same instance name.
fn process_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", hasher.finish())
}

/// A connection to the Redis of `url`.
struct Link {
    url: String,
    connection: MultiplexedConnection,
}

/// What one round brought back.
struct Answer {
    /// The peers whose reports are fresh.
    peers: Vec<Peer>,
    /// This instance's key held another process's report.
    shared: bool,
}

/// One report and read: this instance's counts out, the fresh peers' in.
async fn round(
    link: &mut Option<Link>,
    config: &ClusterConfig,
    routing: &Routing,
    ballast: &Ballast,
    token: &str,
) -> Result<Answer, String> {
    if link.as_ref().is_none_or(|l| l.url != config.redis) {
        let client = redis::Client::open(config.redis.as_str()).map_err(|e| e.to_string())?;
        let timeouts = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(MAX_ROUND))
            .set_response_timeout(Some(MAX_ROUND));
        let connection = client
            .get_multiplexed_async_connection_with_config(&timeouts)
            .await
            .map_err(|e| e.to_string())?;
        *link = Some(Link {
            url: config.redis.clone(),
            connection,
        });
    }
    let Some(link) = link.as_mut() else {
        return Err("no connection".into());
    };
    let report = own_report(routing, ballast, token);
    let ttl_ms = config.peer_ttl.as_millis().max(1) as u64;
    let answer: Vec<String> = Script::new(ROUND)
        .key(format!("{KEY_PREFIX}{}", config.instance))
        .key(INDEX_KEY)
        .arg(report)
        .arg(ttl_ms)
        .arg(&config.instance)
        .arg(KEY_PREFIX)
        .invoke_async(&mut link.connection)
        .await
        .map_err(|e| e.to_string())?;
    let read_at = Instant::now();
    let [now, before, rest @ ..] = answer.as_slice() else {
        return Err("Redis answered too little".into());
    };
    let now: u64 = now.parse().map_err(|_| "Redis's time is not a number")?;
    let shared = !before.is_empty() && report_token(before).is_some_and(|t| t != token);
    let fresh_for = fresh_for(config);
    let peers = rest
        .chunks_exact(3)
        .filter_map(|peer| {
            let written: u64 = peer[1].parse::<f64>().ok()? as u64;
            let age = Duration::from_millis(now.saturating_sub(written));
            // Too old, or this process's own (under a name it had before a rename).
            if age > fresh_for || report_token(&peer[2]).as_deref() == Some(token) {
                return None;
            }
            Some(Peer {
                instance: peer[0].clone(),
                written: read_at.checked_sub(age).unwrap_or(read_at),
                listeners: parse_report(&peer[2])?,
            })
        })
        .collect();
    Ok(Answer { peers, shared })
}

/// This instance's report:
/// `{"token":"…","listeners":{"web":{"backends":{"a":3},"settling":false}}}`.
fn own_report(routing: &Routing, ballast: &Ballast, token: &str) -> String {
    let mut listeners = serde_json::Map::new();
    for l in &routing.listeners {
        let backends: serde_json::Map<String, serde_json::Value> = l
            .backends
            .iter()
            .map(|b| (b.config.name.clone(), b.state.active().into()))
            .collect();
        let settling = l
            .state
            .last_migration()
            .is_some_and(|at| at.elapsed() < SETTLE)
            || super::rebalance::ending(ballast.conns(), l);
        listeners.insert(
            l.config.name.clone(),
            serde_json::json!({ "backends": backends, "settling": settling }),
        );
    }
    serde_json::json!({ "token": token, "listeners": listeners }).to_string()
}

/// The token of the process that wrote `report`.
fn report_token(report: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(report).ok()?;
    Some(value.get("token")?.as_str()?.to_string())
}

/// The most connections a report may claim for one backend; more is not a count.
const MAX_COUNT: u64 = u32::MAX as u64;

/// A peer's report, or `None` when it is not one (a peer of another version, or not
/// ballast): such a peer is left out.
pub fn parse_report(text: &str) -> Option<HashMap<String, PeerListener>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let listeners = value.get("listeners")?.as_object()?;
    let mut out = HashMap::new();
    for (name, l) in listeners {
        let backends = l
            .get("backends")?
            .as_object()?
            .iter()
            .map(|(b, n)| Some((b.clone(), n.as_u64().filter(|n| *n <= MAX_COUNT)?)))
            .collect::<Option<HashMap<_, _>>>()?;
        let settling = l.get("settling").and_then(|s| s.as_bool()).unwrap_or(false);
        out.insert(name.clone(), PeerListener { backends, settling });
    }
    Some(out)
}

/// Stores the peers' summed counts in each backend's state; 0 where none reported.
fn store_peers(routing: &Routing, peers: &[Peer]) {
    for l in &routing.listeners {
        for b in &l.backends {
            let sum = peers
                .iter()
                .filter_map(|p| {
                    p.listeners
                        .get(&l.config.name)?
                        .backends
                        .get(&b.config.name)
                })
                .fold(0u64, |sum, n| sum.saturating_add(*n));
            b.state.set_peer_active(sum);
        }
    }
}

fn forget_peers(routing: &Routing) {
    store_peers(routing, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_back_and_anything_else_is_left_out() {
        let listeners =
            parse_report(r#"{"listeners":{"web":{"backends":{"a":3,"b":0},"settling":true}}}"#)
                .expect("a report");
        assert_eq!(listeners["web"].backends["a"], 3);
        assert!(listeners["web"].settling);
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"listeners":{"web":{"backends":{"a":-1}}}}"#,
            r#"{"listeners":{"web":{"backends":{"a":18446744073709551615}}}}"#,
            r#"{"listeners":{"web":{"backends":{"a":"3"}}}}"#,
            r#"{"listeners":{"web":{}}}"#,
        ] {
            assert_eq!(parse_report(bad), None, "{bad}");
        }
    }
}
