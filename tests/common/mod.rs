//! Shared helpers for the integration tests: test backends on 127.0.0.1:0, a ballast
//! started from TOML text, waiting on conditions with deadlines.
#![allow(dead_code)]

pub mod dns_server;
pub mod redis_server;
pub mod relay;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub const DEADLINE: Duration = Duration::from_secs(10);

/// A test backend: greets every connection with its name and a newline, then echoes.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn greeter(name: &str) -> Backend {
        Backend::spawn(name, true, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A greeter listening on `addr` (another 127.x.y.z serves several on one port).
    pub async fn greeter_at(name: &str, addr: SocketAddr) -> Backend {
        Backend::spawn(name, true, addr).await
    }

    /// A plain echo backend (no greeting).
    pub async fn echo(name: &str) -> Backend {
        Backend::spawn(name, false, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn spawn(name: &str, greet: bool, bind: SocketAddr) -> Backend {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if greet && stream.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stops accepting; the port is closed.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address on which nothing listens (bound, then closed).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// TOML for the backends of one listener.
pub fn backends_toml(backends: &[(&str, SocketAddr, u32)]) -> String {
    backends
        .iter()
        .map(|(name, addr, weight)| {
            format!("\n  [[listeners.backends]]\n  name = \"{name}\"\n  addr = \"{addr}\"\n  weight = {weight}\n")
        })
        .collect()
}

/// Starts ballast on the current runtime from TOML text.
pub async fn start(toml: &str) -> ballast::Running {
    let config = ballast::config::Config::parse(toml, "test.toml").expect("valid test config");
    ballast::start(config, None).await.expect("ballast starts")
}

/// Starts ballast on the current runtime from a config file (reloads read it again).
pub async fn start_file(path: &std::path::Path) -> ballast::Running {
    let config = ballast::config::Config::load(path).expect("valid test config");
    ballast::start(config, Some(path.to_path_buf()))
        .await
        .expect("ballast starts")
}

/// Connects to `addr` and reads the backend's greeting line.
pub async fn connect_and_greet(addr: SocketAddr) -> (TcpStream, String) {
    connect_from_and_greet(None, addr).await
}

/// Connects from source IP `from` (any 127.x.y.z works on Linux) and reads the greeting.
pub async fn connect_from_and_greet(from: Option<IpAddr>, addr: SocketAddr) -> (TcpStream, String) {
    let stream = tokio::time::timeout(DEADLINE, async {
        match from {
            Some(ip) => {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(ip, 0)).unwrap();
                socket.connect(addr).await
            }
            None => TcpStream::connect(addr).await,
        }
    })
    .await
    .expect("connect in time")
    .expect("connect");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, reader.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("greeting");
    assert!(
        line.ends_with('\n'),
        "connection closed before a greeting: {line:?}"
    );
    line.pop();
    (reader.into_inner(), line)
}

/// The access log lines of `listener` in a whole log: the ten fields of each.
pub fn access_lines<'a>(log: &'a str, listener: &str) -> Vec<Vec<&'a str>> {
    log.lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() == 10 && f[1] == listener && f[0].ends_with('Z'))
        .collect()
}

/// The `i`-th of many distinct client addresses on loopback (127.1.0.1 on), for tests
/// that need one source address per client.
pub fn client_ip(i: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        1 + (i / 250) as u8,
        (i % 250) as u8,
        1 + (i % 7) as u8,
    ))
}

/// Waits until `cond` holds, checking every 10 ms, failing the test after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Echo through a held connection: proves it is still open end to end.
pub async fn still_open(stream: &mut TcpStream) -> bool {
    if stream.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping\n"
    )
}

/// The backends of the first listener in `ballast`'s status (`/api/v1/status`), as
/// JSON objects.
pub fn status_backends(ballast: &ballast::Ballast) -> Vec<serde_json::Value> {
    ballast.status()["listeners"][0]["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Asserts that the peer closes `stream` (EOF or reset) within the deadline.
pub async fn assert_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut buf = [0u8; 64];
    let result = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .expect("the connection should be closed in time");
    match result {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected a close, got {n} bytes"),
    }
}

/// One HTTP/1.1 request to the admin endpoint: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, "").await
}

