//! Bytes through ballast come back intact: a large payload both ways, and a half-closed
//! exchange where the client stops writing and still receives the whole answer. And the
//! relay on its own, on real sockets: parked mid-stream and resumed (also through its
//! parts) with every byte delivered once and in order, a WebSocket parked mid-message
//! and later closed at a frame boundary, a reset noticed while the backend does not
//! read, a FIN that ends nothing early, an abort that does not wait.

mod common;

use std::time::Duration;

use ballast::relay::{Relay, RelayEnd, Side, Stop};
use ballast::websocket::{self, FrameCursor};
use common::relay::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

fn one_backend(addr: std::net::SocketAddr) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
        backends_toml(&[("only", addr, 1)])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_payload_echoes_back_intact() {
    let backend = Backend::echo("echo").await;
    let ballast = start(&one_backend(backend.addr)).await;
    let stream = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let data = payload(50 * 1024 * 1024);
    let sent = data.clone();
    let write = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(data.len());
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        reader.read_to_end(&mut echoed),
    )
    .await
    .expect("echo in time")
    .unwrap();
    write.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "echoed bytes differ");

    let route = ballast.ballast.routing();
    let state = &route
        .listener("web")
        .unwrap()
        .backend("only")
        .unwrap()
        .state;
    wait_until("byte counters", || {
        state.received_bytes() == data.len() as u64
    })
    .await;
    assert_eq!(state.sent_bytes(), data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_still_receives_the_whole_answer() {
    // The backend reads the whole request (until the client's FIN), then answers with
    // 4 MiB that depend on what it read, then closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        let mut answer = format!("got {} bytes\n", request.len()).into_bytes();
        answer.extend(payload(4 * 1024 * 1024));
        stream.write_all(&answer).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let ballast = start(&one_backend(backend_addr)).await;
    let mut stream = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    stream.write_all(&payload(100_000)).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    let mut expected = b"got 100000 bytes\n".to_vec();
    expected.extend(payload(4 * 1024 * 1024));
    assert_eq!(answer.len(), expected.len());
    assert!(answer == expected, "answer differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_half_closes_still_receives_the_rest_of_the_client_stream() {
    // The backend says hello and ends its writes at once, then counts what it receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap();
        let _ = tx.send(request);
    });
    let ballast = start(&one_backend(backend_addr)).await;
    let mut stream = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    let mut hello = Vec::new();
    stream.read_to_end(&mut hello).await.unwrap();
    assert_eq!(hello, b"hello");
    let data = payload(1024 * 1024);
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let received = tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("in time")
        .unwrap();
    assert!(received == data);
}

#[tokio::test]
async fn a_relay_carries_no_buffer_in_its_task() {
    // Every open connection holds one relay and its run future: they must stay small
    // for many idle connections to be cheap (buffers are per thread, or allocated when
    // needed).
    let (_, a) = connected().await;
    let (_, b) = connected().await;
    let mut relay = Relay::new(a, b);
    let relay_size = std::mem::size_of_val(&relay);
    let count = |_: u64| {};
    let run = relay.run(&count, &count, None, std::future::pending());
    let run_size = std::mem::size_of_val(&run);
    println!("Relay: {relay_size} bytes, its run future: {run_size} bytes");
    assert!(
        relay_size + run_size < 1024,
        "the relay is {relay_size} bytes and its future {run_size}"
    );
}

#[tokio::test]
async fn client_sockets_inherit_nodelay_and_keepalive_from_their_listener() {
    let config = ballast::config::Config::parse(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:1\"\n",
        "test.toml",
    )
    .unwrap();
    let bound = ballast::bind(&config).unwrap();
    let (_, listener) = &bound.listeners[0];
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let sock = socket2::SockRef::from(&accepted);
    assert!(sock.nodelay().unwrap());
    assert!(sock.keepalive().unwrap());
    assert_eq!(
        sock.keepalive_time().unwrap(),
        std::time::Duration::from_secs(60)
    );
}

