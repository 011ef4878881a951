//! Active health checks with rise/fall thresholds.
//!
//! One loop serves every listener that has a `[listeners.health]` table. It reads the
//! current routing snapshot on every round, so backends and check settings that a reload
//! brings in are checked from the next round on, and the health state itself lives in
//! each backend's runtime state (it survives reloads). A backend goes down after `fall`
//! consecutive failed checks and comes back after `rise` consecutive good ones.
//!
//! - `tcp`: the backend accepts a TCP connection within `timeout`.
//! - `http`: the backend answers `GET path` with a 2xx or 3xx status within `timeout`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{HealthConfig, HealthKind, SendProxy};
use crate::control::periodic::{self, Probe};
use crate::routing::{BackendRoute, ListenerRoute};
use crate::state::BackendState;
use crate::Ballast;

/// Runs health checks until `stopped` turns true.
pub async fn run(ballast: Ballast, stopped: watch::Receiver<bool>) {
    let interval =
        |l: &ListenerRoute, _: &BackendRoute| l.config.health.as_ref().map(|h| h.interval);
    let probe = |l: &ListenerRoute, b: &BackendRoute| -> Option<Probe> {
        let health = l.config.health.clone()?;
        let send_proxy = b.config.send_proxy.or(l.config.send_proxy);
        Some(Box::pin(check_and_record(
            b.config.addr,
            health,
            send_proxy,
            Arc::clone(&b.state),
        )))
    };
    periodic::run(ballast, stopped, interval, probe).await;
}

async fn check_and_record(
    addr: SocketAddr,
    health: HealthConfig,
    send_proxy: Option<SendProxy>,
    state: Arc<BackendState>,
) {
    let result = tokio::time::timeout(health.timeout, probe(addr, &health, send_proxy)).await;
    let outcome = match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Failed::Backend(why))) => Err(why),
        Ok(Err(Failed::Local(e))) => {
            // Out of file descriptors or memory here says nothing of the backend.
            return warn!(
                listener = %state.listener, backend = %state.name, %addr, error = %e,
                "health check not run: no local resources; the backend keeps its state"
            );
        }
        Err(_) => Err(format!("no answer within {:?}", health.timeout)),
    };
    let reason = outcome.as_ref().err().cloned().unwrap_or_default();
    match state.record_health(outcome, health.rise, health.fall) {
        Some(true) => {
            info!(listener = %state.listener, backend = %state.name, %addr, "backend is up")
        }
        Some(false) => warn!(
            listener = %state.listener, backend = %state.name, %addr,
            %reason, "backend is down"
        ),
        None => {}
    }
}

/// Why a probe failed: the backend's fault, or a lack of local resources.
#[derive(Debug)]
enum Failed {
    Backend(String),
    Local(std::io::Error),
}

impl From<String> for Failed {
    fn from(why: String) -> Failed {
        Failed::Backend(why)
    }
}

async fn probe(
    addr: SocketAddr,
    health: &HealthConfig,
    send_proxy: Option<SendProxy>,
) -> Result<(), Failed> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| {
        if crate::proxy::is_local_exhaustion(&e) {
            Failed::Local(e)
        } else {
            Failed::Backend(format!("connect: {e}"))
        }
    })?;
    if let Some(version) = send_proxy {
        // A backend that expects a header gets one that names nobody (v2 LOCAL).
        let header = crate::proxy_protocol::header(version, None);
        stream
            .write_all(&header)
            .await
            .map_err(|e| format!("PROXY header: {e}"))?;
    }
    if health.kind == HealthKind::Tcp {
        return Ok(());
    }
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let mut request = hyper::Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = health
        .path
        .parse()
        .map_err(|e| format!("path {:?}: {e}", health.path))?;
    let headers = request.headers_mut();
    headers.insert(
        HOST,
        HeaderValue::try_from(addr.to_string()).map_err(|e| e.to_string())?,
    );
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    // The connection is driven here, not on a task of its own: it ends with the probe.
    tokio::pin!(connection);
    let send = sender.send_request(request);
    tokio::pin!(send);
    let answer = tokio::select! {
        biased;
        answer = &mut send => answer,
        ended = connection.as_mut() => match ended {
            // An answer read just before the close is waiting in `send`.
            Ok(()) => send.await,
            Err(e) => return Err(format!("HTTP: {e}").into()),
        },
    }
    .map_err(|e| format!("HTTP: {e}"))?;
    let status = answer.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("HTTP status {}", status.as_u16()).into())
    }
}

/// The `User-Agent` of an HTTP health check.
const USER_AGENT_VALUE: &str = concat!("ballast-health/", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that answers every connection with `answer` once it has read a request
    /// head, and the request it read.
    async fn server(answer: &'static [u8]) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned()).await;
                let _ = stream.write_all(answer).await;
            }
        });
        (addr, rx)
    }

    fn http_check(path: &str) -> HealthConfig {
        let toml = format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [listeners.health]\n  kind = \"http\"\n  path = \"{path}\"\n\n  [[listeners.backends]]\n  name = \"a\"\n  addr = \"127.0.0.1:1\"\n"
        );
        let config = crate::config::Config::parse(&toml, "test.toml").unwrap();
        config.listeners[0].health.clone().unwrap()
    }

    #[tokio::test]
    async fn an_http_check_is_up_on_2xx_and_3xx_and_down_otherwise() {
        let health = http_check("/ready?deep=1");
        for (answer, up) in [
            (&b"HTTP/1.1 204 No Content\r\n\r\n"[..], true),
            (
                b"HTTP/1.0 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            (b"SSH-2.0-OpenSSH_9.2\r\n", false),
            (b"", false),
        ] {
            let (addr, mut requests) = server(answer).await;
            let result = probe(addr, &health, None).await;
            assert_eq!(result.is_ok(), up, "{answer:?}: {result:?}");
            let request = requests.recv().await.unwrap();
            assert!(
                request.starts_with("GET /ready?deep=1 HTTP/1.1\r\n"),
                "{request}"
            );
            assert!(request.contains(&format!("host: {addr}\r\n")), "{request}");
        }
    }

    #[tokio::test]
    async fn a_check_of_a_backend_that_expects_a_proxy_header_sends_one_naming_nobody() {
        let health = http_check("/");
        for (version, header) in [
            (SendProxy::V1, &b"PROXY UNKNOWN\r\n"[..]),
            (SendProxy::V2, b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
        ] {
            let (addr, mut requests) =
                server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
            let result = probe(addr, &health, Some(version)).await;
            assert!(result.is_ok(), "{version:?}: {result:?}");
            let request = requests.recv().await.unwrap();
            let expected = format!("{}GET / HTTP/1.1\r\n", String::from_utf8_lossy(header));
            assert!(request.starts_with(&expected), "{version:?}: {request:?}");
        }
    }
}
