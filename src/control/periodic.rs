//! One loop that runs a probe per backend at its own interval: the scheduler under
//! active health checks and agent checks.
//!
//! It reads the current routing snapshot on every round, so backends and settings that a
//! reload brings in are probed from the next round on; what a probe learns lives in the
//! backend's runtime state, which outlives snapshots.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::routing::{BackendRoute, ListenerRoute};
use crate::Ballast;

/// The longest the loop sleeps, so that a reload that adds probes is noticed quickly.
const MAX_NAP: Duration = Duration::from_secs(1);

/// A probe of one backend, ready to run.
pub type Probe = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs probes until `stopped` turns true: each backend for which `interval` gives one
/// is probed that often, with the future `probe` makes for it (`None`: not this time).
pub async fn run<I, P>(ballast: Ballast, mut stopped: watch::Receiver<bool>, interval: I, probe: P)
where
    I: Fn(&ListenerRoute, &BackendRoute) -> Option<Duration>,
    P: Fn(&ListenerRoute, &BackendRoute) -> Option<Probe>,
{
    // When each (listener, backend) is next due.
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    let mut probes = JoinSet::new();
    loop {
        let routing = ballast.routing();
        let now = Instant::now();
        let mut wake = now + MAX_NAP;
        let mut next_due = HashMap::with_capacity(due.len());
        for listener in &routing.listeners {
            for backend in &listener.backends {
                let Some(every) = interval(listener, backend) else {
                    continue;
                };
                let key = (listener.config.name.clone(), backend.config.name.clone());
                let mut at = due.get(&key).copied().unwrap_or(now);
                if at <= now {
                    if let Some(probe) = probe(listener, backend) {
                        probes.spawn(probe);
                    }
                    at = now + every;
                }
                wake = wake.min(at);
                next_due.insert(key, at);
            }
        }
        due = next_due;
        drop(routing);
        while probes.try_join_next().is_some() {}
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(wake) => {}
            () = ballast.routing_swapped() => {}
        }
    }
    probes.shutdown().await;
}
