//! The byte relay between a client and its backend.
//!
//! One task pumps both directions with a hand-written poll loop: a wake-up asks each
//! direction's socket for the one readiness it waits on (its source readable, or, while
//! bytes are pending, its destination writable) and does the system calls only for
//! what is ready. A direction reads into a per-thread scratch buffer and writes straight
//! on; only bytes the destination cannot take at once are kept, in a buffer owned by the
//! connection. So an idle connection holds no relay buffer at all, which keeps the
//! memory of many long-lived, mostly idle (WebSocket) connections small. A short read
//! or write (the socket is drained, or full) clears the socket's readiness at once, so
//! a message costs one read() and one write() per direction, not a third call that only
//! returns EAGAIN. A plain direction whose read fills the whole scratch buffer carries
//! bulk, and splices from then on ([`crate::splice`]): its bytes go from socket to a pipe
//! of its own to socket without entering ballast; what the pipe holds is that
//! direction's pending bytes (read back out into [`DirectionState::pending`] whenever
//! the relay parks or ends, so that the state says everything not yet delivered).
//!
//! Half-close is kept: when one side ends its writes (FIN), the other side's write half
//! is shut down once every byte has been delivered, and the opposite direction goes on
//! until it ends too. An error on either side (a reset) ends both directions at once,
//! also while a direction waits to write to a peer that does not read: a socket that no
//! direction is waiting on is watched for an error.
//!
//! The protocol is recognised once, at the start: the client's first HTTP head (which
//! may come in pieces, up to [`MAX_HEAD`]) and, after an upgrade request, the backend's
//! first answer. After that a plain connection does nothing per chunk, and a WebSocket
//! one only follows its frame boundaries with a [`FrameCursor`] per direction.
//!
//! Everything a [`Relay`] knows lives in the relay, not in the future that runs it, so
//! [`Relay::run`] can stop at a safe point (between two chunks; undelivered bytes stay
//! pending) and be called again, or the sockets and their [`RelayState`] can be taken
//! out ([`Relay::into_parts`]) and put back together later. What ballast asks of a
//! running relay is a [`Stop`]: park (hand everything back, touching nothing on the
//! wire), abort (end at once), or close cleanly: deliver what was read, and, for a
//! connection opened with a WebSocket upgrade, let the frame in flight complete and then
//! send the client a Close frame (1012, Service Restart) and the backend a Close frame
//! (1001, Going Away) — a client never receives a torn frame. A plain TCP connection
//! gets a FIN both ways. The idle timeout ends a connection the same clean way.
//!
//! Bytes are counted as they are delivered, so counters move while a connection is open.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io::{self, Read};
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::splice::{self, NoPipe, Pipe};
use crate::websocket::{self, FrameCursor};

/// Size of the per-thread scratch buffer: one read moves at most this much.
const SCRATCH_SIZE: usize = 64 * 1024;

/// How many reads or writes one direction does in a row on a wake-up (up to 1 MiB, or
/// twice a pipe's size when splicing) before the other direction gets its turn: without
/// it, a direction that always has bytes would use the task's whole budget each time and
/// starve the other.
const TURN: usize = 16;

/// Longest HTTP head ballast looks at to tell a WebSocket upgrade from other traffic.
pub const MAX_HEAD: usize = 16 * 1024;

/// How long ballast lets the frames in flight complete when it ends a connection (a
/// peer that stalls inside a frame longer than this is cut off).
const FRAME_GRACE: Duration = Duration::from_secs(10);
/// How long ballast then waits for the peers to close after its Close frames and FINs.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

thread_local! {
    /// Borrowed only inside one poll, never across an await.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// One end of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// What ballast asks of a running relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// End cleanly now (drain deadline, migration, shutdown): deliver what was read,
    /// complete the WebSocket frames in flight and send Close frames, FIN both ways.
    Close,
    /// End at once: no grace; the sockets are closed when the relay is dropped (the
    /// operator's second SIGTERM).
    Abort,
    /// Stop at the next safe point and hand everything back, touching nothing on the
    /// wire.
    Park,
}

/// How [`Relay::run`] returned.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions ended normally; `first` is the side that ended its writes first.
    Closed { first: Side },
    /// A socket failed (reset, ...) on `side`; the connection is over.
    Failed { side: Side, error: io::Error },
    /// Nothing moved either way for `idle_timeout`; finished cleanly.
    Idle,
    /// [`Stop::Close`] or [`Stop::Abort`] was honoured.
    Stopped,
    /// [`Stop::Park`] was honoured: the [`Relay`] still owns both sockets and its state;
    /// call [`Relay::run`] again to resume.
    Parked,
}

