//! Every admin route as an operator's script would call it, the bearer token, and bad
//! requests that must get an error without hurting the admin server.

mod common;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_with_admin(
    backends: &[(&str, std::net::SocketAddr, u32)],
    strategy: &str,
    admin_extra: &str,
) -> ballast::Running {
    start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{admin_extra}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"{strategy}\"\n{}",
        backends_toml(backends)
    ))
    .await
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_status_and_metrics_answer() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 3)], "least_conn", "").await;
    let admin = ballast.admin_addr().unwrap();
    assert_eq!(
        http(admin, "GET", "/healthz").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(http(admin, "GET", "/readyz").await.0, 200);

    let _held = connect_and_greet(ballast.listener_addr("web")).await;
    let (status, body) = http(admin, "GET", "/api/v1/status").await;
    assert_eq!(status, 200);
    let s = json(&body);
    assert_eq!(s["generation"], 1);
    let web = &s["listeners"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["bind"], ballast.listener_addr("web").to_string());
    assert_eq!(web["strategy"], "least_conn");
    assert_eq!(web["active"], 1);
    let b = &web["backends"][0];
    assert_eq!(b["name"], "a");
    assert_eq!(b["addr"], a.addr.to_string());
    assert_eq!(b["weight"], 3);
    assert_eq!(b["max_conns"], Value::Null);
    assert_eq!(b["state"], "up");
    assert_eq!(b["active"], 1);
    assert_eq!(b["total"], 1);

    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("ballast_build_info{version=\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_connections_and_undrain_restores_them() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let ballast = start_with_admin(&[("a", a.addr, 1), ("b", b.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let addr = ballast.listener_addr("web");
    let (_held_on_a, first) = connect_and_greet(addr).await;
    assert_eq!(first, "a");

    let (status, body) = http(admin, "POST", "/api/v1/listeners/web/backends/a/drain").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["state"], "draining");
    let s = json(&http(admin, "GET", "/api/v1/status").await.1);
    assert_eq!(s["listeners"][0]["backends"][0]["state"], "draining");
    for _ in 0..6 {
        assert_eq!(connect_and_greet(addr).await.1, "b");
    }
    let (status, body) = http(admin, "GET", "/api/v1/listeners/web/pick").await;
    assert_eq!(
        (status, json(&body)["backend"].clone()),
        (200, Value::from("b"))
    );

    assert_eq!(
        http(admin, "POST", "/api/v1/listeners/web/backends/a/undrain")
            .await
            .0,
        200
    );
    let landed: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(connect_and_greet(addr).await.1);
        }
        v
    };
    assert!(landed.iter().any(|n| n == "a"), "{landed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_answers_where_a_client_would_go_without_opening_a_connection() {
    let names = ["a", "b", "c"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(Backend::greeter(n).await);
    }
    let list: Vec<_> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr, 1))
        .collect();
    let ballast = start_with_admin(&list, "ip_hash", "").await;
    let admin = ballast.admin_addr().unwrap();
    for last in 1..=20u8 {
        let ip = format!("127.0.3.{last}");
        let (status, body) = http(
            admin,
            "GET",
            &format!("/api/v1/listeners/web/pick?client={ip}"),
        )
        .await;
        assert_eq!(status, 200);
        let answer = json(&body);
        let (_s, landed) =
            connect_from_and_greet(Some(ip.parse().unwrap()), ballast.listener_addr("web")).await;
        assert_eq!(answer["backend"], landed.as_str(), "pick for {ip}");
        let backend = backends.iter().find(|b| b.name == landed).unwrap();
        assert_eq!(answer["addr"], backend.addr.to_string());
    }
    let opened: usize = backends.iter().map(|b| b.accepted()).sum();
    assert_eq!(opened, 20, "pick opens no connection");

    for n in names {
        http(
            admin,
            "POST",
            &format!("/api/v1/listeners/web/backends/{n}/drain"),
        )
        .await;
    }
    assert_eq!(
        http(admin, "GET", "/api/v1/listeners/web/pick?client=127.0.0.1")
            .await
            .0,
        503
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_404_and_malformed_requests_400() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    for (method, path, expected) in [
        ("POST", "/api/v1/listeners/nope/backends/a/drain", 404),
        ("POST", "/api/v1/listeners/web/backends/nope/drain", 404),
        ("POST", "/api/v1/listeners/web/backends/nope/undrain", 404),
        ("GET", "/api/v1/listeners/nope/pick", 404),
        ("GET", "/nope", 404),
        ("GET", "/api/v1/listeners/web/pick?client=not-an-ip", 400),
        ("GET", "/api/v1/listeners/web/pick?color=blue", 400),
        ("POST", "/healthz", 405),
        ("GET", "/api/v1/listeners/web/backends/a/drain", 405),
        ("POST", "/api/v1/reload", 422),
    ] {
        let (status, body) = http(admin, method, path).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        assert!(json(&body)["error"].is_string(), "{method} {path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_file_every_post_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "t0ps3cret\n").unwrap();
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(
        &[("a", a.addr, 1)],
        "round_robin",
        &format!("token_file = \"{}\"\n", token_file.display()),
    )
    .await;
    let admin = ballast.admin_addr().unwrap();
    let drain = "/api/v1/listeners/web/backends/a/drain";
    assert_eq!(http(admin, "POST", drain).await.0, 401);
    assert_eq!(
        http_with(admin, "POST", drain, "Authorization: Bearer wrong\r\n")
            .await
            .0,
        401
    );
    assert_eq!(
        http_with(admin, "POST", drain, "Authorization: t0ps3cret\r\n")
            .await
            .0,
        401
    );
    let s = json(&http(admin, "GET", "/api/v1/status").await.1);
    assert_eq!(
        s["listeners"][0]["backends"][0]["state"], "up",
        "refused POSTs change nothing"
    );
    let (status, body) =
        http_with(admin, "POST", drain, "Authorization: Bearer t0ps3cret\r\n").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        http(admin, "GET", "/healthz").await.0,
        200,
        "GETs need no token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_huge_and_abandoned_requests_leave_the_admin_port_serving() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();

    let mut garbage = tokio::net::TcpStream::connect(admin).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = garbage.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");

    let mut huge = tokio::net::TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "x".repeat(64 * 1024)
    );
    let _ = huge.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = huge.read_to_end(&mut answer).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"));

    // A client that connects, sends half a request and goes away.
    let mut half = tokio::net::TcpStream::connect(admin).await.unwrap();
    half.write_all(b"GET /heal").await.unwrap();
    drop(half);
    // And one that sends a body bigger than any route takes.
    let (status, _) = http_with(
        admin,
        "POST",
        "/api/v1/reload",
        "Content-Length: 10000000\r\n",
    )
    .await;
    assert_eq!(status, 413);

    assert_eq!(
        http(admin, "GET", "/healthz").await,
        (200, "ok\n".to_string())
    );
}
