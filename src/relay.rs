//! The byte relay between a client and its backend.
//!
//! Two directions are pumped concurrently in one task. Each direction waits until its
//! source is readable, reads into a per-thread scratch buffer and writes straight on;
//! only bytes the destination cannot take at once are kept in a buffer owned by the
//! connection. So an idle connection holds no relay buffer at all, which keeps the
//! memory of many long-lived, mostly idle (WebSocket) connections small.
//!
//! Half-close is kept: when one side ends its writes (FIN), the other side's write half
//! is shut down once every byte has been delivered, and the opposite direction goes on
//! until it ends too. An error on either side (a reset) ends both directions.
//!
//! The state of each direction (undelivered bytes, WebSocket frame position) lives in a
//! [`Direction`] outside the pumping futures, so that when ballast ends a connection
//! (drain deadline, migration, shutdown, idle timeout) it can finish it cleanly: deliver
//! what was read, and, for a connection opened with a WebSocket upgrade, let the frame
//! in flight complete and then send the client a Close frame (1012, Service Restart)
//! and the backend a Close frame (1001, Going Away) — a client never receives a torn
//! frame. A plain TCP connection gets a FIN both ways.
//!
//! Bytes are counted as they are delivered, so counters move while a connection is open.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::websocket::{self, FrameCursor};

/// Size of the per-thread scratch buffer: one read moves at most this much.
const SCRATCH_SIZE: usize = 64 * 1024;

/// How long ballast lets the frames in flight complete when it ends a connection (a
/// peer that stalls inside a frame longer than this is cut off).
const FRAME_GRACE: Duration = Duration::from_secs(10);
/// How long ballast then waits for the peers to close after its Close frames and FINs.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

