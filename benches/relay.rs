//! Micro-benchmark of the relay's cost per message: one round trip of a small message
//! from a client through a [`Relay`] to an echo backend and back, beside the same round
//! trip with no relay. Everything runs on one thread (a current-thread runtime), so the
//! time per round trip is the CPU all parties spend on it, kernel included; the
//! difference between the two is what the relay adds. Run with `cargo bench --bench
//! relay`; compare commits within one run. Most of that time is the kernel's; for the
//! relay's own share, count instructions (`valgrind --tool=callgrind` on the bench
//! binary) instead of timing.

use std::time::{Duration, Instant};

use ballast::relay::Relay;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A connected pair on loopback: (the connecting end, the accepted end).
async fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (far, _) = listener.accept().await.unwrap();
    near.set_nodelay(true).unwrap();
    far.set_nodelay(true).unwrap();
    (near, far)
}

/// Echoes whatever `stream` sends until it closes.
async fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A client connected to an echo backend, through a relay or not.
async fn client(through_relay: bool) -> TcpStream {
    let (client, far) = connected().await;
    if !through_relay {
        tokio::spawn(echo(far));
        return client;
    }
    let (relay_backend, backend) = connected().await;
    tokio::spawn(echo(backend));
    tokio::spawn(async move {
        let mut relay = Relay::new(far, relay_backend);
        let count = |_: u64| {};
        relay
            .run(&count, &count, None, std::future::pending())
            .await
    });
    client
}

fn round_trips(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("round_trip");
    group.measurement_time(Duration::from_secs(5));
    for size in [64usize, 4096] {
        for (name, through_relay) in [("direct", false), ("relay", true)] {
            let mut stream = rt.block_on(client(through_relay));
            let message = vec![7u8; size];
            let mut answer = vec![0u8; size];
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, _| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            stream.write_all(&message).await.unwrap();
                            stream.read_exact(&mut answer).await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, round_trips);
criterion_main!(benches);