/// Where bytes are counted.
pub trait Counter: Sync {
    fn add(&self, bytes: u64);
}

impl<F: Fn(u64) + Sync> Counter for F {
    fn add(&self, bytes: u64) {
        self(bytes)
    }
}

/// A client connection and its backend connection, and everything needed to relay
/// between them from where they stand.
pub struct Relay {
    client: TcpStream,
    backend: TcpStream,
    state: RelayState,
    /// Per direction, indexed by the side bytes come from: whether it splices.
    splice: [Splice; 2],
}

/// Whether a direction moves its bytes in the kernel ([`crate::splice`]). A plain
/// direction whose read fills the whole scratch buffer (bulk, not request/response)
/// splices from then on; a WebSocket one never does (its frames are followed).
#[derive(Debug, Default)]
enum Splice {
    /// Bytes are copied; splicing starts at the first full read.
    #[default]
    NotYet,
    /// Bytes are copied for good: splicing was refused, or no pipe could be had.
    Never,
    /// Bytes pass through this pipe; those it holds are the direction's pending bytes,
    /// delivered before anything else is read.
    Piped(Pipe),
}

impl Splice {
    /// Bytes held in the pipe.
    fn held(&self) -> usize {
        match self {
            Splice::Piped(pipe) => pipe.held(),
            _ => 0,
        }
    }

    /// Reads what the pipe holds out into `dir`'s pending bytes, so that the state
    /// says everything not yet delivered (at a park, an end, a clean finish); the pipe
    /// stays for when the relay resumes.
    fn take_into(&mut self, dir: &mut DirectionState) {
        if let Splice::Piped(pipe) = self {
            pipe.take_into(&mut dir.pending);
        }
    }
}

/// A relay's state apart from its sockets: plain data, to carry elsewhere with them.
/// Any value is safe to resume from (nonsense gives a plain relay, never a panic).
#[derive(Debug, Clone, Default)]
pub struct RelayState {
    /// Client to backend.
    pub to_backend: DirectionState,
    /// Backend to client.
    pub to_client: DirectionState,
    /// What ballast knows of the protocol spoken.
    pub protocol: Protocol,
    /// The side whose end of stream was passed on first, once one was.
    pub first_finished: Option<Side>,
}

/// One direction's state.
#[derive(Clone, Default)]
pub struct DirectionState {
    /// Bytes read but not yet written; empty (and unallocated) in the common case.
    pub pending: Vec<u8>,
    /// Where the WebSocket frames of this direction stand, once they started.
    pub frames: Option<FrameCursor>,
    /// The source's end of stream has been passed on (FIN written).
    pub finished: bool,
    /// Bytes delivered so far.
    pub delivered: u64,
}

/// What ballast knows of the protocol, recognised once at the start of a connection.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Protocol {
    /// Nothing has come from the client yet.
    #[default]
    Unknown,
    /// The start of the client's first HTTP head, kept until it is complete (at most
    /// [`MAX_HEAD`] bytes).
    ClientHead(Vec<u8>),
    /// The client asked for a WebSocket upgrade; the backend has not answered yet.
    UpgradeAsked,
    /// The start of the backend's answer to the upgrade, kept until it is complete.
    BackendHead(Vec<u8>),
    /// The backend answered 101: both directions carry WebSocket frames.
    WebSocket,
    /// Anything else: bytes are bytes.
    Plain,
}

impl fmt::Debug for DirectionState {
    /// Shows how many bytes are pending, not the bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectionState")
            .field("pending", &self.pending.len())
            .field("frames", &self.frames)
            .field("finished", &self.finished)
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl fmt::Debug for Protocol {
    /// Shows how much of a head is kept, not the head.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Unknown => f.write_str("Unknown"),
            Protocol::ClientHead(head) => write!(f, "ClientHead({} bytes)", head.len()),
            Protocol::UpgradeAsked => f.write_str("UpgradeAsked"),
            Protocol::BackendHead(head) => write!(f, "BackendHead({} bytes)", head.len()),
            Protocol::WebSocket => f.write_str("WebSocket"),
            Protocol::Plain => f.write_str("Plain"),
        }
    }
}

impl RelayState {
    fn direction(&mut self, from: Side) -> &mut DirectionState {
        match from {
            Side::Client => &mut self.to_backend,
            Side::Backend => &mut self.to_client,
        }
    }

