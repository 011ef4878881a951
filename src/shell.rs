//! The process shell: ballast inside pingora's `Server`.
//!
//! pingora-core runs each service on its own tokio runtime with its own worker threads,
//! handles the process lifecycle and will carry the listening sockets over to a new
//! process on upgrade. ballast adds one pingora service per listener (each running
//! [`proxy::serve`]) and one admin service (the admin endpoint and health checks).
//!
//! Sockets are bound *before* the server starts (see [`crate::bind`]), so that a port in
//! use is reported as an error naming the listener, with exit code 2, instead of a panic
//! inside a service. Signals go through our own [`ShutdownSignalWatch`]: SIGTERM and
//! SIGINT both mean a graceful shutdown as the user-facing contract says, and that watch
//! only hands control back to pingora once every connection has ended (or
//! `shutdown_timeout` passed), so pingora's own runtime shutdown has nothing left to cut.

use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora_core::services::Service;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

use crate::config::Config;
use crate::{admin, health, proxy, Ballast, Bound};

/// Runs ballast for `config` on already `bound` sockets until a graceful shutdown ends.
/// Blocks the calling thread.
pub fn run(config: Config, bound: Bound) {
    let threads = match config.runtime.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let shutdown_timeout = config.runtime.shutdown_timeout;
    let ballast = Ballast::new(config);

    let conf = ServerConf {
        threads,
        // Our signal watch returns only after connections have ended; nothing to wait for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    for (name, socket) in bound.listeners {
        if let Ok(addr) = socket.local_addr() {
            ballast.set_bound(&name, addr);
        }
        server.add_service(ListenerService {
            service_name: format!("listener {name}"),
            listener: name,
            socket: Some(socket),
            ballast: ballast.clone(),
            threads,
        });
    }
    server.add_service(AdminService {
        socket: bound.admin,
        ballast: ballast.clone(),
    });
    ballast.set_ready();
    info!(version = crate::VERSION, threads, "ballast started");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            ballast,
            shutdown_timeout,
        }),
    });
    info!("ballast stopped");
}

/// One listener: its accept loop on its own runtime.
struct ListenerService {
    listener: String,
    /// pingora names threads after the service.
    service_name: String,
    /// Taken when the service starts.
    socket: Option<std::net::TcpListener>,
    ballast: Ballast,
    threads: usize,
}

#[async_trait]
impl Service for ListenerService {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        match tokio::net::TcpListener::from_std(socket) {
            Ok(listener) => {
                let stop = self.ballast.accept_signal();
                proxy::serve(listener, self.listener.clone(), self.ballast.clone(), stop).await;
            }
            Err(e) => error!(listener = %self.listener, error = %e, "cannot serve listener"),
        }
    }

    fn name(&self) -> &str {
        &self.service_name
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }
}

/// The admin endpoint and the health checks, on one small runtime.
struct AdminService {
    socket: Option<std::net::TcpListener>,
    ballast: Ballast,
}

#[async_trait]
impl Service for AdminService {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let health = tokio::spawn(health::run(
            self.ballast.clone(),
            self.ballast.stopped_signal(),
        ));
        if let Some(socket) = self.socket.take() {
            match tokio::net::TcpListener::from_std(socket) {
                Ok(listener) => {
                    let stopped = self.ballast.stopped_signal();
                    admin::serve(listener, self.ballast.clone(), stopped).await;
                }
                Err(e) => error!(error = %e, "cannot serve the admin endpoint"),
            }
        }
        let _ = health.await;
    }

    fn name(&self) -> &str {
        "admin"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

/// SIGTERM and SIGINT: graceful shutdown, returning to pingora once it is complete.
struct Signals {
    ballast: Ballast,
    shutdown_timeout: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                error!(error = %e, "cannot install signal handlers; shutting down");
                return ShutdownSignal::FastShutdown;
            }
        };
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = which, "graceful shutdown");
        self.ballast.shutdown(self.shutdown_timeout).await;
        // Every connection has ended: pingora may drop its runtimes at once.
        ShutdownSignal::FastShutdown
    }
}
