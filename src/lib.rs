//! ballast: a layer-4 (TCP) load balancer that balances on live connection counts.
//!
//! The architecture in a paragraph: a validated [`config::Config`] is joined with the
//! runtime state of the [`state::Registry`] into an immutable [`routing::Routing`]
//! snapshot, held in one `ArcSwap` inside [`Ballast`]. Each listener runs an accept loop
//! ([`proxy::serve`]) that loads the snapshot, applies limits, picks a backend with the
//! listener's [`balancer`] strategy and spawns one task per connection: connect (with
//! timeout and retries), then [`relay`] bytes both ways. Live counts, health and drain
//! state are atomics in the registry, which outlives config snapshots. [`health`] probes
//! backends; [`drain`] enforces drain deadlines; [`rebalance`] migrates connections
//! away from overloaded backends; [`reload`] swaps in a new config; [`admin`] serves the
//! HTTP admin endpoint. The binary wraps this library in
//! pingora's process shell ([`shell`]); tests drive it directly with [`start`] on
//! listeners bound to `127.0.0.1:0`.

#![deny(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod config;
pub mod demo;
pub mod drain;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod rebalance;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod shell;
pub mod state;
pub mod status;
pub mod systemd;
pub mod upgrade;
pub mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::routing::Routing;
use crate::state::{BackendState, ListenerState, Registry};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The shared heart of a running ballast: routing table, runtime state, lifecycle flags.
/// Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub struct Ballast {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The whole routing table; replaced as a whole by a reload.
    routing: ArcSwap<Routing>,
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
    /// The runtime that accept loops run on (listeners that a reload adds too).
    spawner: Mutex<Option<Handle>>,
    /// Backends and listeners that left the config and still have connections.
    removed: Mutex<Removed>,
    /// One reload at a time.
    reload_lock: Mutex<()>,
    /// The config file's content as last read, so that the file watcher does not reload
    /// a file that SIGHUP or the API already did.
    last_loaded: Mutex<Option<Vec<u8>>>,
    /// Wakes the health checker when a reload swapped the routing snapshot.
    routing_swapped: tokio::sync::Notify,
    /// Turns true when every open connection must be closed.
    close_all: watch::Sender<bool>,
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

