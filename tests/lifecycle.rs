//! The process as an operator runs it: steady traffic through 30 reloads by every
//! trigger, shutdown that ends as soon as the last connection does, sd_notify, and the
//! shipped systemd unit.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(backends: &[(&str, SocketAddr, u32)]) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[runtime]\nthreads = 2\nshutdown_timeout = \"30s\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least_conn\"\ndrain_timeout = \"1h\"\n{}",
        backends_toml(backends)
    )
}

/// Writes `text` as the config file the way editors do: a new file renamed over it.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn generation(admin: SocketAddr) -> u64 {
    let (_, body) = http(admin, "GET", "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["generation"].as_u64().unwrap()
}

async fn wait_for_generation(admin: SocketAddr, at_least: u64) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let g = generation(admin).await;
        if g >= at_least {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "generation stayed {g}, expected {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_reloads_by_every_trigger_lose_no_connection_and_refuse_none() {
    let pool = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
        Backend::greeter("d").await,
    ];
    // Reload i serves a window of 2 or 3 of the 4 backends: every reload adds one
    // backend and removes another.
    let set = |i: usize| -> Vec<(&str, SocketAddr, u32)> {
        (0..2 + i % 2)
            .map(|k| &pool[(i + k) % 4])
            .map(|b| (b.name.as_str(), b.addr, 1))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config(&set(0))).unwrap();
    let proc = Proc::run(&path, &[], 1).await;
    let (addr, admin) = (proc.listeners["web"], proc.admin);

    // Long-lived connections that must survive every reload.
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(connect_and_greet(addr).await.0);
    }

    // Steady churn from four clients until told to stop.
    let churn = Churn::start(addr);

    let mut expected = 1;
    for i in 1..=30 {
        let text = config(&set(i));
        match i % 3 {
            0 => replace_file(&path, &text), // the file watcher
            1 => {
                replace_file(&path, &text);
                proc.signal("-HUP");
            }
            _ => {
                replace_file(&path, &text);
                let (status, body) = http(admin, "POST", "/api/v1/reload").await;
                assert_eq!(status, 200, "{body}");
            }
        }
        expected = wait_for_generation(admin, expected + 1).await;
        if i == 15 {
            // An invalid file is refused and changes nothing.
            replace_file(&path, &text.replace("weight = 1", "weight = 0"));
            let (status, body) = http(admin, "POST", "/api/v1/reload").await;
            assert_eq!(status, 422, "{body}");
            assert_eq!(generation(admin).await, expected);
            one_exchange(addr, 0)
                .await
                .expect("the old config keeps serving");
            replace_file(&path, &text);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (exchanges, failures) = churn.stop().await;
    eprintln!(
        "30 reloads under churn: {exchanges} exchanges, {} failed",
        failures.len()
    );
    assert!(
        exchanges >= 200,
        "too little traffic to prove anything: {exchanges}"
    );
    assert!(
        failures.is_empty(),
        "{} of {exchanges} exchanges failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for (i, stream) in held.iter_mut().enumerate() {
        stream.write_all(b"still here\n").await.unwrap();
        let mut echo = [0u8; 11];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut echo))
            .await
            .unwrap_or_else(|_| panic!("held connection {i} stalled"))
            .unwrap_or_else(|e| panic!("held connection {i} was lost: {e}"));
        assert_eq!(&echo, b"still here\n");
    }
    let text = scrape(admin).await;
    assert!(
        sample(
            &text,
            "ballast_config_reloads_total",
            &[("result", "failure")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        sample(
            &text,
            "ballast_config_reloads_total",
            &[("result", "success")]
        )
        .unwrap()
            >= 30.0
    );
    drop(held);
    let (status, log) = proc.stop().await;
    assert_eq!(status.code(), Some(0));
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_exits_as_soon_as_the_last_connection_ends() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config(&[("a", a.addr, 1)])).unwrap();
    let proc = Proc::run(&path, &[], 1).await;
    let (addr, admin) = (proc.listeners["web"], proc.admin);
    let (mut held, _) = connect_and_greet(addr).await;

    proc.signal("-TERM");
    let deadline = Instant::now() + DEADLINE;
    while http(admin, "GET", "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The accept loop stops right after /readyz turns: connections are then refused.
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The held connection still works during the shutdown...
    held.write_all(b"bye\n").await.unwrap();
    let mut echo = [0u8; 4];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"bye\n");
    // ...and when it ends, ballast exits at once, not after shutdown_timeout (30s).
    let ended = Instant::now();
    drop(held);
    let (status, log) = proc.stop().await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        ended.elapsed() < Duration::from_secs(3),
        "took {:?}",
        ended.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_reloading_ready_and_stopping_in_order() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, config(&[("a", a.addr, 1)])).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let proc = Proc::run(
        &path,
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
        1,
    )
    .await;
    let receive = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(receive(), "READY=1");
    proc.signal("-HUP");
    let reloading = receive();
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"));
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(usec > 0);
    assert_eq!(receive(), "READY=1");
    let (status, _) = proc.stop().await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(receive(), "STOPPING=1");
}

#[test]
fn the_shipped_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/ballast.service"
    ))
    .unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "User=ballast",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    assert!(unit.lines().any(|l| l.starts_with("LimitNOFILE=")));
    // verify checks that the executables exist: point them at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ballast.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/ballast", env!("CARGO_BIN_EXE_ballast")),
    )
    .unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", copy.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (Debian package systemd; tests/run installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("ballast.service:"),
        "systemd-analyze complains:\n{stderr}"
    );
}