    /// Notes a chunk read from `from`, before it is forwarded: feeds the direction's
    /// frame cursor, or, while the protocol is not known yet, looks at the heads.
    fn observe(&mut self, from: Side, chunk: &[u8]) {
        if let Some(cursor) = &mut self.direction(from).frames {
            cursor.feed(chunk);
        } else if !matches!(self.protocol, Protocol::Plain | Protocol::WebSocket) {
            self.recognise(from, chunk);
        }
    }

    /// Protocol detection: the client's first head, then the backend's answer to an
    /// upgrade request. Each head may come in pieces (kept up to [`MAX_HEAD`]).
    fn recognise(&mut self, from: Side, chunk: &[u8]) {
        let kept = match (&mut self.protocol, from) {
            (Protocol::Unknown, Side::Client) | (Protocol::UpgradeAsked, Side::Backend) => {
                Vec::new()
            }
            (Protocol::ClientHead(kept), Side::Client)
            | (Protocol::BackendHead(kept), Side::Backend) => std::mem::take(kept),
            // The backend spoke first: this is no HTTP client's connection.
            (Protocol::Unknown | Protocol::ClientHead(_), Side::Backend) => {
                self.protocol = Protocol::Plain;
                return;
            }
            // Client bytes while the answer to its upgrade is awaited: its frame cursor
            // follows them.
            _ => return,
        };
        let earlier = kept.len();
        let room = MAX_HEAD.saturating_sub(earlier).min(chunk.len());
        let mut owned = kept;
        let head: &[u8] = if owned.is_empty() {
            &chunk[..room]
        } else {
            owned.extend_from_slice(&chunk[..room]);
            &owned
        };
        let prefix: &[u8] = match from {
            Side::Client => b"GET ",
            Side::Backend => b"HTTP/1.",
        };
        let looks_like_http = prefix.starts_with(&head[..head.len().min(prefix.len())]);
        let complete = head[earlier.saturating_sub(3)..]
            .windows(4)
            .any(|w| w == b"\r\n\r\n");
        if looks_like_http && !complete && head.len() < MAX_HEAD {
            // Wait for the rest of the head.
            let head = if owned.is_empty() {
                head.to_vec()
            } else {
                owned
            };
            self.protocol = match from {
                Side::Client => Protocol::ClientHead(head),
                Side::Backend => Protocol::BackendHead(head),
            };
            return;
        }
        let frames_from = match (looks_like_http && complete, from) {
            (false, _) => None,
            (true, Side::Client) => websocket::upgrade_request_len(head),
            (true, Side::Backend) => websocket::switching_protocols_len(head),
        };
        let Some(head_len) = frames_from else {
            self.protocol = Protocol::Plain;
            self.to_backend.frames = None;
            return;
        };
        self.protocol = match from {
            Side::Client => Protocol::UpgradeAsked,
            Side::Backend => Protocol::WebSocket,
        };
        // Frames start after the head, inside this chunk.
        let mut cursor = FrameCursor::default();
        cursor.feed(&chunk[head_len.saturating_sub(earlier).min(chunk.len())..]);
        self.direction(from).frames = Some(cursor);
    }
}

impl Relay {
    pub fn new(client: TcpStream, backend: TcpStream) -> Relay {
        Relay::from_parts(client, backend, RelayState::default())
    }

    /// Client bytes already read before the relay started (a stage before the backend
    /// pick reads them): written to the backend first, counted as sent, and seen by
    /// protocol detection as the start of the client's stream. Call before the first
    /// [`Relay::run`].
    pub fn with_early_bytes(mut self, mut early: Vec<u8>) -> Relay {
        if early.is_empty() {
            return self;
        }
        self.state.observe(Side::Client, &early);
        let up = &mut self.state.to_backend;
        early.append(&mut up.pending);
        up.pending = early;
        self
    }

