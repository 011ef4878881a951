//! The process shell: ballast inside pingora's `Server`.
//!
//! pingora-core runs each service on its own tokio runtime and handles the process
//! lifecycle. ballast runs two services:
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
//! Sockets are bound *before* the server starts (see [`crate::bind`], or
//! [`crate::upgrade::take_over`] for `run --upgrade`), so that a port in use is reported
//! as an error naming the listener, with exit code 2, instead of a panic inside a
//! service. Signals go through our own [`ShutdownSignalWatch`]: SIGHUP reloads; SIGTERM
//! and SIGINT both mean a graceful shutdown as the user-facing contract says; SIGQUIT
//! hands the listening sockets to a new process ([`crate::upgrade`]: why pingora's own
//! `GracefulUpgrade` does not do it), then shuts down gracefully as SIGTERM does. During
//! a graceful shutdown a SIGTERM or SIGINT closes every connection at once. The watch
//! hands control back to pingora only once every connection has ended (or
//! `shutdown_timeout` passed), so pingora's own runtime shutdown has nothing left to cut.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora_core::services::Service;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::{upgrade, Ballast, Bound};

/// Runs ballast for `config` (read from `path`) on already `bound` sockets until a
/// graceful shutdown ends. Blocks the calling thread. `false` when serving could not
/// start.
/// `upgraded`: the sockets were taken over from a running ballast, which waits for this
/// process to say it serves ([`upgrade::mark_ready`]).
pub fn run(config: Config, path: PathBuf, bound: Bound, upgraded: bool) -> bool {
    if upgraded {
        crate::systemd::wait_to_be_main();
    }
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
    // A second handle on the admin socket, to hand it over on SIGQUIT.
    let admin = config.admin.as_ref().map(|a| a.bind).and_then(|addr| {
        let socket = bound.admin.as_ref()?.try_clone();
        match socket {
            Ok(socket) => Some((addr, socket)),
            Err(e) => {
                warn!(error = %e, "the admin socket cannot be handed over on upgrade");
                None
            }
        }
    });
    let (admin_stop, admin_stopped) = watch::channel(false);
    let ballast = Ballast::new(config, Some(path));

    let conf = ServerConf {
        threads,
        // Our signal watch returns only after connections have ended, and always as a
        // FastShutdown; nothing to wait for.
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
        admin_stopped: Some(admin_stopped),
    });
    info!(version = crate::VERSION, threads, "ballast starting");
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signals = Signals {
        ballast,
        shutdown_timeout,
        ready: std::sync::Mutex::new(Some(ready_rx)),
        started: std::sync::Arc::clone(&started),
        admin: std::sync::Mutex::new(admin),
        admin_stop,
        upgraded,
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
    /// Stops the admin endpoint's accept loop; taken when the service starts.
    admin_stopped: Option<watch::Receiver<bool>>,
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
        let admin_stopped = self.admin_stopped.take();
        let mut tasks = JoinSet::new();
        crate::control::discover::first_pass(&self.ballast).await;
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
                    if let (Some(socket), Some(stopped)) = (admin_socket, admin_stopped) {
                        match tokio::net::TcpListener::from_std(socket) {
                            Ok(listener) => {
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

/// SIGHUP reloads; SIGTERM and SIGINT shut down gracefully, SIGQUIT after handing the
/// listening sockets over; either returns to pingora once that is complete.
struct Signals {
    ballast: Ballast,
    shutdown_timeout: Duration,
    /// Whether the proxy service started; a failure there ends the process.
    ready: std::sync::Mutex<Option<std::sync::mpsc::Receiver<bool>>>,
    /// Set once serving started, for the exit code.
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The admin endpoint's bind address and a second handle on its socket, to hand
    /// over; dropped once handed over, so that this process keeps no copy.
    admin: std::sync::Mutex<Option<(std::net::SocketAddr, std::net::TcpListener)>>,
    /// Stops the admin endpoint's accept loop: once the new process has its socket, and
    /// at the end of a shutdown.
    admin_stop: watch::Sender<bool>,
    /// Started by `run --upgrade`: the old process waits for the ready mark.
    upgraded: bool,
}

/// Why the signal loop ended.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGTERM or SIGINT (named): a graceful shutdown.
    Shutdown(&'static str),
    /// SIGQUIT, and the new process took the listening sockets.
    HandedOver,
}

/// How long connections closed by a second SIGTERM get before the runtime is dropped,
/// which closes what is left: enough for their FINs and WebSocket Close frames to go
/// out, not for peers to answer them.
const FORCED_CLOSE_WAIT: Duration = Duration::from_millis(500);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        // Handlers first: a signal sent as soon as ballast says it is ready (to systemd,
        // on /readyz) must find them, not the default action that ends the process.
        let signals = [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
            SignalKind::quit(),
            SignalKind::user_defined2(),
        ]
        .map(signal);
        let [mut term, mut int, mut hup, mut quit, mut usr2] = match signals {
            [Ok(term), Ok(int), Ok(hup), Ok(quit), Ok(usr2)] => [term, int, hup, quit, usr2],
            signals => {
                if let Some(Err(e)) = signals.into_iter().find(Result::is_err) {
                    error!(error = %e, "cannot install signal handlers; shutting down");
                }
                return ShutdownSignal::FastShutdown;
            }
        };
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
            if self.upgraded {
                let sock = self.ballast.routing().config.runtime.upgrade_sock.clone();
                // Listening for the established connections before saying it serves:
                // the old process hands them over as soon as it sees the mark.
                if let Err(e) = crate::control::handover::open_inbox(&self.ballast, &sock) {
                    warn!(
                        "upgrade: cannot take established connections on {} ({e}); the old process keeps them until they end",
                        crate::handover::inbox_path(&sock).display()
                    );
                }
                match upgrade::mark_ready(&sock) {
                    // The old process hands over from now on: systemd follows this one.
                    Ok(()) => crate::systemd::become_main(),
                    Err(e) => error!(
                        "upgrade: cannot tell the old process that this one serves ({}: {e}); it goes on serving too until it is sent SIGTERM",
                        upgrade::ready_mark(&sock).display()
                    ),
                }
            }
        }
        let stop = loop {
            tokio::select! {
                _ = term.recv() => break Stop::Shutdown("SIGTERM"),
                _ = int.recv() => break Stop::Shutdown("SIGINT"),
                _ = hup.recv() => {
                    info!(signal = "SIGHUP", "reloading the config");
                    let ballast = self.ballast.clone();
                    let _ = tokio::task::spawn_blocking(move || ballast.reload()).await;
                }
                _ = quit.recv() => {
                    // A hand-over may wait some 25 s for the new process: SIGTERM and
                    // SIGINT still stop this one meanwhile.
                    tokio::select! {
                        handed = self.hand_over() => if handed {
                            break Stop::HandedOver;
                        },
                        which = again(&mut term, &mut int) => break Stop::Shutdown(which),
                    }
                }
                _ = usr2.recv() => {
                    tokio::select! {
                        handed = self.start_new_binary() => if handed {
                            break Stop::HandedOver;
                        },
                        which = again(&mut term, &mut int) => break Stop::Shutdown(which),
                    }
                }
            }
        };
        match stop {
            Stop::Shutdown(which) => info!(signal = which, "graceful shutdown"),
            Stop::HandedOver => {
                // The new process answers on the admin address from now on.
                self.admin_stop.send_replace(true);
                // What remains is this process's own shutdown, not the service's. Not in
                // the middle of a reload, whose READY=1 would never come.
                let ballast = self.ballast.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let _reloads = ballast.lock_reload();
                    crate::systemd::step_down();
                })
                .await;
                info!("upgrade: the new process serves; this one stops accepting, hands its established connections over and exits");
                self.ballast.stop_accepting();
                let sock = self.ballast.routing().config.runtime.upgrade_sock.clone();
                tokio::select! {
                    _ = crate::control::handover::send_connections(&self.ballast, &sock) => {}
                    which = again(&mut term, &mut int) => {
                        warn!(signal = which, "{which} during the hand-over: closing every connection still here now");
                        self.ballast.conns().set_outbox(None);
                        self.ballast.close_all_now();
                    }
                }
            }
        }
        tokio::select! {
            () = self.ballast.shutdown(self.shutdown_timeout) => {}
            which = again(&mut term, &mut int) => {
                warn!(
                    signal = which,
                    open = self.ballast.active_connections(),
                    "{which} during the graceful shutdown: closing every connection now"
                );
                self.ballast.close_all_now();
                let deadline = tokio::time::Instant::now() + FORCED_CLOSE_WAIT;
                while self.ballast.active_connections() > 0
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        self.admin_stop.send_replace(true);
        // Every connection has ended: pingora may drop its runtimes at once.
        ShutdownSignal::FastShutdown
    }
}

/// The new process SIGUSR2 started: asked to stop (SIGTERM: it closes what it may have
/// accepted gracefully, and says nothing to systemd) if the upgrade does not go through,
/// whichever way this process stops waiting for it; kept once it serves. Reaped
/// whenever it exits while this process lives.
struct NewProcess {
    child: Option<std::process::Child>,
    /// `runtime.upgrade_sock`: what a stopped one may leave behind is removed.
    sock: PathBuf,
}

impl NewProcess {
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    fn keep(&mut self) {
        if let Some(child) = self.child.take() {
            reap(child, || {});
        }
    }
}

impl Drop for NewProcess {
    fn drop(&mut self) {
        let Some(child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let sock = self.sock.clone();
        reap(child, move || {
            // A socket it waited on, the connections' socket, its mark: a later
            // upgrade must not take them for another process's.
            let mark = upgrade::ready_mark(&sock);
            for path in [crate::handover::inbox_path(&sock), mark, sock] {
                let _ = std::fs::remove_file(path);
            }
            // Had it told systemd it took over (its mark came too late), this process
            // is the main one again.
            crate::systemd::notify(&format!("MAINPID={}", std::process::id()));
        });
    }
}

/// Waits for `child` on a thread of its own, then runs `then`. Without a thread to be had
/// (a limit on threads), the child is left to be reaped by whoever inherits it.
fn reap(mut child: std::process::Child, then: impl FnOnce() + Send + 'static) {
    let _ = std::thread::Builder::new()
        .name("ballast-reaper".into())
        .spawn(move || {
            let _ = child.wait();
            then();
        });
}

/// Resolves with the signal's name on the next SIGTERM or SIGINT. Cancel-safe.
async fn again(term: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

impl Signals {
    /// SIGUSR2 (nginx's signal for it): starts the binary this process was started as
    /// (its path as given, so a package's new binary at that path), with this process's
    /// arguments and `--upgrade`, as a child (so that under systemd it runs in the
    /// service's cgroup and may send `MAINPID=`), waits until it waits on
    /// `runtime.upgrade_sock`, then hands everything over as SIGQUIT does. `false`,
    /// logged, when the new binary did not start or exited: this one goes on serving.
    async fn start_new_binary(&self) -> bool {
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if args.is_empty() {
            error!(
                signal = "SIGUSR2",
                "upgrade: cannot tell which binary this is; still serving"
            );
            return false;
        }
        let exe = args.remove(0);
        if !args.iter().any(|a| a == "--upgrade") {
            args.push("--upgrade".into());
        }
        let sock = self.ballast.routing().config.runtime.upgrade_sock.clone();
        if std::fs::symlink_metadata(&sock).is_ok() {
            error!(
                signal = "SIGUSR2",
                "upgrade: {} exists: another `run --upgrade` waits there (send SIGQUIT instead), or one that died left it (remove it); still serving",
                sock.display()
            );
            return false;
        }
        info!(signal = "SIGUSR2", binary = %exe.to_string_lossy(), "upgrade: starting the new binary");
        let child = std::process::Command::new(&exe)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => NewProcess {
                child: Some(child),
                sock: sock.clone(),
            },
            Err(e) => {
                error!(
                    "upgrade: cannot start {} ({e}); still serving",
                    exe.to_string_lossy()
                );
                return false;
            }
        };
        // The new process creates the socket when it waits on it.
        let deadline = tokio::time::Instant::now() + upgrade::TAKEN_WITHIN;
        let waiting = loop {
            if std::fs::symlink_metadata(&sock).is_ok() {
                break true;
            }
            if child.exited() || tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !waiting {
            error!(
                "upgrade: the new binary did not wait on {} (see its log above); still serving",
                sock.display()
            );
            return false;
        }
        let handed = self.hand_over().await;
        if handed {
            child.keep();
        }
        handed
    }

    /// SIGQUIT: sends every listening socket to the process waiting on
    /// `runtime.upgrade_sock` (as the config reads now: a reload of the file applies) and
    /// waits until it has taken them. `false`, logged, when there is no such process or
    /// it did not take them: this one goes on serving then.
    async fn hand_over(&self) -> bool {
        let path = self.ballast.routing().config.runtime.upgrade_sock.clone();
        let shown = path.display().to_string();
        info!(
            signal = "SIGQUIT",
            "upgrade: handing the listening sockets over on {shown}"
        );
        let admin = {
            let admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            admin
                .as_ref()
                .and_then(|(addr, socket)| Some((*addr, socket.try_clone().ok()?)))
        };
        let ballast = self.ballast.clone();
        let sent = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                // No reload adds or moves a listener while the table is made and sent.
                let _reloads = ballast.lock_reload();
                let sockets = upgrade::listening_sockets(
                    &ballast,
                    admin.as_ref().map(|(addr, socket)| (*addr, socket)),
                );
                let keys: Vec<&str> = sockets.iter().map(|(key, _)| key.as_str()).collect();
                upgrade::send(&path, &sockets).map(|()| (sockets.len(), keys.join(", ")))
            })
            .await
        };
        match sent {
            Ok(Ok((n, keys))) => {
                info!("upgrade: handed {n} listening sockets over on {shown}: {keys}")
            }
            Ok(Err(e)) => {
                error!("{e}; still serving");
                return false;
            }
            Err(e) => {
                error!("upgrade: the hand-over on {shown} failed ({e}); still serving");
                return false;
            }
        }
        if !upgrade::taken(&path, upgrade::TAKEN_WITHIN).await {
            error!(
                "upgrade: the new process did not take the listening sockets within {}s ({shown} is still there); still serving",
                upgrade::TAKEN_WITHIN.as_secs()
            );
            return false;
        }
        // Until the new process serves, this one accepts on its copies of the sockets
        // (one accept queue): a new process that fails now leaves nothing refused.
        if !upgrade::serving(&path, upgrade::SERVES_WITHIN).await {
            error!(
                "upgrade: the new process took the listening sockets but did not say it serves within {}s (no {}); still serving",
                upgrade::SERVES_WITHIN.as_secs(),
                upgrade::ready_mark(&path).display()
            );
            return false;
        }
        // This process keeps no copy of the admin socket; the listeners' go at shutdown.
        drop(self.admin.lock().unwrap_or_else(|e| e.into_inner()).take());
        true
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
