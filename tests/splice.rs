//! Bulk bytes spliced in the kernel (socket → pipe → socket): they arrive intact and
//! counted both ways; bytes held in a pipe are handed back at a park and a hand-over,
//! delivered once and in order, delivered before a FIN and at a clean close; urgent
//! data neither stalls a spliced stream nor cuts it short; no pipe outlives its
//! connection.
//!
//! Every test here counts or opens pipes, and the count is the process's: they run one
//! at a time (`SPLICING`), in a test binary of their own.

mod common;

use std::time::Duration;

use ballast::relay::{Relay, RelayEnd, Stop};
use ballast::splice::open_pipes;
use common::relay::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::{timeout, Instant};

static SPLICING: Mutex<()> = Mutex::const_new(());

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_is_spliced_both_ways_and_handed_back_with_what_its_pipes_hold() {
    let _one_at_a_time = SPLICING.lock().await;
    const LEN: usize = 20 * MIB;
    let (client, relay_client) = connected().await;
    let (backend, relay_backend) = connected().await;
    // The backend stops reading at 10 MiB until the test lets it go on: the pipe
    // towards it fills, and a hand-over then carries what it holds.
    let mut streams = BothWays::start(client, backend, LEN, [11, 12], 10 * MIB as u64);
    bulk_waits_at(&relay_client).await;
    bulk_waits_at(&relay_backend).await;
    let mut relay = drive(Relay::new(relay_client, relay_backend), None);

    wait_until("both directions splice", || open_pipes() == 2).await;
    wait_until("the backend stops reading at 10 MiB", || {
        relay.counted().0 >= 10 * MIB as u64
    })
    .await;
    // The backend's buffers are full: what the relay read since sits in its pipe, and
    // a park reads it out into the state.
    let (_, held) = streams.hand_over_until_pending(&mut relay).await;
    let relay_after = streams.finish(relay).await;
    drop(relay_after);
    assert_eq!(open_pipes(), 0, "the relay's pipes are closed with it");
    println!("a hand-over carried {held} bytes that a pipe held");
}

