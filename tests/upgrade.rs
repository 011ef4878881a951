//! Upgrading the binary as an operator does it: `ballast run --upgrade` waits on
//! `runtime.upgrade_sock`, SIGQUIT to the running ballast hands its listening sockets
//! over; and the operator's second SIGTERM during a graceful shutdown.
//!
//! Listening sockets are handed over by bind address, so these configs name fixed ports:
//! each one found free by binding 127.0.0.1:0 and closing it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(
    web: SocketAddr,
    admin: SocketAddr,
    sock: &Path,
    shutdown_timeout: &str,
    backends: &[(&str, SocketAddr, u32)],
) -> String {
    format!(
        "[admin]\nbind = \"{admin}\"\n\n[runtime]\nthreads = 2\nshutdown_timeout = \"{shutdown_timeout}\"\nupgrade_sock = \"{}\"\n\n[[listeners]]\nname = \"web\"\nbind = \"{web}\"\nstrategy = \"least_conn\"\n{}",
        sock.display(),
        backends_toml(backends)
    )
}

/// A `ballast run` process whose log is read line by line as it comes.
struct Run {
    child: KillOnDrop,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far.
    log: Vec<String>,
}

impl Run {
    fn spawn(config: &Path, upgrade: bool) -> Run {
        Run::spawn_with(config, upgrade, &[])
    }

