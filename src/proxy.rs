//! The data plane: one listener's accept loop and the life of one client connection.
//!
//! accept -> register -> (stage) -> limits -> pick -> connect (timeout, retries) -> relay
//! -> end, with one [`EndReason`].
//!
//! The connection path gets a [`DataPlane`] and nothing else: the routing snapshot, the
//! connection table, and the pause that local resource exhaustion imposes. It never sees
//! the control plane (reload, health, drain, admin): those drive it through the same
//! snapshot and table.
//!
//! Without a stage before the pick, the first pick happens in the accept loop, before the
//! connection's task is spawned, and counts against the chosen backend at once; every
//! pick of a listener holds the listener's pick lock, so each one sees the counts of all
//! the picks before it and `least_conn` fills exactly even under a burst of new
//! connections. The task starts on the worker that accepted the connection, or on the
//! least loaded one when that worker is ahead ([`crate::workers`]); it stays there.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::SendProxy;
use crate::conn::{Ask, Conn, Conns, EndReason, Handoff};
use crate::handover::{Handed, Parked};
use crate::proxy_protocol;
use crate::relay::{Relay, RelayEnd, Side, Stop};
use crate::routing::{ListenerRoute, Routing};
use crate::stage;
use crate::state::{BackendGuard, BackendState, ClientGuard, ListenerGuard, RejectReason};
use crate::workers::{OnWorker, Spread};

/// TCP keepalive on both sides of every connection: probe after 60 s of silence, every
/// 10 s, give up after 6 unanswered probes.
pub(crate) const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// How long accept loops pause after running out of file descriptors or memory.
const BACKOFF: Duration = Duration::from_millis(100);

/// What the connection path may use.
#[derive(Clone, Debug)]
pub struct DataPlane {
    routing: Arc<ArcSwap<Routing>>,
    conns: Arc<Conns>,
    pressure: Arc<Pressure>,
}

