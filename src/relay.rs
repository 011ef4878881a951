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
//! until it ends too. An error on either side ends both directions.
//!
//! Bytes are counted as they are relayed, so counters move while a connection is open.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Size of the per-thread scratch buffer: one read moves at most this much.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    /// Borrowed only between two awaits, never across one.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their writes; every byte was delivered.
    Done,
    /// Nothing moved either way for `idle_timeout`.
    Idle,
    /// The `stop` future resolved (shutdown, drain deadline).
    Stopped,
}

/// Which way bytes move, for counting.
pub trait Counter: Sync {
    fn add(&self, bytes: u64);
}

impl<F: Fn(u64) + Sync> Counter for F {
    fn add(&self, bytes: u64) {
        self(bytes)
    }
}

/// Relays between `client` and `backend` until both directions are done, one fails,
/// nothing moves for `idle_timeout`, or `stop` resolves. Both sockets are closed when
/// this returns (they are dropped); when ballast ends the relay (idle, stop), both sides
/// get a FIN first. An error on one side (a reset) ends both directions at once, as a
/// relay to a peer that is gone has nothing left to do.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    to_backend: &dyn Counter,
    to_client: &dyn Counter,
    idle_timeout: Option<Duration>,
    stop: impl Future<Output = ()>,
) -> io::Result<RelayEnd> {
    let start = Instant::now();
    // Millis since `start` of the last byte moved either way, for the idle timer.
    let last_activity = AtomicU64::new(0);
    let both = async {
        tokio::try_join!(
            pump(&client, &backend, to_backend, &last_activity, start),
            pump(&backend, &client, to_client, &last_activity, start),
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
        result = both => result.map(|_| RelayEnd::Done),
        () = idle => Ok(RelayEnd::Idle),
        () = stop => Ok(RelayEnd::Stopped),
    };
    if matches!(end, Ok(RelayEnd::Idle | RelayEnd::Stopped)) {
        // Closed by ballast: a FIN both ways, so each peer sees a clean end of stream.
        for socket in [&client, &backend] {
            let _ = socket2::SockRef::from(socket).shutdown(Shutdown::Write);
        }
    }
    end
}

/// Reads one chunk from `from` into `scratch` and writes what `to` takes at once; the
/// rest goes to `pending`. `None` at end of stream.
fn pass_chunk(
    from: &TcpStream,
    to: &TcpStream,
    scratch: &mut [u8],
    pending: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    use std::io::Read;
    let n = (&*socket2::SockRef::from(from)).read(scratch)?;
    if n == 0 {
        return Ok(None);
    }
    let mut written = 0;
    while written < n {
        match to.try_write(&scratch[written..n]) {
            Ok(w) => written += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    pending.extend_from_slice(&scratch[written..n]);
    Ok(Some(n))
}

/// Moves bytes from `from` to `to` until `from` ends its writes, then shuts down the
/// write half of `to`. Cancel-safe in the sense that matters here: dropping it loses
/// only bytes that the connection is being closed over anyway.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counter: &dyn Counter,
    last_activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    // Bytes read but not yet written; empty (and unallocated) in the common case.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        from.readable().await?;
        // Read and pass on one chunk inside `try_io`, so that a short read (the socket
        // is drained) can clear the readiness at once: this saves the read() that would
        // only return EAGAIN, one syscall per message per direction. Readiness that a
        // new packet sets meanwhile is not lost (tokio clears only the readiness event
        // it handed out).
        let mut outcome: Option<io::Result<Option<usize>>> = None;
        let _ = from.try_io(Interest::READABLE, || {
            let result = SCRATCH
                .with(|scratch| pass_chunk(from, to, &mut scratch.borrow_mut(), &mut pending));
            let drained = match &result {
                Ok(Some(n)) => *n < SCRATCH_SIZE,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                Ok(None) => false,
            };
            outcome = Some(result);
            if drained {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        let read = match outcome {
            None => continue,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Some(result) => result?,
        };
        let Some(n) = read else { break };
        counter.add(n as u64);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut written = 0;
        while written < pending.len() {
            to.writable().await?;
            match to.try_write(&pending[written..]) {
                Ok(w) => {
                    written += w;
                    last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        pending.clear();
        if pending.capacity() > SCRATCH_SIZE {
            pending = Vec::new();
        }
    }
    // `from` sent FIN: pass it on. The peer may already be gone, which is not an error
    // worth failing the other direction for.
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}