    fn spawn_with(config: &Path, upgrade: bool, envs: &[(&str, &Path)]) -> Run {
        use std::io::BufRead;
        let mut command = Command::new(env!("CARGO_BIN_EXE_ballast"));
        command
            .args(["run", "--log-format", "text", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if upgrade {
            command.arg("--upgrade");
        }
        command.envs(envs.iter().copied());
        let mut child = KillOnDrop(command.spawn().unwrap());
        let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
        let (tx, lines) = mpsc::unbounded_channel();
        // Reads to the end, so that ballast never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(strip_ansi(&line));
            }
        });
        Run {
            child,
            lines,
            log: Vec::new(),
        }
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.0.id(), signal);
    }

    /// The first line from now on that contains `needle`, within the deadline.
    async fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_within(needle, DEADLINE).await
    }

    /// The first line from now on that contains `needle`, within `within`.
    async fn wait_for_within(&mut self, needle: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no log line with {needle:?} in time; the log:\n{}",
                        self.log.join("\n")
                    )
                })
                .unwrap_or_else(|| {
                    panic!("the log ended without {needle:?}:\n{}", self.log.join("\n"))
                });
            self.log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// SIGTERM, and a clean exit (0, no panic) within the deadline.
    async fn terminate_cleanly(mut self) {
        self.signal("-TERM");
        let (status, log) = self.exit_within(DEADLINE).await;
        assert_eq!(status.code(), Some(0), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    /// Whether the process is still running.
    fn running(&mut self) -> bool {
        self.child.0.try_wait().unwrap().is_none()
    }

    /// The exit status, waiting at most `within`; then the whole log.
    async fn exit_within(&mut self, within: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "ballast did not exit within {within:?}; the log:\n{}",
                self.log.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The pipe closes with the process (or, where a new process it started shares
        // it, goes quiet): the rest of the log is there to read.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(500), self.lines.recv()).await
        {
            self.log.push(line);
        }
        (status, self.log.join("\n"))
    }
}

/// Starts `run --upgrade` on `config`, sends `old` SIGQUIT once it waits, and waits
/// `within` for the old process to exit cleanly (0, no panic): the new process, how
/// long the old one took from SIGQUIT, and the old one's log.
async fn upgrade(old: &mut Run, config: &Path, within: Duration) -> (Run, Duration, String) {
    let mut new = Run::spawn(config, true);
    new.wait_for("upgrade: waiting for listening sockets on")
        .await;
    let quit = Instant::now();
    old.signal("-QUIT");
    let (status, log) = old.exit_within(within).await;
    let took = quit.elapsed();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    (new, took, log)
}

/// Waits until `/readyz` at `admin` answers 200.
async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if TcpStream::connect(admin).await.is_ok()
            && http(admin, "GET", "/readyz").await == (200, "ready\n".to_string())
        {
            return;
        }
        assert!(Instant::now() < deadline, "ballast never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes a line on `stream` and reads its echo.
async fn echo(stream: &mut TcpStream, line: &[u8]) -> Result<(), String> {
    stream.write_all(line).await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .map_err(|_| "no echo in time".to_string())?
        .map_err(|e| e.to_string())?;
    if back != line {
        return Err(format!(
            "echo differs: {:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    Ok(())
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: PathBuf,
    web: SocketAddr,
    admin: SocketAddr,
}

fn setup(shutdown_timeout: &str, backends: &[(&str, SocketAddr, u32)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let sock = dir.path().join("upgrade.sock");
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    std::fs::write(&path, config(web, admin, &sock, shutdown_timeout, backends)).unwrap();
    Setup {
        _dir: dir,
        path,
        sock,
        web,
        admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_churn_refuses_no_connection_and_the_old_process_exits_once_it_handed_everything_over(
) {
    let (a, b) = (Backend::greeter("a").await, Backend::greeter("b").await);
    let s = setup("30s", &[("a", a.addr, 1), ("b", b.addr, 1)]);
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;

    // A long-lived connection through the old process, and clients churning.
    let (mut held, _) = connect_and_greet(s.web).await;
    let churn = Churn::start(s.web);
    churn.wait_for_more(50).await;

    let mut new = Run::spawn(&s.path, true);
    let waiting = new
        .wait_for("upgrade: waiting for listening sockets on")
        .await;
    assert!(waiting.contains(s.sock.to_str().unwrap()), "{waiting}");
    old.signal("-QUIT");
    // The listener's socket and the admin endpoint's.
    old.wait_for("upgrade: handed 2 listening sockets over on")
        .await;
    new.wait_for("upgrade: took over 2 listening sockets; bound afresh: none")
        .await;
    // Ready once every accept loop is started (their "listener bound" lines may come
    // before or after).
    new.wait_for("ready").await;
    old.wait_for("upgrade: the new process serves").await;
    old.wait_for("stopped accepting connections").await;

    // The old process no longer accepts, and the churn goes on through the new one.
    churn.wait_for_more(300).await;
    // The connection opened before the upgrade was handed over: the old process exits,
    // 0, and the connection works on through the new one.
    let (status, old_log) = old.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{old_log}");
    assert!(!old_log.contains("panicked"), "{old_log}");
    echo(&mut held, b"still here\n")
        .await
        .expect("the held connection works through the new process");

    churn.wait_for_more(100).await;
    let (exchanges, failures) = churn.stop().await;
    eprintln!(
        "upgrade under churn: {exchanges} exchanges, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {exchanges} exchanges failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // The new process serves alone: clients and the admin endpoint.
    one_exchange(s.web, 0)
        .await
        .expect("the new process serves");
    wait_ready(s.admin).await;
    drop(held);
    new.terminate_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_a_graceful_shutdown_closes_every_connection_and_exits_at_once() {
    let a = Backend::greeter("a").await;
    let s = setup("10m", &[("a", a.addr, 1)]);
    let mut run = Run::spawn(&s.path, false);
    run.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let (mut held, _) = connect_and_greet(s.web).await;

    run.signal("-TERM");
    run.wait_for("graceful shutdown").await;
    run.wait_for("shutting down: waiting for open connections")
        .await;
    // Graceful: the open connection still works, and ballast waits for it.
    echo(&mut held, b"still here\n").await.unwrap();
    assert!(run.running());

    let again = Instant::now();
    run.signal("-TERM");
    let (status, log) = run.exit_within(Duration::from_secs(2)).await;
    eprintln!("exited {:?} after the second SIGTERM", again.elapsed());
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("SIGTERM during the graceful shutdown: closing every connection now"),
        "{log}"
    );
    assert_closed(&mut held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_with_no_running_ballast_fails_with_exit_2_naming_the_socket_and_binds_nothing()
{
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let started = Instant::now();
    let mut run = Run::spawn(&s.path, true);
    let (status, log) = run.exit_within(Duration::from_secs(15)).await;
    eprintln!("gave up after {:?}", started.elapsed());
    assert_eq!(status.code(), Some(2), "{log}");
    let expected = format!(
        "error: upgrade: no listening sockets came on {} within 6s",
        s.sock.display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains("was it sent SIGQUIT?"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // pingora's receiver logs an error every second while it waits: not shown.
    assert!(!log.contains("No incoming socket transfer"), "{log}");
    // It did not fall back to binding the listeners itself.
    assert!(TcpStream::connect(s.web).await.is_err());
    assert!(!s.sock.exists(), "the socket file is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_socket_in_a_missing_folder_fails_at_once_naming_the_folder() {
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let missing = s.path.parent().unwrap().join("missing/upgrade.sock");
    let text = std::fs::read_to_string(&s.path)
        .unwrap()
        .replace(s.sock.to_str().unwrap(), missing.to_str().unwrap());
    std::fs::write(&s.path, text).unwrap();
    let mut run = Run::spawn(&s.path, true);
    let (status, log) = run.exit_within(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(2), "{log}");
    let expected = format!(
        "error: upgrade: cannot wait on {}: cannot create files in {}: No such file or directory",
        missing.display(),
        missing.parent().unwrap().display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_with_no_new_process_waiting_keeps_serving() {
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let mut run = Run::spawn(&s.path, false);
    run.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let (mut held, _) = connect_and_greet(s.web).await;

    run.signal("-QUIT");
    let line = run
        .wait_for("upgrade: cannot hand the listening sockets over on")
        .await;
    assert!(line.contains(s.sock.to_str().unwrap()), "{line}");
    assert!(line.contains("still serving"), "{line}");
    // Nothing changed: it accepts, it is ready, the open connection works.
    one_exchange(s.web, 1).await.unwrap();
    wait_ready(s.admin).await;
    echo(&mut held, b"still here\n").await.unwrap();
    drop(held);
    run.terminate_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_a_reload_added_is_handed_over_too() {
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let api: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let text = std::fs::read_to_string(&s.path).unwrap();
    let with_api = format!(
        "{text}\n[[listeners]]\nname = \"api\"\nbind = \"{api}\"\n{}",
        backends_toml(&[("a", a.addr, 1)])
    );
    std::fs::write(&s.path, with_api).unwrap();
    old.signal("-HUP");
    old.wait_for("listener bound listener=api").await;

    let mut new = Run::spawn(&s.path, true);
    new.wait_for("upgrade: waiting for listening sockets on")
        .await;
    old.signal("-QUIT");
    let handed = old
        .wait_for("upgrade: handed 3 listening sockets over")
        .await;
    assert!(handed.contains(&api.to_string()), "{handed}");
    new.wait_for("upgrade: took over 3 listening sockets; bound afresh: none")
        .await;
    new.wait_for("ready").await;
    let (status, log) = old.exit_within(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{log}");
    one_exchange(api, 1)
        .await
        .expect("the new process serves api");
    one_exchange(s.web, 2)
        .await
        .expect("the new process serves web");
    new.terminate_cleanly().await;
}

/// Found in review: the old process stopped accepting as soon as the new one had taken
/// the sockets, so a new process that failed after that (here: a listener of its config
/// on a port already in use) left nobody serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_after_taking_the_sockets_leaves_the_old_one_serving() {
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let (mut held, _) = connect_and_greet(s.web).await;
    let streams = Streams::start(s.web, 10).await;

    // The new config adds a listener on a port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let new_config = s.path.with_file_name("new.toml");
    std::fs::write(
        &new_config,
        format!(
            "{}\n[[listeners]]\nname = \"busy\"\nbind = \"{busy}\"\n{}",
            std::fs::read_to_string(&s.path).unwrap(),
            backends_toml(&[("a", a.addr, 1)])
        ),
    )
    .unwrap();
    let mut new = Run::spawn(&new_config, true);
    new.wait_for("upgrade: waiting for listening sockets on")
        .await;
    old.signal("-QUIT");
    old.wait_for("upgrade: handed 2 listening sockets over on")
        .await;
    let (status, new_log) = new.exit_within(DEADLINE).await;
    assert_eq!(status.code(), Some(2), "{new_log}");
    assert!(new_log.contains("busy"), "{new_log}");

    // The old process never stopped serving: it accepts, it is ready, the open
    // connection works.
    for n in 0..20 {
        one_exchange(s.web, n)
            .await
            .unwrap_or_else(|e| panic!("the old process still serves web: {e:?}"));
    }
    wait_ready(s.admin).await;
    echo(&mut held, b"still here\n").await.unwrap();
    // The old process waits 15 s for the new one's word from the hand-over on.
    let line = old
        .wait_for_within("did not say it serves within 15s", Duration::from_secs(20))
        .await;
    assert!(line.contains("still serving"), "{line}");
    one_exchange(s.web, 20).await.unwrap();
    // The streaming connections never stopped, and nothing was altered or reset.
    streams.stop_and_check().await;
    drop(held);
    old.terminate_cleanly().await;
}

/// The byte at position `at` of every stream: a pattern in which a byte lost,
/// duplicated or altered anywhere shows.
fn pattern(at: u64) -> u8 {
    (at.wrapping_mul(31) ^ (at >> 8) ^ (at >> 16)) as u8
}

/// Clients that each stream chunks of up to 16 KiB through ballast to a greeting echo
/// backend and check every byte that comes back, until stopped.
struct Streams {
    stop: tokio::sync::watch::Sender<bool>,
    /// Bytes checked so far, per client.
    progress: Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    tasks: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
}

impl Streams {
    async fn start(addr: SocketAddr, n: usize) -> Streams {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut progress = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let (mut stream, _) = connect_and_greet(addr).await;
            let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            progress.push(std::sync::Arc::clone(&done));
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let mut at = 0u64;
                let mut len = 1 + i * 997 % 16384;
                while !*stopped.borrow() {
                    let chunk: Vec<u8> = (at..at + len as u64).map(pattern).collect();
                    let io = async {
                        stream.write_all(&chunk).await?;
                        let mut back = vec![0u8; len];
                        stream.read_exact(&mut back).await?;
                        Ok::<_, std::io::Error>(back)
                    };
                    let back = tokio::time::timeout(DEADLINE, io)
                        .await
                        .map_err(|_| format!("client {i}: no echo in time at byte {at}"))?
                        .map_err(|e| format!("client {i}: {e} at byte {at}"))?;
                    if back != chunk {
                        return Err(format!("client {i}: bytes altered after byte {at}"));
                    }
                    at += len as u64;
                    done.store(at, std::sync::atomic::Ordering::Relaxed);
                    len = 1 + (len * 7919 + 13) % 16384;
                }
                Ok(at)
            }));
        }
        let streams = Streams {
            stop,
            progress,
            tasks,
        };
        streams.wait_all_moved().await;
        streams
    }

    /// Waits until every client has checked more bytes than it had.
    async fn wait_all_moved(&self) {
        let before: Vec<u64> = self
            .progress
            .iter()
            .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        wait_until("every stream moves", || {
            self.progress
                .iter()
                .zip(&before)
                .all(|(p, b)| p.load(std::sync::atomic::Ordering::Relaxed) > *b)
        })
        .await;
    }

    /// Stops every client; each one must have had no error.
    async fn stop_and_check(self) -> u64 {
        self.wait_all_moved().await;
        self.stop.send_replace(true);
        let mut total = 0;
        for task in self.tasks {
            total += task.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        }
        total
    }
}

/// Live connections on backend `name` of the first listener, in a status.
fn active_on(status: &serde_json::Value, name: &str) -> u64 {
    status["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()["active"]
        .as_u64()
        .unwrap()
}

/// The JSON of `/api/v1/status` at `admin`.
async fn status_of(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http(admin, "GET", "/api/v1/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_hands_over_50_streaming_connections_with_no_byte_lost_and_the_old_process_goes()
{
    let (a, b) = (Backend::greeter("a").await, Backend::greeter("b").await);
    let s = setup("30s", &[("a", a.addr, 1), ("b", b.addr, 1)]);
    std::fs::write(
        &s.path,
        std::fs::read_to_string(&s.path).unwrap().replace(
            "strategy = \"least_conn\"",
            "strategy = \"least_conn\"\naccess_log = true",
        ),
    )
    .unwrap();
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let streams = Streams::start(s.web, 50).await;
    let churn = Churn::start(s.web);
    churn.wait_for_more(50).await;

    let (new, gone, old_log) = upgrade(&mut old, &s.path, Duration::from_secs(5)).await;
    eprintln!("the old process was gone {gone:?} after SIGQUIT");
    let handed = old_log
        .lines()
        .find(|l| l.contains("upgrade: established connections handed over"))
        .unwrap_or_else(|| panic!("{old_log}"));
    eprintln!("{handed}");
    // With the 50 streams, churning connections that were open then went over too (one
    // whose backend had just closed stays and ends in the old process).
    let sent: u64 = field(handed, "sent=").parse().unwrap();
    assert!(sent >= 50, "{handed}");
    // The access log marks each connection handed over.
    let marked = access_lines(&old_log, "web")
        .iter()
        .filter(|f| f.last() == Some(&"handover"))
        .count();
    assert_eq!(marked as u64, sent, "{old_log}");

    // Every stream goes on through the new process, every byte checked.
    churn.wait_for_more(100).await;
    let (exchanges, failures) = churn.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {exchanges} exchanges failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    streams.wait_all_moved().await;
    // The new process counts them: 50 live on the listener, 25 on each backend.
    let mut counts = (0, 0, 0);
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        let status = status_of(s.admin).await;
        counts = (
            status["listeners"][0]["active"].as_u64().unwrap(),
            active_on(&status, "a"),
            active_on(&status, "b"),
        );
        if counts == (50, 25, 25) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts, (50, 25, 25));
    let metrics = scrape(s.admin).await;
    assert_eq!(
        sample(
            &metrics,
            "ballast_handover_connections_total",
            &[("result", "received")]
        ),
        Some(sent as f64)
    );
    let total = streams.stop_and_check().await;
    eprintln!("50 streams: {total} bytes checked, {exchanges} churn exchanges");
    new.terminate_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_mid_message_go_over_whole_and_rebalance_and_drain_work_on_them_afterwards() {
    use ballast::websocket::{encode_masked_frame, OP_BINARY, OP_CLOSE};
    let ((a, a_closes), (b, _)) = (recording_ws_backend().await, recording_ws_backend().await);
    let s = setup("30s", &[("a", a, 1), ("b", b, 1)]);
    let plain = std::fs::read_to_string(&s.path).unwrap().replace(
        "strategy = \"least_conn\"",
        "strategy = \"least_conn\"\ndrain_timeout = \"500ms\"",
    );
    std::fs::write(&s.path, &plain).unwrap();
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    // Every client on a: b is drained in the old process (a new process starts with
    // every backend in service).
    let (code, body) = http(s.admin, "POST", "/api/v1/listeners/web/backends/b/drain").await;
    assert_eq!(code, 200, "{body}");

    // 20 WebSockets, each with a 1 MiB message half sent.
    let mut clients = Vec::new();
    for i in 0..20u8 {
        let (mut ws, rest) = ws_connect(s.web).await;
        assert!(rest.is_empty());
        let payload: Vec<u8> = (0..1u32 << 20).map(|n| (n as u8) ^ i).collect();
        let frame = encode_masked_frame(OP_BINARY, &payload, [i, 7, 42, 99]);
        let half = frame.len() / 2;
        ws.write_all(&frame[..half]).await.unwrap();
        clients.push((ws, payload, frame, half));
    }

    let (mut new, _, old_log) = upgrade(&mut old, &s.path, DEADLINE).await;
    assert!(old_log.contains("sent=20 kept=0"), "{old_log}");

    // The rest of each message goes through the new process, and every echo comes back
    // whole.
    let mut bufs = Vec::new();
    for (ws, payload, frame, half) in &mut clients {
        ws.write_all(&frame[*half..]).await.unwrap();
        let mut buf = Vec::new();
        let (opcode, echoed) = read_frame(ws, &mut buf).await;
        assert_eq!(opcode, OP_BINARY);
        assert!(echoed == *payload, "a message arrived altered");
        bufs.push(buf);
    }

    // Rebalance: a reload turns it on, and the new process moves about half of them to
    // b, each with a Close 1012 after whole frames.
    std::fs::write(
        &s.path,
        format!("{plain}\n  [listeners.rebalance]\n  interval = \"100ms\"\n  precision = 1\n  step_size = 2\n"),
    )
    .unwrap();
    new.signal("-HUP");
    new.wait_for("reload").await;
    let mut closed = vec![false; clients.len()];
    let close_code = |payload: &[u8]| u16::from_be_bytes([payload[0], payload[1]]);
    // A migrated client reconnects, as a WebSocket client does, and lands on b; the
    // process stops once both are within precision of 10.
    let mut reconnected = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut even_since: Option<Instant> = None;
    while even_since.is_none_or(|at| at.elapsed() < Duration::from_millis(500)) {
        assert!(
            Instant::now() < deadline,
            "rebalance did not even out: {closed:?}"
        );
        for (i, (ws, ..)) in clients.iter_mut().enumerate() {
            if closed[i] {
                continue;
            }
            let mut chunk = [0u8; 64];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(5), ws.read(&mut chunk)).await
            {
                bufs[i].extend_from_slice(&chunk[..n]);
                let (opcode, payload) = read_frame(ws, &mut bufs[i]).await;
                assert_eq!((opcode, close_code(&payload)), (OP_CLOSE, 1012));
                closed[i] = true;
                let _ = ws.shutdown().await;
                reconnected.push(ws_connect(s.web).await.0);
            }
        }
        let status = status_of(s.admin).await;
        let even = [active_on(&status, "a"), active_on(&status, "b")]
            .iter()
            .all(|n| n.abs_diff(10) <= 1);
        even_since = if even {
            even_since.or(Some(Instant::now()))
        } else {
            None
        };
    }
    let migrated = closed.iter().filter(|c| **c).count();
    assert!((9..=11).contains(&migrated), "{migrated} migrated");

    // Drain: a's remaining ones get their Close 1012 once drain_timeout passed.
    let (code, body) = http(s.admin, "POST", "/api/v1/listeners/web/backends/a/drain").await;
    assert_eq!(code, 200, "{body}");
    for (i, (ws, ..)) in clients.iter_mut().enumerate() {
        if closed[i] {
            continue;
        }
        let (opcode, payload) = read_frame(ws, &mut bufs[i]).await;
        assert_eq!((opcode, close_code(&payload)), (OP_CLOSE, 1012));
        let _ = ws.shutdown().await;
    }
    // a saw a Close 1001 for each of the 20 (migrated or drained).
    wait_until("a sees every Close", || {
        a_closes.lock().unwrap().len() == 20
    })
    .await;
    assert!(a_closes.lock().unwrap().iter().all(|c| *c == 1001));
    drop(reconnected);
    new.terminate_cleanly().await;
}

/// The new process, played by the test: it takes the listening sockets, says it
/// serves, takes the first batch of connections (their descriptors arrive), then dies
/// before it answers, or (`hangs`) holds the link without answering for 7 s first.
async fn a_failed_hand_over_leaves_every_connection_to_the_old_process(hangs: bool) {
    let (a, b) = (Backend::greeter("a").await, Backend::greeter("b").await);
    let s = setup("30s", &[("a", a.addr, 1), ("b", b.addr, 1)]);
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let streams = Streams::start(s.web, 20).await;

    let sock = s.sock.clone();
    let new = tokio::task::spawn_blocking(move || {
        let inherited = ballast::upgrade::receive(&sock).unwrap();
        let inbox =
            std::os::unix::net::UnixListener::bind(ballast::handover::inbox_path(&sock)).unwrap();
        ballast::upgrade::mark_ready(&sock).unwrap();
        let (link, _) = inbox.accept().unwrap();
        let batch = ballast::handover::receive_batch(&link).unwrap().unwrap();
        if hangs {
            std::thread::sleep(Duration::from_secs(7));
        }
        (inherited, batch.len())
    });
    wait_until("the new process waits", || s.sock.exists()).await;
    old.signal("-QUIT");
    let failed = old
        .wait_for("upgrade: the new process failed during the hand-over")
        .await;
    let summary = old
        .wait_for("upgrade: established connections handed over")
        .await;
    assert!(summary.contains("sent=0 kept=20"), "{summary}");
    if hangs {
        assert!(
            failed.contains("timed out") || failed.contains("temporarily unavailable"),
            "{failed}"
        );
    }
    let (_inherited, taken) = new.await.unwrap();
    assert!(taken > 0);

    // Every connection works on through the old process: nothing lost, nothing reset,
    // also for those whose descriptors had reached the new process.
    let total = streams.stop_and_check().await;
    eprintln!("{taken} in the batch the new process failed with; {total} bytes checked");
    assert!(old.running());
    old.terminate_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_that_dies_in_the_middle_of_the_hand_over_leaves_every_connection_to_the_old_one(
) {
    a_failed_hand_over_leaves_every_connection_to_the_old_process(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_that_does_not_answer_within_5s_leaves_every_connection_to_the_old_one() {
    a_failed_hand_over_leaves_every_connection_to_the_old_process(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_with_a_config_the_new_binary_refuses_keeps_the_old_process_serving() {
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let streams = Streams::start(s.web, 5).await;
    std::fs::write(&s.path, "[[listeners]]\nname = 1\n").unwrap();
    old.signal("-USR2");
    old.wait_for("upgrade: the new binary did not wait on")
        .await;
    one_exchange(s.web, 0).await.unwrap();
    wait_ready(s.admin).await;
    streams.stop_and_check().await;
    old.terminate_cleanly().await;
}

/// Kills process `pid` when dropped, if it still runs.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        if alive(self.0) {
            send_signal(self.0, "-KILL");
        }
    }
}

/// Whether process `pid` runs (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_new_binary_and_systemd_follows_it_through_mainpid() {
    let a = Backend::greeter("a").await;
    let s = setup("30s", &[("a", a.addr, 1)]);
    let notify_path = s.path.with_file_name("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let receive = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut old = Run::spawn_with(&s.path, false, &[("NOTIFY_SOCKET", &notify_path)]);
    assert_eq!(receive(), "READY=1");
    let (mut held, _) = connect_and_greet(s.web).await;

    // The unit's upgrade path: SIGUSR2 to the main process.
    old.signal("-USR2");
    let mut heard = Vec::new();
    let new_pid: u32 = loop {
        let message = receive();
        heard.push(message.clone());
        if let Some(pid) = message.lines().find_map(|l| l.strip_prefix("MAINPID=")) {
            break pid.parse().unwrap();
        }
    };
    // Nothing else before: the new process is silent until it takes over, and then says
    // MAINPID= and READY=1 at once; the old one says nothing.
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert!(heard[0].lines().any(|l| l == "READY=1"), "{heard:?}");
    assert_ne!(new_pid, old.child.0.id());
    // Not this test's child: killed here should the test fail.
    let _new = KillPid(new_pid);
    let (status, log) = old.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    // The old process leaves without telling systemd the service stops.
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 512];
    let after = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).to_string());
    assert!(after.is_err(), "heard {after:?} after the upgrade");
    notify.set_read_timeout(Some(DEADLINE)).unwrap();

    // The new process serves, the held connection with it.
    assert!(alive(new_pid));
    echo(&mut held, b"still here\n").await.unwrap();
    one_exchange(s.web, 0).await.unwrap();
    drop(held);
    send_signal(new_pid, "-TERM");
    assert_eq!(receive(), "STOPPING=1");
    wait_until("the new process exits", || !alive(new_pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_backend_the_new_config_lacks_drains_there_and_one_whose_listener_it_lacks_stays(
) {
    let (a, b) = (Backend::greeter("a").await, Backend::greeter("b").await);
    let s = setup("2s", &[("a", a.addr, 1), ("b", b.addr, 1)]);
    let side: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let text = std::fs::read_to_string(&s.path).unwrap();
    let with_side = format!(
        "{text}\n[[listeners]]\nname = \"side\"\nbind = \"{side}\"\n{}",
        backends_toml(&[("a", a.addr, 1)])
    );
    std::fs::write(&s.path, &with_side).unwrap();
    // The new config: web without b (and a short drain_timeout), no listener side.
    let new_config = s.path.with_file_name("new.toml");
    let web_only = config(s.web, s.admin, &s.sock, "2s", &[("a", a.addr, 1)]).replace(
        "strategy = \"least_conn\"",
        "strategy = \"least_conn\"\ndrain_timeout = \"1s\"",
    );
    std::fs::write(&new_config, web_only).unwrap();
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let (mut on_a, first) = connect_and_greet(s.web).await;
    let (mut on_b, second) = connect_and_greet(s.web).await;
    assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
    let (mut on_side, _) = connect_and_greet(side).await;

    let mut new = Run::spawn(&new_config, true);
    new.wait_for("upgrade: waiting for listening sockets on")
        .await;
    let quit = Instant::now();
    old.signal("-QUIT");
    let summary = old
        .wait_for("upgrade: established connections handed over")
        .await;
    assert!(summary.contains("sent=2 kept=1"), "{summary}");
    new.wait_for("a connection handed over goes to a backend this config does not have; it drains")
        .await;
    // On b it works through the new process until drain_timeout (1 s from when the new
    // process took it, after SIGQUIT), then is closed.
    echo(&mut on_b, b"on b\n").await.unwrap();
    assert_closed(&mut on_b).await;
    let lived = quit.elapsed();
    assert!(
        lived >= Duration::from_secs(1),
        "closed {lived:?} after SIGQUIT"
    );
    echo(&mut on_a, b"on a\n").await.unwrap();
    // The old process kept the one on side, and ends it as a graceful shutdown does.
    echo(&mut on_side, b"on side\n").await.unwrap();
    let (status, log) = old.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert_closed(&mut on_side).await;
    drop(on_a);
    new.terminate_cleanly().await;
}

/// Each of `streams` sends an 8-byte ping every `every` (spread over the period) until
/// `stop` turns true; returns each one's longest wait for an echo among the pings sent
/// before `split`, and among those sent after it; and the errors.
async fn probe(
    streams: Vec<TcpStream>,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    split: std::sync::Arc<std::sync::OnceLock<Instant>>,
) -> (Vec<(Duration, Duration)>, Vec<String>) {
    let n = streams.len() as u32;
    let mut tasks = Vec::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let stop = stop.clone();
        let split = std::sync::Arc::clone(&split);
        tasks.push(tokio::spawn(async move {
            let (mut before, mut after) = (Duration::ZERO, Duration::ZERO);
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + every * i as u32 / n, every);
            while !*stop.borrow() {
                tick.tick().await;
                let sent = Instant::now();
                let io = async {
                    stream.write_all(b"ping1234").await?;
                    let mut back = [0u8; 8];
                    stream.read_exact(&mut back).await?;
                    Ok::<_, std::io::Error>(back)
                };
                match tokio::time::timeout(DEADLINE, io).await {
                    Ok(Ok(back)) if &back == b"ping1234" => {}
                    other => return Err(format!("connection {i}: {other:?}")),
                }
                let waited = sent.elapsed();
                match split.get() {
                    Some(at) if sent >= *at => after = after.max(waited),
                    _ => before = before.max(waited),
                }
            }
            Ok((before, after))
        }));
    }
    let mut longest = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(l) => longest.push(l),
            Err(e) => errors.push(e),
        }
    }
    (longest, errors)
}

/// The figures of the note: how long an upgrade of 5,000 idle connections takes,
/// and the longest pause a connection saw (each one pings every 500 ms; the same
/// pings before the upgrade are the baseline). Run by `benches/handover.py`, in release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: benches/handover.py runs it"]
async fn measure_an_upgrade_of_idle_connections() {
    let n: usize = std::env::var("BALLAST_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let backend = Backend::echo("a").await;
    let s = setup("30s", &[("a", backend.addr, 1)]);
    let mut old = Run::spawn(&s.path, false);
    old.wait_for("listener bound").await;
    wait_ready(s.admin).await;
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(TcpStream::connect(s.web).await.unwrap());
    }
    let open = || async {
        status_of(s.admin).await["listeners"][0]["active"]
            .as_u64()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while open().await < n as u64 {
        assert!(Instant::now() < deadline, "{} of {n} open", open().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let every = Duration::from_millis(500);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let split = std::sync::Arc::new(std::sync::OnceLock::new());
    let probes = tokio::spawn(probe(
        streams,
        every,
        stopped,
        std::sync::Arc::clone(&split),
    ));
    // The baseline: 3 s of pings before the upgrade.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Through the upgrade: from the new process's start on.
    split.set(Instant::now()).unwrap();
    let (new, took, log) = upgrade(&mut old, &s.path, Duration::from_secs(60)).await;
    let handed = log
        .lines()
        .find(|l| l.contains("upgrade: established connections handed over"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send_replace(true);
    let (longest, errors) = probes.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let quantiles = |mut waits: Vec<Duration>| {
        waits.sort();
        let at = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
        format!("max={:.1} p99={:.1} p50={:.1}", at(1.0), at(0.99), at(0.5))
    };
    eprintln!(
        "IDLE-UPGRADE conns={n} sigquit_to_old_gone_ms={} handover: {} | longest wait per connection, ms: baseline {} | through the upgrade {}",
        took.as_millis(),
        handed.split("handed over").nth(1).unwrap_or("").trim(),
        quantiles(longest.iter().map(|l| l.0).collect()),
        quantiles(longest.iter().map(|l| l.1).collect()),
    );
    new.signal("-TERM");
}