/// Scrapes `/metrics` from the admin endpoint.
pub async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The value of the sample of metric `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let present: Vec<(String, String)> = label_text
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            labels
                .iter()
                .all(|(k, v)| present.iter().any(|(pk, pv)| pk == k && pv == v))
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// Scrapes until metric `name` with `labels` satisfies `cond`, within the deadline.
pub async fn wait_for_metric(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    cond: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(admin).await;
        let value = sample(&text, name, labels);
        if let Some(v) = value.filter(|v| cond(*v)) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {name}{labels:?}: last value {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/1.1 request with extra header lines: (status, body). It names the admin
/// address as `Host`, and a POST says `Content-Type: application/json` (as the admin
/// API asks of a mutation) unless `headers` name another.
pub async fn http_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    http_with_body(addr, method, path, headers, "").await
}

/// As [`http_with`], with a request body.
pub async fn http_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let json = if method == "POST" && !headers.to_ascii_lowercase().contains("content-type:") {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{json}{length}{headers}Connection: close\r\n\r\n{body}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut answer))
        .await
        .expect("admin answers in time")
        .unwrap();
    status_and_body(&answer)
}

/// The status code and the body of an HTTP/1.1 answer (0 when there is no status line).
pub fn status_and_body(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sends `signal` (such as `-HUP`) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pid}");
}

/// A child process that is killed if the test ends early (a failed assertion), so that
/// no ballast outlives its test.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM and waits for the exit status (within the deadline).
pub async fn terminate(mut child: KillOnDrop) -> std::process::ExitStatus {
    send_signal(child.0.id(), "-TERM");
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ballast did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `ballast run` process with its listener and admin addresses read from its log.
pub struct Proc {
    pub child: KillOnDrop,
    pub listeners: std::collections::HashMap<String, SocketAddr>,
    pub admin: SocketAddr,
    log: Log,
}

/// What becomes of a [`Proc`]'s log once it is bound.
enum Log {
    /// Read on (so that ballast never meets a full pipe), kept for [`Proc::stop`].
    Drained(std::thread::JoinHandle<Vec<String>>),
    /// Never read again: the pipe stays open and fills up.
    Unread(Box<dyn Send>),
    Taken,
}

impl Proc {
    /// Runs `ballast run --config FILE` with extra environment, waits until `listeners`
    /// listeners are bound and `/readyz` answers 200.
    pub async fn run(config: &std::path::Path, envs: &[(&str, &str)], listeners: usize) -> Proc {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"));
        command.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
        for (k, v) in envs {
            command.env(k, v);
        }
        Proc::spawn(command, config, listeners, true).await
    }

    /// Runs `ballast run --config FILE` (one listener) and never reads its stderr once
    /// it is bound: a pipe nobody reads.
    pub async fn run_with_unread_log(config: &std::path::Path) -> Proc {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"));
        command.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
        Proc::spawn(command, config, 1, false).await
    }

    /// Runs `ballast run --config FILE` (one listener) with at most `nofile` file
    /// descriptors.
    pub async fn run_limited(config: &std::path::Path, nofile: u32) -> Proc {
        let mut command = std::process::Command::new("sh");
        command.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
        command.args([
            "-c",
            &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_ballast"),
        ]);
        Proc::spawn(command, config, 1, true).await
    }

    async fn spawn(
        mut command: std::process::Command,
        config: &std::path::Path,
        listeners: usize,
        drain_log: bool,
    ) -> Proc {
        use std::io::BufRead;
        command
            .args([
                "run",
                "--log-format",
                "text",
                "--config",
                config.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = KillOnDrop(command.spawn().unwrap());
        let stderr = std::io::BufReader::new(child.0.stderr.take().unwrap());
        let mut lines = stderr.lines().map_while(Result::ok).map(|l| strip_ansi(&l));
        let mut bound = std::collections::HashMap::new();
        let mut admin = None;
        while bound.len() < listeners || admin.is_none() {
            let line = lines
                .next()
                .expect("ballast's log ended before it was bound");
            if line.contains("listener bound") {
                let name = field(&line, "listener=").to_string();
                bound.insert(name, field(&line, "addr=").parse().unwrap());
            } else if line.contains("admin bound") {
                admin = Some(field(&line, "addr=").parse().unwrap());
            }
        }
        let log = if drain_log {
            // Keep draining the log so that ballast never blocks on a full pipe.
            Log::Drained(std::thread::spawn(move || lines.collect::<Vec<_>>()))
        } else {
            Log::Unread(Box::new(lines))
        };
        let admin = admin.unwrap();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if TcpStream::connect(admin).await.is_ok()
                && http(admin, "GET", "/readyz").await == (200, "ready\n".to_string())
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ballast never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Proc {
            child,
            listeners: bound,
            admin,
            log,
        }
    }

    pub fn pid(&self) -> String {
        self.child.0.id().to_string()
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.0.id(), signal);
    }

    /// SIGTERM, then the exit status and the whole log.
    pub async fn stop(mut self) -> (std::process::ExitStatus, String) {
        let log = std::mem::replace(&mut self.log, Log::Taken);
        let child = std::mem::replace(
            &mut self.child,
            KillOnDrop(std::process::Command::new("true").spawn().unwrap()),
        );
        let status = terminate(child).await;
        let log = match log {
            Log::Drained(log) => log.join().unwrap().join("\n"),
            _ => String::new(),
        };
        (status, log)
    }
}

/// The value after `key` in a text log line, up to the next space.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        + key.len();
    line[at..].split_whitespace().next().unwrap()
}

pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Opens a WebSocket through `addr`: sends the upgrade and reads the 101 head; returns
/// the stream and any bytes read past the head.
pub async fn ws_connect(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut ws = TcpStream::connect(addr).await.unwrap();
    ws.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let (head, rest) = read_answer_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (ws, rest)
}

/// Reads an HTTP answer head: (the head, bytes read past it).
pub async fn read_answer_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before the answer head");
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    (head, buf)
}

/// Reads one whole server frame: (opcode, payload). Fails the test on a torn frame
/// (the connection ends inside a frame).
pub async fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Some(h) = ballast::websocket::parse_header(buf) {
            let end = h.header_len + h.payload_len as usize;
            if buf.len() >= end {
                assert!(h.mask.is_none(), "server frames are not masked");
                let payload = buf[h.header_len..end].to_vec();
                buf.drain(..end);
                return (h.opcode, payload);
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("a frame in time")
            .expect("no reset");
        assert!(
            n > 0,
            "the connection ended inside a frame ({} bytes of it)",
            buf.len()
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends `request` exactly as given (it should ask for `Connection: close`) and reads
/// the answer until the server closes: (status, head, body).
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("admin answers in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (status, head.to_string(), body.to_string())
}

/// One client's life: connect, get the greeting, echo a line, close.
pub async fn one_exchange(addr: SocketAddr, n: usize) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut greeting = [0u8; 2];
    stream
        .read_exact(&mut greeting)
        .await
        .map_err(|e| format!("greeting: {e}"))?;
    let line = format!("message {n}\n");
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = vec![0u8; line.len()];
    stream
        .read_exact(&mut echo)
        .await
        .map_err(|e| format!("echo: {e}"))?;
    if echo != line.as_bytes() {
        return Err(format!(
            "echo differs: {:?}",
            String::from_utf8_lossy(&echo)
        ));
    }
    Ok(())
}

/// A TCP server that accepts and never reads or answers (an HTTP health check of it
/// times out; a client writing to it through ballast fills every buffer).
pub async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// Four clients, each opening a connection, exchanging one line and closing, over and
/// over until `stop` (or 100,000 exchanges): the failures, and the count of exchanges.
pub struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Churn {
    pub fn start(addr: SocketAddr) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let clients = (0..4)
            .map(|_| {
                let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) && n < 100_000 {
                        if let Err(e) = one_exchange(addr, n).await {
                            failures.push(e);
                        }
                        n += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        Churn {
            stop,
            done,
            clients,
        }
    }

    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `more` further exchanges have been made.
    pub async fn wait_for_more(&self, more: usize) {
        let target = self.done() + more;
        wait_until("more exchanges", || self.done() >= target).await;
    }

    pub async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for client in self.clients {
            failures.extend(client.await.unwrap());
        }
        (self.done.load(Ordering::Relaxed), failures)
    }
}

/// A WebSocket echo backend that records the status code of every Close it receives.
pub async fn recording_ws_backend() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u16>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&closes);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                buf.drain(..end);
                let accept = ballast::websocket::accept_key("dGhlIHNhbXBsZSBub25jZQ==");
                let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                loop {
                    while let Some(h) = ballast::websocket::parse_header(&buf) {
                        let end = h.header_len + h.payload_len as usize;
                        if buf.len() < end {
                            break;
                        }
                        let mut payload = buf[h.header_len..end].to_vec();
                        buf.drain(..end);
                        ballast::websocket::apply_mask(
                            &mut payload,
                            h.mask.expect("client frames are masked"),
                        );
                        if h.opcode == ballast::websocket::OP_CLOSE {
                            record
                                .lock()
                                .unwrap()
                                .push(u16::from_be_bytes([payload[0], payload[1]]));
                            let _ = stream
                                .write_all(&ballast::websocket::encode_frame(
                                    ballast::websocket::OP_CLOSE,
                                    &payload,
                                ))
                                .await;
                            return;
                        }
                        if stream
                            .write_all(&ballast::websocket::encode_frame(h.opcode, &payload))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, closes)
}