// The relay on its own.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_parked_mid_stream_and_resumed_delivers_50_mib_each_way_exactly_once_in_order() {
    const LEN: usize = 50 * 1024 * 1024;
    const MIB: u64 = 1024 * 1024;
    let (client, relay_client) = connected().await;
    let (backend, relay_backend) = connected().await;
    let mut relay = drive(Relay::new(relay_client, relay_backend), None);
    // The backend stops reading at 40 MiB until the test lets it go on, so that a
    // hand-over finds bytes pending towards it.
    let mut streams = BothWays::start(client, backend, LEN, [1, 2], 40 * MIB);

    // Parks on the same sockets, while bytes flow both ways.
    let mut parked_at = Vec::new();
    for k in 1..=5 {
        wait_until("bytes relayed", || {
            let (up, down) = relay.counted();
            up + down >= k * 8 * MIB
        })
        .await;
        let state = relay.park(Ask::Stop(Stop::Park)).await;
        parked_at.push((state.to_backend.delivered, state.to_client.delivered));
    }
    // Then hands it over until it carries bytes read but not yet delivered.
    let (handovers, pending) = streams.hand_over_until_pending(&mut relay).await;
    streams.finish(relay).await;
    assert!(
        parked_at.windows(2).all(|w| w[0] <= w[1]) && parked_at[0] != (0, 0),
        "parked mid-stream: {parked_at:?}"
    );
    println!(
        "parked at (to the backend, to the client): {parked_at:?}; \
         handed over {handovers} times, the last with {pending} bytes pending"
    );
}

