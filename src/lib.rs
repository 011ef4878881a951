//! ballast: a layer-4 (TCP) load balancer that balances on live connection counts.
//!
//! The architecture in a paragraph: a validated [`config::Config`] is joined with the
//! runtime state of the [`state::Registry`] into an immutable [`routing::Routing`]
//! snapshot, held in one `ArcSwap` inside [`Ballast`]. Each listener runs an accept loop
//! ([`proxy::serve`]) that loads the snapshot, applies limits, picks a backend with the
//! listener's [`balancer`] strategy and spawns one task per connection: connect (with
//! timeout and retries), then [`relay`] bytes both ways. Live counts, health and drain
//! state are atomics in the registry, which outlives config snapshots. [`health`] probes
//! backends; [`admin`] serves the HTTP admin endpoint. The binary wraps this library in
//! pingora's process shell ([`shell`]); tests drive it directly with [`start`] on
//! listeners bound to `127.0.0.1:0`.

#![deny(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod config;
pub mod demo;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod routing;
pub mod shell;
pub mod state;
pub mod status;
pub mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::routing::Routing;
use crate::state::Registry;

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
    /// Every listener is bound (for `/readyz`).
    ready: AtomicBool,
    /// Graceful shutdown has begun (`/readyz` answers 503).
    shutting_down: AtomicBool,
    /// The address each listener actually listens on (differs from the config for port 0).
    bound: Mutex<HashMap<String, SocketAddr>>,
    /// Turns true when listeners must stop accepting.
    stop_accepting: watch::Sender<bool>,
    /// Turns true when every open connection must be closed.
    close_all: watch::Sender<bool>,
    /// Turns true when shutdown is complete; background loops (admin, health) end then.
    stopped: watch::Sender<bool>,
}

impl Ballast {
    /// A ballast for `config`, as generation 1, not yet serving anything.
    pub fn new(config: Config) -> Ballast {
        let registry = Registry::default();
        let routing = Routing::build(config, 1, &registry);
        let metrics = registry.metrics();
        metrics.config_generation.set(1);
        metrics.config_last_reload_success.set(unix_now());
        Ballast {
            inner: Arc::new(Inner {
                routing: ArcSwap::from_pointee(routing),
                registry,
                ready: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
                bound: Mutex::new(HashMap::new()),
                stop_accepting: watch::channel(false).0,
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

    /// Resolves when listeners must stop accepting.
    pub fn accept_signal(&self) -> watch::Receiver<bool> {
        self.inner.stop_accepting.subscribe()
    }

    /// Resolves when every open connection must be closed.
    pub fn close_signal(&self) -> watch::Receiver<bool> {
        self.inner.close_all.subscribe()
    }

    /// Resolves when shutdown is complete.
    pub fn stopped_signal(&self) -> watch::Receiver<bool> {
        self.inner.stopped.subscribe()
    }

    pub fn set_bound(&self, listener: &str, addr: SocketAddr) {
        let mut bound = self.inner.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.insert(listener.to_string(), addr);
    }

    /// The address listener `name` really listens on, once bound.
    pub fn bound_addr(&self, name: &str) -> Option<SocketAddr> {
        let bound = self.inner.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.get(name).copied()
    }

    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Relaxed);
    }

    /// Every listener is bound and no shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed) && !self.is_shutting_down()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Client connections open right now, over all listeners.
    pub fn active_connections(&self) -> u64 {
        self.routing()
            .listeners
            .iter()
            .map(|l| l.state.active())
            .sum()
    }

    /// Graceful shutdown: `/readyz` turns 503, listeners stop accepting, open connections
    /// get up to `timeout` to end by themselves, then the rest are closed. Returns as
    /// soon as the last connection has ended.
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        self.inner.stop_accepting.send_replace(true);
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
            self.wait_for_idle(Duration::from_secs(5)).await;
        }
        self.inner.stopped.send_replace(true);
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
        let metrics = self.inner.registry.metrics();
        metrics.config_generation.set(routing.generation as i64);
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

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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
        let socket = bind_one(l.bind).map_err(|source| BindError {
            what: "listener",
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        listeners.push((l.name.clone(), socket));
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

/// A non-blocking listening socket with `SO_REUSEADDR` (so a restart does not wait for
/// TIME_WAIT) and a deep accept backlog.
fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
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
/// checks and the admin endpoint.
pub async fn start(config: Config) -> Result<Running, BindError> {
    let bound = bind(&config)?;
    let ballast = Ballast::new(config);
    let mut tasks = JoinSet::new();
    for (name, socket) in bound.listeners {
        let listener = tokio::net::TcpListener::from_std(socket).map_err(|source| BindError {
            what: "listener",
            name: name.clone(),
            addr: ballast
                .routing()
                .listener(&name)
                .map(|l| l.config.bind)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })?;
        if let Ok(addr) = listener.local_addr() {
            ballast.set_bound(&name, addr);
        }
        tasks.spawn(proxy::serve(
            listener,
            name,
            ballast.clone(),
            ballast.accept_signal(),
        ));
    }
    let mut admin_addr = None;
    if let Some(socket) = bound.admin {
        let listener = tokio::net::TcpListener::from_std(socket).map_err(|source| BindError {
            what: "admin",
            name: "admin".into(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        admin_addr = listener.local_addr().ok();
        tasks.spawn(admin::serve(
            listener,
            ballast.clone(),
            ballast.stopped_signal(),
        ));
    }
    tasks.spawn(health::run(ballast.clone(), ballast.stopped_signal()));
    ballast.set_ready();
    Ok(Running {
        ballast,
        admin_addr,
        tasks,
    })
}
