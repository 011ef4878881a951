//! `ballast demo`: three demo backends and ballast in front of them, on loopback.
//!
//! Each demo backend answers HTTP `GET /` with its own name and echoes WebSocket
//! messages, so a new user sees balancing (repeat `curl`), live counts (hold WebSockets
//! open) and draining (the admin API) without setting anything up.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::websocket::{self, OP_CLOSE, OP_PING, OP_PONG};

/// Largest WebSocket frame a demo backend echoes.
const MAX_FRAME: u64 = 16 * 1024 * 1024;

/// The demo's names: the listener and its three backends.
pub const LISTENER: &str = "demo";
pub const BACKENDS: [&str; 3] = ["demo-1", "demo-2", "demo-3"];

/// Starts the demo backends and ballast (listener on `listen`, admin on `admin`) on the
/// current runtime, prints the guide, and runs until `stop` resolves.
pub async fn run(
    listen: SocketAddr,
    admin: SocketAddr,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), crate::StartError> {
    let mut backends = Vec::new();
    for name in BACKENDS {
        let (addr, listener) = bind_local("demo backend", name).await?;
        backends.push((name, addr));
        tokio::spawn(serve_backend(listener, name));
    }
    let mut agents = Vec::new();
    for (name, _) in &backends {
        let (addr, agent) = bind_local("demo agent", name).await?;
        agents.push(addr);
        tokio::spawn(serve_agent(agent));
    }
    let config = Config::parse(&config_text(listen, admin, &backends, &agents), "demo")
        .map_err(crate::StartError::Config)?;
    let running = crate::start(config, None).await?;
    let listen = running.listener_addr(LISTENER);
    let admin = running.admin_addr().unwrap_or(admin);
    // After the startup lines, not among them.
    crate::logging::flush(crate::logging::FLUSH_WAIT);
    // Not println!: a closed stdout must not end the demo with a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        guide(listen, admin, &own_command())
    );
    stop.await;
    running.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

/// A listening socket on a free loopback port, and its address.
async fn bind_local(
    what: &'static str,
    name: &str,
) -> Result<(SocketAddr, TcpListener), crate::BindError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let bound = async {
        let listener = TcpListener::bind(any).await?;
        Ok((listener.local_addr()?, listener))
    };
    bound.await.map_err(|source| crate::BindError {
        what,
        name: name.to_string(),
        addr: any,
        source,
    })
}

fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    backends: &[(&str, SocketAddr)],
    agents: &[SocketAddr],
) -> String {
    let mut text = format!(
        "[admin]\nbind = \"{admin}\"\n\n[[listeners]]\nname = \"{LISTENER}\"\nbind = \"{listen}\"\nstrategy = \"least_conn\"\n\n  [listeners.health]\n  kind = \"http\"\n  path = \"/\"\n  interval = \"1s\"\n\n  [listeners.agent]\n  interval = \"2s\"\n"
    );
    for ((name, addr), agent) in backends.iter().zip(agents) {
        text.push_str(&format!(
            "\n  [[listeners.backends]]\n  name = \"{name}\"\n  addr = \"{addr}\"\n  agent_addr = \"{agent}\"\n"
        ));
    }
    text
}

/// A demo backend's agent (HAProxy's agent-check): reports the backend up and ready,
/// leaving its weight alone (so the weight API's holds). An app's own agent would report
/// its real load (`50%`, `maxconn:30`, `drain`).
async fn serve_agent(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                tokio::spawn(async move {
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"up ready\n").await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How a user runs this very binary from a shell: `ballast` when that name on `PATH` is
/// this file (an installed package), else its full path (`target/release/ballast` is on
/// nobody's `PATH`), else the cargo command that builds and runs it.
pub fn own_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "cargo run --release --".to_string();
    };
    let on_path = std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("ballast"))
                .find(|candidate| candidate.is_file())
        })
        .and_then(|found| found.canonicalize().ok());
    if on_path.is_some_and(|found| exe.canonicalize().is_ok_and(|exe| exe == found)) {
        return "ballast".to_string();
    }
    shell_word(&exe.to_string_lossy())
}

