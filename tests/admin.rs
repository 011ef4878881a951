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

/// The state of backend `name` of the first listener, from `/api/v1/status`.
async fn backend_state(admin: std::net::SocketAddr, name: &str) -> Value {
    let s = json(&http(admin, "GET", "/api/v1/status").await.1);
    s["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {s}"))["state"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shaped_cross_site_post_is_refused_and_drains_nothing() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    // What a page on attacker.example sends with fetch(..., {method: "POST", mode:
    // "no-cors", body: "{}"}) after its name was pointed at the admin address.
    let (status, _, body) = http_raw(
        admin,
        b"POST /api/v1/listeners/web/backends/a/drain HTTP/1.1\r\nHost: attacker.example\r\nOrigin: https://attacker.example\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    assert_eq!(backend_state(admin, "a").await, "up", "nothing was drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_rebinding_request_naming_a_foreign_host_is_refused() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    // The browser thinks it talks to attacker.example, so it sends no Origin on a
    // same-origin GET, and Host names the attacker's domain.
    let (status, _, body) = http_raw(
        admin,
        b"GET /api/v1/status HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    let (status, _, body) = http_raw(
        admin,
        format!("POST /api/v1/listeners/web/backends/a/drain HTTP/1.1\r\nHost: attacker.example:{}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", admin.port()).as_bytes(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(backend_state(admin, "a").await, "up", "nothing was drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_listed_in_allowed_hosts_is_accepted_and_others_are_not() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(
        &[("a", a.addr, 1)],
        "round_robin",
        "allowed_hosts = [\"lb.internal\"]\n",
    )
    .await;
    let admin = ballast.admin_addr().unwrap();
    for (host, expected) in [
        ("lb.internal", 200),
        ("lb.internal:9901", 200),
        ("LB.Internal", 200),
        ("other.internal", 403),
        ("lb.internal.attacker.example", 403),
    ] {
        let request =
            format!("GET /api/v1/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (status, _, body) = http_raw(admin, request.as_bytes()).await;
        assert_eq!(status, expected, "Host: {host}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_origin_requests_from_the_admin_address_are_accepted() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let port = admin.port();
    let (status, _, body) = http_raw(
        admin,
        format!("POST /api/v1/listeners/web/backends/a/drain HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://{admin}\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend_state(admin, "a").await, "draining");
    // Bound to loopback, the admin page may also be opened as localhost.
    let (status, _, body) = http_raw(
        admin,
        format!("POST /api/v1/listeners/web/backends/a/undrain HTTP/1.1\r\nHost: localhost:{port}\r\nOrigin: http://localhost:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(backend_state(admin, "a").await, "up");
    // Another port on the same machine is another origin.
    let (status, _, body) = http_raw(
        admin,
        format!("GET /api/v1/status HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://127.0.0.1:{}\r\nConnection: close\r\n\r\n", port.wrapping_add(1)).as_bytes(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_a_json_content_type_or_the_token_is_415() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    for content_type in [
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
    ] {
        let request = format!("POST /api/v1/listeners/web/backends/a/drain HTTP/1.1\r\nHost: {admin}\r\n{content_type}Connection: close\r\n\r\n");
        let (status, _, body) = http_raw(admin, request.as_bytes()).await;
        assert_eq!(status, 415, "{content_type:?}: {body}");
        let error = json(&body)["error"].as_str().unwrap().to_string();
        assert!(error.contains("Content-Type: application/json"), "{error}");
    }
    assert_eq!(backend_state(admin, "a").await, "up", "nothing was drained");
    let request = format!("POST /api/v1/listeners/web/backends/a/drain HTTP/1.1\r\nHost: {admin}\r\nContent-Type: Application/JSON; charset=utf-8\r\nConnection: close\r\n\r\n");
    let (status, _, body) = http_raw(admin, request.as_bytes()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_decodes_a_percent_encoded_client_address() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "ip_hash", "").await;
    let admin = ballast.admin_addr().unwrap();
    // What Python's urlencode({"client": "::1"}) sends.
    let (status, body) = http(admin, "GET", "/api/v1/listeners/web/pick?client=%3A%3A1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["backend"], "a");
    let (status, body) = http(admin, "GET", "/api/v1/listeners/web/pick?client=%FF").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_backend_is_drained_by_its_percent_encoded_default_name() {
    let ballast = start(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"[::1]:3000\"\n",
    )
    .await;
    let admin = ballast.admin_addr().unwrap();
    let (status, body) = http(
        admin,
        "POST",
        "/api/v1/listeners/web/backends/%5B%3A%3A1%5D%3A3000/drain",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["backend"], "[::1]:3000");
    assert_eq!(backend_state(admin, "[::1]:3000").await, "draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_slash_stays_in_its_segment_and_invalid_utf8_is_400() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let (status, body) = http(admin, "GET", "/api%2Fv1/status").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = http(admin, "GET", "/api/v1/listeners/%FF%FE/pick").await;
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_bare_lf_line_endings_is_answered_at_once() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let request = format!("GET /healthz HTTP/1.1\nHost: {admin}\nConnection: close\n\n");
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        http_raw(admin, request.as_bytes()),
    )
    .await;
    let (status, _, _) =
        answer.unwrap_or_else(|_| panic!("no answer after {:?}", started.elapsed()));
    assert!(status == 200 || status == 400, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_are_a_bad_request() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    let (status, head, _) = http_raw(admin, request.as_bytes()).await;
    assert_eq!(status, 400, "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_like_get_without_a_body() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/status"] {
        let request = format!("HEAD {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        let (status, head, body) = http_raw(admin, request.as_bytes()).await;
        assert_eq!(status, 200, "HEAD {path}: {head}");
        assert_eq!(body, "", "HEAD {path} has no body");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_idle_connections_leave_metrics_answering_within_two_seconds() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ballast.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
            backends_toml(&[("a", a.addr, 1)])
        ),
    )
    .unwrap();
    let proc = Proc::run(&config, &[], 1).await;
    let admin = proc.admin;
    // Leave ballast 40 file descriptors, fewer than the idle connections below: the
    // `ulimit -n` of a small machine, reached by the admin port alone.
    let open = std::fs::read_dir(format!("/proc/{}/fd", proc.pid()))
        .unwrap()
        .count();
    let limit = format!("--nofile={}:{}", open + 40, open + 40);
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &proc.pid(), &limit])
        .status()
        .unwrap();
    assert!(limited.success());

    let started = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..200 {
        let connect = tokio::net::TcpStream::connect(admin);
        if let Ok(Ok(stream)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), connect).await
        {
            idle.push(stream);
        }
    }
    let asked = std::time::Instant::now();
    let metrics = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        http(admin, "GET", "/metrics").await
    })
    .await;
    let took = asked.elapsed();
    let (status, body) = metrics.unwrap_or_else(|_| {
        panic!(
            "/metrics did not answer within 2 s with {} idle connections open",
            idle.len()
        )
    });
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ballast_build_info"), "{body}");
    // The oldest idle connection made room: it was closed.
    assert_closed(&mut idle[0]).await;
    drop(idle);
    let elapsed = started.elapsed();
    let (_, log) = proc.stop().await;
    let accept_lines = log.lines().filter(|l| l.contains("admin accept")).count();
    assert!(
        accept_lines as u64 <= elapsed.as_secs() + 2,
        "{accept_lines} accept lines in {elapsed:?} (/metrics took {took:?}):\n{log}"
    );
}

/// Opens `n` admin connections and writes `head` on each (a request that never
/// finishes), then waits until the endpoint has dealt with all of them: over the cap and
/// the reserve, at least `n - 72` were closed, whether refused or evicted.
async fn hold_unfinished_requests(
    admin: std::net::SocketAddr,
    n: usize,
    head: &str,
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        // Refused or evicted ones may be closed already; that is fine.
        let _ = stream.write_all(head.as_bytes()).await;
        held.push(stream);
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let closed = held.iter().filter(|s| is_closed(s)).count();
        if closed >= n.saturating_sub(72) {
            return held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {closed} of {n} connections closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// True when the server has closed `stream` (an end of stream or an error on read).
fn is_closed(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// `GET path` on a new connection, answered within 2 s: the status and body, or what
/// went wrong (an empty reply is what curl reports as exit 52).
async fn answered_within_two_seconds(
    admin: std::net::SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let asked = std::time::Instant::now();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let mut stream = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .map_err(|_| format!("no answer after {:?}", asked.elapsed()))??;
    if answer.is_empty() {
        return Err("empty reply: the connection was closed without an answer".into());
    }
    Ok(status_and_body(&answer))
}

/// Health, readiness and metrics each answer 200 within 2 s on new connections.
async fn assert_health_and_metrics_answer(admin: std::net::SocketAddr, held: usize) {
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = answered_within_two_seconds(admin, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} with {held} unfinished requests open: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_posts_waiting_for_their_bodies_leave_metrics_and_health_answering() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let head = format!(
        "POST /api/v1/reload HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    );
    let held = hold_unfinished_requests(admin, 100, &head).await;
    assert_health_and_metrics_answer(admin, held.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_request_heads_that_never_finish_leave_metrics_and_health_answering() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let head = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nX-Slow: ");
    let held = hold_unfinished_requests(admin, 100, &head).await;
    assert_health_and_metrics_answer(admin, held.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clients_that_pipeline_requests_and_never_read_leave_metrics_answering() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let one = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    let mut held = Vec::new();
    for _ in 0..100 {
        // A small receive window that the unread answers soon fill.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(admin).await.unwrap();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            stream.write_all(one.repeat(200).as_bytes()),
        )
        .await;
        held.push(stream);
    }
    assert_health_and_metrics_answer(admin, held.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_connections_leaves_metrics_and_health_answering() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let a = Backend::greeter("a").await;
    let ballast = start_with_admin(&[("a", a.addr, 1)], "round_robin", "").await;
    let admin = ballast.admin_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for _ in 0..2 {
        let (stop, opened) = (Arc::clone(&stop), Arc::clone(&opened));
        flooders.push(tokio::spawn(async move {
            // Each keeps its last 100 connections open, half of them with a request
            // head that never ends, and opens new ones as fast as it can.
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
                    if held.len() % 2 == 0 {
                        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\n").await;
                    }
                    held.push_back(stream);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                if held.len() > 100 {
                    held.pop_front();
                }
            }
        }));
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    while opened.load(Ordering::Relaxed) < 500 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Every new connection closes the oldest idle one; none may close a probe before
    // its request was read.
    for _ in 0..100 {
        assert_health_and_metrics_answer(admin, 400).await;
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.await.unwrap();
    }
}
