//! ballast: a layer-4 (TCP) load balancer that balances on live connection counts.
//!
//! The architecture in a paragraph. The **data plane** ([`proxy`], [`stage`], [`relay`],
//! [`websocket`], [`conn`]) carries connections: each listener's accept loop registers a
//! connection in the [`conn::Conns`] table, reads what a [`stage`] before the pick needs,
//! picks a backend with the listener's [`balancer`] strategy, connects, and relays until
//! the connection ends with one [`conn::EndReason`]. It sees only a
//! [`proxy::DataPlane`]: an immutable [`routing::Routing`] snapshot (config joined with
//! the runtime [`state`], which outlives snapshots) and the connection table. The
//! **control plane** ([`control`]: [`control::Ballast`], reload, health, drain,
//! rebalance, shutdown) swaps snapshots, writes backend state and ends connections only
//! through the table; [`admin`] serves the HTTP admin endpoint over it. The binary wraps
//! this library in pingora's process shell ([`shell`]); tests drive it directly with
//! [`start`] on listeners bound to `127.0.0.1:0`.
//!
//! The connection path may import: `conn`, `stage`, `proxy_protocol`, `relay`, `splice`, `websocket`,
//! `routing`, `balancer`, `state`, `workers`, `config` (read only), `metrics` (through
//! `state`) and `logging` — never `control`, `admin` or `shell`.

#![deny(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod config;
pub mod conn;
pub mod control;
pub mod demo;
pub mod handover;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod routing;
pub mod shell;
pub mod splice;
pub mod stage;
pub mod state;
pub mod status;
pub mod systemd;
pub mod upgrade;
pub mod websocket;
pub mod workers;

pub use control::{drain, health, rebalance, reload, Ballast};
pub use listen::{bind, BindError, Bound};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinSet;

use crate::config::Config;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    control::discover::first_pass(&ballast).await;
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
    tasks.spawn(control::agent::run(
        ballast.clone(),
        ballast.stopped_signal(),
    ));
    tasks.spawn(drain::run(ballast.clone(), ballast.stopped_signal()));
    tasks.spawn(rebalance::run(ballast.clone(), ballast.stopped_signal()));
    tasks.spawn(control::discover::run(
        ballast.clone(),
        ballast.stopped_signal(),
    ));
    tasks.spawn(control::cluster::run(
        ballast.clone(),
        ballast.stopped_signal(),
    ));
    if let Some(path) = ballast.config_path().cloned() {
        tasks.spawn(reload::watch_file(
            ballast.clone(),
            path,
            ballast.stopped_signal(),
        ));
    }
    Ok(())
}