/// Waits until `socket` has a whole relay read (64 KiB) waiting: the relay's first read
/// of it fills its buffer, and the direction splices from then on.
async fn bulk_waits_at(socket: &TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + DEADLINE;
    while socket.peek(&mut buf).await.unwrap() < buf.len() {
        assert!(Instant::now() < deadline, "64 KiB never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A relay between a client that sends `len` bytes (in a task of its own) and a backend
/// that reads nothing yet, with small buffers on the backend's side, so that the
/// client's bytes pile up in front of the relay, its reads fill, and the direction
/// splices: (client, backend, the driven relay, the client's writer).
async fn spliced_towards_a_backend_that_does_not_read(
    len: usize,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    TcpStream,
    Driven,
    tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
) {
    let (client, relay_client) = connected().await;
    let (backend, relay_backend) = connected().await;
    socket2::SockRef::from(&relay_backend)
        .set_send_buffer_size(16 * 1024)
        .unwrap();
    socket2::SockRef::from(&backend)
        .set_recv_buffer_size(16 * 1024)
        .unwrap();
    let (client_read, mut client_write) = client.into_split();
    let writer = tokio::spawn(async move {
        client_write.write_all(&payload(len)).await.unwrap();
        client_write
    });
    bulk_waits_at(&relay_client).await;
    let relay = drive(Relay::new(relay_client, relay_backend), None);
    wait_until("the direction splices", || open_pipes() == 1).await;
    (client_read, backend, relay, writer)
}

async fn written(
    writer: tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
) -> tokio::net::tcp::OwnedWriteHalf {
    timeout(DEADLINE, writer)
        .await
        .expect("the client's bytes written in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_behind_bytes_in_a_pipe_comes_after_them() {
    let _one_at_a_time = SPLICING.lock().await;
    let len = 4 * MIB;
    let (client, mut backend, relay, writer) =
        spliced_towards_a_backend_that_does_not_read(len).await;
    let mut received = Vec::new();
    let read = async {
        timeout(DEADLINE, backend.read_to_end(&mut received))
            .await
            .expect("everything, then the end, in time")
            .unwrap()
    };
    let write = async {
        let mut writer = written(writer).await;
        writer.shutdown().await.unwrap();
        writer
    };
    let (_, writer) = tokio::join!(read, write);
    assert_eq!(received.len(), len);
    assert!(received == payload(len), "bytes differ");
    drop((backend, client, writer));
    let (end, relay) = relay.end().await;
    assert!(!matches!(end, RelayEnd::Parked), "{end:?}");
    assert_eq!(relay.totals().0, len as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_delivers_every_byte_read_its_pipe_held_too() {
    let _one_at_a_time = SPLICING.lock().await;
    let (mut client, mut backend, relay, _writer) =
        spliced_towards_a_backend_that_does_not_read(4 * MIB).await;
    // The backend's small buffers are full: what the relay read since sits in its pipe.
    let mut delivered = relay.counted().0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = relay.counted().0;
        if now == delivered {
            break;
        }
        delivered = now;
    }
    relay.asks.send(Ask::Stop(Stop::Close)).unwrap();
    let mut received = Vec::new();
    timeout(DEADLINE, backend.read_to_end(&mut received))
        .await
        .expect("what the relay read, then the end, in time")
        .unwrap();
    assert_closed(&mut client).await;
    let (end, relay) = relay.end().await;
    assert!(matches!(end, RelayEnd::Stopped), "{end:?}");
    // A clean close delivers every byte the relay read (not those still in its socket),
    // those its pipe held included.
    assert!(
        received.len() as u64 > delivered,
        "{} bytes received, {delivered} delivered before the close",
        received.len()
    );
    assert!(received == payload(received.len()), "bytes differ");
    assert_eq!(relay.totals().0, received.len() as u64);
    assert!(relay.state().to_backend.pending.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_data_in_a_spliced_stream_neither_stalls_nor_cuts_it_short() {
    let _one_at_a_time = SPLICING.lock().await;
    let (client_read, mut backend, relay, writer) =
        spliced_towards_a_backend_that_does_not_read(MIB).await;
    let mut received = vec![0u8; MIB];
    timeout(DEADLINE, backend.read_exact(&mut received))
        .await
        .expect("the first MiB in time")
        .unwrap();
    assert!(received == payload(MIB), "the first MiB differs");
    let mut client = written(writer).await;
    // One byte of urgent data (out of band: not part of the stream), then more.
    socket2::SockRef::from(client.as_ref())
        .send_out_of_band(b"!")
        .unwrap();
    let after = payload(100_000);
    client.write_all(&after).await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(DEADLINE, backend.read_to_end(&mut rest))
        .await
        .expect("the rest and the end in time")
        .unwrap();
    assert_eq!(MIB + rest.len(), MIB + after.len(), "bytes received in all");
    assert!(rest == after, "the bytes after the urgent data differ");
    drop((client, client_read, backend));
    relay.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_connections_through_ballast_leave_no_pipe_open() {
    let _one_at_a_time = SPLICING.lock().await;
    let backend = Backend::echo("echo").await;
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
        backends_toml(&[("only", backend.addr, 1)])
    ))
    .await;
    let addr = ballast.listener_addr("web");
    let data = payload(MIB / 2);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut most = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(open_pipes());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            most
        })
    };
    for _batch in 0..10 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let data = data.clone();
            batch.spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (mut reader, mut writer) = stream.into_split();
                let sent = data.clone();
                let write = tokio::spawn(async move {
                    writer.write_all(&sent).await.unwrap();
                    writer.shutdown().await.unwrap();
                });
                let mut echoed = Vec::new();
                timeout(DEADLINE, reader.read_to_end(&mut echoed))
                    .await
                    .expect("the echo in time")
                    .unwrap();
                write.await.unwrap();
                assert!(echoed == data, "echoed bytes differ");
            });
        }
        while let Some(done) = batch.join_next().await {
            done.unwrap();
        }
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let most_open = sampler.await.unwrap();
    assert!(most_open > 0, "no connection spliced");
    wait_until("every pipe closed with its connection", || {
        open_pipes() == 0
    })
    .await;
    println!("at most {most_open} pipes open at once");
    ballast.shutdown(Duration::from_secs(1)).await;
}
