//! The admin HTTP endpoint: health of the process, readiness and status.
//!
//! A deliberately small HTTP/1.1 server: one request per connection, answered with
//! `Connection: close`. The request head is limited in size and time, so garbage or a
//! slow client on the admin port costs one task and an error answer, never the server.
//! Routing is one flat `match` on method and path.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::Ballast;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read its answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the admin endpoint on `listener` until `stopped` turns true.
pub async fn serve(listener: TcpListener, ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    info!(bind = ?listener.local_addr().ok(), "admin endpoint listening");
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ballast = ballast.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &ballast).await {
                        debug!(client = %peer, error = %e, "admin request failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: format!("{value}\n"),
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }
}

async fn handle(mut stream: TcpStream, ballast: &Ballast) -> std::io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::error(408, "request not received in time"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(head)) => match parse_request(&head) {
            Ok(request) => match discard_body(&mut stream, &request, &head).await {
                Ok(()) => route(ballast, &request).await,
                Err(response) => response,
            },
            Err(why) => Response::error(why.status(), why.message()),
        },
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    // A client that never reads its answer costs one task for WRITE_TIMEOUT, not forever.
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(response.body.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The admin API: one flat match on method and path segments.
pub async fn route(ballast: &Ballast, request: &Request) -> Response {
    let segments: Vec<&str> = request.path.split('/').filter(|s| !s.is_empty()).collect();
    let method = request.method.as_str();
    if method == "POST" && !authorized(ballast, request) {
        return Response::error(401, "missing or wrong bearer token");
    }
    match (method, segments.as_slice()) {
        ("GET", ["healthz"]) => Response::text(200, "ok\n"),
        ("GET", ["readyz"]) => {
            if ballast.is_shutting_down() {
                Response::text(503, "shutting down\n")
            } else if ballast.is_ready() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready\n")
            }
        }
        ("GET", ["metrics"]) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: ballast.render_metrics(),
        },
        ("GET", ["api", "v1", "status"]) => Response::json(200, &ballast.status()),
        ("POST", ["api", "v1", "reload"]) => reload(ballast).await,
        ("POST", ["api", "v1", "listeners", listener, "backends", backend, action])
            if *action == "drain" || *action == "undrain" =>
        {
            drain(ballast, listener, backend, *action == "drain")
        }
        ("GET", ["api", "v1", "listeners", listener, "pick"]) => {
            pick(ballast, listener, &request.query)
        }
        (_, ["healthz" | "readyz" | "metrics"] | ["api", "v1", "status"])
        | (_, ["api", "v1", "listeners", _, "pick"]) => {
            Response::error(405, &format!("{method} is not allowed here; use GET"))
        }
        (_, ["api", "v1", "reload"])
        | (_, ["api", "v1", "listeners", _, "backends", _, "drain" | "undrain"]) => {
            Response::error(405, &format!("{method} is not allowed here; use POST"))
        }
        _ => Response::error(404, &format!("no such route: {method} {}", request.path)),
    }
}