    /// Bytes delivered so far: (to the backend, to the client).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.state.to_backend.delivered,
            self.state.to_client.delivered,
        )
    }

    /// The state as it stands (between two runs).
    pub fn state(&self) -> &RelayState {
        &self.state
    }

    /// The sockets and per-direction state, to carry elsewhere; see
    /// [`Relay::from_parts`].
    pub fn into_parts(mut self) -> (TcpStream, TcpStream, RelayState) {
        take_pipes(&mut self.state, &mut self.splice);
        (self.client, self.backend, self.state)
    }

    pub fn from_parts(client: TcpStream, backend: TcpStream, state: RelayState) -> Relay {
        Relay {
            client,
            backend,
            state,
            splice: Default::default(),
        }
    }

    /// Relays until both directions are done, one fails, nothing moves for
    /// `idle_timeout`, or `stop` resolves (see [`Stop`]); an idle timeout and
    /// [`Stop::Close`] finish the connection cleanly before returning. The sockets are
    /// closed when the relay is dropped. After [`RelayEnd::Parked`], call again to
    /// resume; after any other end the connection is over.
    ///
    /// Cancel-safe: everything read is in the relay (delivered, pending, or in a
    /// direction's pipe, which [`Relay::into_parts`] reads back into the state) whenever
    /// this returns `Pending`, so dropping the future parks the relay, except
    /// during the clean finish of [`Stop::Close`] or an idle timeout. `stop` is not
    /// polled during that finish (up to 10 s for the frames in flight, then 2 s): to cut it
    /// short (the operator's second SIGTERM), drop the future.
    ///
    /// `stop` is polled on every wake-up, so it should be cheap to poll. It is held
    /// once, in place: the future is written by hand because an `async fn` would hold
    /// it two or three times over (the argument, then the pinned local), and every open
    /// connection carries this future.
    pub fn run<'a>(
        &'a mut self,
        to_backend: &'a dyn Counter,
        to_client: &'a dyn Counter,
        idle_timeout: Option<Duration>,
        stop: impl Future<Output = Stop> + 'a,
    ) -> impl Future<Output = RelayEnd> + 'a {
        let Relay {
            client,
            backend,
            state,
            splice,
        } = self;
        Run {
            sockets: [client, backend],
            counters: [to_backend, to_client],
            splice,
            phase: Phase::Relaying(state),
            stop,
            watch: None,
            idle: idle_timeout.map(|limit| {
                Box::pin(IdleTimer {
                    limit,
                    last_moved: Instant::now(),
                    sleep: tokio::time::sleep(limit),
                })
            }),
        }
    }
}

/// A future that is done when its socket reports an error.
type ErrorWatch<'a> = Pin<Box<dyn Future<Output = io::Result<Ready>> + Send + 'a>>;

