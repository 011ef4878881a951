//! Reload and drain, driven through the library: live counts survive a reload, drained
//! and removed backends keep their connections until `drain_timeout` and then lose them
//! spread over a short window, and an invalid file changes nothing.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

fn config(extra: &str, backends: &[(&str, SocketAddr, u32)]) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least_conn\"\n{extra}\n{}",
        backends_toml(backends)
    )
}

async fn hold(addr: SocketAddr, n: usize) -> Vec<(TcpStream, String)> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(connect_and_greet(addr).await);
    }
    held
}

fn on(held: &[(TcpStream, String)], name: &str) -> usize {
    held.iter().filter(|(_, n)| n == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_keeps_its_counts_across_a_reload_and_fills_a_new_backend() {
    let [a, b, c] = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config("", &[("a", a.addr, 1), ("b", b.addr, 1)])).unwrap();
    let ballast = start_file(&path).await;
    let addr = ballast.listener_addr("web");
    let mut held = hold(addr, 20).await;
    assert_eq!((on(&held, "a"), on(&held, "b")), (10, 10));

    std::fs::write(
        &path,
        config("", &[("a", a.addr, 1), ("b", b.addr, 1), ("c", c.addr, 1)]),
    )
    .unwrap();
    assert_eq!(ballast.ballast.reload().unwrap(), 2);
    held.extend(hold(addr, 10).await);
    assert_eq!(
        (on(&held, "a"), on(&held, "b"), on(&held, "c")),
        (10, 10, 10)
    );
    for (stream, name) in &mut held {
        assert!(
            still_open(stream).await,
            "a connection to {name} was lost in the reload"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_and_the_old_config_keeps_serving() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config("", &[("a", a.addr, 1)])).unwrap();
    let ballast = start_file(&path).await;
    let admin = ballast.admin_addr().unwrap();
    let (mut held, _) = connect_and_greet(ballast.listener_addr("web")).await;

    std::fs::write(&path, config("", &[("a", a.addr, 0)])).unwrap();
    let (status, body) = http(admin, "POST", "/api/v1/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("weight must be at least 1"), "{body}");
    let text = scrape(admin).await;
    assert_eq!(
        sample(
            &text,
            "ballast_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "ballast_config_generation", &[]), Some(1.0));
    assert!(still_open(&mut held).await);
    assert_eq!(connect_and_greet(ballast.listener_addr("web")).await.1, "a");

    std::fs::write(&path, config("", &[("a", a.addr, 2)])).unwrap();
    let (status, body) = http(admin, "POST", "/api/v1/reload").await;
    assert_eq!((status, body.trim()), (200, "{\"generation\":2}"));
    let text = scrape(admin).await;
    assert_eq!(
        sample(
            &text,
            "ballast_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ballast_backend_weight", &[("backend", "a")]),
        Some(2.0)
    );
}

/// `drain_timeout` of the drain tests and the window its closes are spread over.
const DRAIN: Duration = Duration::from_millis(800);
const SPREAD: Duration = Duration::from_millis(200);

/// Waits (with the deadline) until ballast closes `stream` cleanly (a FIN, not a
/// reset); returns when.
async fn closed_at(mut stream: TcpStream) -> Instant {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return Instant::now(),
            Ok(Err(e)) => panic!("the connection was reset, not closed: {e}"),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was not closed in time"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_keeps_its_connections_until_drain_timeout_then_loses_them_spread_out() {
    let [a, b] = [Backend::greeter("a").await, Backend::greeter("b").await];
    let ballast = start(&config(
        "drain_timeout = \"800ms\"",
        &[("a", a.addr, 1), ("b", b.addr, 1)],
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let addr = ballast.listener_addr("web");
    let held = hold(addr, 40).await;
    let (mut on_a, on_b): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, n)| n == "a");
    assert_eq!((on_a.len(), on_b.len()), (20, 20));

    let drained = Instant::now();
    assert_eq!(
        http(admin, "POST", "/api/v1/listeners/web/backends/a/drain")
            .await
            .0,
        200
    );
    for _ in 0..5 {
        assert_eq!(
            connect_and_greet(addr).await.1,
            "b",
            "a drained backend gets nothing new"
        );
    }
    tokio::time::sleep(DRAIN / 2).await;
    for (stream, _) in &mut on_a {
        assert!(still_open(stream).await, "closed before drain_timeout");
    }
    assert!(
        drained.elapsed() < DRAIN,
        "the check above took too long to prove anything"
    );

    let closes: Vec<Instant> = futures_join(on_a.into_iter().map(|(s, _)| closed_at(s))).await;
    let first = *closes.iter().min().unwrap();
    let last = *closes.iter().max().unwrap();
    assert!(
        first >= drained + DRAIN,
        "closed {:?} after the drain, before drain_timeout",
        first - drained
    );
    assert!(
        last <= drained + DRAIN + SPREAD + Duration::from_millis(500),
        "closed late: {:?}",
        last - drained
    );
    assert!(
        last - first >= SPREAD / 3,
        "all closed at once ({:?} apart): a reconnect storm",
        last - first
    );
    for (mut stream, _) in on_b {
        assert!(
            still_open(&mut stream).await,
            "the other backend's connections are untouched"
        );
    }
}

/// Runs the futures concurrently and collects their outputs.
async fn futures_join<F: std::future::Future<Output = Instant> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Instant> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undrain_before_the_deadline_keeps_the_connections() {
    let [a, b] = [Backend::greeter("a").await, Backend::greeter("b").await];
    let ballast = start(&config(
        "drain_timeout = \"800ms\"",
        &[("a", a.addr, 1), ("b", b.addr, 1)],
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let (mut on_a, name) = connect_and_greet(ballast.listener_addr("web")).await;
    assert_eq!(name, "a");
    http(admin, "POST", "/api/v1/listeners/web/backends/a/drain").await;
    tokio::time::sleep(DRAIN / 4).await;
    http(admin, "POST", "/api/v1/listeners/web/backends/a/undrain").await;
    tokio::time::sleep(DRAIN + SPREAD).await;
    assert!(still_open(&mut on_a).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_from_the_file_drains_and_is_forgotten_after_its_last_connection() {
    let [a, b] = [Backend::greeter("a").await, Backend::greeter("b").await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        config("drain_timeout = \"800ms\"", &[("a", a.addr, 1)]),
    )
    .unwrap();
    let ballast = start_file(&path).await;
    let admin = ballast.admin_addr().unwrap();
    let addr = ballast.listener_addr("web");
    let mut held = hold(addr, 3).await;

    std::fs::write(
        &path,
        config("drain_timeout = \"800ms\"", &[("b", b.addr, 1)]),
    )
    .unwrap();
    let removed = Instant::now();
    assert_eq!(ballast.ballast.reload().unwrap(), 2);
    assert_eq!(connect_and_greet(addr).await.1, "b");
    let status: serde_json::Value =
        serde_json::from_str(&http(admin, "GET", "/api/v1/status").await.1).unwrap();
    assert_eq!(
        status["listeners"][0]["backends"].as_array().unwrap().len(),
        1
    );
    let text = scrape(admin).await;
    assert_eq!(
        sample(&text, "ballast_backend_draining", &[("backend", "a")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "ballast_backend_connections_active",
            &[("backend", "a")]
        ),
        Some(3.0)
    );
    for (stream, _) in &mut held {
        assert!(
            still_open(stream).await,
            "a reload closed an established connection"
        );
    }
    assert!(removed.elapsed() < DRAIN);

    let closes = futures_join(held.into_iter().map(|(s, _)| closed_at(s))).await;
    assert!(closes.iter().all(|t| *t >= removed + DRAIN));
    wait_for_metric(
        admin,
        "ballast_backend_connections_total",
        &[("backend", "b")],
        |v| v == 1.0,
    )
    .await;
    let deadline = Instant::now() + DEADLINE;
    while sample(
        &scrape(admin).await,
        "ballast_backend_connections_total",
        &[("backend", "a")],
    )
    .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the removed backend's state was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_zero_in_a_reload_drains_the_backend() {
    let [a, b] = [Backend::greeter("a").await, Backend::greeter("b").await];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        config(
            "drain_timeout = \"800ms\"\nstrategy = \"round_robin\"",
            &[("a", a.addr, 1), ("b", b.addr, 1)],
        )
        .replace("strategy = \"least_conn\"\n", ""),
    )
    .unwrap();
    let ballast = start_file(&path).await;
    let addr = ballast.listener_addr("web");
    let (on_a, name) = connect_and_greet(addr).await;
    assert_eq!(name, "a");

    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "weight = 1\n",
        "weight = 1\n  max_conns = 0\n",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let changed = Instant::now();
    ballast.ballast.reload().unwrap();
    let status = ballast.ballast.status();
    assert_eq!(status["listeners"][0]["backends"][0]["state"], "draining");
    for _ in 0..4 {
        assert_eq!(connect_and_greet(addr).await.1, "b");
    }
    let closed = closed_at(on_a).await;
    assert!(closed >= changed + DRAIN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_drops_health_checks_brings_a_down_backend_back() {
    let a = Backend::greeter("a").await;
    let dead = dead_addr().await;
    let health =
        "\n  [listeners.health]\n  interval = \"50ms\"\n  timeout = \"50ms\"\n  fall = 1\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config(health, &[("a", a.addr, 1), ("b", dead, 1)])).unwrap();
    let ballast = start_file(&path).await;
    let routing = ballast.ballast.routing();
    let b = routing
        .listener("web")
        .unwrap()
        .backend("b")
        .unwrap()
        .state
        .clone();
    wait_until("b down", || !b.is_up()).await;
    std::fs::write(&path, config("", &[("a", a.addr, 1), ("b", dead, 1)])).unwrap();
    ballast.ballast.reload().unwrap();
    assert!(
        b.is_up(),
        "without health checks nothing can bring b back up"
    );
    assert_eq!(
        ballast.ballast.status()["listeners"][0]["backends"][1]["state"],
        "up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_removed_and_re_added_keeps_its_state_and_serves_on_its_new_socket() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let with_api = |extra: &str| {
        format!(
            "{}\n[[listeners]]\nname = \"api\"\nbind = \"127.0.0.1:0\"\n{extra}\n{}",
            config("", &[("a", a.addr, 1)]),
            backends_toml(&[("a", a.addr, 1)])
        )
    };
    std::fs::write(&path, with_api("")).unwrap();
    let ballast = start_file(&path).await;
    let admin = ballast.admin_addr().unwrap();
    let (mut held, _) = connect_and_greet(ballast.listener_addr("api")).await;

    std::fs::write(&path, config("", &[("a", a.addr, 1)])).unwrap();
    ballast.ballast.reload().unwrap();
    assert!(
        ballast.ballast.bound_addr("api").is_none(),
        "a removed listener stops accepting"
    );
    assert!(still_open(&mut held).await, "its connections live on");
    std::fs::write(&path, with_api("")).unwrap();
    ballast.ballast.reload().unwrap();
    let (_again, name) = connect_and_greet(ballast.listener_addr("api")).await;
    assert_eq!(name, "a");
    drop(held);
    wait_for_metric(
        admin,
        "ballast_listener_connections_active",
        &[("listener", "api")],
        |v| v == 1.0,
    )
    .await;
    // Well past the supervisor's next looks, the re-added listener is still counted.
    tokio::time::sleep(ballast::drain::TICK * 4).await;
    let text = scrape(admin).await;
    assert_eq!(
        sample(
            &text,
            "ballast_listener_connections_total",
            &[("listener", "api")]
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reload_is_applied_once_shutdown_has_begun() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config("", &[("a", a.addr, 1)])).unwrap();
    let running = start_file(&path).await;
    let ballast = running.ballast.clone();
    let (held, _) = connect_and_greet(running.listener_addr("web")).await;
    let shutdown = tokio::spawn(running.shutdown(Duration::from_secs(30)));
    wait_until("shutdown to begin", || ballast.is_shutting_down()).await;
    assert!(matches!(
        ballast.reload(),
        Err(ballast::reload::ReloadError::ShuttingDown)
    ));
    assert!(ballast.bound_addr("web").is_none());
    drop(held);
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown ends with the last connection")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_a_listener_hands_its_socket_on_and_refuses_no_connection() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let text = config("", &[("a", a.addr, 1)]);
    std::fs::write(&path, &text).unwrap();
    let ballast = start_file(&path).await;
    let addr = ballast.listener_addr("web");
    let (mut held, _) = connect_and_greet(addr).await;

    std::fs::write(&path, text.replace("name = \"web\"", "name = \"www\"")).unwrap();
    ballast
        .ballast
        .reload()
        .expect("a rename reuses the socket instead of binding again");
    assert_eq!(ballast.listener_addr("www"), addr);
    assert!(ballast.ballast.bound_addr("web").is_none());
    for _ in 0..5 {
        assert_eq!(connect_and_greet(addr).await.1, "a");
    }
    assert!(still_open(&mut held).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_for_its_proxy_header_picks_on_the_config_in_place_then() {
    // Behind accept_proxy a connection is accepted (and loads the routing) well before it
    // picks. A reload that moves backend "a" to another server in between: the pick
    // follows the reload, as it would for a connection accepted after it.
    use tokio::io::AsyncWriteExt;
    let [old, new] = [Backend::greeter("old").await, Backend::greeter("new").await];
    let header = "accept_proxy = \"v1\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config(header, &[("a", old.addr, 1)])).unwrap();
    let ballast = start_file(&path).await;
    let mut client = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    wait_until("the connection is accepted", || {
        ballast.ballast.status()["listeners"][0]["active"] == 1
    })
    .await;
    std::fs::write(&path, config(header, &[("a", new.addr, 1)])).unwrap();
    ballast.ballast.reload().unwrap();
    client
        .write_all(b"PROXY TCP4 127.0.0.9 127.0.0.1 4000 80\r\n")
        .await
        .unwrap();
    let mut greeting = [0u8; 4];
    tokio::time::timeout(DEADLINE, client.read_exact(&mut greeting))
        .await
        .expect("an answer in time")
        .expect("greeted, not refused");
    assert_eq!(&greeting, b"new\n");
}
