//! The control plane: everything that drives the data plane from outside a connection.
//!
//! [`Ballast`] owns the routing snapshot (one `ArcSwap`, swapped as a whole by
//! [`reload`]), the runtime state [`Registry`], the connection table and the accept
//! loops' lifecycle. It hands the data plane ([`crate::proxy`]) only a
//! [`DataPlane`] — the snapshot, the table — and acts on connections only through the
//! table: [`drain`] closes a drained backend's connections after `drain_timeout`,
//! [`rebalance`] migrates the newest away from an overloaded backend, and
//! [`Ballast::shutdown`] closes what is left, spread over time. [`health`] probes
//! backends and writes their state; the admin endpoint reads and drives all of it.

pub mod agent;
pub mod cluster;
pub mod discover;
pub mod drain;
pub mod handover;
pub mod health;
pub mod periodic;
pub mod rebalance;
pub mod reload;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::config::Config;
use crate::conn::{Ask, Conns, EndReason};
use crate::logging::{rfc3339, unix_now};
use crate::proxy::{self, DataPlane};
use crate::routing::Routing;
use crate::state::{BackendState, ListenerState, Phase, Registry};
use crate::systemd;
use crate::workers::Spread;

/// A running ballast's control plane. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct Ballast {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// What the connection path sees: the routing snapshot and the connection table.
    plane: DataPlane,
    /// Runtime state by name, carried across routing snapshots.
    registry: Registry,
    /// The file the config came from; reloads read it again.
    config_path: Option<PathBuf>,
    /// Every listener is bound (for `/readyz`).
    ready: AtomicBool,
    /// Graceful shutdown has begun (`/readyz` answers 503).
    shutting_down: AtomicBool,
    /// The accept loop of each listener, by name.
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    /// The runtimes that accept loops and connections run on, one loop per runtime per
    /// listener: the worker threads, or the runtime ballast started on.
    spawner: Mutex<Option<Arc<Spread>>>,
    /// Backends and listeners that left the config and still have connections.
    removed: Mutex<Removed>,
    /// One reload at a time.
    reload_lock: Mutex<()>,
    /// The config file's content as last read, so that the file watcher does not reload
    /// a file that SIGHUP or the API already did.
    last_loaded: Mutex<Option<Vec<u8>>>,
    /// Wakes the health checker when a reload swapped the routing snapshot.
    routing_swapped: tokio::sync::Notify,
    /// Wakes the discovery loop to resolve every entry now (after a reload).
    resolve_now: tokio::sync::Notify,
    /// The cluster as the latest report round saw it; `None` without `[cluster]`.
    cluster: Mutex<Option<cluster::ClusterView>>,
    /// Shutdown asks the cluster's task to take this instance's report out of Redis.
    leave: watch::Sender<cluster::Leave>,
    /// Turns true when shutdown is complete; background loops (admin, health) end then.
    stopped: watch::Sender<bool>,
}

/// A running accept loop.
#[derive(Debug)]
struct ListenerHandle {
    /// The bind address from the config (a reload that changes it rebinds).
    bind: SocketAddr,
    /// The address really listened on.
    local: SocketAddr,
    /// A second handle on the listening socket, so that a reload that renames the
    /// listener (or swaps addresses) hands the same socket on instead of binding again.
    /// Dropped with the handle, which closes the port once the accept loop ends too.
    socket: std::net::TcpListener,
    /// Stops the accept loop.
    stop: watch::Sender<bool>,
}

/// What a reload removed but connections still use; the drain supervisor closes their
/// connections after `drain_timeout` and forgets them once the last one has ended.
#[derive(Debug, Default)]
pub(crate) struct Removed {
    pub(crate) backends: Vec<RemovedBackend>,
    pub(crate) listeners: Vec<Arc<ListenerState>>,
}

#[derive(Debug)]
pub(crate) struct RemovedBackend {
    pub(crate) state: Arc<BackendState>,
    pub(crate) drain_timeout: Duration,
}

/// How often shutdown looks at what is left.
const SHUTDOWN_TICK: Duration = Duration::from_millis(20);