pin_project! {
    /// The future of [`Relay::run`].
    #[project = RunProj]
    struct Run<'a, S> {
        // Indexed by the side bytes come from: [client, backend], and [counter of bytes
        // delivered to the backend, to the client].
        sockets: [&'a TcpStream; 2],
        counters: [&'a dyn Counter; 2],
        splice: &'a mut [Splice; 2],
        phase: Phase<'a>,
        #[pin]
        stop: S,
        // The error watch on the socket no direction waits on (see `poll_relay`),
        // allocated the first time there is such a socket: for a connection that is
        // open and idle both ways, never.
        watch: Option<(Side, ErrorWatch<'a>)>,
        // Boxed: a timer only for connections with an idle timeout.
        idle: Option<Pin<Box<IdleTimer>>>,
    }
}

pin_project! {
    /// The idle timeout: fires `limit` after the last byte moved.
    struct IdleTimer {
        limit: Duration,
        last_moved: Instant,
        #[pin]
        sleep: Sleep,
    }
}

enum Phase<'a> {
    /// The poll loop runs.
    Relaying(&'a mut RelayState),
    /// Ballast ends the connection cleanly ([`finish`]), then returns the end.
    /// Boxed: its state (a read buffer, timers) is allocated only for connections that
    /// are being closed, not carried in every connection's task.
    Finishing(RelayEnd, Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
    /// Returned.
    Done,
}

/// Why the poll loop let go of the connection.
enum Interrupted {
    End(RelayEnd),
    Stop(Stop),
    Idle,
}

impl<S: Future<Output = Stop>> Future for Run<'_, S> {
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let mut this = self.project();
        loop {
            let end = match this.phase {
                Phase::Relaying(state) => {
                    let interrupted = ready!(poll_relay(
                        cx,
                        *this.sockets,
                        state,
                        this.splice,
                        *this.counters,
                        this.stop.as_mut(),
                        this.watch,
                        this.idle
                    ));
                    // Whatever ends or pauses the loop, the state says every byte not
                    // yet delivered.
                    take_pipes(state, this.splice);
                    match interrupted {
                        Interrupted::End(end) => end,
                        Interrupted::Stop(Stop::Park) => RelayEnd::Parked,
                        Interrupted::Stop(Stop::Abort) => RelayEnd::Stopped,
                        Interrupted::Stop(Stop::Close) => {
                            this.start_finish(RelayEnd::Stopped);
                            continue;
                        }
                        Interrupted::Idle => {
                            this.start_finish(RelayEnd::Idle);
                            continue;
                        }
                    }
                }
                Phase::Finishing(_, finishing) => {
                    ready!(finishing.as_mut().poll(cx));
                    match std::mem::replace(this.phase, Phase::Done) {
                        Phase::Finishing(end, _) => end,
                        _ => RelayEnd::Stopped,
                    }
                }
                // Polled again after it returned.
                Phase::Done => return Poll::Pending,
            };
            *this.phase = Phase::Done;
            return Poll::Ready(end);
        }
    }
}

impl<S> RunProj<'_, '_, S> {
    /// Moves on to the clean finish, which returns `end`.
    fn start_finish(&mut self, end: RelayEnd) {
        *self.watch = None;
        *self.idle = None;
        if let Phase::Relaying(state) = std::mem::replace(self.phase, Phase::Done) {
            let finishing = finish(*self.sockets, state, *self.counters);
            *self.phase = Phase::Finishing(end, Box::pin(finishing));
        }
    }
}

/// The poll loop: `stop`, both directions, the error watch and the idle timer.
/// `sockets` and `counters` are indexed by the side bytes come from.
#[allow(clippy::too_many_arguments)]
fn poll_relay<'a>(
    cx: &mut Context<'_>,
    sockets: [&'a TcpStream; 2],
    state: &mut RelayState,
    splice: &mut [Splice; 2],
    counters: [&dyn Counter; 2],
    stop: Pin<&mut impl Future<Output = Stop>>,
    watch: &mut Option<(Side, ErrorWatch<'a>)>,
    idle: &mut Option<Pin<Box<IdleTimer>>>,
) -> Poll<Interrupted> {
    if let Poll::Ready(stop) = stop.poll(cx) {
        return Poll::Ready(Interrupted::Stop(stop));
    }
    let mut moved = false;
    // The sockets a direction waits on, for reading or for writing.
    let mut waited_on = [false; 2];
    for from in [Side::Client, Side::Backend] {
        let (source, destination) = (sockets[from as usize], sockets[from.other() as usize]);
        let counter = counters[from as usize];
        let pipe = &mut splice[from as usize];
        match pump_direction(
            cx,
            source,
            destination,
            from,
            state,
            pipe,
            counter,
            &mut moved,
        ) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err((side, error))) => {
                return Poll::Ready(Interrupted::End(RelayEnd::Failed { side, error }))
            }
            Poll::Pending if state.direction(from).pending.is_empty() && pipe.held() == 0 => {
                waited_on[from as usize] = true
            }
            Poll::Pending => waited_on[from.other() as usize] = true,
        }
    }
    if state.to_backend.finished && state.to_client.finished {
        let first = state.first_finished.unwrap_or(Side::Client);
        return Poll::Ready(Interrupted::End(RelayEnd::Closed { first }));
    }
    // A socket no direction waits on (its own direction waits to write to a peer that
    // does not read, or is finished, and nothing is pending towards it) is watched for
    // an error, so that a reset is noticed at once. While the connection is open there
    // is at most one such socket.
    if let Some(side) = [Side::Client, Side::Backend]
        .into_iter()
        .find(|side| !waited_on[*side as usize])
    {
        let socket = sockets[side as usize];
        if !matches!(watch, Some((watched, _)) if *watched == side) {
            *watch = Some((side, Box::pin(socket.ready(Interest::ERROR))));
        }
        if let Some((_, error_watch)) = watch {
            if let Poll::Ready(result) = error_watch.as_mut().poll(cx) {
                let error = match result {
                    Err(e) => e,
                    Ok(_) => socket
                        .take_error()
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()),
                };
                return Poll::Ready(Interrupted::End(RelayEnd::Failed { side, error }));
            }
        }
    }
    if let Some(timer) = idle {
        let mut timer = timer.as_mut().project();
        if moved {
            *timer.last_moved = Instant::now();
        }
        while timer.sleep.as_mut().poll(cx).is_ready() {
            let deadline = *timer.last_moved + *timer.limit;
            if deadline <= Instant::now() {
                return Poll::Ready(Interrupted::Idle);
            }
            timer.sleep.as_mut().reset(deadline);
        }
    }
    Poll::Pending
}

