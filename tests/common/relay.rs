//! The relay driven on its own, on real sockets: connected pairs, checked byte streams,
//! and a relay run in a task that parks, hands over and stops on request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast::relay::{Relay, RelayEnd, RelayState, Stop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::DEADLINE;

/// Deterministic, non-repeating-looking bytes.
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A connected pair on loopback: (the peer's end, the relay's end).
pub async fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (relay_end, _) = listener.accept().await.unwrap();
    (peer, relay_end)
}

/// The byte stream `payload` makes, generated as it goes: (seed, position).
pub struct Stream(pub u32);

impl Stream {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            *b = self.0 as u8;
        }
    }
}

/// Writes `len` bytes of the stream seeded `seed`, then ends the writes.
pub async fn send_stream(mut to: tokio::net::tcp::OwnedWriteHalf, seed: u32, len: usize) {
    let mut stream = Stream(seed);
    let mut chunk = vec![0u8; 61_000];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.fill(&mut chunk[..n]);
        to.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    to.shutdown().await.unwrap();
}

/// Reads until the end of stream, checking each byte against the stream seeded `seed`;
/// returns how many arrived. Once past `gate_at` bytes it waits for `gate` to open.
pub async fn check_stream(
    mut from: tokio::net::tcp::OwnedReadHalf,
    seed: u32,
    gate: Option<(u64, tokio::sync::oneshot::Receiver<()>)>,
) -> u64 {
    let mut stream = Stream(seed);
    let mut buf = vec![0u8; 50_000];
    let mut expected = vec![0u8; 50_000];
    let mut total = 0u64;
    let mut gate = gate;
    loop {
        if let Some((at, _)) = &gate {
            if total >= *at {
                let (_, open) = gate.take().unwrap();
                open.await.unwrap();
            }
        }
        let n = from.read(&mut buf).await.unwrap();
        if n == 0 {
            return total;
        }
        stream.fill(&mut expected[..n]);
        assert!(
            buf[..n] == expected[..n],
            "bytes {total}..{} differ from what was sent",
            total + n as u64
        );
        total += n as u64;
    }
}

/// What the test asks of a relay driven in its own task.
pub enum Ask {
    Stop(Stop),
    /// Park, take the relay apart (the sockets leave the runtime and come back, as
    /// they would through another process), put it together again and resume.
    HandOver,
}

/// A relay run in its own task until it ends; parks on request and resumes at once.
pub struct Driven {
    pub asks: mpsc::UnboundedSender<Ask>,
    /// The state at each park, in order.
    pub parks: mpsc::UnboundedReceiver<RelayState>,
    /// Bytes counted: to the backend, to the client.
    pub counted: [Arc<AtomicU64>; 2],
    pub task: tokio::task::JoinHandle<(RelayEnd, Relay)>,
}

pub fn drive(mut relay: Relay, idle_timeout: Option<Duration>) -> Driven {
    let (asks, mut asked) = mpsc::unbounded_channel();
    let (parked, parks) = mpsc::unbounded_channel();
    let counted = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let [up, down] = counted.clone();
    let task = tokio::spawn(async move {
        let to_backend = move |n: u64| {
            up.fetch_add(n, Ordering::Relaxed);
        };
        let to_client = move |n: u64| {
            down.fetch_add(n, Ordering::Relaxed);
        };
        loop {
            let mut hand_over = false;
            let stop = async {
                match asked.recv().await {
                    Some(Ask::Stop(stop)) => stop,
                    Some(Ask::HandOver) => {
                        hand_over = true;
                        Stop::Park
                    }
                    None => std::future::pending().await,
                }
            };
            let end = relay.run(&to_backend, &to_client, idle_timeout, stop).await;
            if !matches!(end, RelayEnd::Parked) {
                return (end, relay);
            }
            let _ = parked.send(relay.state().clone());
            if hand_over {
                let (client, backend, state) = relay.into_parts();
                let client = TcpStream::from_std(client.into_std().unwrap()).unwrap();
                let backend = TcpStream::from_std(backend.into_std().unwrap()).unwrap();
                relay = Relay::from_parts(client, backend, state);
            }
        }
    });
    Driven {
        asks,
        parks,
        counted,
        task,
    }
}