impl DataPlane {
    pub fn new(routing: Arc<ArcSwap<Routing>>, conns: Arc<Conns>) -> DataPlane {
        DataPlane {
            routing,
            conns,
            pressure: Arc::new(Pressure::default()),
        }
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    pub fn conns(&self) -> &Arc<Conns> {
        &self.conns
    }

    /// Puts a new routing snapshot in place (the control plane's reload).
    pub(crate) fn swap_routing(&self, routing: Routing) {
        self.routing.store(Arc::new(routing));
    }
}

/// When local resources (file descriptors, memory, ports) ran out: accepting pauses
/// for a moment instead of taking connections it cannot serve.
#[derive(Debug)]
struct Pressure {
    epoch: Instant,
    /// Millis since `epoch` until which accepting pauses; 0 when it need not.
    until_ms: AtomicU64,
}

impl Default for Pressure {
    fn default() -> Pressure {
        Pressure {
            epoch: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl Pressure {
    fn note(&self) {
        let until = (self.epoch.elapsed() + BACKOFF).as_millis() as u64;
        self.until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// How long to pause before the next accept, if at all.
    fn pause(&self) -> Option<Duration> {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// The peer reset the connection.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Out of file descriptors, memory, buffers or local ports: this machine's trouble, not
/// a backend's.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// The worker an accept loop runs on.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its place in `spread`.
    pub index: usize,
    pub spread: Arc<Spread>,
}

/// Accepts connections on `listener` for the listener called `name` until `stop` turns
/// true; each connection runs on this loop's worker, or on the least loaded one when
/// this one is ahead. Several loops (one per worker) serve one listening socket; the
/// first worker's speaks for them in the logs. Never returns early on an accept error:
/// a transient one (EMFILE, ...) is logged and retried after a short pause.
pub async fn serve(
    listener: TcpListener,
    name: String,
    plane: DataPlane,
    mut stop: watch::Receiver<bool>,
    worker: Worker,
) {
    let first = worker.index == 0;
    if first {
        match listener.local_addr() {
            Ok(addr) => info!(listener = %name, %addr, "listener bound"),
            Err(_) => info!(listener = %name, "listener bound"),
        }
    }
    loop {
        if let Some(pause) = plane.pressure.pause() {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let on_worker = worker.spread.place(worker.index);
                let client = if on_worker.worker() == worker.index {
                    Accepted::Here(client)
                } else {
                    // Unregistered here, registered on its worker.
                    match client.into_std() {
                        Ok(client) => Accepted::Moving(client),
                        Err(e) => {
                            warn!(listener = %name, client = %peer, error = %e, "cannot pass a connection to another worker; closed");
                            continue;
                        }
                    }
                };
                admit(&plane, &name, client, peer, &worker.spread, on_worker);
            }
            Err(e) if is_local_exhaustion(&e) => {
                warn!(listener = %name, error = %e, "accept failed; pausing");
                plane.pressure.note();
            }
            Err(e) => debug!(listener = %name, error = %e, "accept failed"),
        }
    }
    if first {
        info!(listener = %name, "stopped accepting connections");
    }
}

/// An accepted client socket: registered with the runtime of the worker that accepted
/// it, or on its way to another worker's.
#[derive(Debug)]
enum Accepted {
    Here(TcpStream),
    Moving(std::net::TcpStream),
}

/// Registers the connection and, without a stage before the pick, applies the client
/// rules, the limits and the first pick; then starts the connection's task on its
/// worker. No awaits.
fn admit(
    plane: &DataPlane,
    name: &str,
    client: Accepted,
    peer: SocketAddr,
    spread: &Spread,
    on_worker: OnWorker,
) {
    let routing = plane.routing();
    let Some(mut route) = routing.listener(name).cloned() else {
        // The listener left the config; its accept loop is being stopped.
        return;
    };
    drop(routing);
    let conn = plane.conns.open(&route.state, peer);
    let accepted = route.state.accept();
    // Borrowed from the accept loop: no handle is cloned per connection.
    let handle = spread.handle(on_worker.worker());
    let Some(stage) = route.stage.clone() else {
        match pick_newest(plane, &mut route, &conn) {
            Ok(picked) => {
                let pressure = Arc::clone(&plane.pressure);
                handle.spawn(async move {
                    let _on_worker = on_worker;
                    let Some(client) = registered(client, &route, &conn) else {
                        return;
                    };
                    proxy(&pressure, &route, conn, accepted, client, None, picked).await;
                });
            }
            Err(ended) => end(&route, &conn, &ended),
        }
        return;
    };
    if !stage.admits(peer.ip()) {
        debug!(listener = %route.config.name, client = %peer, "refused: not an address this listener takes connections from");
        return end(&route, &conn, &turned_away(&route, stage.refusal()));
    }
    let pressure = Arc::clone(&plane.pressure);
    let plane = plane.clone();
    handle.spawn(async move {
        let mut route = route;
        let _on_worker = on_worker;
        let Some(client) = registered(client, &route, &conn) else {
            return;
        };
        let hello = tokio::select! {
            hello = stage::read(&client, peer, stage.as_ref()) => hello,
            ask = conn.wait_end() => return end(&route, &conn, &Ended::refused(ask.reason())),
        };
        let hello = match hello {
            Ok(hello) => {
                // One form for one client: an IPv4-mapped address is its IPv4 address.
                conn.set_client(SocketAddr::new(hello.client.ip().to_canonical(), hello.client.port()));
                hello
            }
            Err(e) => {
                debug!(listener = %route.config.name, client = %peer, error = %e, "ended before the pick");
                let ended = match e {
                    stage::StageError::Closed => Ended::refused(EndReason::ClientClosed),
                    stage::StageError::Io(_) => Ended::refused(EndReason::Error),
                    _ => turned_away(&route, stage.refusal()),
                };
                return end(&route, &conn, &ended);
            }
        };
        // The stage may have waited seconds for its bytes: the pick is made on the routing
        // in place now, as for a connection accepted now.
        if let Some(newer) = newest_alike(&plane, &route) {
            route = newer;
        }
        match pick_newest(&plane, &mut route, &conn) {
            Ok(picked) => {
                proxy(&pressure, &route, conn, accepted, client, Some(hello), picked).await
            }
            Err(ended) => end(&route, &conn, &ended),
        }
    });
}

/// `client` registered with the runtime this runs on; `None`, the connection ended,
/// when it cannot be (the kernel's limit on watched descriptors).
fn registered(client: Accepted, route: &ListenerRoute, conn: &Conn) -> Option<TcpStream> {
    let moving = match client {
        Accepted::Here(client) => return Some(client),
        Accepted::Moving(client) => client,
    };
    match TcpStream::from_std(moving) {
        Ok(client) => Some(client),
        Err(e) => {
            warn!(listener = %route.config.name, client = %conn.client(), error = %e, "cannot serve the connection");
            end(route, conn, &Ended::refused(EndReason::Error));
            None
        }
    }
}

/// [`pick_first`] on `route`, or, when it has no backend left, on the listener's route in
/// the newest routing snapshot, which then becomes the connection's. A reload or a DNS
/// change that replaced every backend swapped it in after this connection loaded its
/// own, and took the old backends out of service: the connection goes to the new ones
/// instead of being refused.
fn pick_newest(
    plane: &DataPlane,
    route: &mut Arc<ListenerRoute>,
    conn: &Conn,
) -> Result<Picked, Ended> {
    let ended = match pick_first(route, conn) {
        Err(ended) if ended.reason == EndReason::NoBackend => ended,
        picked => return picked,
    };
    let again = match newest_alike(plane, route) {
        Some(newer) => {
            *route = newer;
            pick_first(route, conn)
        }
        None => Err(ended),
    };
    if let Err(ended) = &again {
        if ended.reason == EndReason::NoBackend {
            route.state.record_rejected(RejectReason::NoBackend);
            warn!(listener = %route.config.name, client = %conn.client(), "refused: no backend available");
        }
    }
    again
}

/// The listener's route in the newest routing snapshot, when it is a newer one than
/// `route` and reads connections the same way before the pick: the same listener and the
/// same stage, which the connection already went through (or none).
fn newest_alike(plane: &DataPlane, route: &Arc<ListenerRoute>) -> Option<Arc<ListenerRoute>> {
    let newer = plane.routing().listener(&route.config.name).cloned()?;
    let alike = !Arc::ptr_eq(&newer, route)
        && Arc::ptr_eq(&newer.state, &route.state)
        && newer.config.accept_proxy == route.config.accept_proxy;
    alike.then_some(newer)
}

/// A connection that passed the listener's rules and limits, and the backend first
/// picked for it.
#[derive(Debug)]
struct Picked {
    first: usize,
    guard: BackendGuard,
    /// Its place in its address's count, with `max_conns_per_ip`.
    _per_ip: Option<ClientGuard>,
}

/// The listener's rules for the client (`deny`, `allow`), its limits
/// (`max_conns_per_ip`, `max_conns`) and the first pick, which counts against the
/// backend at once. All see the client's real address (`Conn::client`).
fn pick_first(route: &ListenerRoute, conn: &Conn) -> Result<Picked, Ended> {
    let client = conn.client().ip();
    if !route.config.clients.permits(client) {
        debug!(listener = %route.config.name, client = %conn.client(), "refused: address not allowed");
        return Err(turned_away(route, RejectReason::Denied));
    }
    let per_ip = match route.config.max_conns_per_ip {
        None => None,
        Some(max) => match route.state.enter_client(client, max) {
            Some(guard) => Some(guard),
            None => {
                debug!(listener = %route.config.name, client = %conn.client(), "refused: address at max_conns_per_ip");
                return Err(turned_away(route, RejectReason::PerIpLimit));
            }
        },
    };
    if route
        .config
        .max_conns
        .is_some_and(|max| route.state.active() > max)
    {
        route.state.record_rejected(RejectReason::MaxConns);
        debug!(listener = %route.config.name, client = %conn.client(), "refused: listener at max_conns");
        return Err(Ended::refused(EndReason::Limit));
    }
    let Some((first, guard)) = route.pick_and_acquire(client, &[]) else {
        return Err(Ended::refused(EndReason::NoBackend));
    };
    conn.set_backend(guard.backend());
    Ok(Picked {
        first,
        guard,
        _per_ip: per_ip,
    })
}

/// A connection the listener turns away for `why`: counted, and ended as a limit with
/// `why` in its access log line.
fn turned_away(route: &ListenerRoute, why: RejectReason) -> Ended {
    route.state.record_rejected(why);
    Ended {
        refusal: Some(why),
        ..Ended::refused(EndReason::Limit)
    }
}

/// How a connection ended, for its metrics and its access log line.
#[derive(Debug)]
struct Ended {
    reason: EndReason,
    /// Why the listener turned it away, where the access log says more than `reason`
    /// (`denied`, `per_ip_limit`, `proxy_protocol`).
    refusal: Option<RejectReason>,
    /// The backend it was relayed to, once connected.
    backend: Option<Via>,
    /// How long the successful connect took.
    connect: Option<Duration>,
    /// Bytes delivered: (to the backend, to the client).
    bytes: (u64, u64),
}

impl Ended {
    /// The access log's `reason`.
    fn logged_reason(&self) -> &'static str {
        self.refusal
            .map_or(self.reason.as_str(), RejectReason::as_str)
    }

    fn refused(reason: EndReason) -> Ended {
        Ended {
            reason,
            refusal: None,
            backend: None,
            connect: None,
            bytes: (0, 0),
        }
    }
}

/// Connects to the picked backend (or, failing that, up to `retries` others) and relays
/// until the connection ends; then accounts for it.
async fn proxy(
    pressure: &Pressure,
    route: &ListenerRoute,
    conn: Conn,
    accepted: ListenerGuard,
    client: TcpStream,
    hello: Option<stage::Hello>,
    picked: Picked,
) {
    let Picked {
        first,
        guard: first_guard,
        _per_ip: per_ip,
    } = picked;
    // Boxed: the connect phase's state is freed once connected, not carried for the
    // connection's whole life.
    let connected = Box::pin(async {
        tokio::select! {
            connected = connect(pressure, route, &conn, first, first_guard) => connected,
            ask = conn.wait_end() => Err(ask.reason()),
        }
    })
    .await;
    let (index, guard, backend, took) = match connected {
        Ok(connected) => connected,
        Err(reason) => return end(route, &conn, &Ended::refused(reason)),
    };
    // An upstream's header that named nobody (its own health check) is passed on as one
    // that names nobody.
    let (early, named) = match hello {
        None => (Vec::new(), Named::Socket),
        Some(hello) if hello.nobody => (hello.early, Named::Nobody),
        Some(hello) => match hello.destination {
            Some(destination) => (hello.early, Named::Header(destination)),
            None => (hello.early, Named::Socket),
        },
    };
    let send_proxy = route.backends[index]
        .config
        .send_proxy
        .or(route.config.send_proxy);
    if let Some(version) = send_proxy {
        if let Err(e) = send_header(route, &conn, &client, &backend, version, named).await {
            debug!(listener = %route.config.name, client = %conn.client(), backend = %route.backends[index].config.name, error = %e, "cannot write the PROXY header");
            let ended = Ended {
                backend: Some(Via::Route(index)),
                connect: Some(took),
                ..Ended::refused(EndReason::BackendClosed)
            };
            return end(route, &conn, &ended);
        }
    }
    debug!(listener = %route.config.name, client = %conn.client(), backend = %route.backends[index].config.name, "connected");
    // The client socket has these from its listener (see `bind_one`). Long-lived
    // connections to a peer that vanished without a FIN end in minutes, not never, even
    // without idle_timeout.
    let _ = backend.set_nodelay(true);
    let _ = socket2::SockRef::from(&backend).set_tcp_keepalive(&KEEPALIVE);
    let relay = Relay::new(client, backend).with_early_bytes(early);
    let ended = relay_to_end(
        route,
        &conn,
        Via::Route(index),
        Some(took),
        relay,
        guard.backend(),
    )
    .await;
    end(route, &conn, &ended);
    drop(guard);
    drop(per_ip);
    drop(accepted);
}

/// What became of a parked relay given to an upgrade's hand-over.
enum Parking {
    Sent,
    /// Taken back: relay on.
    Back(Box<Relay>),
    Lost,
}

/// Gives a parked relay and what the connection path knows of its connection to the
/// hand-over ([`Conn::park`]).
async fn hand_off(
    route: &ListenerRoute,
    conn: &Conn,
    via: &Via,
    took: Option<Duration>,
    relay: Relay,
) -> Parking {
    let (client, backend, state) = relay.into_parts();
    let parked = Parked {
        handed: Handed {
            listener: route.config.name.clone(),
            backend: via.name(route).to_string(),
            client: conn.client(),
            age: conn.started.elapsed(),
            connect: took,
            relay: state,
        },
        client,
        backend,
    };
    match conn.park(parked).await {
        Handoff::Sent => Parking::Sent,
        Handoff::Back(back) => {
            conn.take_back();
            let Parked {
                handed,
                client,
                backend,
            } = *back;
            Parking::Back(Box::new(Relay::from_parts(client, backend, handed.relay)))
        }
        Handoff::Lost => Parking::Lost,
    }
}

/// A connection the process before this one handed over, registered here: its place in
/// the table, and its counts against the listener, its client address and its backend.
#[derive(Debug)]
pub(crate) struct Resumed {
    pub route: Arc<ListenerRoute>,
    pub conn: Conn,
    pub accepted: ListenerGuard,
    pub guard: BackendGuard,
    pub per_ip: Option<ClientGuard>,
    pub via: Via,
    pub connect: Option<Duration>,
}

/// Relays a [`Resumed`] connection from where it stood until it ends, then accounts for
/// it as any other. Runs on the worker whose runtime registers the sockets.
pub(crate) async fn resume(
    resumed: Resumed,
    client: std::net::TcpStream,
    backend: std::net::TcpStream,
    state: crate::relay::RelayState,
) {
    let Resumed {
        route,
        conn,
        accepted,
        guard,
        per_ip,
        via,
        connect,
    } = resumed;
    let registered =
        (|| Ok::<_, io::Error>((TcpStream::from_std(client)?, TcpStream::from_std(backend)?)))();
    let ended = match registered {
        Ok((client, backend)) => {
            let relay = Relay::from_parts(client, backend, state);
            relay_to_end(&route, &conn, via, connect, relay, guard.backend()).await
        }
        Err(e) => {
            warn!(listener = %route.config.name, client = %conn.client(), error = %e, "upgrade: cannot serve a connection handed over");
            Ended {
                backend: Some(via),
                connect,
                ..Ended::refused(EndReason::Error)
            }
        }
    };
    end(&route, &conn, &ended);
    drop(guard);
    drop(per_ip);
    drop(accepted);
}

/// A connected connection's backend: in its route, or, for a connection handed over by
/// the process before this one, a backend this config no longer has (it drains here).
/// Boxed where it is rare, so that every connection carries two words.
#[derive(Debug, Clone)]
pub(crate) enum Via {
    Route(usize),
    Gone(Box<(String, SocketAddr)>),
}

impl Via {
    /// The backend's index in the route, where it has one.
    fn index(&self) -> Option<usize> {
        match self {
            Via::Route(i) => Some(*i),
            Via::Gone(_) => None,
        }
    }

    fn name<'a>(&'a self, route: &'a ListenerRoute) -> &'a str {
        match self {
            Via::Route(i) => &route.backends[*i].config.name,
            Via::Gone(gone) => &gone.0,
        }
    }

    fn addr(&self, route: &ListenerRoute) -> SocketAddr {
        match self {
            Via::Route(i) => route.backends[*i].config.addr,
            Via::Gone(gone) => gone.1,
        }
    }
}

/// Relays until the connection ends, and says how it ended. Asked to park (an upgrade),
/// the relay stops at a safe point and the connection goes to the new process
/// ([`Conn::park`]); one taken back resumes here where it stood.
///
/// Not an `async fn`: one of those keeps its arguments apart from the locals it moves
/// them into, and every open connection would carry its relay twice. This future holds
/// the one it is given, in place.
#[allow(clippy::manual_async_fn)]
fn relay_to_end<'a>(
    route: &'a ListenerRoute,
    conn: &'a Conn,
    via: Via,
    took: Option<Duration>,
    mut relay: Relay,
    state: &'a Arc<BackendState>,
) -> impl Future<Output = Ended> + 'a {
    async move {
        let to_backend = |n| state.add_sent(n);
        // Passive ejection: the backend's first byte to its client is a success (a
        // connection handed over was answered long ago, or not by this process's backend).
        let answered =
            std::sync::atomic::AtomicBool::new(relay.totals().1 > 0 || via.index().is_none());
        let to_client = |n| {
            state.add_received(n);
            if route.config.outlier.is_some() && !answered.swap(true, Ordering::Relaxed) {
                if let Some(i) = via.index() {
                    route.observe(i, false);
                }
            }
        };
        let mut lost = false;
        let (end_of_relay, bytes) = loop {
            let stop = async {
                match conn.wait_ask(None).await {
                    Ask::Close(_) => Stop::Close,
                    Ask::Abort(_) => Stop::Abort,
                    Ask::Park => Stop::Park,
                }
            };
            let end_of_relay = tokio::select! {
                end = relay.run(&to_backend, &to_client, route.config.idle_timeout, stop) => end,
                // A clean close still finishing when an abort comes: the sockets go now.
                () = wait_abort(conn) => RelayEnd::Stopped,
            };
            let bytes = relay.totals();
            if !matches!(end_of_relay, RelayEnd::Parked) {
                break (end_of_relay, bytes);
            }
            // Boxed: what parking holds is allocated only while a connection parks, not
            // carried in every connection's future.
            match Box::pin(hand_off(route, conn, &via, took, relay)).await {
                Parking::Sent => break (RelayEnd::Parked, bytes),
                Parking::Back(back) => relay = *back,
                Parking::Lost => {
                    warn!(listener = %route.config.name, client = %conn.client(), "upgrade: connection lost in the hand-over");
                    lost = true;
                    break (RelayEnd::Stopped, bytes);
                }
            }
        };
        // Passive ejection: a reset before the backend's first byte is a failure.
        if let Some(i) = via.index() {
            if bytes.1 == 0
                && matches!(&end_of_relay, RelayEnd::Failed { side: Side::Backend, error } if is_reset(error))
            {
                route.observe(i, true);
            }
        }
        let reason = match end_of_relay {
            RelayEnd::Closed {
                first: Side::Client,
            } => EndReason::ClientClosed,
            RelayEnd::Closed {
                first: Side::Backend,
            } => EndReason::BackendClosed,
            RelayEnd::Failed { side, error } => {
                debug!(listener = %route.config.name, client = %conn.client(), ?side, %error, "closed on error");
                match side {
                    _ if is_local_exhaustion(&error) => EndReason::Error,
                    Side::Client => EndReason::ClientClosed,
                    Side::Backend => EndReason::BackendClosed,
                }
            }
            RelayEnd::Idle => EndReason::IdleTimeout,
            RelayEnd::Stopped if lost => EndReason::Error,
            RelayEnd::Stopped => conn.asked().map_or(EndReason::Error, |a| a.reason()),
            RelayEnd::Parked => EndReason::Handover,
        };
        Ended {
            reason,
            refusal: None,
            backend: Some(via),
            connect: took,
            bytes,
        }
    }
}

/// Who the header to a backend names.
#[derive(Debug, Clone, Copy)]
enum Named {
    /// The socket's own client, and the listener's address it connected to.
    Socket,
    /// The client an upstream's header named, and where it said it connected to.
    Header(SocketAddr),
    /// Nobody: the upstream's header named nobody (`LOCAL`, `UNKNOWN`).
    Nobody,
}

/// Writes the PROXY protocol header that names the client to a backend just connected:
/// the client's real address, and where it connected to (as an upstream's header said,
/// or this listener's own address).
async fn send_header(
    route: &ListenerRoute,
    conn: &Conn,
    client: &TcpStream,
    backend: &TcpStream,
    version: SendProxy,
    named: Named,
) -> io::Result<()> {
    let addresses = match named {
        Named::Socket => Some((conn.client(), client.local_addr()?)),
        Named::Header(destination) => Some((conn.client(), destination)),
        Named::Nobody => None,
    };
    let header = proxy_protocol::header(version, addresses);
    let write = async {
        let mut rest = &header[..];
        while !rest.is_empty() {
            backend.writable().await?;
            match backend.try_write(rest) {
                Ok(written) => rest = &rest[written..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(route.config.connect_timeout, write)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Resolves when the connection is asked to abort.
async fn wait_abort(conn: &Conn) {
    let mut seen = None;
    loop {
        let ask = conn.wait_ask(seen).await;
        if matches!(ask, Ask::Abort(_)) {
            return;
        }
        seen = Some(ask);
    }
}

/// Tries the picked backend, then up to `retries` other available ones. The client is
/// not touched until a backend answers, so it sees no error while any backend is
/// reachable. A local resource error (no file descriptor left) is no backend's fault:
/// it counts against no backend, tries no other, and pauses accepting.
async fn connect(
    pressure: &Pressure,
    route: &ListenerRoute,
    conn: &Conn,
    first: usize,
    first_guard: BackendGuard,
) -> Result<(usize, BackendGuard, TcpStream, Duration), EndReason> {
    // The backends that failed this client, allocated only once one has.
    let mut tried = Vec::new();
    let mut attempt = Some((first, first_guard));
    while let Some((index, guard)) = attempt.take() {
        let backend = &route.backends[index];
        let addr = backend.config.addr;
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(route.config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let took = started.elapsed();
                backend.state.record_connected(took);
                return Ok((index, guard, stream, took));
            }
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                warn!(listener = %route.config.name, client = %conn.client(), error = %e, "cannot connect: no local resources; pausing accepts");
                pressure.note();
                return Err(EndReason::Error);
            }
            Ok(Err(e)) => {
                warn!(listener = %route.config.name, client = %conn.client(), backend = %backend.config.name, %addr, error = %e, "connect failed")
            }
            Err(_) => warn!(
                listener = %route.config.name, client = %conn.client(), backend = %backend.config.name, %addr,
                timeout = ?route.config.connect_timeout, "connect timed out"
            ),
        }
        backend.state.record_connect_failure(started.elapsed());
        route.observe(index, true);
        drop(guard);
        tried.push(index);
        if tried.len() > route.config.retries as usize {
            break;
        }
        if let Some((next, guard)) = route.pick_and_acquire(conn.client().ip(), &tried) {
            conn.set_backend(guard.backend());
            attempt = Some((next, guard));
        }
    }
    route.state.record_rejected(RejectReason::NoBackend);
    warn!(listener = %route.config.name, client = %conn.client(), "no backend could be reached; closing the client");
    Err(EndReason::ConnectFailed)
}

/// The end of a connection: its metric, and its access log line when the listener asks
/// for one.
fn end(route: &ListenerRoute, conn: &Conn, ended: &Ended) {
    route.state.record_end(ended.reason);
    if route.config.access_log {
        crate::logging::write_line(&access_line(route, conn, ended));
    }
}

/// `ts listener client backend backend_addr connect_ms duration_ms bytes_sent
/// bytes_received reason` (SPEC section 8), as text or as one JSON object with those
/// keys, by the log format in use. `bytes_sent` went to the backend, `bytes_received`
/// came from it; `-` (or null) where there was no backend.
fn access_line(route: &ListenerRoute, conn: &Conn, ended: &Ended) -> String {
    let backend = ended
        .backend
        .as_ref()
        .map(|via| (via.name(route), via.addr(route)));
    let ts = crate::logging::rfc3339(std::time::SystemTime::now());
    let duration_ms = conn.started.elapsed().as_secs_f64() * 1000.0;
    let connect_ms = ended.connect.map(|d| d.as_secs_f64() * 1000.0);
    match crate::logging::format() {
        crate::logging::Format::Json => {
            let line = serde_json::json!({
                "ts": ts,
                "listener": route.config.name,
                "client": conn.client().to_string(),
                "backend": backend.map(|(name, _)| name),
                "backend_addr": backend.map(|(_, addr)| addr.to_string()),
                "connect_ms": connect_ms.map(round3),
                "duration_ms": round3(duration_ms),
                "bytes_sent": ended.bytes.0,
                "bytes_received": ended.bytes.1,
                "reason": ended.logged_reason(),
            });
            format!("{line}\n")
        }
        crate::logging::Format::Text => format!(
            "{ts} {} {} {} {} {} {duration_ms:.3} {} {} {}\n",
            route.config.name,
            conn.client(),
            backend.map_or("-", |(name, _)| name),
            backend.map_or_else(|| "-".to_string(), |(_, addr)| addr.to_string()),
            connect_ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}")),
            ended.bytes.0,
            ended.bytes.1,
            ended.logged_reason(),
        ),
    }
}

fn round3(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::FromLine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_client_a_stage_names_is_the_one_the_table_and_the_logs_see() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let toml = format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n[[listeners.backends]]\nname = \"a\"\naddr = \"{backend_addr}\"\n"
        );
        let config = crate::config::Config::parse(&toml, "test.toml").unwrap();
        let registry = crate::state::Registry::default();
        let mut routing = Routing::build(config, 1, &registry);
        Arc::get_mut(&mut routing.listeners[0]).unwrap().stage = Some(Arc::new(FromLine));
        let conns = Arc::new(Conns::default());
        let plane = DataPlane::new(Arc::new(ArcSwap::from_pointee(routing)), Arc::clone(&conns));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let worker = Worker {
            index: 0,
            spread: Arc::new(Spread::new(vec![tokio::runtime::Handle::current()])),
        };
        tokio::spawn(serve(listener, "web".into(), plane, stop_rx, worker));

        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"FROM 192.0.2.7:4000\nhi").await.unwrap();
        let mut back = [0u8; 2];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hi");
        let entries = conns.select(|_| true);
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].client(),
            "192.0.2.7:4000".parse::<SocketAddr>().unwrap(),
            "the pick, the limits and the logs should see the stage's client"
        );
    }
}