/// Moves bytes from `from` to `to` while both are ready, for at most [`TURN`] rounds.
/// `Ready(Ok)` once the direction is finished (its FIN passed on); `Pending` while it
/// waits on `from` being readable (nothing pending) or `to` being writable (bytes
/// pending, in memory or in its pipe), or when its turn is over (the task is woken
/// again at once). An error names its side.
#[allow(clippy::too_many_arguments)]
fn pump_direction(
    cx: &mut Context<'_>,
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    state: &mut RelayState,
    splice: &mut Splice,
    counter: &dyn Counter,
    moved: &mut bool,
) -> Poll<Result<(), (Side, io::Error)>> {
    let to_side = from_side.other();
    for _ in 0..TURN {
        let dir = state.direction(from_side);
        if let Splice::Piped(pipe) = splice {
            if pipe.held() > 0 {
                ready!(to.poll_write_ready(cx)).map_err(|e| (to_side, e))?;
                match splice_out(pipe, to) {
                    Ok(written) => {
                        *moved |= written > 0;
                        deliver(dir, counter, written);
                    }
                    Err(e) if splice::refused(&e) => {
                        splice.take_into(dir);
                        *splice = Splice::Never;
                    }
                    Err(e) => return Poll::Ready(Err((to_side, e))),
                }
                continue;
            }
        }
        if !dir.pending.is_empty() {
            ready!(to.poll_write_ready(cx)).map_err(|e| (to_side, e))?;
            let written = write_some(to, &dir.pending).map_err(|e| (to_side, e))?;
            if written > 0 {
                *moved = true;
                deliver(dir, counter, written);
                dir.pending.drain(..written);
                if dir.pending.is_empty() {
                    // Delivered: the connection holds no buffer again.
                    dir.pending = Vec::new();
                }
            }
            continue;
        }
        if dir.finished {
            return Poll::Ready(Ok(()));
        }
        ready!(from.poll_read_ready(cx)).map_err(|e| (from_side, e))?;
        if let Splice::Piped(pipe) = splice {
            match splice_in(from, pipe) {
                Ok(0) => {}
                Ok(_) => {
                    *moved = true;
                    // Delivered from the pipe on the next round.
                    continue;
                }
                Err(e) if splice::refused(&e) => *splice = Splice::Never,
                Err(e) => return Poll::Ready(Err((from_side, e))),
            }
            // Nothing moved: the socket is drained, at its end, or at urgent data
            // (which splice stops at): the read below tells which, and takes the bytes
            // after urgent data.
        }
        let read = SCRATCH.with(|scratch| {
            let scratch = &mut scratch.borrow_mut()[..];
            let n = match read_some(from, scratch) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(None),
                Err(e) => return Err((from_side, e)),
            };
            if n == 0 {
                return Ok(Some(0));
            }
            let chunk = &scratch[..n];
            state.observe(from_side, chunk);
            let written = write_some(to, chunk).map_err(|e| (to_side, e))?;
            let dir = state.direction(from_side);
            deliver(dir, counter, written);
            dir.pending.extend_from_slice(&chunk[written..]);
            if n == scratch.len()
                && matches!(splice, Splice::NotYet)
                && state.protocol == Protocol::Plain
            {
                *splice = match Pipe::open() {
                    Ok(pipe) => Splice::Piped(pipe),
                    // The next full read asks again (no system call until one is free).
                    Err(NoPipe::AllInUse) => Splice::NotYet,
                    Err(NoPipe::Refused) => Splice::Never,
                };
            }
            Ok(Some(n))
        })?;
        match read {
            // Not readable after all; the readiness is cleared.
            None => continue,
            Some(0) => {
                shutdown_write(to).map_err(|e| (to_side, e))?;
                state.direction(from_side).finished = true;
                state.first_finished.get_or_insert(from_side);
                return Poll::Ready(Ok(()));
            }
            Some(_) => *moved = true,
        }
    }
    // The turn is over while bytes may still be waiting: the other direction gets its
    // turn, then this one goes on.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Moves what `from` has into `pipe`: 0 when nothing moved (the socket is drained, at
/// its end or at urgent data; a read then tells which and clears the readiness). A
/// short splice is not taken as drained, since splice stops short at the end of the
/// pipe's room as well.
fn splice_in(from: &TcpStream, pipe: &mut Pipe) -> io::Result<usize> {
    let mut outcome = Ok(0);
    let _ = from.try_io(Interest::READABLE, || {
        outcome = match pipe.fill_from(from) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        };
        Ok(())
    });
    outcome
}

/// Moves what `pipe` holds into `to`, as much as it takes now; EAGAIN clears the write
/// readiness.
fn splice_out(pipe: &mut Pipe, to: &TcpStream) -> io::Result<usize> {
    match to.try_io(Interest::WRITABLE, || pipe.empty_into(to)) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        other => other,
    }
}