thread_local! {
    /// Borrowed only between two awaits, never across one.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed their writes; every byte was delivered.
    Done,
    /// Nothing moved either way for `idle_timeout`.
    Idle,
    /// The `stop` future resolved (shutdown, drain deadline, migration).
    Stopped,
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

/// What ballast knows of the protocol, shared by both directions.
const PROTOCOL_UNKNOWN: u8 = 0;
/// The client asked for a WebSocket upgrade; the backend has not answered yet.
const PROTOCOL_UPGRADE_ASKED: u8 = 1;
/// The backend answered 101: both directions carry WebSocket frames.
const PROTOCOL_WEBSOCKET: u8 = 2;
/// Anything else: bytes are bytes.
const PROTOCOL_PLAIN: u8 = 3;

/// Longest HTTP head ballast looks at to tell a WebSocket upgrade from other traffic.
const MAX_HEAD: usize = 16 * 1024;

/// One direction's state: resumable, and readable by the code that ends a connection.
#[derive(Debug, Default)]
pub struct Direction {
    /// Bytes read but not yet written; empty (and unallocated) in the common case.
    pending: Vec<u8>,
    /// Where the WebSocket frames of this direction stand, once they started.
    frames: Option<FrameCursor>,
    /// The start of an HTTP head that arrived in pieces, kept until it is complete
    /// (at most [`MAX_HEAD`]); empty in the common case of a head in one read.
    head: Vec<u8>,
    /// Whether this direction's protocol is known (a WebSocket or not).
    decided: bool,
    /// The source's end of stream has been passed on (FIN written).
    finished: bool,
}

impl Direction {
    /// Looks at a chunk about to be forwarded (`client_side`: it came from the client).
    fn observe(&mut self, chunk: &[u8], client_side: bool, protocol: &AtomicU8) {
        if let Some(cursor) = &mut self.frames {
            cursor.feed(chunk);
            return;
        }
        if self.decided {
            return;
        }
        // The head so far: this chunk alone when no earlier piece is waiting.
        let pieced;
        let (head, earlier) = if self.head.is_empty() {
            (chunk, 0)
        } else {
            let earlier = self.head.len();
            self.head.extend_from_slice(chunk);
            pieced = std::mem::take(&mut self.head);
            (&pieced[..], earlier)
        };
        let looks_like_http = if client_side {
            b"GET ".starts_with(&head[..head.len().min(4)])
        } else {
            protocol.load(Ordering::Relaxed) == PROTOCOL_UPGRADE_ASKED
                && b"HTTP/1.".starts_with(&head[..head.len().min(7)])
        };
        let complete = head.windows(4).any(|w| w == b"\r\n\r\n");
        if looks_like_http && !complete && head.len() < MAX_HEAD {
            // Wait for the rest of the head.
            self.head = head.to_vec();
            return;
        }
        self.decided = true;
        let frames_from = if !looks_like_http || !complete {
            None
        } else if client_side {
            websocket::upgrade_request_len(head)
        } else {
            websocket::switching_protocols_len(head)
        };
        let next = match (client_side, frames_from.is_some()) {
            (true, true) => PROTOCOL_UPGRADE_ASKED,
            (false, true) => PROTOCOL_WEBSOCKET,
            _ => PROTOCOL_PLAIN,
        };
        if client_side {
            let _ = protocol.compare_exchange(
                PROTOCOL_UNKNOWN,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            protocol.store(next, Ordering::Relaxed);
        }
        if let Some(head_len) = frames_from {
            // Frames start after the head, inside this chunk.
            let mut cursor = FrameCursor::default();
            cursor.feed(&chunk[head_len.saturating_sub(earlier).min(chunk.len())..]);
            self.frames = Some(cursor);
        }
    }
}

fn lock(d: &Mutex<Direction>) -> std::sync::MutexGuard<'_, Direction> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Relays between `client` and `backend` until both directions are done, one fails,
/// nothing moves for `idle_timeout`, or `stop` resolves. When ballast ends the relay
/// (idle, stop), it finishes it cleanly as the module doc says. Both sockets are closed
/// when this returns.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    to_backend: &dyn Counter,
    to_client: &dyn Counter,
    idle_timeout: Option<Duration>,
    stop: impl Future<Output = ()>,
) -> io::Result<Ended> {
    let start = Instant::now();
    // Millis since `start` of the last byte moved either way, for the idle timer.
    let last_activity = AtomicU64::new(0);
    let protocol = AtomicU8::new(PROTOCOL_UNKNOWN);
    let up = Mutex::new(Direction::default());
    let down = Mutex::new(Direction::default());
    let both = async {
        let (up, down) = Pump::pair(&client, &backend, &up, &down);
        tokio::try_join!(
            up.run(to_backend, &protocol, &last_activity, start),
            down.run(to_client, &protocol, &last_activity, start),
        )
    };
    let idle = async {
        let Some(limit) = idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let end = tokio::select! {
        result = both => result.map(|_| Ended::Done),
        () = idle => Ok(Ended::Idle),
        () = stop => Ok(Ended::Stopped),
    };
    if matches!(end, Ok(Ended::Idle | Ended::Stopped)) {
        let websocket = protocol.load(Ordering::Relaxed) == PROTOCOL_WEBSOCKET;
        // Boxed: its state (read buffers) is allocated only for connections that are
        // being closed, not carried in every connection's task.
        let finish = Box::pin(async {
            let (up, down) = Pump::pair(&client, &backend, &up, &down);
            let frames = async {
                tokio::join!(
                    up.finish(websocket.then(websocket::close_to_backend), to_backend),
                    down.finish(websocket.then(websocket::close_to_client), to_client),
                )
            };
            let _ = tokio::time::timeout(FRAME_GRACE, frames).await;
            // Read what the peers still send (a Close answer) until they close, so
            // that closing does not reset the connection under them.
            let peers = async { tokio::join!(discard(&client), discard(&backend)) };
            let _ = tokio::time::timeout(CLOSE_GRACE, peers).await;
        });
        finish.await;
    }
    end
}

/// One direction: bytes from `from` to `to`, with its state in `dir`.
struct Pump<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    dir: &'a Mutex<Direction>,
    /// Bytes from the client (for telling a request from an answer).
    client_side: bool,
}

impl<'a> Pump<'a> {
    /// The two directions of a connection: client to backend, backend to client.
    fn pair(
        client: &'a TcpStream,
        backend: &'a TcpStream,
        up: &'a Mutex<Direction>,
        down: &'a Mutex<Direction>,
    ) -> (Pump<'a>, Pump<'a>) {
        (
            Pump {
                from: client,
                to: backend,
                dir: up,
                client_side: true,
            },
            Pump {
                from: backend,
                to: client,
                dir: down,
                client_side: false,
            },
        )
    }

    /// Moves bytes until `from` ends its writes, then shuts down the write half of `to`.
    /// Cancel-safe: everything read is in `dir` (delivered or pending) between awaits.
    async fn run(
        &self,
        counter: &dyn Counter,
        protocol: &AtomicU8,
        last_activity: &AtomicU64,
        start: Instant,
    ) -> io::Result<()> {
        loop {
            self.from.readable().await?;
            // Read and pass on one chunk inside `try_io`, so that a short read (the
            // socket is drained) can clear the readiness at once: this saves the read()
            // that would only return EAGAIN, one syscall per message per direction.
            // Readiness that a new packet sets meanwhile is not lost (tokio clears only
            // the readiness event it handed out).
            let mut outcome: Option<io::Result<usize>> = None;
            let _ = self.from.try_io(Interest::READABLE, || {
                let result = SCRATCH.with(|scratch| {
                    let scratch = &mut scratch.borrow_mut()[..];
                    self.pass_chunk(scratch, protocol, counter)
                });
                let drained = match &result {
                    Ok(n) => *n < SCRATCH_SIZE,
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                };
                outcome = Some(result);
                if drained {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            let n = match outcome {
                None => continue,
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Some(result) => result?,
            };
            if n == 0 {
                break;
            }
            last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            self.flush(counter, Some((last_activity, start))).await?;
        }
        self.flush(counter, None).await?;
        lock(self.dir).finished = true;
        shutdown_write(self.to)
    }

    /// Reads one chunk into `scratch`, notes it in the direction's state and writes what
    /// `to` takes at once; the rest goes to `pending`. 0 at end of stream.
    fn pass_chunk(
        &self,
        scratch: &mut [u8],
        protocol: &AtomicU8,
        counter: &dyn Counter,
    ) -> io::Result<usize> {
        use std::io::Read;
        let n = (&*socket2::SockRef::from(self.from)).read(scratch)?;
        if n == 0 {
            return Ok(0);
        }
        let mut dir = lock(self.dir);
        dir.observe(&scratch[..n], self.client_side, protocol);
        let written = try_write_all(self.to, &scratch[..n])?;
        counter.add(written as u64);
        dir.pending.extend_from_slice(&scratch[written..n]);
        Ok(n)
    }

    /// Writes out `pending`, waiting for `to` to take it.
    /// Counts what it writes: bytes count once delivered to the destination's socket.
    async fn flush(
        &self,
        counter: &dyn Counter,
        activity: Option<(&AtomicU64, Instant)>,
    ) -> io::Result<()> {
        loop {
            {
                let mut dir = lock(self.dir);
                if dir.pending.is_empty() {
                    if dir.pending.capacity() > SCRATCH_SIZE {
                        dir.pending = Vec::new();
                    }
                    return Ok(());
                }
                let written = try_write_all(self.to, &dir.pending)?;
                counter.add(written as u64);
                dir.pending.drain(..written);
                if let (true, Some((last, start))) = (written > 0, activity) {
                    last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                if dir.pending.is_empty() {
                    continue;
                }
            }
            self.to.writable().await?;
        }
    }

    /// Ends this direction cleanly: delivers what was read, completes the frame in
    /// flight and adds `close` (a WebSocket Close frame), then a FIN.
    async fn finish(&self, close: Option<Vec<u8>>, counter: &dyn Counter) -> io::Result<()> {
        if lock(self.dir).finished {
            return Ok(());
        }
        self.flush(counter, None).await?;
        if let Some(close) = close {
            let mut buf = vec![0u8; 16 * 1024];
            while lock(self.dir)
                .frames
                .as_ref()
                .is_some_and(|f| !f.at_boundary())
            {
                self.from.readable().await?;
                let n = match self.from.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                };
                let upto = lock(self.dir)
                    .frames
                    .as_mut()
                    .map_or(0, |f| f.until_boundary(&buf[..n]));
                write_all(self.to, &buf[..upto]).await?;
                counter.add(upto as u64);
            }
            if lock(self.dir)
                .frames
                .as_ref()
                .is_some_and(FrameCursor::at_boundary)
            {
                write_all(self.to, &close).await?;
            }
        }
        lock(self.dir).finished = true;
        shutdown_write(self.to)
    }
}

/// Writes as much of `bytes` as `to` takes now; returns how much.
fn try_write_all(to: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match to.try_write(&bytes[written..]) {
            Ok(w) => written += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Writes all of `bytes`, waiting for `to` as needed.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let written = try_write_all(to, bytes)?;
        bytes = &bytes[written..];
        if !bytes.is_empty() {
            to.writable().await?;
        }
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

// Interim: the resumable relay's interface over the relay above.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Close,
    Abort,
    Park,
}

#[derive(Debug)]
pub enum RelayEnd {
    Closed { first: Side },
    Failed { side: Side, error: io::Error },
    Idle,
    Stopped,
    Parked,
}

pub struct Relay {
    sockets: Option<(TcpStream, TcpStream)>,
    early: Vec<u8>,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Relay {
    pub fn new(client: TcpStream, backend: TcpStream) -> Relay {
        Relay {
            sockets: Some((client, backend)),
            early: Vec::new(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    pub fn with_early_bytes(mut self, early: Vec<u8>) -> Relay {
        self.early = early;
        self
    }

    pub fn totals(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    pub async fn run(
        &mut self,
        to_backend: &dyn Counter,
        to_client: &dyn Counter,
        idle_timeout: Option<Duration>,
        stop: impl Future<Output = Stop>,
    ) -> RelayEnd {
        let Some((client, backend)) = self.sockets.take() else {
            return RelayEnd::Stopped;
        };
        if !self.early.is_empty() {
            if let Err(error) = write_all(&backend, &self.early).await {
                return RelayEnd::Failed {
                    side: Side::Backend,
                    error,
                };
            }
            to_backend.add(self.early.len() as u64);
        }
        let up = |n| {
            self.sent.fetch_add(n, Ordering::Relaxed);
            to_backend.add(n)
        };
        let down = |n| {
            self.received.fetch_add(n, Ordering::Relaxed);
            to_client.add(n)
        };
        let aborted = std::sync::atomic::AtomicBool::new(false);
        let stop = async {
            if stop.await == Stop::Abort {
                aborted.store(true, Ordering::Relaxed);
            }
        };
        match relay(client, backend, &up, &down, idle_timeout, stop).await {
            Ok(Ended::Done) => RelayEnd::Closed {
                first: Side::Client,
            },
            Ok(Ended::Idle) => RelayEnd::Idle,
            Ok(Ended::Stopped) => RelayEnd::Stopped,
            Err(error) => RelayEnd::Failed {
                side: Side::Client,
                error,
            },
        }
    }
}
