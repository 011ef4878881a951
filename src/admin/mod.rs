//! The admin HTTP endpoint: health of the process, readiness, metrics, status and the
//! operator's actions (reload, drain, pick).
//!
//! HTTP/1.1 is hyper's: keep-alive, a limit on the size of a request head and on the
//! time to send it (a silent or slow client is closed), strict parsing (two different
//! `Content-Length`s are a 400). [`routes`] holds the cross-site checks and the routes,
//! one flat match on method and path.
//!
//! Connections are capped ([`Limits::max_conns`]): a new one over the cap closes the
//! oldest idle one; when every one is busy a few more are let in as a reserve that
//! answers only `/healthz`, `/readyz` and `/metrics`. Only the endpoint's own work makes
//! a connection busy: one waiting on its client (for a request head, for a request
//! body, to take its answer) is idle, so slow or stalled clients cannot use up the cap
//! and the reserve. Whether a request may go (the reserve, the health and metrics
//! routes) is decided from its head alone; a `GET` or `HEAD` body is never read. A
//! spare file descriptor is held so that a process out of them (through admin
//! connections or proxied ones) still lets one admin connection in, and closes the
//! oldest idle one to get the spare back.

mod conns;
pub mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::Ballast;
use conns::{Admission, Conn, InRequest, Table};
pub use routes::{route, Request, Response};

/// Largest request head accepted (a larger one is answered 431).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body read; no route takes more than a small JSON object.
const MAX_BODY: usize = 64 * 1024;
/// How long the accept loop pauses when it is out of file descriptors and has no spare.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a log line about refused connections or failed accepts may repeat.
const LOG_EVERY: Duration = Duration::from_secs(1);
/// How often connections stuck in one request are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long a connection asked to close may take to finish the answer it is writing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a connection asked to close with no request in progress may take: the tail
/// of an answer already handed to hyper, or nothing (a client that never finishes its
/// request head), so that closed connections give their descriptors back quickly.
const IDLE_CLOSE_GRACE: Duration = Duration::from_millis(100);
/// How long the accept loop waits for an evicted connection to give its descriptor
/// back before it takes a new spare.
const EVICT_WAIT: Duration = Duration::from_millis(100);

/// The endpoint's limits; [`Limits::default`] is what `ballast run` uses.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; a new one over this closes the oldest idle one.
    pub max_conns: usize,
    /// Connections let in beyond `max_conns` while every one is busy. They answer only
    /// the health and metrics routes, so a probe or a scrape still gets through.
    pub reserve: usize,
    /// How long a client may take to send a request head; also how long a keep-alive
    /// connection may wait for its next request.
    pub header_timeout: Duration,
    /// How long one request may take, from its head to the end of its answer, before
    /// its connection is closed (a client that never reads its answer).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_conns: 64,
            reserve: 8,
            header_timeout: Duration::from_secs(10),
            // A reload may resolve host names, which can be slow.
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves the admin endpoint on `listener` until `stopped` turns true.
pub async fn serve(listener: TcpListener, ballast: Ballast, stopped: watch::Receiver<bool>) {
    serve_with(listener, ballast, stopped, Limits::default()).await
}

