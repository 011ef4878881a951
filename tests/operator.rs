//! What an operator meets in the first hour: a terminal that goes away, logs that read
//! well, backends that a reload adds, a config file mounted as a Kubernetes ConfigMap.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

/// A POST as a script sends it (JSON content type).
async fn post(admin: SocketAddr, path: &str) -> (u16, String) {
    http_with(admin, "POST", path, "Content-Type: application/json\r\n").await
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http(admin, "GET", "/api/v1/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The status entry of backend `name` of the first listener.
fn backend<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {status}"))
}

/// Waits until backend `a` of the first listener has `weight` (a reload was applied);
/// returns the generation.
async fn wait_for_weight(admin: SocketAddr, weight: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let now = status(admin).await;
        if backend(&now, "a")["weight"] == weight {
            return now["generation"].as_u64().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit to weight {weight} was never reloaded: {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stderr_breaks_neither_reload_nor_drain_nor_proxying_at_debug_level() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n{}",
        backends_toml(&[("a", a.addr, 1), ("b", b.addr, 1)])
    );
    std::fs::write(&path, &text).unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
            .args(["run", "--log-level", "debug", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let (mut web, mut admin) = (None, None);
    while web.is_none() || admin.is_none() {
        let line = lines.next().expect("a log line").unwrap();
        assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
        if line.contains("listener bound") {
            web = Some(field(&line, "addr=").parse::<SocketAddr>().unwrap());
        } else if line.contains("admin bound") {
            admin = Some(field(&line, "addr=").parse::<SocketAddr>().unwrap());
        }
    }
    let (web, admin) = (web.unwrap(), admin.unwrap());
    // The terminal goes away: the read end of stderr closes.
    drop(lines);

    // Proxying logs at debug level on every connection.
    for _ in 0..4 {
        let (_, greeting) = connect_and_greet(web).await;
        assert!(greeting == "a" || greeting == "b", "{greeting}");
    }
    let (code, body) = post(admin, "/api/v1/reload").await;
    assert_eq!((code, body.trim()), (200, "{\"generation\":2}"));
    let (code, body) = post(admin, "/api/v1/listeners/web/backends/a/drain").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(admin, "/api/v1/listeners/web/backends/a/undrain").await;
    assert_eq!(code, 200, "{body}");
    send_signal(child.0.id(), "-HUP");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while status(admin).await["generation"] != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "ballast died on SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        let (_, greeting) = connect_and_greet(web).await;
        assert!(greeting == "a" || greeting == "b", "{greeting}");
    }
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "ballast is still running"
    );
    let dropped = sample(&scrape(admin).await, "ballast_log_lines_dropped_total", &[]);
    assert!(
        dropped.unwrap_or(0.0) > 0.0,
        "dropped lines are counted: {dropped:?}"
    );
    let status = terminate(child).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_names_each_bind_once_says_what_a_reload_changed_and_hides_pingora() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let head = "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n";
    std::fs::write(
        &path,
        format!("{head}{}", backends_toml(&[("a", a.addr, 1)])),
    )
    .unwrap();
    let proc = Proc::run(&path, &[], 1).await;
    let admin = proc.admin;
    assert_eq!(post(admin, "/api/v1/reload").await.0, 200);
    std::fs::write(
        &path,
        format!(
            "{head}{}",
            backends_toml(&[("a", a.addr, 3), ("b", b.addr, 1)])
        ),
    )
    .unwrap();
    assert_eq!(post(admin, "/api/v1/reload").await.0, 200);
    let (_, log) = proc.stop().await;
    assert!(log.contains("reload: no change"), "{log}");
    assert!(
        log.contains(r#"reload: listener "web": backend "a" re-weighted: 1 -> 3"#),
        "{log}"
    );
    assert!(
        log.contains(r#"reload: listener "web": backend "b" added"#),
        "{log}"
    );
    // Proc::run read the one "listener bound" line; a reload that keeps the listener
    // binds nothing.
    assert_eq!(log.matches("listener bound").count(), 0, "{log}");
    assert!(!log.contains("Some("), "{log}");
    assert!(!log.contains("Starting services"), "{log}");
    assert!(!log.contains("Bootstrap"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_flat_fields_and_no_source_paths_even_at_debug_level() {
    // The only backend is dead: a client's connection logs "connect failed" inside the
    // connection's span, whose fields (listener, client) must come out at the top level.
    let dead = dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nretries = 0\n{}",
            backends_toml(&[("a", dead, 1)])
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
            .args([
                "run",
                "--log-format",
                "json",
                "--log-level",
                "debug",
                "--config",
            ])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut pingora_lines = 0;
    loop {
        let line = lines.next().expect("a log line").unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for nested in ["fields", "span", "spans"] {
            assert!(json.get(nested).is_none(), "nested {nested}: {line}");
        }
        assert!(!line.contains(".rs\""), "a source path: {line}");
        assert!(!line.contains("log."), "a log.* field: {line}");
        if json["target"].as_str().unwrap_or("").starts_with("pingora") {
            pingora_lines += 1;
        }
        if json["message"] == "listener bound" {
            assert_eq!(json["listener"], "web", "{line}");
            let web: SocketAddr = json["addr"].as_str().unwrap().parse().unwrap();
            let _ = tokio::net::TcpStream::connect(web).await.unwrap();
        }
        let failed = json["message"] == "connect failed";
        seen.push(line);
        if failed {
            assert_eq!(json["listener"], "web", "{}", seen.join("\n"));
            assert!(json["client"].as_str().unwrap().starts_with("127.0.0.1:"));
            assert_eq!(json["backend"], "a");
            assert_eq!(json["level"], "WARN");
            break;
        }
    }
    assert!(
        pingora_lines > 0,
        "pingora speaks at debug: {}",
        seen.join("\n")
    );
    drop(lines);
    let _ = child.0.kill();
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_by_a_reload_gets_nothing_until_its_first_check_passes() {
    let a = Backend::greeter("a").await;
    let (silent, _task) = silent_server().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let head = "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least_conn\"\n  [listeners.health]\n  kind = \"http\"\n  interval = \"2s\"\n  timeout = \"1500ms\"\n  rise = 5\n  fall = 5\n";
    // `a` is not HTTP either, but it is up from the start (as HAProxy's servers are)
    // and it takes `fall` = 5 failed checks, 8 s, to take it down.
    write(
        &path,
        &format!("{head}{}", backends_toml(&[("a", a.addr, 1)])),
    );
    let running = start_file(&path).await;
    let admin = running.admin_addr().unwrap();
    let web = running.listener_addr("web");
    assert_eq!(backend(&status(admin).await, "a")["state"], "up");

    write(
        &path,
        &format!(
            "{head}{}",
            backends_toml(&[("a", a.addr, 1), ("new", silent, 1)])
        ),
    );
    assert_eq!(post(admin, "/api/v1/reload").await.0, 200);
    let now = status(admin).await;
    assert_eq!(backend(&now, "new")["state"], "checking", "{now}");
    assert!(backend(&now, "new")["since"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(
        backend(&now, "a")["state"],
        "up",
        "a kept backend keeps its state"
    );
    // least_conn would send every new connection to the empty backend: none goes there.
    let mut held = Vec::new();
    for _ in 0..5 {
        let (stream, greeting) = connect_and_greet(web).await;
        assert_eq!(greeting, "a");
        held.push(stream);
    }
    let (code, body) = http(admin, "GET", "/api/v1/listeners/web/pick?client=127.0.0.1").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"backend\":\"a\""), "{body}");
    // Its first check times out: down at once, with the reason shown.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let now = status(admin).await;
        let new = backend(&now, "new");
        if new["state"] == "down" {
            let reason = new["last_check_failure"]["reason"].as_str().unwrap();
            assert!(!reason.is_empty(), "{now}");
            break;
        }
        assert_eq!(new["state"], "checking", "{now}");
        assert!(tokio::time::Instant::now() < deadline, "{now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checking_backend_is_up_after_its_first_good_check_whatever_rise_says() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let head = "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n  [listeners.health]\n  kind = \"tcp\"\n  interval = \"1h\"\n  rise = 5\n";
    write(
        &path,
        &format!("{head}{}", backends_toml(&[("a", a.addr, 1)])),
    );
    let running = start_file(&path).await;
    let admin = running.admin_addr().unwrap();
    write(
        &path,
        &format!(
            "{head}{}",
            backends_toml(&[("a", a.addr, 1), ("b", b.addr, 1)])
        ),
    );
    assert_eq!(post(admin, "/api/v1/reload").await.0, 200);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while backend(&status(admin).await, "b")["state"] != "up" {
        assert!(tokio::time::Instant::now() < deadline, "b never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_and_a_write_to_the_link_target_both_reload() {
    use std::os::unix::fs::symlink;
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let config = |weight: u32| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
            backends_toml(&[("a", a.addr, weight)])
        )
    };
    // What the kubelet lays out: ballast.toml -> ..data/ballast.toml, ..data -> ..<ts>.
    let first = dir.path().join("..2026_11_23_05_00_00.000000001");
    std::fs::create_dir(&first).unwrap();
    std::fs::write(first.join("ballast.toml"), config(1)).unwrap();
    symlink(first.file_name().unwrap(), dir.path().join("..data")).unwrap();
    symlink("..data/ballast.toml", dir.path().join("ballast.toml")).unwrap();
    let running = start_file(&dir.path().join("ballast.toml")).await;
    let admin = running.admin_addr().unwrap();

    // An edit of the file the link points at, in place. (Once it is seen, the watcher
    // is surely running.)
    std::fs::write(first.join("ballast.toml"), config(2)).unwrap();
    assert_eq!(wait_for_weight(admin, 2).await, 2);

    // The update: a new folder, a new ..data link renamed over the old one.
    let second = dir.path().join("..2026_11_23_05_01_00.000000002");
    std::fs::create_dir(&second).unwrap();
    std::fs::write(second.join("ballast.toml"), config(3)).unwrap();
    symlink(second.file_name().unwrap(), dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    assert_eq!(wait_for_weight(admin, 3).await, 3);

    // And an in-place edit in the folder the link points at now.
    std::fs::write(second.join("ballast.toml"), config(4)).unwrap();
    assert_eq!(wait_for_weight(admin, 4).await, 4);
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_file_beside_the_config_does_not_hold_back_its_reload() {
    let a = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let config = |weight: u32| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
            backends_toml(&[("a", a.addr, weight)])
        )
    };
    std::fs::write(&path, config(1)).unwrap();
    let running = start_file(&path).await;
    let admin = running.admin_addr().unwrap();
    // Once an edit is seen, the watcher is surely running.
    std::fs::write(&path, config(2)).unwrap();
    wait_for_weight(admin, 2).await;
    // A log file in the same folder, written every 50 ms (more often than the watcher's
    // quiet period) until the reload is seen.
    let busy = dir.path().join("other.log");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            // Bounded, and longer than the test waits for the reload.
            let deadline = tokio::time::Instant::now() + 2 * DEADLINE;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && tokio::time::Instant::now() < deadline
            {
                n += 1;
                let _ = std::fs::write(&busy, n.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    std::fs::write(&path, config(3)).unwrap();
    wait_for_weight(admin, 3).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_replaces_every_backend_refuses_no_connection_while_they_are_checked() {
    let blue = Backend::greeter("blue").await;
    let green = Backend::greeter("green").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    // Checks every hour: only the first check of a new backend happens in this test.
    let head = "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n  [listeners.health]\n  kind = \"tcp\"\n  interval = \"1h\"\n";
    write(
        &path,
        &format!("{head}{}", backends_toml(&[("blue", blue.addr, 1)])),
    );
    let running = start_file(&path).await;
    let admin = running.admin_addr().unwrap();
    let web = running.listener_addr("web");
    write(
        &path,
        &format!("{head}{}", backends_toml(&[("green", green.addr, 1)])),
    );
    assert_eq!(post(admin, "/api/v1/reload").await.0, 200);
    // Right after the swap: blue is gone, green is checking or just up.
    for _ in 0..20 {
        let (_, greeting) = connect_and_greet(web).await;
        assert_eq!(greeting, "green");
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn check_answers_by_its_exit_code_when_stdout_is_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n  [[listeners.backends]]\n  addr = \"127.0.0.1:3001\"\n",
    )
    .unwrap();
    // `ballast check ... | head -0`: the reader is gone before ballast writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["check", "--config"])
        .arg(&path)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