impl Ballast {
    /// A ballast for `config`, as generation 1, not yet serving anything.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Ballast {
        let registry = Registry::default();
        let routing = Routing::build(config, 1, &registry);
        let metrics = registry.metrics();
        metrics.config_generation.set(1);
        metrics.config_last_reload_success.set(unix_now());
        let last_loaded = config_path.as_ref().and_then(|p| std::fs::read(p).ok());
        Ballast {
            inner: Arc::new(Inner {
                routing: ArcSwap::from_pointee(routing),
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
                close_all: watch::channel(false).0,
                stopped: watch::channel(false).0,
            }),
        }
    }

    /// The current routing snapshot. Hold the `Arc` as long as you like; it does not
    /// block reloads.
    pub fn routing(&self) -> Arc<Routing> {
        self.inner.routing.load_full()
    }

    pub(crate) fn swap_routing(&self, routing: Routing) {
        self.inner.routing.store(Arc::new(routing));
        // Backends the new snapshot adds are checked at once, not at the next nap's end.
        self.inner.routing_swapped.notify_one();
    }

    /// Resolves after the next routing swap (or at once if one happened since the last
    /// call). Cancel-safe; meant for one waiter, the health checker.
    pub(crate) async fn routing_swapped(&self) {
        self.inner.routing_swapped.notified().await
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

    /// Resolves when every open connection must be closed.
    pub fn close_signal(&self) -> watch::Receiver<bool> {
        self.inner.close_all.subscribe()
    }

    /// Resolves when shutdown is complete.
    pub fn stopped_signal(&self) -> watch::Receiver<bool> {
        self.inner.stopped.subscribe()
    }

    /// Sets the runtime on which accept loops run (the current one, when called from
    /// inside a runtime and nothing was set before).
    pub fn set_spawner(&self, handle: Handle) {
        let mut spawner = self.inner.spawner.lock().unwrap_or_else(|e| e.into_inner());
        spawner.get_or_insert(handle);
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
        let kept = socket.try_clone()?;
        let handle = {
            let spawner = self.inner.spawner.lock().unwrap_or_else(|e| e.into_inner());
            spawner.clone().or_else(|| Handle::try_current().ok())
        }
        .ok_or_else(|| std::io::Error::other("no runtime to run listeners on"))?;
        let listener = {
            let _entered = handle.enter();
            tokio::net::TcpListener::from_std(socket)?
        };
        let local = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        handle.spawn(proxy::serve(
            listener,
            name.to_string(),
            self.clone(),
            stop_rx,
        ));
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
    pub(crate) fn clone_socket(&self, name: &str) -> Option<std::net::TcpListener> {
        self.handles()
            .get(name)
            .and_then(|h| h.socket.try_clone().ok())
    }

    /// The config bind address of every running accept loop, by listener name.
    pub(crate) fn listener_binds(&self) -> HashMap<String, SocketAddr> {
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
        self.inner.registry.active_connections()
    }

    /// Graceful shutdown: `/readyz` turns 503, listeners stop accepting, open connections
    /// get up to `timeout` to end by themselves, then the rest are closed. Returns as
    /// soon as the last connection has ended.
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        systemd::notify("STOPPING=1");
        for (_, handle) in self.handles().drain() {
            handle.stop.send_replace(true);
        }
        tracing::info!(
            open = self.active_connections(),
            ?timeout,
            "shutting down: waiting for open connections"
        );
        if !self.wait_for_idle(timeout).await {
            tracing::info!(
                open = self.active_connections(),
                "shutdown_timeout reached: closing open connections"
            );
            self.inner.close_all.send_replace(true);
            // Connections end cleanly: frames in flight complete, peers get to close.
            self.wait_for_idle(Duration::from_secs(15)).await;
        }
        self.inner.stopped.send_replace(true);
    }

    /// Closes every open connection now, whatever a graceful shutdown in progress was
    /// waiting for (a second SIGTERM: the operator means it).
    pub fn close_all_now(&self) {
        self.inner.close_all.send_replace(true);
    }

    /// Waits until no connection is open, polling every few milliseconds; `false` when
    /// `timeout` passed first.
    async fn wait_for_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.active_connections() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The text of `GET /metrics`: gauges that describe the current snapshot (up,
    /// draining, weight, imbalance, generation) are set first, then all is encoded.
    pub fn render_metrics(&self) -> String {
        let routing = self.routing();
        for l in &routing.listeners {
            for b in &l.backends {
                let m = b.state.metrics();
                m.up.set(i64::from(b.state.is_up()));
                m.draining.set(i64::from(b.is_draining()));
                m.weight.set(i64::from(b.config.weight));
            }
            l.state.metrics().imbalance.set(l.imbalance());
        }
        for removed in &self.removed().backends {
            removed.state.metrics().draining.set(1);
        }
        let metrics = self.inner.registry.metrics();
        metrics.config_generation.set(routing.generation as i64);
        // Concurrent scrapes each add a disjoint part: the counter never counts twice.
        metrics
            .log_lines_dropped
            .inc_by(logging::newly_dropped_lines());
        metrics.encode()
    }

    /// The JSON of `GET /api/v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let routing = self.routing();
        let listeners: Vec<serde_json::Value> = routing
            .listeners
            .iter()
            .map(|l| {
                let backends: Vec<serde_json::Value> = l
                    .backends
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "name": b.config.name,
                            "addr": b.config.addr_text,
                            "weight": b.config.weight,
                            "max_conns": b.config.max_conns,
                            "state": b.status().as_str(),
                            "since": rfc3339(b.state.since()),
                            "last_check_failure": b.state.last_failure().map(|f| {
                                serde_json::json!({ "at": rfc3339(f.at), "reason": f.reason })
                            }),
                            "active": b.state.active(),
                            "total": b.state.total(),
                        })
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
        serde_json::json!({ "generation": routing.generation, "listeners": listeners })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_read_as_rfc_3339_in_utc() {
        assert_eq!(super::rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_411_208_123);
        assert_eq!(super::rfc3339(t), "2026-11-23T05:20:08.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(super::rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `time` as RFC 3339 in UTC with millisecond precision: `2026-11-23T05:20:08.123Z`.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// A listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?}: cannot listen on {addr}: {source}")]
pub struct BindError {
    /// `"listener"` or `"admin"`.
    pub what: &'static str,
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Sockets bound for a config, before anything serves on them.
#[derive(Debug)]
pub struct Bound {
    /// (listener name, socket), in config order.
    pub listeners: Vec<(String, std::net::TcpListener)>,
    pub admin: Option<std::net::TcpListener>,
}

/// Binds every listener and the admin endpoint of `config`. The first failure is
/// returned naming the listener and the address; nothing stays bound then.
pub fn bind(config: &Config) -> Result<Bound, BindError> {
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        listeners.push((l.name.clone(), bind_listener(l)?));
    }
    let admin = match &config.admin {
        Some(admin) => Some(bind_one(admin.bind).map_err(|source| BindError {
            what: "admin",
            name: "admin".into(),
            addr: admin.bind,
            source,
        })?),
        None => None,
    };
    Ok(Bound { listeners, admin })
}

/// Binds one listener's address; the error names the listener.
pub(crate) fn bind_listener(
    l: &config::ListenerConfig,
) -> Result<std::net::TcpListener, BindError> {
    bind_one(l.bind).map_err(|source| BindError {
        what: "listener",
        name: l.name.clone(),
        addr: l.bind,
        source,
    })
}

/// A non-blocking listening socket with `SO_REUSEADDR` (so a restart does not wait for
/// TIME_WAIT), a deep accept backlog, and the options every client socket should have.
pub(crate) fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these (Linux copies them from the listener), which saves
    // five setsockopt() calls per client connection.
    socket.set_nodelay(true)?;
    socket.set_tcp_keepalive(&proxy::KEEPALIVE)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A ballast serving on the current tokio runtime: what tests and embedders use.
#[derive(Debug)]
pub struct Running {
    pub ballast: Ballast,
    admin_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
}

impl Running {
    /// The address listener `name` listens on.
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        self.ballast
            .bound_addr(name)
            .unwrap_or_else(|| panic!("no listener named {name:?}"))
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Graceful shutdown with `timeout` for open connections; waits for every task.
    pub async fn shutdown(mut self, timeout: Duration) {
        self.ballast.shutdown(timeout).await;
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Binds and serves `config` on the current tokio runtime: every listener, health
/// checks, the drain supervisor and the admin endpoint. With `config_path`, reloads
/// read that file, and it is watched for changes.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Running, StartError> {
    let bound = bind(&config)?;
    let ballast = Ballast::new(config, config_path);
    ballast.set_spawner(Handle::current());
    let mut tasks = JoinSet::new();
    let admin_addr = bound.admin.as_ref().and_then(|s| s.local_addr().ok());
    serve(&ballast, bound, &mut tasks)?;
    ballast.set_ready();
    Ok(Running {
        ballast,
        admin_addr,
        tasks,
    })
}

/// Why ballast could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("listener {name:?}: cannot serve: {source}")]
    Serve {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Starts the accept loops on `bound` sockets and the background tasks (admin endpoint,
/// health checks, drain supervisor, config file watcher) into `tasks`.
pub fn serve(ballast: &Ballast, bound: Bound, tasks: &mut JoinSet<()>) -> Result<(), StartError> {
    let routing = ballast.routing();
    for (name, socket) in bound.listeners {
        let bind = routing
            .listener(&name)
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |l| l.config.bind);
        ballast
            .open_listener(&name, bind, socket)
            .map_err(|source| StartError::Serve {
                name: name.clone(),
                source,
            })?;
    }
    if let Some(socket) = bound.admin {
        let listener = {
            let _entered = Handle::current().enter();
            tokio::net::TcpListener::from_std(socket)
        }
        .map_err(|source| StartError::Serve {
            name: "admin".into(),
            source,
        })?;
        tasks.spawn(admin::serve(
            listener,
            ballast.clone(),
            ballast.stopped_signal(),
        ));
    }
    tasks.spawn(health::run(ballast.clone(), ballast.stopped_signal()));
    tasks.spawn(drain::run(ballast.clone(), ballast.stopped_signal()));
    tasks.spawn(rebalance::run(ballast.clone(), ballast.stopped_signal()));
    if let Some(path) = ballast.config_path().cloned() {
        tasks.spawn(reload::watch_file(
            ballast.clone(),
            path,
            ballast.stopped_signal(),
        ));
    }
    Ok(())
}