/// [`serve`] with other limits.
pub async fn serve_with(
    listener: TcpListener,
    ballast: Ballast,
    mut stopped: watch::Receiver<bool>,
    limits: Limits,
) {
    match listener.local_addr() {
        Ok(addr) => info!(%addr, "admin bound"),
        Err(_) => info!("admin bound"),
    }
    let endpoint = Arc::new(Endpoint {
        ballast,
        table: Arc::new(Table::default()),
        limits,
    });
    let mut spare = open_spare();
    let mut accept_errors = LogLimiter::new(LOG_EVERY);
    let mut refusals = LogLimiter::new(LOG_EVERY);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if spare.is_none() {
            spare = open_spare();
        }
        // All three branches are cancel-safe: a lost accept leaves the connection in
        // the backlog for the next turn.
        let accepted = tokio::select! {
            biased;
            _ = stopped.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
            _ = sweep.tick() => {
                let closed = endpoint
                    .table
                    .sweep(Instant::now(), endpoint.limits.request_timeout);
                if closed > 0 {
                    debug!(closed, "closed admin connections stuck in one request");
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                endpoint.open(stream, peer, &mut refusals);
                // Let the new connection's task read its request head before the next
                // accept: at the cap every accept closes the oldest idle connection,
                // and a flood of them must not close a new one before it had a chance
                // to send a request.
                tokio::task::yield_now().await;
            }
            Err(e) if is_out_of_fds(&e) && spare.is_some() => {
                // The spare's descriptor lets the waiting connection in; the oldest idle
                // admin connection gives its own back for the next spare.
                drop(spare.take());
                let evicted = endpoint.table.evict_oldest_idle();
                if let Ok(Ok((stream, peer))) =
                    tokio::time::timeout(EVICT_WAIT, listener.accept()).await
                {
                    endpoint.open(stream, peer, &mut refusals);
                }
                if let Some(evicted) = evicted {
                    let _ = tokio::time::timeout(EVICT_WAIT, evicted.gone()).await;
                }
            }
            Err(e) if is_out_of_fds(&e) => {
                if let Some(suppressed) = accept_errors.allow(Instant::now()) {
                    warn!(error = %e, suppressed, "admin accept failed; pausing");
                }
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
            // The client went away before it was accepted, or the like.
            Err(e) => debug!(error = %e, "admin accept failed"),
        }
    }
    endpoint.table.close_all();
}

/// What every admin connection shares.
struct Endpoint {
    ballast: Ballast,
    table: Arc<Table>,
    limits: Limits,
}

impl Endpoint {
    /// Admits a new connection (or refuses it when over the cap and the reserve with
    /// every connection busy) and serves it on its own task.
    fn open(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, refusals: &mut LogLimiter) {
        let (conn, registration, evicted) =
            match self.table.admit(self.limits.max_conns, self.limits.reserve) {
                Admission::Open {
                    conn,
                    registration,
                    evicted,
                } => (conn, registration, evicted),
                Admission::Refused => {
                    if let Some(suppressed) = refusals.allow(Instant::now()) {
                        warn!(
                            client = %peer,
                            busy = self.table.open(),
                            suppressed,
                            "admin connection refused: every admin connection is busy"
                        );
                    }
                    return;
                }
            };
        if evicted.is_some() {
            debug!(client = %peer, "admin connection cap reached; closing the oldest idle one");
        }
        let endpoint = Arc::clone(self);
        tokio::spawn(async move {
            endpoint.serve_connection(stream, peer, &conn).await;
            // The socket is closed by now; the registration goes last.
            drop(registration);
        });
    }

    async fn serve_connection(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        conn: &Arc<Conn>,
    ) {
        let admin_addr = match stream.local_addr() {
            Ok(addr) => addr,
            Err(_) => return,
        };
        let service = {
            let endpoint = Arc::clone(self);
            let conn = Arc::clone(conn);
            service_fn(move |request| {
                let endpoint = Arc::clone(&endpoint);
                let conn = Arc::clone(&conn);
                let in_request = conn.start_request();
                async move {
                    let answer = endpoint.answer(request, admin_addr, &conn).await;
                    Ok::<_, Infallible>(into_hyper(answer, in_request))
                }
            })
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .max_buf_size(MAX_HEAD);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(client = %peer, error = %e, "admin connection ended with an error");
                }
            }
            _ = conn.close_requested() => {
                // hyper closes at once between requests; one in a request may finish
                // its answer (a body still awaited is answered 503 at once).
                let grace = if conn.in_request() {
                    CLOSE_GRACE
                } else {
                    IDLE_CLOSE_GRACE
                };
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(grace, connection).await;
            }
        }
    }

    /// Decides from the request head whether the request may go, reads its body
    /// where a route may take one, and routes it. The connection is busy only once the
    /// request has been read.
    async fn answer(
        &self,
        request: hyper::Request<Incoming>,
        admin_addr: SocketAddr,
        conn: &Arc<Conn>,
    ) -> Response {
        let (parts, body) = request.into_parts();
        let mut request = head(&parts, admin_addr);
        if conn.reserve && !routes::is_health_or_metrics(&request) {
            return Response::error(
                503,
                "every admin connection is busy; only /healthz, /readyz and /metrics answer now",
            );
        }
        // No route reads the body of a GET or HEAD, so the health and metrics routes
        // never wait on one.
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            request.body = match self.read_body(&parts, body, conn).await {
                Ok(body) => body,
                Err(refused) => return refused,
            };
        }
        let _busy = conn.start_work();
        route(&self.ballast, &request).await
    }

    /// The request body, limited in size and time; the connection stays idle while it
    /// comes, and one asked to close (to make room) is answered 503 at once.
    async fn read_body(
        &self,
        parts: &hyper::http::request::Parts,
        body: Incoming,
        conn: &Conn,
    ) -> Result<Bytes, Response> {
        let too_large = || Response::error(413, "request body too large");
        let announced = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|length| length > MAX_BODY as u64) {
            return Err(too_large());
        }
        let collect = tokio::time::timeout(
            self.limits.header_timeout,
            Limited::new(body, MAX_BODY).collect(),
        );
        tokio::select! {
            collected = collect => match collected {
                Ok(Ok(collected)) => Ok(collected.to_bytes()),
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
                Ok(Err(_)) | Err(_) => Err(Response::error(400, "incomplete request body")),
            },
            _ = conn.close_requested() => Err(Response::error(
                503,
                "the admin connection cap was reached while this request body was awaited",
            )),
        }
    }
}

