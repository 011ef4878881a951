//! The process shell: ballast inside pingora's `Server`.
//!
//! pingora-core runs each service on its own tokio runtime, handles the process
//! lifecycle and will carry listening sockets over to a new process on upgrade. ballast
//! runs two services:
//!
//! - `proxy`, with `runtime.threads` worker threads: the accept loop of every listener
//!   and every proxied connection. Listeners that a reload adds are started on this
//!   runtime too. (One pingora service per listener cannot work for listeners that come
//!   and go: pingora fixes its services when the server starts, and each service would
//!   bring `threads` more worker threads.)
//!   Health checks, the drain supervisor and the config file watcher run there too.
//! - the admin endpoint, on a thread and runtime of its own, so that a busy proxy never
//!   delays `/metrics` or `/readyz`.
//!
//! Sockets are bound *before* the server starts (see [`crate::bind`]), so that a port in
//! use is reported as an error naming the listener, with exit code 2, instead of a panic
//! inside a service. Signals go through our own [`ShutdownSignalWatch`]: SIGHUP reloads;
//! SIGTERM and SIGINT both mean a graceful shutdown as the user-facing contract says, and
//! the watch hands control back to pingora only once every connection has ended (or
//! `shutdown_timeout` passed), so pingora's own runtime shutdown has nothing left to cut.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora_core::services::Service;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tracing::{error, info};

use crate::config::Config;
use crate::{Ballast, Bound};

/// Runs ballast for `config` (read from `path`) on already `bound` sockets until a
/// graceful shutdown ends. Blocks the calling thread. `false` when serving could not
/// start.
pub fn run(config: Config, path: PathBuf, bound: Bound) -> bool {
    let threads = match config.runtime.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // pingora builds its runtimes with `expect`: a thread it cannot start aborts the
    // process. Find out first, and end with the reason instead.
    if let Err(e) = try_threads(threads + EXTRA_THREADS, WORKER_STACK) {
        error!(
            "cannot start {threads} worker threads (runtime.threads = {}): {e}; lower runtime.threads, or raise the limits on threads or memory (ulimit -u, ulimit -v; TasksMax=, MemoryMax= for a service)",
            config.runtime.threads
        );
        return false;
    }
    let shutdown_timeout = config.runtime.shutdown_timeout;
    let ballast = Ballast::new(config, Some(path));

    let conf = ServerConf {
        threads,
        // Our signal watch returns only after connections have ended; nothing to wait for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    server.add_service(ProxyService {
        ballast: ballast.clone(),
        bound: Some(bound),
        threads,
        ready: Some(ready_tx),
    });
    info!(version = crate::VERSION, threads, "ballast starting");
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signals = Signals {
        ballast,
        shutdown_timeout,
        ready: std::sync::Mutex::new(Some(ready_rx)),
        started: std::sync::Arc::clone(&started),
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    info!("ballast stopped");
    started.load(std::sync::atomic::Ordering::Relaxed)
}

/// Threads started besides the workers: pingora's main runtime, the control plane's,
/// the admin thread, the config file watcher's and one of tokio's blocking pool (the
/// reload).
const EXTRA_THREADS: usize = 5;

/// The stack of a tokio worker thread (tokio's default).
const WORKER_STACK: usize = 2 << 20;

