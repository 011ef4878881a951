//! One listener's accept loop and the life of one client connection:
//! accept -> limits -> pick -> connect (timeout, retries) -> relay -> account.
//!
//! The first pick happens in the accept loop, before the connection's task is spawned,
//! and the pick immediately counts against the chosen backend. Picks of one listener are
//! therefore serialised and each one sees the counts of all the picks before it, so
//! `least_conn` fills exactly even under a burst of new connections.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::relay::{Relay, RelayEnd, Stop};
use crate::routing::ListenerRoute;
use crate::state::{BackendGuard, ListenerGuard, RejectReason};
use crate::Ballast;

/// TCP keepalive on both sides of every connection: probe after 60 s of silence, every
/// 10 s, give up after 6 unanswered probes.
pub(crate) const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// How long the accept loop pauses after running out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` for the listener called `name` until `shutdown`
/// turns true. Never returns early on an accept error: a transient one (EMFILE, ...) is
/// logged and retried after a short pause.
pub async fn serve(
    listener: TcpListener,
    name: String,
    ballast: Ballast,
    mut shutdown: watch::Receiver<bool>,
) {
    match listener.local_addr() {
        Ok(addr) => info!(listener = %name, %addr, "listener bound"),
        Err(_) => info!(listener = %name, "listener bound"),
    }
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => admit(&ballast, &name, client, peer),
            Err(e) if is_resource_exhaustion(&e) => {
                warn!(listener = %name, error = %e, "accept failed; pausing");
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
            Err(e) => debug!(listener = %name, error = %e, "accept failed"),
        }
    }
    info!(listener = %name, "stopped accepting connections");
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Applies the listener's limits and the first pick, then hands the connection to its
/// own task. Runs in the accept loop: no awaits.
fn admit(ballast: &Ballast, name: &str, client: TcpStream, peer: SocketAddr) {
    let routing = ballast.routing();
    let Some(route) = routing.listener(name).cloned() else {
        // The listener left the config; its accept loop is being stopped.
        return;
    };
    drop(routing);
    if route
        .config
        .max_conns
        .is_some_and(|max| route.state.active() >= max)
    {
        route.state.record_refused_at_accept(RejectReason::MaxConns);
        debug!(listener = %name, client = %peer, "rejected: listener at max_conns");
        return;
    }
    let Some(first) = route.pick(peer.ip(), &[]) else {
        route
            .state
            .record_refused_at_accept(RejectReason::NoBackend);
        warn!(listener = %name, client = %peer, "rejected: no backend available");
        return;
    };
    let listener_guard = route.state.accept();
    let backend_guard = route.backends[first].state.acquire();
    let span = tracing::info_span!("conn", listener = %name, client = %peer);
    let stop = ballast.close_signal();
    tokio::spawn(
        async move {
            let _listener_guard: ListenerGuard = listener_guard;
            proxy(route, client, peer, first, backend_guard, stop).await;
        }
        .instrument(span),
    );
}

/// Connects to the picked backend (or, failing that, up to `retries` others) and relays.
async fn proxy(
    route: Arc<ListenerRoute>,
    client: TcpStream,
    peer: SocketAddr,
    first: usize,
    first_guard: BackendGuard,
    mut stop: watch::Receiver<bool>,
) {
    let connected = tokio::select! {
        connected = connect(&route, peer, first, first_guard) => connected,
        _ = stop.wait_for(|stop| *stop) => return,
    };
    let Some((index, guard, backend)) = connected else {
        route.state.record_rejected(RejectReason::NoBackend);
        warn!("no backend could be reached; closing the client");
        return;
    };
    let state = Arc::clone(guard.backend());
    // In the backend's registry from here on, so a drain deadline can close it.
    let registration = state.register();
    debug!(backend = %route.backends[index].config.name, "connected");
    // The client socket has these from its listener (see `bind_one`). Long-lived
    // connections to a peer that vanished without a FIN end in minutes, not never, even
    // without idle_timeout.
    let _ = backend.set_nodelay(true);
    let _ = socket2::SockRef::from(&backend).set_tcp_keepalive(&KEEPALIVE);
    let mut relay = Relay::new(client, backend);
    let end = relay
        .run(
            &|n| state.add_sent(n),
            &|n| state.add_received(n),
            route.config.idle_timeout,
            async {
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => {}
                    () = registration.closed() => {}
                }
                Stop::Close
            },
        )
        .await;
    // The sockets close here, before the counts drop.
    drop(relay);
    match end {
        RelayEnd::Closed { .. } => debug!("closed"),
        RelayEnd::Idle => debug!("closed after idle_timeout"),
        RelayEnd::Stopped | RelayEnd::Parked => debug!("closed by ballast"),
        RelayEnd::Failed { side, error } => debug!(?side, error = %error, "closed on error"),
    }
    drop(registration);
    drop(guard);
}

/// Tries the picked backend, then up to `retries` other available ones. The client is
/// not touched until a backend answers, so it sees no error while any backend is
/// reachable.
async fn connect(
    route: &ListenerRoute,
    peer: SocketAddr,
    first: usize,
    first_guard: BackendGuard,
) -> Option<(usize, BackendGuard, TcpStream)> {
    let mut tried = vec![first];
    let mut attempt = Some((first, first_guard));
    while let Some((index, guard)) = attempt.take() {
        let backend = &route.backends[index];
        let addr = backend.config.addr;
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(route.config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                backend.state.record_connected(started.elapsed());
                return Some((index, guard, stream));
            }
            Ok(Err(e)) => {
                warn!(backend = %backend.config.name, %addr, error = %e, "connect failed")
            }
            Err(_) => warn!(
                backend = %backend.config.name, %addr,
                timeout = ?route.config.connect_timeout, "connect timed out"
            ),
        }
        backend.state.record_connect_failure(started.elapsed());
        drop(guard);
        if tried.len() > route.config.retries as usize {
            break;
        }
        if let Some(next) = route.pick(peer.ip(), &tried) {
            tried.push(next);
            attempt = Some((next, route.backends[next].state.acquire()));
        }
    }
    None
}