/// The request as the routes see it, from its head; the body is filled in once read.
fn head(parts: &hyper::http::request::Parts, admin_addr: SocketAddr) -> Request {
    Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: Bytes::new(),
        admin_addr,
    }
}

/// The hyper answer for `response`; the request stays in progress until hyper has
/// taken its body.
fn into_hyper(response: Response, in_request: InRequest) -> hyper::Response<AnswerBody> {
    let mut answer = hyper::Response::new(AnswerBody {
        body: Full::new(Bytes::from(response.body)),
        _in_request: in_request,
    });
    *answer.status_mut() =
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = answer.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(response.content_type),
    );
    if let Some(allow) = response.allow {
        headers.insert(ALLOW, HeaderValue::from_static(allow));
    }
    answer
}

/// An answer's body, holding its request in progress until hyper has taken it all.
struct AnswerBody {
    body: Full<Bytes>,
    _in_request: InRequest,
}

impl Body for AnswerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A descriptor held in reserve, given up to accept one connection when the process has
/// none left.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn is_out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Lets a repeated log line through at most once per period and counts the ones held
/// back, so a client hammering a full endpoint cannot flood the log.
#[derive(Debug)]
struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged at `now`.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_repeated_log_line_passes_once_a_second_with_a_count_of_the_others() {
        let mut limiter = LogLimiter::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(limiter.allow(start), Some(0));
        // 20 failures a second, as an accept loop out of descriptors produced.
        let mut passed = Vec::new();
        for i in 1..=40u64 {
            if let Some(n) = limiter.allow(start + Duration::from_millis(50 * i)) {
                passed.push(n);
            }
        }
        assert_eq!(passed, [19, 19]);
    }

    async fn endpoint(limits: Limits) -> (SocketAddr, watch::Sender<bool>) {
        let config = crate::config::Config::parse(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  name = \"a\"\n  addr = \"127.0.0.1:1\"\n",
            "test.toml",
        )
        .unwrap();
        let ballast = Ballast::new(config, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve_with(listener, ballast, stopped, limits));
        (addr, stop)
    }

    /// Reads until the server closes; the time it took.
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .ok();
        started.elapsed()
    }

    #[tokio::test]
    async fn a_silent_or_slow_client_is_closed_after_the_header_timeout() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop) = endpoint(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        assert!(closed_after(&mut silent).await < Duration::from_secs(3));
        assert!(closed_after(&mut slow).await < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_keep_alive_connection_answers_again_and_closes_when_idle() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop) = endpoint(limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .await
                .unwrap();
            let mut answer = [0u8; 256];
            let n = stream.read(&mut answer).await.unwrap();
            let answer = String::from_utf8_lossy(&answer[..n]);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        }
        assert!(closed_after(&mut stream).await < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn every_connection_closes_when_the_endpoint_stops() {
        let (addr, stop) = endpoint(Limits::default()).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        // Wait until it is being served, so that it is in the table.
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 256];
        assert!(idle.read(&mut answer).await.unwrap() > 0);
        stop.send_replace(true);
        assert!(closed_after(&mut idle).await < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn over_the_cap_the_oldest_idle_connection_makes_room() {
        let limits = Limits {
            max_conns: 4,
            reserve: 1,
            ..Limits::default()
        };
        let (addr, _stop) = endpoint(limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // A request on the last one: all four are in the table once it answers.
        let last = idle.last_mut().unwrap();
        last.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 256];
        assert!(last.read(&mut answer).await.unwrap() > 0);

        let mut fifth = TcpStream::connect(addr).await.unwrap();
        assert!(closed_after(&mut idle[0]).await < Duration::from_secs(3));
        fifth
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        fifth.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn connections_arriving_together_do_not_close_one_before_its_request_is_read() {
        let limits = Limits {
            max_conns: 2,
            reserve: 1,
            ..Limits::default()
        };
        let (addr, _stop) = endpoint(limits).await;
        // Blocking connects: all of them wait in the backlog before the endpoint runs,
        // the probe's request with them, and each accept over the cap closes the
        // oldest idle connection.
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(
            &mut probe,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let flood: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        probe.set_nonblocking(true).unwrap();
        let mut probe = TcpStream::from_std(probe).unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), probe.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .ok();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        drop(flood);
    }
}
