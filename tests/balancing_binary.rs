//! least_conn's splits seen through the real binary: `ballast run --config FILE` in front
//! of three backends that greet with their name, and short connections one after another
//! (each closed, and seen closed by ballast, before the next opens), as a run of short
//! HTTP requests makes them.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free port on 127.0.0.1: bound, read and released, so the config can name it.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Three greeting backends a, b and c.
async fn three_backends() -> Vec<Backend> {
    vec![
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ]
}

/// Writes a least_conn config for `backends` with these weights and runs the binary on it.
async fn run_least_conn(
    dir: &tempfile::TempDir,
    backends: &[Backend],
    weights: &[u32],
) -> (Proc, SocketAddr) {
    let (listener, admin) = (free_addr(), free_addr());
    let list: Vec<_> = backends
        .iter()
        .zip(weights)
        .map(|(b, &w)| (b.name.as_str(), b.addr, w))
        .collect();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nbind = \"{admin}\"\n\n[[listeners]]\nname = \"web\"\nbind = \"{listener}\"\nstrategy = \"least_conn\"\n{}",
            backends_toml(&list)
        ),
    )
    .unwrap();
    let proc = Proc::run(&path, &[], 1).await;
    assert_eq!(proc.listeners["web"], listener);
    assert_eq!(proc.admin, admin);
    (proc, listener)
}

/// One admin request as a script sends it (Host the admin address itself, a JSON content
/// type): (status, body).
async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("admin answers in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// The listener's live connection count as `/api/v1/status` shows it.
async fn listener_active(admin: SocketAddr) -> u64 {
    let (status, body) = admin_request(admin, "GET", "/api/v1/status").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["listeners"][0]["active"]
        .as_u64()
        .expect("a live count")
}

/// Opens `n` connections one after another, each closed and counted closed by ballast
/// before the next opens; where they landed.
async fn short_connections(listener: SocketAddr, admin: SocketAddr, n: usize) -> [usize; 3] {
    let mut landed: HashMap<String, usize> = HashMap::new();
    for _ in 0..n {
        let (stream, name) = connect_and_greet(listener).await;
        *landed.entry(name).or_default() += 1;
        drop(stream);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while listener_active(admin).await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ballast never counted the connection closed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    ["a", "b", "c"].map(|name| landed.get(name).copied().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_splits_60_short_connections_30_30_when_one_of_three_backends_is_drained() {
    let backends = three_backends().await;
    let dir = tempfile::tempdir().unwrap();
    let (proc, listener) = run_least_conn(&dir, &backends, &[1, 1, 1]).await;
    let (status, body) =
        admin_request(proc.admin, "POST", "/api/v1/listeners/web/backends/b/drain").await;
    assert_eq!(status, 200, "{body}");

    let landed = short_connections(listener, proc.admin, 60).await;
    assert_eq!(landed, [30, 0, 30], "connections on a, b, c");

    let (status, log) = proc.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_with_weights_two_one_one_splits_60_short_connections_30_15_15() {
    let backends = three_backends().await;
    let dir = tempfile::tempdir().unwrap();
    let (proc, listener) = run_least_conn(&dir, &backends, &[2, 1, 1]).await;

    let landed = short_connections(listener, proc.admin, 60).await;
    assert_eq!(landed, [30, 15, 15], "connections on a, b, c");

    let (status, log) = proc.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
}
