//! Bytes through ballast come back intact: a large payload both ways, and a half-closed
//! exchange where the client stops writing and still receives the whole answer.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn one_backend(addr: std::net::SocketAddr) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
        backends_toml(&[("only", addr, 1)])
    )
}

/// Deterministic, non-repeating-looking bytes.
fn payload(len: usize) -> Vec<u8> {
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
    // Every open connection holds one relay future: it must stay small for many idle
    // connections to be cheap (buffers are per thread, or allocated when needed).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (b, _) = listener.accept().await.unwrap();
    let count = |_: u64| {};
    let relay = ballast::relay::relay(a, b, &count, &count, None, std::future::pending());
    let size = std::mem::size_of_val(&relay);
    assert!(size < 2048, "the relay future is {size} bytes");
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