impl Ballast {
    /// A ballast for `config`, as generation 1, not yet serving anything.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Ballast {
        let registry = Registry::default();
        let routing = Routing::build(config, 1, &registry);
        let metrics = registry.metrics();
        metrics.config_generation.set(1);
        metrics.config_last_reload_success.set(unix_now());
        let last_loaded = config_path.as_ref().and_then(|p| std::fs::read(p).ok());
        let plane = DataPlane::new(
            Arc::new(ArcSwap::from_pointee(routing)),
            Arc::new(Conns::default()),
        );
        Ballast {
            inner: Arc::new(Inner {
                plane,
                registry,
                config_path,
                ready: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
                listeners: Mutex::new(HashMap::new()),
                spawner: Mutex::new(None),
                removed: Mutex::new(Removed::default()),
                reload_lock: Mutex::new(()),
                last_loaded: Mutex::new(last_loaded),
                routing_swapped: tokio::sync::Notify::new(),
                resolve_now: tokio::sync::Notify::new(),
                cluster: Mutex::new(None),
                leave: watch::channel(cluster::Leave::Staying).0,
                stopped: watch::channel(false).0,
            }),
        }
    }

    /// The current routing snapshot. Hold the `Arc` as long as you like; it does not
    /// block reloads.
    pub fn routing(&self) -> Arc<Routing> {
        self.inner.plane.routing()
    }

    /// Every open client connection.
    pub fn conns(&self) -> &Arc<Conns> {
        self.inner.plane.conns()
    }

    pub(crate) fn swap_routing(&self, routing: Routing) {
        self.inner.plane.swap_routing(routing);
        // Backends the new snapshot adds are checked at once, not at the next nap's end.
        self.inner.routing_swapped.notify_one();
    }

    /// Resolves after the next routing swap (or at once if one happened since the last
    /// call). Cancel-safe; meant for one waiter, the health checker.
    pub(crate) async fn routing_swapped(&self) {
        self.inner.routing_swapped.notified().await
    }

    /// Asks the discovery loop to resolve every entry now.
    pub(crate) fn resolve_now(&self) {
        self.inner.resolve_now.notify_one();
    }

    /// Resolves when [`Ballast::resolve_now`] was called (once per call, or at once if
    /// it was called since). Meant for one waiter, the discovery loop.
    pub(crate) async fn resolve_asked(&self) {
        self.inner.resolve_now.notified().await
    }

    /// The cluster as the latest report round saw it; `None` without `[cluster]`.
    pub fn cluster_view(&self) -> Option<cluster::ClusterView> {
        self.inner
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Turns from `Staying` when shutdown asks the cluster's task to leave.
    pub(crate) fn leave_signal(&self) -> watch::Receiver<cluster::Leave> {
        self.inner.leave.subscribe()
    }

    /// The cluster's task has taken this instance's report out (or given up).
    pub(crate) fn left(&self) {
        self.inner.leave.send_replace(cluster::Leave::Done);
    }

    pub(crate) fn set_cluster_view(&self, view: Option<cluster::ClusterView>) {
        *self.inner.cluster.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }

    pub fn config_path(&self) -> Option<&PathBuf> {
        self.inner.config_path.as_ref()
    }

    /// The bearer token every admin POST needs, when `admin.token_file` is set.
    pub fn admin_token(&self) -> Option<String> {
        self.routing()
            .config
            .admin
            .as_ref()
            .and_then(|a| a.token.clone())
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn removed(&self) -> MutexGuard<'_, Removed> {
        self.inner.removed.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_last_loaded(&self, content: &[u8]) {
        let mut last = self
            .inner
            .last_loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *last = Some(content.to_vec());
    }

    pub(crate) fn is_last_loaded(&self, content: &[u8]) -> bool {
        let last = self
            .inner
            .last_loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        last.as_deref() == Some(content)
    }

    pub(crate) fn lock_reload(&self) -> MutexGuard<'_, ()> {
        self.inner
            .reload_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<String, ListenerHandle>> {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Runs accept loops and connections on `workers` (the binary's worker threads).
    pub fn set_workers(&self, workers: &crate::workers::Workers) {
        let mut spawner = self.inner.spawner.lock().unwrap_or_else(|e| e.into_inner());
        *spawner = Some(Arc::new(Spread::new(workers.handles().to_vec())));
    }

    /// The worker runtimes that carry connections, once there are any.
    pub(crate) fn spread(&self) -> Option<Arc<Spread>> {
        self.inner
            .spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Live connections on each worker runtime.
    pub fn worker_loads(&self) -> Vec<usize> {
        let spawner = self.inner.spawner.lock().unwrap_or_else(|e| e.into_inner());
        spawner.as_ref().map(|s| s.loads()).unwrap_or_default()
    }

    /// Resolves when shutdown is complete.
    pub fn stopped_signal(&self) -> watch::Receiver<bool> {
        self.inner.stopped.subscribe()
    }

    /// Sets the runtime on which accept loops run (the current one, when called from
    /// inside a runtime and nothing was set before).
    pub fn set_spawner(&self, handle: Handle) {
        let mut spawner = self.inner.spawner.lock().unwrap_or_else(|e| e.into_inner());
        spawner.get_or_insert_with(|| Arc::new(Spread::new(vec![handle])));
    }

    /// Starts the accept loop of listener `name` on `socket` (already bound).
    pub fn open_listener(
        &self,
        name: &str,
        bind: SocketAddr,
        socket: std::net::TcpListener,
    ) -> std::io::Result<SocketAddr> {
        if self.is_shutting_down() {
            return Err(std::io::Error::other("ballast is shutting down"));
        }
        let local = socket.local_addr()?;
        let spread = {
            let mut spawner = self.inner.spawner.lock().unwrap_or_else(|e| e.into_inner());
            if spawner.is_none() {
                *spawner = Handle::try_current()
                    .ok()
                    .map(|handle| Arc::new(Spread::new(vec![handle])));
            }
            spawner
                .clone()
                .ok_or_else(|| std::io::Error::other("no runtime to run listeners on"))?
        };
        // Every loop registers the socket with its own runtime first: a failure starts
        // none of them.
        let mut loops = Vec::new();
        for handle in spread.handles() {
            let _entered = handle.enter();
            loops.push(tokio::net::TcpListener::from_std(socket.try_clone()?)?);
        }
        let (stop, stop_rx) = watch::channel(false);
        for (worker, listener) in loops.into_iter().enumerate() {
            spread.handle(worker).spawn(proxy::serve(
                listener,
                name.to_string(),
                self.inner.plane.clone(),
                stop_rx.clone(),
                proxy::Worker {
                    index: worker,
                    spread: Arc::clone(&spread),
                },
            ));
        }
        let kept = socket;
        let old = self.handles().insert(
            name.to_string(),
            ListenerHandle {
                bind,
                local,
                socket: kept,
                stop,
            },
        );
        if let Some(old) = old {
            old.stop.send_replace(true);
        }
        Ok(local)
    }

    /// Stops the accept loop of listener `name`; its connections are not touched.
    pub(crate) fn close_listener(&self, name: &str) {
        if let Some(handle) = self.handles().remove(name) {
            handle.stop.send_replace(true);
        }
    }

    /// Another handle on the socket of running listener `name`.
    pub fn clone_socket(&self, name: &str) -> Option<std::net::TcpListener> {
        self.handles()
            .get(name)
            .and_then(|h| h.socket.try_clone().ok())
    }

    /// The config bind address of every running accept loop, by listener name.
    pub fn listener_binds(&self) -> HashMap<String, SocketAddr> {
        self.handles()
            .iter()
            .map(|(n, h)| (n.clone(), h.bind))
            .collect()
    }

    /// The address listener `name` really listens on, once bound.
    pub fn bound_addr(&self, name: &str) -> Option<SocketAddr> {
        self.handles().get(name).map(|h| h.local)
    }

    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Relaxed);
        systemd::notify("READY=1");
    }

    /// Every listener is bound and no shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed) && !self.is_shutting_down()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Client connections open right now, over all listeners (removed ones too).
    pub fn active_connections(&self) -> u64 {
        self.conns().len() as u64
    }

    /// Stops every accept loop; connections are not touched.
    pub fn stop_accepting(&self) {
        for (_, handle) in self.handles().drain() {
            handle.stop.send_replace(true);
        }
    }

    /// Graceful shutdown: `/readyz` turns 503 and listeners stop accepting. Open
    /// connections get the first part of `timeout` to end by themselves; those left are
    /// then closed cleanly, oldest first, spread over the window a drain would use
    /// (a quarter of `timeout`, 100 ms to 5 s), so that their clients do not all
    /// reconnect elsewhere in the same instant; whatever is still ending at `timeout` is
    /// cut. Returns as soon as the last connection has ended, and within `timeout`.
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        systemd::notify("STOPPING=1");
        self.stop_accepting();
        let open = self.active_connections();
        tracing::info!(
            open,
            ?timeout,
            "shutting down: waiting for open connections"
        );
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let window = drain::spread_window(timeout).min(timeout / 2);
        // Closes must leave the clean finish (a frame in flight, Close frames) a moment
        // before the deadline cuts it.
        let finish = (timeout / 10).min(Duration::from_secs(1));
        let closes_end = deadline - finish;
        // What is still ending then is cut, and has the rest of the time to go.
        let cut_at = deadline - finish / 2;
        let closes_start = closes_end.checked_sub(window).unwrap_or(start).max(start);
        let mut announced = false;
        loop {
            let now = tokio::time::Instant::now();
            if self.conns().is_empty() {
                break;
            }
            if now >= cut_at {
                let cut = self.conns().ask_all(Ask::Abort(EndReason::Shutdown));
                tracing::info!(cut, "shutdown_timeout reached: cutting what is left");
                // Aborted connections drop their sockets at their next poll.
                self.wait_for_idle(deadline.saturating_duration_since(now))
                    .await;
                break;
            }
            if now >= closes_start {
                if !announced {
                    tracing::info!(
                        open = self.active_connections(),
                        over = ?closes_end.saturating_duration_since(now),
                        "closing open connections"
                    );
                    announced = true;
                }
                let remaining = closes_end.saturating_duration_since(now);
                let share = |left| drain::share_now(left, SHUTDOWN_TICK, remaining);
                self.conns().close_share(share, EndReason::Shutdown);
            }
            tokio::time::sleep(SHUTDOWN_TICK.min(cut_at.saturating_duration_since(now))).await;
        }
        // Peers stop counting this instance's connections now, not at peer_ttl: its
        // report goes before the process can end.
        if self.routing().config.cluster.is_some() {
            self.inner.leave.send_replace(cluster::Leave::Asked);
            let mut left = self.inner.leave.subscribe();
            let done = left.wait_for(|l| *l == cluster::Leave::Done);
            let _ = tokio::time::timeout(cluster::WITHDRAW_WAIT * 2, done).await;
        }
        self.inner.stopped.send_replace(true);
    }

    /// Closes every connection at once, with no grace: the operator's second SIGTERM.
    pub fn close_all_now(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        self.stop_accepting();
        let cut = self.conns().ask_all(Ask::Abort(EndReason::Shutdown));
        tracing::info!(cut, "closing every connection now");
    }

    /// Waits until no connection is open; `false` when `timeout` passed first.
    async fn wait_for_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.conns().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The text of `GET /metrics`: gauges that describe the current snapshot (up,
    /// draining, weight, imbalance, generation) are set first, then all is encoded.
    pub fn render_metrics(&self) -> String {
        let routing = self.routing();
        for l in &routing.listeners {
            for b in &l.backends {
                let m = b.state.metrics();
                // As the status says it: an agent's `down` and an ejection are not up, an
                // agent's `drain` is draining.
                let phase = b.phase();
                let out = matches!(phase, Phase::Down | Phase::Ejected { .. });
                m.up.set(i64::from(b.state.is_up() && !out));
                m.draining.set(i64::from(phase.as_str() == "draining"));
                m.weight.set(i64::from(b.config.weight));
                m.effective_weight.set(
                    b.effective_weight(l.config.slow_start) as f64
                        / crate::balancer::WEIGHT_SCALE as f64,
                );
                b.state.publish_bytes();
            }
            l.state.metrics().imbalance.set(l.imbalance());
        }
        for removed in &self.removed().backends {
            removed.state.metrics().draining.set(1);
            removed.state.publish_bytes();
        }
        let metrics = self.inner.registry.metrics();
        metrics.config_generation.set(routing.generation as i64);
        // Concurrent scrapes each add a disjoint part: the counter never counts twice.
        metrics
            .log_lines_dropped
            .inc_by(crate::logging::newly_dropped_lines());
        metrics.encode()
    }

    /// The JSON of `GET /api/v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let routing = self.routing();
        let clustered = routing.config.cluster.is_some();
        let listeners: Vec<serde_json::Value> = routing
            .listeners
            .iter()
            .map(|l| {
                let backends: Vec<serde_json::Value> = l
                    .backends
                    .iter()
                    .map(|b| {
                        let mut backend = serde_json::json!({
                            "name": b.config.name,
                            "addr": b.config.addr_text,
                            "weight": b.config.weight,
                            "effective_weight": b.effective_weight(l.config.slow_start) as f64
                                / crate::balancer::WEIGHT_SCALE as f64,
                            "max_conns": b.config.max_conns,
                            "agent_max_conns": b.state.agent_max_conns(),
                            "state": b.phase().as_str(),
                            "since": rfc3339(b.state.since()),
                            "last_check_failure": b.state.last_failure().map(|f| {
                                serde_json::json!({ "at": rfc3339(f.at), "reason": f.reason })
                            }),
                            "active": b.state.active(),
                            "total": b.state.total(),
                        });
                        if clustered {
                            backend["cluster_active"] = b.cluster_active().into();
                        }
                        backend
                    })
                    .collect();
                let bind = self.bound_addr(&l.config.name).unwrap_or(l.config.bind);
                serde_json::json!({
                    "name": l.config.name,
                    "bind": bind.to_string(),
                    "strategy": l.config.strategy.to_string(),
                    "active": l.state.active(),
                    "backends": backends,
                })
            })
            .collect();
        let mut status =
            serde_json::json!({ "generation": routing.generation, "listeners": listeners });
        if clustered {
            let view = self.cluster_view().unwrap_or_default();
            let peers: Vec<serde_json::Value> = view
                .peers
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "instance": p.instance,
                        "age_seconds": p.written.elapsed().as_secs_f64(),
                    })
                })
                .collect();
            status["cluster"] = serde_json::json!({ "up": view.up, "peers": peers });
        }
        status
    }
}