/// POSTs need `Authorization: Bearer <token>` when `admin.token_file` is set.
fn authorized(ballast: &Ballast, request: &Request) -> bool {
    let Some(expected) = ballast.admin_token() else {
        return true;
    };
    let given = request
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compare every byte, so the time taken does not tell how much of a guess was right.
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn drain(ballast: &Ballast, listener: &str, backend: &str, drained: bool) -> Response {
    let routing = ballast.routing();
    let Some(l) = routing.listener(listener) else {
        return Response::error(404, &format!("no listener named {listener:?}"));
    };
    let Some(b) = l.backend(backend) else {
        return Response::error(
            404,
            &format!("listener {listener:?} has no backend named {backend:?}"),
        );
    };
    b.state.set_drained(drained);
    tracing::info!(
        listener,
        backend,
        drained,
        "backend drain state changed by the admin API"
    );
    Response::json(
        200,
        &serde_json::json!({ "listener": listener, "backend": backend, "state": b.status().as_str() }),
    )
}

async fn reload(ballast: &Ballast) -> Response {
    let ballast = ballast.clone();
    // A reload reads a file and may resolve host names: off the async threads.
    match tokio::task::spawn_blocking(move || ballast.reload()).await {
        Ok(Ok(generation)) => Response::json(200, &serde_json::json!({ "generation": generation })),
        Ok(Err(e)) => Response::error(422, &e.to_string()),
        Err(e) => Response::error(500, &format!("reload failed: {e}")),
    }
}

fn pick(ballast: &Ballast, listener: &str, query: &str) -> Response {
    let mut client = std::net::IpAddr::from([0, 0, 0, 0]);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("client", value)) => match value.parse() {
                Ok(ip) => client = ip,
                Err(_) => {
                    return Response::error(400, &format!("client {value:?} is not an IP address"))
                }
            },
            _ => {
                return Response::error(
                    400,
                    &format!("unknown query parameter {pair:?}; expected client=IP"),
                )
            }
        }
    }
    let routing = ballast.routing();
    let Some(l) = routing.listener(listener) else {
        return Response::error(404, &format!("no listener named {listener:?}"));
    };
    match l.peek(client) {
        Some(i) => {
            let b = &l.backends[i];
            Response::json(
                200,
                &serde_json::json!({ "backend": b.config.name, "addr": b.config.addr_text }),
            )
        }
        None => Response::error(503, "no backend is available"),
    }
}

/// Largest request body read (and ignored): no admin route takes a body.
const MAX_BODY: usize = 64 * 1024;

/// Reads and drops a request body announced by `Content-Length`, so that closing the
/// connection after the answer does not reset it before the client has read it.
async fn discard_body(
    stream: &mut TcpStream,
    request: &Request,
    head: &[u8],
) -> Result<(), Response> {
    let Some(length) = request.header("content-length") else {
        return Ok(());
    };
    let length: usize = length
        .parse()
        .map_err(|_| Response::error(400, "malformed Content-Length"))?;
    if length > MAX_BODY {
        return Err(Response::error(413, "request body too large"));
    }
    let head_end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(head.len(), |i| i + 4);
    let mut remaining = length.saturating_sub(head.len() - head_end);
    let mut buf = [0u8; 4096];
    while remaining > 0 {
        let want = remaining.min(buf.len());
        match tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                return Err(Response::error(400, "incomplete request body"))
            }
            Ok(Ok(n)) => remaining -= n,
        }
    }
    Ok(())
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most [`MAX_HEAD`] bytes.
pub async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() > MAX_HEAD {
            return Ok(head);
        }
    }
}

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    TooLarge,
    Malformed(&'static str),
}

impl BadRequest {
    fn status(&self) -> u16 {
        match self {
            BadRequest::TooLarge => 431,
            BadRequest::Malformed(_) => 400,
        }
    }
    fn message(&self) -> &'static str {
        match self {
            BadRequest::TooLarge => "request head too large",
            BadRequest::Malformed(why) => why,
        }
    }
}

/// Parses an HTTP/1.x request head.
pub fn parse_request(head: &[u8]) -> Result<Request, BadRequest> {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if head.len() > MAX_HEAD {
            BadRequest::TooLarge
        } else {
            BadRequest::Malformed("incomplete request head")
        });
    };
    let text = std::str::from_utf8(&head[..end])
        .map_err(|_| BadRequest::Malformed("request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::Malformed("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(BadRequest::Malformed("malformed method"));
    }
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(BadRequest::Malformed("malformed request line"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(BadRequest::Malformed("malformed header line"));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_parses() {
        let r = parse_request(b"GET /api/v1/status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/v1/status");
        assert_eq!(r.query, "x=1");
        assert_eq!(r.headers, vec![("host".to_string(), "a".to_string())]);
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for garbage in [
            &b"\x00\x01\x02\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET / HTTP/1.1",
            b"get / HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse_request(garbage).is_err(), "{garbage:?}");
        }
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(parse_request(&huge), Err(BadRequest::TooLarge));
    }
}