/// Starts `n` threads with `stack` bytes of stack each, all alive at once, then ends
/// them: what a thread limit (`ulimit -u`, a cgroup's `pids.max`) or a memory limit
/// would refuse to the runtimes is refused here, as an error.
fn try_threads(n: usize, stack: usize) -> std::io::Result<()> {
    let mut started = Vec::with_capacity(n);
    let mut result = Ok(());
    for _ in 0..n {
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("ballast-probe".into())
            .stack_size(stack)
            .spawn(move || {
                // Returns when the sender is dropped.
                let _ = held.recv();
            });
        match spawned {
            Ok(thread) => started.push((hold, thread)),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    for (hold, thread) in started {
        drop(hold);
        let _ = thread.join();
    }
    result
}

/// Every listener's accept loop and connections; starts the admin side on a runtime of
/// its own.
struct ProxyService {
    ballast: Ballast,
    /// Taken when the service starts.
    bound: Option<Bound>,
    threads: usize,
    /// Says whether every listener is being served.
    ready: Option<std::sync::mpsc::Sender<bool>>,
}

#[async_trait]
impl Service for ProxyService {
    async fn start_service(
        &mut self,
        _fds: Option<ListenFds>,
        _shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(mut bound) = self.bound.take() else {
            return;
        };
        match crate::workers::Workers::start(self.threads) {
            Ok(workers) => self.ballast.set_workers(&workers),
            Err(e) => {
                error!(error = %e, "cannot start the worker threads");
                if let Some(ready) = self.ready.take() {
                    let _ = ready.send(false);
                }
                return;
            }
        }
        self.ballast.set_spawner(tokio::runtime::Handle::current());
        let admin_socket = bound.admin.take();
        let mut tasks = JoinSet::new();
        let started = crate::serve(&self.ballast, bound, &mut tasks);
        if let Err(e) = &started {
            error!(error = %e, "cannot start");
        }
        // The admin side gets a small runtime of its own, so that a busy proxy never
        // delays /metrics or health checks.
        let ballast = self.ballast.clone();
        let admin = std::thread::Builder::new()
            .name("ballast-admin".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => return error!(error = %e, "cannot start the admin runtime"),
                };
                runtime.block_on(async move {
                    let mut tasks = JoinSet::new();
                    if let Some(socket) = admin_socket {
                        match tokio::net::TcpListener::from_std(socket) {
                            Ok(listener) => {
                                let stopped = ballast.stopped_signal();
                                tasks.spawn(crate::admin::serve(
                                    listener,
                                    ballast.clone(),
                                    stopped,
                                ));
                            }
                            Err(e) => error!(error = %e, "cannot serve the admin endpoint"),
                        }
                    }
                    while tasks.join_next().await.is_some() {}
                });
            });
        if let Err(e) = &admin {
            error!(error = %e, "cannot start the admin thread");
        }
        // Without its admin thread ballast would serve with no /metrics or /readyz:
        // that is a failed start too.
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(started.is_ok() && admin.is_ok());
        }
        while tasks.join_next().await.is_some() {}
    }

    fn name(&self) -> &str {
        "proxy"
    }

    fn threads(&self) -> Option<usize> {
        // The control plane (health checks, drain, rebalance, reloads); connections run
        // on the workers.
        Some(1)
    }
}

/// SIGHUP reloads; SIGTERM and SIGINT shut down gracefully and return to pingora once
/// that is complete.
struct Signals {
    ballast: Ballast,
    shutdown_timeout: Duration,
    /// Whether the proxy service started; a failure there ends the process.
    ready: std::sync::Mutex<Option<std::sync::mpsc::Receiver<bool>>>,
    /// Set once serving started, for the exit code.
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let ready = self.ready.lock().ok().and_then(|mut r| r.take());
        if let Some(ready) = ready {
            let started = tokio::task::spawn_blocking(move || ready.recv().unwrap_or(false)).await;
            if !matches!(started, Ok(true)) {
                return ShutdownSignal::FastShutdown;
            }
            self.started
                .store(true, std::sync::atomic::Ordering::Relaxed);
            self.ballast.set_ready();
            info!("ready");
        }
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (mut term, mut int, mut hup) = match signals {
            (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                error!(error = %e, "cannot install signal handlers; shutting down");
                return ShutdownSignal::FastShutdown;
            }
        };
        let which = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    info!(signal = "SIGHUP", "reloading the config");
                    let ballast = self.ballast.clone();
                    let _ = tokio::task::spawn_blocking(move || ballast.reload()).await;
                }
            }
        };
        info!(signal = which, "graceful shutdown");
        self.ballast.shutdown(self.shutdown_timeout).await;
        // Every connection has ended: pingora may drop its runtimes at once.
        ShutdownSignal::FastShutdown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_the_machine_can_start_pass_the_probe() {
        assert!(try_threads(8, WORKER_STACK).is_ok());
    }

    #[test]
    fn a_thread_the_machine_cannot_start_is_an_error_not_an_abort() {
        // A petabyte of stack fits no address space.
        let err = try_threads(3, 1 << 50).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
