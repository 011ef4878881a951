//! Rebalance seen from the outside: when a backend joins (here: is undrained), the
//! overloaded one sheds its newest connections a step at a time until the live counts
//! are within `precision` of the fair shares; plain TCP clients see a clean FIN, and
//! WebSocket clients a Close 1012 after whole frames, never a torn one.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast::websocket::{self, OP_BINARY, OP_CLOSE};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(rebalance: &str, backends: &[(&str, SocketAddr, u32)]) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least_conn\"\n\n  [listeners.rebalance]\n  {rebalance}\n{}",
        backends_toml(backends)
    )
}

async fn open_on(ballast: &ballast::Running, backend: &str) -> u64 {
    let routing = ballast.ballast.routing();
    routing
        .listener("web")
        .unwrap()
        .backend(backend)
        .unwrap()
        .state
        .active()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_backend_sheds_connections_until_shares_are_even_and_then_stops() {
    let [a, b] = [Backend::greeter("a").await, Backend::greeter("b").await];
    let ballast = start(&config(
        "interval = \"100ms\"\n  precision = 1\n  step_size = 2\n",
        &[("a", a.addr, 1), ("b", b.addr, 1)],
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let addr = ballast.listener_addr("web");
    http(admin, "POST", "/api/v1/listeners/web/backends/b/drain").await;

    // Twelve clients that reconnect whenever ballast closes their connection.
    let migrated = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..12 {
        let (stream, name) = connect_and_greet(addr).await;
        assert_eq!(name, "a");
        let migrated = Arc::clone(&migrated);
        clients.push(tokio::spawn(async move {
            let mut stream = stream;
            loop {
                let mut buf = [0u8; 16];
                match stream.read(&mut buf).await {
                    Ok(0) => {}
                    Ok(_) => continue,
                    Err(e) => panic!("a migrated connection was reset, not closed: {e}"),
                }
                migrated.fetch_add(1, Ordering::SeqCst);
                stream = connect_and_greet(addr).await.0;
            }
        }));
    }
    http(admin, "POST", "/api/v1/listeners/web/backends/b/undrain").await;

    let mut done = false;
    for _ in 0..200 {
        let (on_a, on_b) = (open_on(&ballast, "a").await, open_on(&ballast, "b").await);
        if on_a + on_b == 12 && on_a <= 7 && on_b >= 5 {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        done,
        "never balanced: a {} b {}",
        open_on(&ballast, "a").await,
        open_on(&ballast, "b").await
    );
    // Converged: a few more intervals migrate nothing more.
    let before = migrated.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        migrated.load(Ordering::SeqCst),
        before,
        "rebalance kept migrating after convergence"
    );
    assert!(
        (5..=6).contains(&before),
        "{before} migrations for 12 connections 12/0 -> 6/6 (precision 1)"
    );

    let text = scrape(admin).await;
    let from_a = sample(
        &text,
        "ballast_rebalance_migrations_total",
        &[("backend", "a")],
    );
    assert_eq!(from_a, Some(before as f64));
    assert_eq!(
        sample(
            &text,
            "ballast_rebalance_migrations_total",
            &[("backend", "b")]
        ),
        Some(0.0)
    );
    assert!(
        sample(&text, "ballast_listener_imbalance", &[("listener", "web")]).unwrap()
            <= 7.0 / 6.0 + 1e-9
    );
    clients.iter().for_each(|c| c.abort());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_websocket_gets_close_1012_after_whole_frames_and_its_backend_1001() {
    let (a, a_closes) = recording_ws_backend().await;
    let (b, _) = recording_ws_backend().await;
    let ballast = start(&config(
        "interval = \"100ms\"\n  precision = 0\n  step_size = 1\n",
        &[("a", a, 1), ("b", b, 1)],
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let addr = ballast.listener_addr("web");
    http(admin, "POST", "/api/v1/listeners/web/backends/b/drain").await;

    // Four clients echo 48 KiB messages in a loop (so frames are in flight when the
    // migration comes); a client that gets a Close reconnects, as browsers do.
    let closed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..4u8 {
        let (mut ws, mut buf) = ws_connect(addr).await;
        let closed = Arc::clone(&closed);
        clients.push(tokio::spawn(async move {
            let mut echoes = 0u32;
            loop {
                let message: Vec<u8> = (0..48 * 1024)
                    .map(|i| (i as u32 ^ echoes ^ u32::from(c)) as u8)
                    .collect();
                let frame = websocket::encode_masked_frame(OP_BINARY, &message, [c, 1, 2, 3]);
                if ws.write_all(&frame).await.is_err() {
                    // Ballast already ended its side; the Close must be waiting.
                }
                let (opcode, payload) = read_frame(&mut ws, &mut buf).await;
                if opcode == OP_CLOSE {
                    assert_eq!(
                        payload[..2],
                        1012u16.to_be_bytes(),
                        "status 1012, Service Restart"
                    );
                    closed.fetch_add(1, Ordering::SeqCst);
                    (ws, buf) = ws_connect(addr).await;
                    continue;
                }
                assert_eq!(opcode, OP_BINARY);
                assert!(payload == message, "an echo came back altered");
                echoes += 1;
                if echoes > 100_000 {
                    return echoes;
                }
            }
        }));
    }
    wait_until("all four on a", || {
        let r = ballast.ballast.routing();
        r.listener("web")
            .unwrap()
            .backend("a")
            .unwrap()
            .state
            .active()
            == 4
    })
    .await;
    http(admin, "POST", "/api/v1/listeners/web/backends/b/undrain").await;
    // Fair share 2 each, precision 0, one per interval: two clients are migrated, and
    // reconnect to b.
    wait_until("two migrations", || closed.load(Ordering::SeqCst) == 2).await;
    wait_until("two on b", || {
        let r = ballast.ballast.routing();
        r.listener("web")
            .unwrap()
            .backend("b")
            .unwrap()
            .state
            .active()
            == 2
    })
    .await;
    wait_until("a's backend to hear two Close 1001", || {
        a_closes.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(*a_closes.lock().unwrap(), vec![1001, 1001]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        closed.load(Ordering::SeqCst),
        2,
        "no more migrations once even"
    );
    for c in clients {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_whose_upgrade_came_in_pieces_still_gets_a_clean_close_at_the_drain_deadline() {
    let (a, a_closes) = recording_ws_backend().await;
    let (b, _) = recording_ws_backend().await;
    let ballast = start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\ndrain_timeout = \"300ms\"\n{}",
        backends_toml(&[("a", a, 1), ("b", b, 1)])
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let mut ws = tokio::net::TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    for piece in head.chunks(20) {
        ws.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (head, mut buf) = read_answer_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.write_all(&websocket::encode_masked_frame(
        OP_BINARY,
        b"ping",
        [1, 2, 3, 4],
    ))
    .await
    .unwrap();
    assert_eq!(
        read_frame(&mut ws, &mut buf).await,
        (OP_BINARY, b"ping".to_vec())
    );

    http(admin, "POST", "/api/v1/listeners/web/backends/a/drain").await;
    let (opcode, payload) = read_frame(&mut ws, &mut buf).await;
    assert_eq!(
        (opcode, &payload[..2]),
        (OP_CLOSE, &1012u16.to_be_bytes()[..])
    );
    wait_until("the backend to hear Close 1001", || {
        *a_closes.lock().unwrap() == vec![1001]
    })
    .await;
}
