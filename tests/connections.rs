//! How connections end: every ending has its reason in the access log and in
//! `ballast_connections_closed_total`; shutdown spreads its closes and keeps its
//! deadline; a connection still connecting can be stopped; a client reset is noticed
//! while its backend does not read; running out of file descriptors is not a backend's
//! fault.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A backend that says "bye" and closes at once.
async fn closer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"bye\n").await;
        }
    });
    addr
}

/// A backend address where a connect hangs: a listener with a backlog of 0 whose queue
/// is already full, so further SYNs go unanswered.
fn hanging_backend() -> (SocketAddr, Vec<std::net::TcpStream>, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // Fill the accept queue; the connect that would wait is the test's sign it is full.
    for _ in 0..8 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        std::thread::sleep(Duration::from_millis(5));
        fillers.push(s.into());
    }
    (addr, fillers, socket)
}

async fn read_line(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
        .await
        .expect("a line in time")
        .unwrap()
        == 1
    {
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

fn closed(text: &str, listener: &str, reason: &str) -> f64 {
    sample(
        text,
        "ballast_connections_closed_total",
        &[("listener", listener), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_has_its_access_log_line_and_its_counter() {
    let echo = Backend::echo("echo").await;
    let bye = closer().await;
    let dead = dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let listener = |name: &str, extra: &str, backends: &str| {
        format!("\n[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n{extra}{backends}")
    };
    let config = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[runtime]\nshutdown_timeout = \"1s\"\n{}{}{}{}{}{}{}",
        listener("echo", "", &backends_toml(&[("e", echo.addr, 1)])),
        listener("bye", "", &backends_toml(&[("b", bye, 1)])),
        listener(
            "idle",
            "idle_timeout = \"200ms\"\n",
            &backends_toml(&[("e", echo.addr, 1)])
        ),
        listener(
            "drained",
            "drain_timeout = \"100ms\"\n",
            &backends_toml(&[("e", echo.addr, 1)])
        ),
        listener(
            "dead",
            "retries = 0\nconnect_timeout = \"500ms\"\n",
            &backends_toml(&[("d", dead, 1)])
        ),
        listener(
            "tight",
            "max_conns = 1\n",
            &format!(
                "{}\n  [[listeners.backends]]\n  name = \"off\"\n  addr = \"{}\"\n  max_conns = 0\n",
                backends_toml(&[("e", echo.addr, 1)]),
                echo.addr
            )
        ),
        listener(
            "moved",
            "strategy = \"least_conn\"\n  [listeners.rebalance]\n  interval = \"100ms\"\n  precision = 0\n  step_size = 1\n",
            &backends_toml(&[("a", echo.addr, 1), ("b", echo.addr, 1)])
        ),
    );
    std::fs::write(&path, config).unwrap();
    let ballast = Proc::run(&path, &[], 7).await;
    let at = |name: &str| ballast.listeners[name];

    // client_closed: the client ends first.
    let mut c = TcpStream::connect(at("echo")).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    c.shutdown().await.unwrap();
    assert_closed(&mut c).await;
    // backend_closed: the backend ends first.
    let mut b = TcpStream::connect(at("bye")).await.unwrap();
    assert_eq!(read_line(&mut b).await, "bye");
    assert_closed(&mut b).await;
    drop(b);
    // idle_timeout
    let mut i = TcpStream::connect(at("idle")).await.unwrap();
    assert_closed(&mut i).await;
    // drain: the backend is drained and its drain_timeout passes.
    let mut d = TcpStream::connect(at("drained")).await.unwrap();
    d.write_all(b"x").await.unwrap();
    d.read_exact(&mut [0u8; 1]).await.unwrap();
    let (status, _) = http(
        ballast.admin,
        "POST",
        "/api/v1/listeners/drained/backends/e/drain",
    )
    .await;
    assert_eq!(status, 200);
    assert_closed(&mut d).await;
    // connect_failed
    let mut f = TcpStream::connect(at("dead")).await.unwrap();
    assert_closed(&mut f).await;
    // limit, then no_backend: the one backend in service is full, the other drained.
    let mut first = TcpStream::connect(at("tight")).await.unwrap();
    first.write_all(b"y").await.unwrap();
    first.read_exact(&mut [0u8; 1]).await.unwrap();
    let mut second = TcpStream::connect(at("tight")).await.unwrap();
    assert_closed(&mut second).await;
    drop(first);
    wait_for_metric(
        ballast.admin,
        "ballast_connections_closed_total",
        &[("listener", "tight"), ("reason", "client_closed")],
        |v| v == 1.0,
    )
    .await;
    http(
        ballast.admin,
        "POST",
        "/api/v1/listeners/tight/backends/e/drain",
    )
    .await;
    let mut third = TcpStream::connect(at("tight")).await.unwrap();
    assert_closed(&mut third).await;
    // migrated: two clients on a while b is drained; b comes back, one moves.
    http(
        ballast.admin,
        "POST",
        "/api/v1/listeners/moved/backends/b/drain",
    )
    .await;
    let mut pair = Vec::new();
    for _ in 0..2 {
        let mut m = TcpStream::connect(at("moved")).await.unwrap();
        m.write_all(b"m").await.unwrap();
        m.read_exact(&mut [0u8; 1]).await.unwrap();
        pair.push(m);
    }
    http(
        ballast.admin,
        "POST",
        "/api/v1/listeners/moved/backends/b/undrain",
    )
    .await;
    wait_for_metric(
        ballast.admin,
        "ballast_connections_closed_total",
        &[("listener", "moved"), ("reason", "migrated")],
        |v| v == 1.0,
    )
    .await;
    drop(pair);
    // shutdown: still open when ballast stops.
    let mut s = TcpStream::connect(at("echo")).await.unwrap();
    s.write_all(b"z").await.unwrap();
    s.read_exact(&mut [0u8; 1]).await.unwrap();

    for (listener, reason) in [
        ("echo", "client_closed"),
        ("bye", "backend_closed"),
        ("idle", "idle_timeout"),
        ("drained", "drain"),
        ("dead", "connect_failed"),
        ("tight", "limit"),
        ("tight", "no_backend"),
    ] {
        let labels = [("listener", listener), ("reason", reason)];
        wait_for_metric(
            ballast.admin,
            "ballast_connections_closed_total",
            &labels,
            |v| v == 1.0,
        )
        .await;
    }
    let text = scrape(ballast.admin).await;
    assert_eq!(closed(&text, "echo", "backend_closed"), 0.0);
    assert_eq!(closed(&text, "bye", "client_closed"), 0.0);

    let (exit, log) = ballast.stop().await;
    assert!(exit.success());
    let expect = [
        ("echo", "client_closed"),
        ("bye", "backend_closed"),
        ("idle", "idle_timeout"),
        ("drained", "drain"),
        ("dead", "connect_failed"),
        ("tight", "limit"),
        ("tight", "client_closed"),
        ("tight", "no_backend"),
        ("moved", "migrated"),
        ("echo", "shutdown"),
    ];
    for (listener, reason) in expect {
        let lines = access_lines(&log, listener);
        let line = lines
            .iter()
            .find(|f| f[9] == reason)
            .unwrap_or_else(|| panic!("no {reason} line for {listener} in:\n{log}"));
        assert!(line[2].starts_with("127.0.0.1:"), "client: {line:?}");
        let connected = !matches!(reason, "connect_failed" | "limit" | "no_backend");
        if connected {
            assert_ne!(line[3], "-", "backend name: {line:?}");
            assert!(line[4].parse::<SocketAddr>().is_ok(), "{line:?}");
            assert!(line[5].parse::<f64>().is_ok(), "connect_ms: {line:?}");
        } else {
            assert_eq!(&line[3..6], ["-", "-", "-"], "{line:?}");
        }
        assert!(line[6].parse::<f64>().is_ok(), "duration_ms: {line:?}");
    }
    let echo_line = &access_lines(&log, "echo")
        .into_iter()
        .find(|f| f[9] == "client_closed")
        .unwrap();
    assert_eq!((echo_line[7], echo_line[8]), ("5", "5"), "bytes each way");
    let idle_line = &access_lines(&log, "idle")[0];
    let idle_ms: f64 = idle_line[6].parse().unwrap();
    assert!(
        idle_ms >= 200.0,
        "closed before idle_timeout: {idle_line:?}"
    );
    assert_eq!(
        access_lines(&log, "dead").len(),
        1,
        "one line per connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_objects_with_the_same_fields_under_json_logs() {
    let echo = Backend::echo("echo").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n{}",
            backends_toml(&[("e", echo.addr, 1)])
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
            .args(["run", "--log-format", "json", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
    let web: SocketAddr = loop {
        let line = lines.next().expect("a log line").unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        if json["message"] == "listener bound" {
            break json["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let mut c = TcpStream::connect(web).await.unwrap();
    c.write_all(b"abc").await.unwrap();
    c.read_exact(&mut [0u8; 3]).await.unwrap();
    drop(c);
    let access = loop {
        let line = lines.next().expect("the access log line").unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        if json.get("reason").is_some() {
            break json;
        }
    };
    assert_eq!(access["listener"], "web");
    assert_eq!(access["backend"], "e");
    assert_eq!(access["backend_addr"], echo.addr.to_string());
    assert_eq!(access["bytes_sent"], 3);
    assert_eq!(access["bytes_received"], 3);
    assert_eq!(access["reason"], "client_closed");
    for key in ["ts", "client", "connect_ms", "duration_ms"] {
        assert!(!access[key].is_null(), "{key}: {access}");
    }
    let _ = child.0.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_spreads_its_closes_and_keeps_its_deadline() {
    let echo = Backend::echo("echo").await;
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
        backends_toml(&[("e", echo.addr, 1)])
    ))
    .await;
    let addr = ballast.listener_addr("web");
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"1").await.unwrap();
        c.read_exact(&mut [0u8; 1]).await.unwrap();
        clients.push(tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let _ = c.read(&mut buf).await;
            Instant::now()
        }));
    }
    let route = ballast.ballast.routing();
    let state = std::sync::Arc::clone(&route.listener("web").unwrap().state);
    drop(route);
    assert_eq!(state.active(), 200);
    let timeout = Duration::from_secs(2);
    let begun = Instant::now();
    ballast.shutdown(timeout).await;
    let took = begun.elapsed();
    assert!(
        took <= timeout + Duration::from_millis(300),
        "shutdown took {took:?}"
    );
    let mut closes = Vec::new();
    for c in clients {
        closes.push(c.await.unwrap() - begun);
    }
    closes.sort();
    let (first, last) = (closes[0], closes[199]);
    assert!(
        last - first >= Duration::from_millis(250),
        "closed at once: {first:?}..{last:?}"
    );
    // Spread evenly: about half are closed by the middle of the spread.
    let middle = first + (last - first) / 2;
    let by_middle = closes.iter().filter(|t| **t <= middle).count();
    assert!((50..=150).contains(&by_middle), "{by_middle} by {middle:?}");
    assert!(last <= timeout, "the last close at {last:?}");
    assert_eq!(state.active(), 0);
    assert_eq!(
        state.metrics().closed[ballast::conn::EndReason::Shutdown.index()].get(),
        200
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_connecting_is_stopped_by_shutdown() {
    let (backend, _fillers, _socket) = hanging_backend();
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nconnect_timeout = \"30s\"\n{}",
        backends_toml(&[("slow", backend, 1)])
    ))
    .await;
    let mut client = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    let route = ballast.ballast.routing();
    let web = std::sync::Arc::clone(&route.listener("web").unwrap().state);
    let slow = std::sync::Arc::clone(&route.listener("web").unwrap().backends[0].state);
    drop(route);
    wait_until("the connection to be connecting", || slow.active() == 1).await;
    assert_eq!(slow.total(), 0, "not connected yet");
    let begun = Instant::now();
    ballast.shutdown(Duration::from_secs(1)).await;
    assert!(begun.elapsed() < Duration::from_millis(1500));
    assert_closed(&mut client).await;
    assert_eq!(slow.active(), 0);
    assert_eq!(
        web.metrics().closed[ballast::conn::EndReason::Shutdown.index()].get(),
        1
    );
    assert_eq!(
        slow.connect_failures(),
        0,
        "stopping is no backend's failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_is_noticed_while_its_backend_does_not_read() {
    let (backend, _deaf) = silent_server().await;
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
        backends_toml(&[("deaf", backend, 1)])
    ))
    .await;
    let client = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    let route = ballast.ballast.routing();
    let web = std::sync::Arc::clone(&route.listener("web").unwrap().state);
    let deaf_state = std::sync::Arc::clone(&route.listener("web").unwrap().backends[0].state);
    drop(route);
    // Write until nothing more goes: the backend's buffers and ballast's are full.
    let chunk = vec![7u8; 64 * 1024];
    let mut stalled = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stalled < 3 && Instant::now() < deadline {
        match client.try_write(&chunk) {
            Ok(_) => stalled = 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stalled += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(deaf_state.sent_bytes() > 0);
    // Reset: SO_LINGER 0 and close.
    let client = client.into_std().unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let reset_at = Instant::now();
    wait_until("the connection to end", || web.active() == 0).await;
    assert!(
        reset_at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        reset_at.elapsed()
    );
    assert_eq!(deaf_state.active(), 0);
    assert_eq!(
        web.metrics().closed[ballast::conn::EndReason::ClientClosed.index()].get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_leaves_backends_up() {
    let echo = Backend::echo("echo").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n[runtime]\nthreads = 1\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nconnect_timeout = \"1s\"\naccess_log = true\n  [listeners.health]\n  kind = \"tcp\"\n  interval = \"50ms\"\n  timeout = \"50ms\"\n  fall = 2\n{}",
            backends_toml(&[("e", echo.addr, 1)])
        ),
    )
    .unwrap();
    // Few file descriptors: a handful of proxied connections use them all.
    let ballast = Proc::run_limited(&path, 48).await;
    let web = ballast.listeners["web"];
    let mut clients = Vec::new();
    for _ in 0..40 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(web)).await
        {
            clients.push(c);
        }
    }
    // Let health checks come due many times over (`fall` is 2 at 50 ms) while the
    // descriptors are gone: a time to pass, not a condition to poll.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(clients);
    // Descriptors back: connections work again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = TcpStream::connect(web).await.unwrap();
        let ok = c.write_all(b"k").await.is_ok()
            && tokio::time::timeout(Duration::from_millis(500), c.read_exact(&mut [0u8; 1]))
                .await
                .is_ok_and(|r| r.is_ok());
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
    }
    let metrics = scrape(ballast.admin).await;
    assert!(
        sample(
            &metrics,
            "ballast_connections_closed_total",
            &[("listener", "web"), ("reason", "error")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "a connection ended for want of a descriptor"
    );
    assert_eq!(
        sample(
            &metrics,
            "ballast_backend_connect_failures_total",
            &[("backend", "e")]
        ),
        Some(0.0),
        "a local shortage is no connect failure of the backend"
    );
    let (_, log) = ballast.stop().await;
    assert!(log.contains("no local resources"), "{log}");
    assert!(
        access_lines(&log, "web")
            .iter()
            .any(|f| f[9] == "error" && f[3] == "-"),
        "an access log line with reason error: {log}"
    );
    assert!(!log.contains("backend is down"), "{log}");
}

/// Found in review: a connection that a retry sent to another backend must be that
/// backend's in the connection table, or drain and rebalance act on the wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_a_retry_sent_to_a_drained_backend_is_closed_at_its_drain_timeout() {
    let dead = dead_addr().await;
    let b = Backend::greeter("b").await;
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\nretries = 1\ndrain_timeout = \"100ms\"\n{}",
        backends_toml(&[("a", dead, 1), ("b", b.addr, 1)])
    ))
    .await;
    let addr = ballast.listener_addr("web");
    // Round robin picks `a` first for one of two clients: refused, retried on `b`.
    let (mut c1, g1) = connect_and_greet(addr).await;
    let (mut c2, g2) = connect_and_greet(addr).await;
    assert_eq!((g1.as_str(), g2.as_str()), ("b", "b"));
    let route = ballast.ballast.routing();
    let web = route.listener("web").unwrap();
    let (a, b_state) = (web.backends[0].state.clone(), web.backends[1].state.clone());
    drop(route);
    assert!(a.connect_failures() >= 1, "a connection was retried");
    assert_eq!(b_state.active(), 2, "both live on b");
    // The operator drains b: both connections end once drain_timeout (100 ms) and the
    // spread window (100 ms) have passed.
    b_state.set_drained(true);
    assert_closed(&mut c1).await;
    assert_closed(&mut c2).await;
}

/// Found in review: every log line was a blocking write to stderr on the worker that
/// logged it, so a stderr nobody reads (journald stalled, a pipe whose reader hung)
/// stopped that worker and every connection on it once the pipe was full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_holds_up_no_connection_and_its_lines_are_counted_as_dropped() {
    let greeter = Backend::greeter("g").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n[runtime]\nthreads = 1\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n{}",
            backends_toml(&[("g", greeter.addr, 1)])
        ),
    )
    .unwrap();
    let ballast = Proc::run_with_unread_log(&path).await;
    let web = ballast.listeners["web"];
    // An access log line is some 95 bytes: a 64 KiB pipe is full after some 700 of
    // them, the writer's queue after 4,096 more.
    const CLIENTS: usize = 8;
    const EACH: usize = 700;
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        clients.spawn(async move {
            for i in 0..EACH {
                let n = client * EACH + i;
                match tokio::time::timeout(Duration::from_secs(5), one_exchange(web, n)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("connection {n}: {e}")),
                    Err(_) => return Err(format!("connection {n} was held up")),
                }
            }
            Ok(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap().unwrap();
    }
    let dropped = sample(
        &scrape(ballast.admin).await,
        "ballast_log_lines_dropped_total",
        &[],
    )
    .unwrap_or(0.0);
    assert!(dropped >= 100.0, "{dropped} lines counted as dropped");
    let (status, _) = ballast.stop().await;
    assert!(status.success(), "{status}");
}
