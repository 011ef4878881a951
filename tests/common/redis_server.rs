//! A Redis server of the test's own, on a free loopback port (`redis-server` from the
//! Debian package `redis-server`, which `.ci/run` installs), and clients that stay
//! connected through ballast and reconnect whenever their connection is closed.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{connect_and_greet, DEADLINE};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// Extra arguments (TLS).
    args: Vec<String>,
}

impl Redis {
    /// A Redis on a free port, answering PING. (A port found free can be taken before
    /// Redis binds it: then Redis exits, and another port is tried.)
    pub async fn start() -> Redis {
        Redis::start_with(Vec::new()).await
    }

    /// A Redis that also takes TLS on `tls_port`, with this certificate and key.
    pub async fn start_tls(tls_port: u16, cert: &std::path::Path, key: &std::path::Path) -> Redis {
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        Redis::start_with(vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(cert),
            "--tls-key-file".into(),
            path(key),
            "--tls-auth-clients".into(),
            "no".into(),
        ])
        .await
    }

    async fn start_with(args: Vec<String>) -> Redis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut redis = Redis {
                port,
                child: None,
                args: args.clone(),
            };
            if redis.try_start().await {
                return redis;
            }
        }
        panic!("redis-server never started on a free port");
    }

    /// Starts it again on the same port (empty: nothing is saved).
    pub async fn restart(&mut self) {
        assert!(self.try_start().await, "redis-server did not start again");
    }

    /// Starts redis-server on `self.port`; `false` when it exits (the port is taken).
    async fn try_start(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let answered = self.command("PING").await.as_deref() == Some("+PONG");
            // Its own child, not another test's Redis that took the port first.
            let exited = self.child.as_mut().map(|c| c.try_wait());
            if matches!(exited, Some(Ok(Some(_)))) {
                self.child = None;
                return false;
            }
            if answered {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it with SIGKILL and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One inline command's first line of answer; `None` when Redis does not answer.
    pub async fn command(&self, command: &str) -> Option<String> {
        let exchange = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
            stream
                .write_all(format!("{command}\r\n").as_bytes())
                .await
                .ok()?;
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).await.ok()?;
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
                if answer.ends_with(b"\r\n") && (answer[0] != b'$' || answer.starts_with(b"$-1")) {
                    break;
                }
                if answer.ends_with(b"\r\n") {
                    // A bulk answer ($LEN\r\nDATA\r\n) is whole once DATA is in.
                    let text = String::from_utf8_lossy(&answer).into_owned();
                    let whole = match text.split_once("\r\n") {
                        Some((head, rest)) if head.starts_with('$') => head[1..]
                            .parse::<usize>()
                            .is_ok_and(|len| rest.len() >= len + 2),
                        _ => true,
                    };
                    if whole {
                        break;
                    }
                }
            }
            Some(String::from_utf8_lossy(&answer).trim_end().to_string())
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Clients that each hold one connection through ballast and reconnect at once when it
/// is closed (as socket.io clients do after a migration), until stopped (at most 1,000
/// connections each).
pub struct Sticky {
    stop: Arc<AtomicBool>,
    /// Connections opened, over all clients.
    pub connects: Arc<AtomicUsize>,
    /// Connections open now.
    pub live: Arc<AtomicUsize>,
    /// The backend each client is on now (its greeting), `None` between connections.
    pub on: Arc<Mutex<Vec<Option<String>>>>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sticky {
    pub fn start(addr: SocketAddr, clients: usize) -> Sticky {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicUsize::new(0));
        let live = Arc::new(AtomicUsize::new(0));
        let on = Arc::new(Mutex::new(vec![None; clients]));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|i| {
                let (stop, connects, live) = (stop.clone(), connects.clone(), live.clone());
                let (on, failures) = (on.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut opened = 0;
                    while !stop.load(Ordering::Relaxed) && opened < 1000 {
                        let attempt = tokio::time::timeout(DEADLINE, connect_and_greet(addr));
                        let Ok((mut stream, backend)) = attempt.await else {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("client {i}: no greeting"));
                            return;
                        };
                        opened += 1;
                        connects.fetch_add(1, Ordering::SeqCst);
                        live.fetch_add(1, Ordering::SeqCst);
                        on.lock().unwrap()[i] = Some(backend.trim().to_string());
                        let mut buf = [0u8; 64];
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let read = tokio::time::timeout(
                                Duration::from_millis(50),
                                stream.read(&mut buf),
                            );
                            match read.await {
                                Err(_) => continue,
                                Ok(Ok(n)) if n > 0 => continue,
                                Ok(_) => break,
                            }
                        }
                        on.lock().unwrap()[i] = None;
                        live.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Sticky {
            stop,
            connects,
            live,
            on,
            failures,
            tasks,
        }
    }

    /// How many clients are on `backend` now.
    pub fn on(&self, backend: &str) -> usize {
        let on = self.on.lock().unwrap();
        on.iter().filter(|b| b.as_deref() == Some(backend)).count()
    }

    pub fn connects(&self) -> usize {
        self.connects.load(Ordering::SeqCst)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Stops every client (their connections close); what failed.
    pub async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let failures = self.failures.lock().unwrap().clone();
        failures
    }
}