impl Driven {
    pub fn counted(&self) -> (u64, u64) {
        (
            self.counted[0].load(Ordering::Relaxed),
            self.counted[1].load(Ordering::Relaxed),
        )
    }

    /// Asks for a park (or a hand-over) and returns the state it parked with.
    pub async fn park(&mut self, ask: Ask) -> RelayState {
        self.asks.send(ask).unwrap();
        timeout(DEADLINE, self.parks.recv())
            .await
            .expect("parked in time")
            .expect("parked, not ended")
    }

    pub async fn end(self) -> (RelayEnd, Relay) {
        timeout(DEADLINE, self.task)
            .await
            .expect("the relay ends in time")
            .unwrap()
    }
}

/// Writes to `stream` until its socket stays full (the relay no longer reads it, as its
/// bytes wait for a backend that does not read); returns how many bytes it wrote.
pub async fn write_until_stuck(stream: &TcpStream) -> u64 {
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0u64;
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "the socket never filled up");
        stream.writable().await.unwrap();
        match stream.try_write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let stuck = Duration::from_millis(500);
                if timeout(stuck, stream.writable()).await.is_err() {
                    return written;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// A checked stream each way through a relay, `len` bytes each: the client sends the
/// stream seeded `seeds[0]`, the backend the one seeded `seeds[1]`. The backend stops
/// reading at `gate_at` bytes until the gate opens.
pub struct BothWays {
    len: usize,
    sends: [tokio::task::JoinHandle<()>; 2],
    checks: [tokio::task::JoinHandle<u64>; 2],
    open_gate: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BothWays {
    /// Starts both streams on the peers' ends of the connection (`client`, `backend`).
    pub fn start(
        client: TcpStream,
        backend: TcpStream,
        len: usize,
        seeds: [u32; 2],
        gate_at: u64,
    ) -> BothWays {
        let (client_read, client_write) = client.into_split();
        let (backend_read, backend_write) = backend.into_split();
        let (open_gate, gate) = tokio::sync::oneshot::channel();
        BothWays {
            len,
            sends: [
                tokio::spawn(send_stream(client_write, seeds[0], len)),
                tokio::spawn(send_stream(backend_write, seeds[1], len)),
            ],
            checks: [
                tokio::spawn(check_stream(backend_read, seeds[0], Some((gate_at, gate)))),
                tokio::spawn(check_stream(client_read, seeds[1], None)),
            ],
            open_gate: Some(open_gate),
        }
    }

    /// Hands `relay` over (parked, taken apart, put together again) until it carries
    /// bytes read but not yet delivered towards the backend, which stopped reading at the
    /// gate; then opens the gate. (How many hand-overs, bytes the last one carried.)
    pub async fn hand_over_until_pending(&mut self, relay: &mut Driven) -> (usize, usize) {
        let deadline = Instant::now() + DEADLINE;
        let mut handovers = 0;
        let pending = loop {
            let state = relay.park(Ask::HandOver).await;
            handovers += 1;
            if !state.to_backend.pending.is_empty() {
                break state.to_backend.pending.len();
            }
            assert!(
                Instant::now() < deadline,
                "no hand-over carried bytes pending"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Some(open_gate) = self.open_gate.take() {
            open_gate.send(()).unwrap();
        }
        (handovers, pending)
    }

    /// The relay ends once both streams have: every byte arrived each way, once and in
    /// order, and was counted once. Returns the relay.
    pub async fn finish(self, relay: Driven) -> Relay {
        let len = self.len as u64;
        let (end, relay) = relay.end().await;
        assert!(matches!(end, RelayEnd::Closed { .. }), "{end:?}");
        for send in self.sends {
            send.await.unwrap();
        }
        for check in self.checks {
            assert_eq!(check.await.unwrap(), len);
        }
        assert_eq!(relay.totals(), (len, len));
        let state = relay.state();
        assert_eq!(
            (state.to_backend.delivered, state.to_client.delivered),
            (len, len)
        );
        relay
    }
}