/// `word` quoted for a POSIX shell when it holds anything but plain path characters.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A WebSocket handshake and one message through ballast with nothing but python3: prints
/// the `101 Switching Protocols` line, then the echoed `hello`, and exits 0.
fn websocket_command(listen: SocketAddr) -> String {
    let (ip, port) = (listen.ip(), listen.port());
    format!(
        r#"python3 -c 'import socket; s = socket.create_connection(("{ip}", {port}), timeout=5); f = s.makefile("rb"); s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"); head = list(iter(lambda: f.readline().strip() or None, None)); print(head[0].decode()); s.sendall(b"\x81\x85\0\0\0\0hello"); print(f.read(7)[2:].decode())'"#
    )
}

/// What to try, with the real addresses. Every line that starts with two spaces and then
/// a non-space is a command a user can paste as it is (a test runs each one); `ballast`
/// is the command that runs this binary ([`own_command`]).
pub fn guide(listen: SocketAddr, admin: SocketAddr, ballast: &str) -> String {
    format!(
        "ballast demo: listener \"{LISTENER}\" on {listen} (least_conn over {b}), admin on {admin}

Try these in another terminal:

  curl http://{listen}/
      a demo backend answers with its name; repeat it to see the connections spread

  {websocket}
      a WebSocket handshake and a message through ballast: prints the 101 Switching
      Protocols line, then the echoed hello; any WebSocket client pointed at
      ws://{listen}/ gets its messages echoed

  {ballast} status --admin {admin}
      listeners and backends with their live connection counts

  curl -X POST -H 'Content-Type: application/json' http://{admin}/api/v1/listeners/{LISTENER}/backends/demo-1/drain
      drain demo-1: it gets no new connections (undrain puts it back)

  curl http://{admin}/api/v1/listeners/{LISTENER}/pick
      where the next connection would go

  curl http://{admin}/metrics
      Prometheus metrics

Ctrl-C stops the demo.",
        b = BACKENDS.join(", "),
        websocket = websocket_command(listen),
    )
}

/// Serves one demo backend on `listener` (also used by tests as a WebSocket peer).
pub async fn serve_backend(listener: TcpListener, name: &'static str) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = answer(stream, name).await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One demo connection, served by hyper: a plain answer naming the backend, or a
/// WebSocket echo after an upgrade.
async fn answer(stream: TcpStream, name: &'static str) -> Result<(), hyper::Error> {
    let service =
        service_fn(move |request| async move { Ok::<_, Infallible>(respond(request, name)) });
    http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
}

fn respond(mut request: hyper::Request<Incoming>, name: &str) -> hyper::Response<Full<Bytes>> {
    let headers = request.headers();
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|u| u.to_str().ok())
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let accept = headers
        .get("sec-websocket-key")
        .and_then(|k| k.to_str().ok())
        .map(websocket::accept_key)
        .and_then(|accept| HeaderValue::try_from(accept).ok());
    match (upgrade, accept) {
        (true, Some(accept)) => {
            let upgraded = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgraded.await {
                    let _ = echo_frames(TokioIo::new(upgraded)).await;
                }
            });
            let mut answer = hyper::Response::new(Full::default());
            *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = answer.headers_mut();
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert("sec-websocket-accept", accept);
            answer
        }
        _ => {
            let mut answer = hyper::Response::new(Full::new(Bytes::from(format!("{name}\n"))));
            answer
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            answer
        }
    }
}

/// Echoes data frames, answers pings, and returns a close frame then closes.
async fn echo_frames(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some(h) = websocket::parse_header(&buf) {
            if h.payload_len > MAX_FRAME {
                let close = websocket::encode_frame(OP_CLOSE, &1009u16.to_be_bytes());
                stream.write_all(&close).await?;
                return stream.shutdown().await;
            }
            let end = h.header_len + h.payload_len as usize;
            if buf.len() < end {
                break;
            }
            let mut payload = buf[h.header_len..end].to_vec();
            buf.drain(..end);
            if let Some(mask) = h.mask {
                websocket::apply_mask(&mut payload, mask);
            }
            match h.opcode {
                OP_CLOSE => {
                    stream
                        .write_all(&websocket::encode_frame(OP_CLOSE, &payload))
                        .await?;
                    return stream.shutdown().await;
                }
                OP_PING => {
                    stream
                        .write_all(&websocket::encode_frame(OP_PONG, &payload))
                        .await?
                }
                OP_PONG => {}
                opcode => {
                    let mut frame = websocket::encode_frame(opcode, &payload);
                    frame[0] = (u8::from(h.fin) << 7) | opcode;
                    stream.write_all(&frame).await?;
                }
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