/// The upgrade request of `common::ws_connect`.
const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// Reads one whole frame, masked or not: (opcode, unmasked payload).
async fn read_any_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Some(h) = websocket::parse_header(buf) {
            let end = h.header_len + h.payload_len as usize;
            if buf.len() >= end {
                let mut payload = buf[h.header_len..end].to_vec();
                if let Some(mask) = h.mask {
                    websocket::apply_mask(&mut payload, mask);
                }
                buf.drain(..end);
                return (h.opcode, payload);
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("a frame in time")
            .expect("no reset");
        assert!(n > 0, "ended inside a frame ({} bytes of it)", buf.len());
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the end of stream; fails on anything left over.
async fn assert_ends(stream: &mut TcpStream, buf: &[u8]) {
    assert!(buf.is_empty(), "{} more bytes", buf.len());
    let mut rest = Vec::new();
    timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the end in time")
        .unwrap();
    assert!(rest.is_empty(), "{} more bytes before the end", rest.len());
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_parked_mid_message_resumes_intact_and_later_closes_at_a_frame_boundary() {
    let (mut client, relay_client) = connected().await;
    let (mut backend, relay_backend) = connected().await;
    let mut relay = drive(Relay::new(relay_client, relay_backend), None);
    let mut at_client = Vec::new();
    let mut at_backend = Vec::new();

    // The handshake, the backend's answer in two pieces.
    client.write_all(UPGRADE).await.unwrap();
    let mut head = vec![0u8; UPGRADE.len()];
    backend.read_exact(&mut head).await.unwrap();
    assert_eq!(head, UPGRADE);
    backend.write_all(&SWITCHING[..20]).await.unwrap();
    wait_until("the first piece of the answer", || relay.counted().1 == 20).await;
    backend.write_all(&SWITCHING[20..]).await.unwrap();
    backend
        .write_all(&websocket::encode_frame(websocket::OP_TEXT, b"hello"))
        .await
        .unwrap();
    let (answer, rest) = read_answer_head(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    at_client.extend(rest);
    assert_eq!(
        read_any_frame(&mut client, &mut at_client).await,
        (websocket::OP_TEXT, b"hello".to_vec())
    );

    // A client message parked half-way through and handed over.
    let message: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let frame = websocket::encode_masked_frame(websocket::OP_BINARY, &message, [9, 8, 7, 6]);
    let half = frame.len() / 2;
    client.write_all(&frame[..half]).await.unwrap();
    let sent = (UPGRADE.len() + half) as u64;
    wait_until("half the message relayed", || relay.counted().0 == sent).await;
    let state = relay.park(Ask::HandOver).await;
    assert_eq!(format!("{:?}", state.protocol), "WebSocket");
    let cursor: &FrameCursor = state.to_backend.frames.as_ref().unwrap();
    assert!(!cursor.at_boundary(), "parked inside the frame");
    client.write_all(&frame[half..]).await.unwrap();
    assert_eq!(
        read_any_frame(&mut backend, &mut at_backend).await,
        (websocket::OP_BINARY, message.clone())
    );

    // A backend message parked half-way through, resumed on the same sockets.
    let answer = websocket::encode_frame(websocket::OP_BINARY, &message[..70_000]);
    let before = relay.counted().1;
    backend.write_all(&answer[..30_000]).await.unwrap();
    wait_until("part of the answer relayed", || {
        relay.counted().1 == before + 30_000
    })
    .await;
    let state = relay.park(Ask::Stop(Stop::Park)).await;
    assert!(!state.to_client.frames.as_ref().unwrap().at_boundary());
    backend.write_all(&answer[30_000..]).await.unwrap();
    assert_eq!(
        read_any_frame(&mut client, &mut at_client).await,
        (websocket::OP_BINARY, message[..70_000].to_vec())
    );

    // Closed by ballast while the client is inside a frame: the client gets its Close
    // (1012) at once, as nothing is in flight towards it; the backend gets the rest of
    // the frame first, then its Close (1001).
    let last = websocket::encode_masked_frame(websocket::OP_TEXT, b"last words", [1, 2, 3, 4]);
    let before = relay.counted().0;
    client.write_all(&last[..5]).await.unwrap();
    wait_until("the start of the last frame relayed", || {
        relay.counted().0 == before + 5
    })
    .await;
    relay.asks.send(Ask::Stop(Stop::Close)).unwrap();
    let (opcode, payload) = read_any_frame(&mut client, &mut at_client).await;
    assert_eq!((opcode, close_code(&payload)), (websocket::OP_CLOSE, 1012));
    client.write_all(&last[5..]).await.unwrap();
    assert_eq!(
        read_any_frame(&mut backend, &mut at_backend).await,
        (websocket::OP_TEXT, b"last words".to_vec())
    );
    let (opcode, payload) = read_any_frame(&mut backend, &mut at_backend).await;
    assert_eq!((opcode, close_code(&payload)), (websocket::OP_CLOSE, 1001));
    assert_ends(&mut backend, &at_backend).await;
    assert_ends(&mut client, &at_client).await;
    drop((client, backend));
    let (end, relay) = relay.end().await;
    assert!(matches!(end, RelayEnd::Stopped), "{end:?}");
    let frames_to_backend = (UPGRADE.len() + frame.len() + last.len()) as u64;
    let frames_to_client = (SWITCHING.len() + 7 + answer.len()) as u64;
    assert_eq!(relay.totals(), (frames_to_backend, frames_to_client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_while_its_backend_is_not_reading_ends_the_relay_within_a_second() {
    let (client, relay_client) = connected().await;
    let (_backend_that_never_reads, relay_backend) = connected().await;
    let count = |_: u64| {};
    let relay = tokio::spawn(async move {
        let mut relay = Relay::new(relay_client, relay_backend);
        relay
            .run(&count, &count, None, std::future::pending())
            .await
    });
    write_until_stuck(&client).await;
    let client = client.into_std().unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let end = timeout(Duration::from_secs(1), relay)
        .await
        .expect("the relay ends within 1 s of the client's reset")
        .unwrap();
    match end {
        RelayEnd::Failed {
            side: Side::Client,
            error,
        } => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_fin_behind_bytes_the_backend_has_not_read_yet_ends_nothing_early() {
    let (mut client, relay_client) = connected().await;
    let (mut backend, relay_backend) = connected().await;
    let relay = drive(Relay::new(relay_client, relay_backend), None);
    let written = write_until_stuck(&client).await;
    client.shutdown().await.unwrap();
    // Now the backend reads it all, answers and ends its writes.
    let mut received = Vec::new();
    timeout(DEADLINE, backend.read_to_end(&mut received))
        .await
        .expect("the client's bytes in time")
        .unwrap();
    assert_eq!(received.len() as u64, written);
    assert!(received.iter().all(|b| *b == 7));
    backend.write_all(b"got it").await.unwrap();
    backend.shutdown().await.unwrap();
    let mut answer = Vec::new();
    timeout(DEADLINE, client.read_to_end(&mut answer))
        .await
        .expect("the answer in time")
        .unwrap();
    assert_eq!(answer, b"got it");
    let (end, relay) = relay.end().await;
    assert!(
        matches!(
            end,
            RelayEnd::Closed {
                first: Side::Client
            }
        ),
        "{end:?}"
    );
    assert_eq!(relay.totals(), (written, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_returns_at_once_even_with_bytes_that_cannot_be_delivered() {
    let (client, relay_client) = connected().await;
    let (_backend_that_never_reads, relay_backend) = connected().await;
    let relay = drive(Relay::new(relay_client, relay_backend), None);
    write_until_stuck(&client).await;
    let asked = Instant::now();
    relay.asks.send(Ask::Stop(Stop::Abort)).unwrap();
    let (end, relay) = relay.end().await;
    let took = asked.elapsed();
    assert!(matches!(end, RelayEnd::Stopped), "{end:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        !relay.state().to_backend.pending.is_empty(),
        "bytes were left pending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_go_first_and_are_seen_as_the_start_of_the_stream() {
    let (mut client, relay_client) = connected().await;
    let (mut backend, relay_backend) = connected().await;
    // A stage before the pick read the start of the upgrade request.
    let relay = drive(
        Relay::new(relay_client, relay_backend).with_early_bytes(UPGRADE[..10].to_vec()),
        None,
    );
    client.write_all(&UPGRADE[10..]).await.unwrap();
    let mut head = vec![0u8; UPGRADE.len()];
    backend.read_exact(&mut head).await.unwrap();
    assert_eq!(head, UPGRADE);
    backend.write_all(SWITCHING).await.unwrap();
    let (answer, _) = read_answer_head(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    // Recognised as a WebSocket: a stop closes with Close frames.
    relay.asks.send(Ask::Stop(Stop::Close)).unwrap();
    let mut at_client = Vec::new();
    let (opcode, payload) = read_any_frame(&mut client, &mut at_client).await;
    assert_eq!((opcode, close_code(&payload)), (websocket::OP_CLOSE, 1012));
    drop((client, backend));
    let (end, relay) = relay.end().await;
    assert!(matches!(end, RelayEnd::Stopped), "{end:?}");
    assert_eq!(relay.totals().0, UPGRADE.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_ends_cleanly_after_its_timeout_and_not_while_bytes_move() {
    let (mut client, relay_client) = connected().await;
    let (mut backend, relay_backend) = connected().await;
    let idle = Duration::from_secs(1);
    let relay = drive(Relay::new(relay_client, relay_backend), Some(idle));
    // A client that says something every 200 ms for longer than the timeout.
    let mut last_moved = Instant::now();
    for _ in 0..7 {
        client.write_all(b"ping").await.unwrap();
        let mut ping = [0u8; 4];
        backend.read_exact(&mut ping).await.unwrap();
        last_moved = Instant::now();
        assert!(!relay.task.is_finished(), "ended while bytes moved");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_closed(&mut client).await;
    assert_closed(&mut backend).await;
    let quiet = last_moved.elapsed();
    assert!(
        quiet >= idle - Duration::from_millis(50),
        "closed after {quiet:?} of silence"
    );
    let (end, relay) = relay.end().await;
    assert!(matches!(end, RelayEnd::Idle), "{end:?}");
    assert_eq!(relay.totals(), (28, 0));
}