/// Reads what the pipes hold back into the directions' pending bytes.
fn take_pipes(state: &mut RelayState, splice: &mut [Splice; 2]) {
    let [up, down] = splice;
    up.take_into(&mut state.to_backend);
    down.take_into(&mut state.to_client);
}

/// Counts `bytes` delivered in `dir`.
fn deliver(dir: &mut DirectionState, counter: &dyn Counter, bytes: usize) {
    if bytes > 0 {
        counter.add(bytes as u64);
        dir.delivered += bytes as u64;
    }
}

/// Reads one chunk into `scratch`: `Some(0)` at end of stream, `None` when there was
/// nothing to read. A short read (the socket is drained) clears the readiness at once:
/// this saves the read() that would only return EAGAIN, one syscall per message.
/// Readiness that a new packet sets meanwhile is not lost (tokio clears only the
/// readiness event it handed out).
fn read_some(from: &TcpStream, scratch: &mut [u8]) -> io::Result<Option<usize>> {
    let mut outcome = None;
    let _ = from.try_io(Interest::READABLE, || {
        let result = (&*socket2::SockRef::from(from)).read(scratch);
        let drained = match &result {
            Ok(n) => *n < scratch.len(),
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        };
        outcome = Some(result);
        if drained {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match outcome {
        None => Ok(None),
        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Some(result) => result.map(Some),
    }
}

/// Writes as much of `bytes` as `to` takes now; returns how much. A short write (the
/// socket's buffer is full) clears the write readiness at once, which saves the write()
/// that would only return EAGAIN.
fn write_some(to: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    let result = to.try_io(Interest::WRITABLE, || {
        // MSG_NOSIGNAL: a peer gone is an EPIPE, never a signal.
        written = socket2::SockRef::from(to).send_with_flags(bytes, libc::MSG_NOSIGNAL)?;
        if written < bytes.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match result {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(written),
    }
}

/// Writes all of `bytes`, waiting for `to` as needed.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        let written = write_some(to, bytes)?;
        bytes = &bytes[written..];
    }
    Ok(())
}

/// Passes a FIN on; a peer that is already gone is not an error worth failing for.
fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// Ends a connection cleanly, as the module doc says: each direction delivers what was
/// read, completes its WebSocket frame in flight and adds a Close frame, then a FIN; then
/// whatever the peers still send is read until they close, so that closing does not
/// reset the connection under them. Errors end the direction they happen in.
async fn finish(
    [client, backend]: [&TcpStream; 2],
    state: &mut RelayState,
    [to_backend, to_client]: [&dyn Counter; 2],
) {
    let websocket = state.protocol == Protocol::WebSocket;
    let RelayState {
        to_backend: up,
        to_client: down,
        ..
    } = state;
    let frames = async {
        tokio::join!(
            finish_direction(
                client,
                backend,
                up,
                websocket.then(websocket::close_to_backend),
                to_backend
            ),
            finish_direction(
                backend,
                client,
                down,
                websocket.then(websocket::close_to_client),
                to_client
            ),
        )
    };
    let _ = tokio::time::timeout(FRAME_GRACE, frames).await;
    let peers = async { tokio::join!(discard(client), discard(backend)) };
    let _ = tokio::time::timeout(CLOSE_GRACE, peers).await;
}

/// Ends one direction cleanly: delivers what was read, completes the frame in flight
/// and adds `close` (a WebSocket Close frame), then a FIN.
async fn finish_direction(
    from: &TcpStream,
    to: &TcpStream,
    dir: &mut DirectionState,
    close: Option<Vec<u8>>,
    counter: &dyn Counter,
) -> io::Result<()> {
    if dir.finished {
        return Ok(());
    }
    while !dir.pending.is_empty() {
        to.writable().await?;
        let written = write_some(to, &dir.pending)?;
        deliver(dir, counter, written);
        dir.pending.drain(..written);
    }
    dir.pending = Vec::new();
    if let Some(close) = close {
        let mut buf = vec![0u8; 16 * 1024];
        while let Some(frames) = dir.frames.as_mut().filter(|f| !f.at_boundary()) {
            from.readable().await?;
            let n = match from.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let upto = frames.until_boundary(&buf[..n]);
            write_all(to, &buf[..upto]).await?;
            deliver(dir, counter, upto);
        }
        if dir.frames.as_ref().is_some_and(FrameCursor::at_boundary) {
            write_all(to, &close).await?;
        }
    }
    dir.finished = true;
    shutdown_write(to)
}

/// Reads and drops whatever `stream` still sends, until it closes.
async fn discard(stream: &TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn an_idle_relay_and_its_run_future_are_small() {
        let (a, b) = pair().await;
        let mut relay = Relay::new(a, b);
        let count = |_: u64| {};
        let relay_size = std::mem::size_of::<Relay>();
        let run = relay.run(&count, &count, None, std::future::pending());
        let run_size = std::mem::size_of_val(&run);
        drop(run);
        let with_idle = relay.run(
            &count,
            &count,
            Some(Duration::from_secs(60)),
            std::future::pending(),
        );
        let with_idle_size = std::mem::size_of_val(&with_idle);
        drop(with_idle);
        let big = [0u8; 256];
        let stop = async move {
            std::future::pending::<()>().await;
            std::hint::black_box(big);
            Stop::Close
        };
        let stop_size = std::mem::size_of_val(&stop);
        let with_stop = relay.run(&count, &count, None, stop);
        let with_stop_size = std::mem::size_of_val(&with_stop);
        println!(
            "size_of::<Relay>() = {relay_size} bytes, run future = {run_size} bytes \
             ({with_idle_size} with an idle timeout, whose timer is boxed; \
             {with_stop_size} with a {stop_size}-byte stop future)"
        );
        assert!(
            relay_size + run_size < 1024,
            "{relay_size} + {run_size} bytes"
        );
        assert!(
            with_stop_size <= run_size + stop_size + 8,
            "the stop future is held more than once: {with_stop_size} bytes"
        );
    }

    fn fed(state: &mut RelayState, from: Side, bytes: &[u8], piece: usize) {
        for chunk in bytes.chunks(piece) {
            state.observe(from, chunk);
        }
    }

    const UPGRADE: &[u8] =
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";

    #[test]
    fn an_upgrade_in_pieces_is_recognised_and_its_frames_followed() {
        for piece in [1, 3, 17, 1000] {
            let mut state = RelayState::default();
            let mut up = UPGRADE.to_vec();
            up.extend(websocket::encode_masked_frame(1, b"hi", [1, 2, 3, 4]));
            up.extend(&websocket::encode_masked_frame(1, b"half", [1, 2, 3, 4])[..3]);
            fed(&mut state, Side::Client, &up, piece);
            assert_eq!(state.protocol, Protocol::UpgradeAsked, "piece {piece}");
            let mut down = SWITCHING.to_vec();
            down.extend(websocket::encode_frame(1, b"hello"));
            fed(&mut state, Side::Backend, &down, piece);
            assert_eq!(state.protocol, Protocol::WebSocket, "piece {piece}");
            assert!(state.to_client.frames.as_ref().unwrap().at_boundary());
            assert!(!state.to_backend.frames.as_ref().unwrap().at_boundary());
        }
    }

    #[test]
    fn anything_else_is_plain_and_keeps_no_head() {
        let cases: [(&[u8], &[u8]); 4] = [
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\n\r\n",
            ),
            (UPGRADE, b"HTTP/1.1 400 Bad Request\r\n\r\n"),
            (b"\x16\x03\x01 a TLS hello", b""),
            (b"PING\r\n", b"+PONG\r\n"),
        ];
        for (client, backend) in cases {
            let mut state = RelayState::default();
            fed(&mut state, Side::Client, client, 5);
            fed(&mut state, Side::Backend, backend, 5);
            assert_eq!(state.protocol, Protocol::Plain, "{client:?}");
            assert!(state.to_backend.frames.is_none() && state.to_client.frames.is_none());
        }
        // The backend speaking first makes it plain, even inside the client's head.
        let mut state = RelayState::default();
        state.observe(Side::Client, &UPGRADE[..10]);
        state.observe(Side::Backend, b"220 smtp ready\r\n");
        state.observe(Side::Client, &UPGRADE[10..]);
        assert_eq!(state.protocol, Protocol::Plain);
    }

    #[test]
    fn a_head_longer_than_the_limit_is_plain_and_keeps_at_most_the_limit() {
        let mut state = RelayState::default();
        state.observe(Side::Client, b"GET / HTTP/1.1\r\n");
        let filler = vec![b'a'; 4096];
        for _ in 0..3 {
            state.observe(Side::Client, &filler);
            let Protocol::ClientHead(head) = &state.protocol else {
                panic!("{:?}", state.protocol)
            };
            assert!(head.len() < MAX_HEAD);
        }
        state.observe(Side::Client, &vec![b'a'; 64 * 1024]);
        assert_eq!(state.protocol, Protocol::Plain);
    }
}
