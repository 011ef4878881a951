//! The admin API: the checks every request passes, then one flat match on method and
//! path segments.
//!
//! The checks come first because the admin API changes what the load balancer does and
//! an operator's browser can reach it: a page on another site may send it requests
//! (a cross-site POST), or point its own name at the admin address (DNS rebinding).
//! So a request is refused when its `Origin` is not the admin endpoint's own address,
//! when its `Host` is not an IP address, `localhost` or a name in `admin.allowed_hosts`,
//! and a POST needs `Content-Type: application/json` (which a page can only send to
//! another site with the site's consent) or the bearer token.
//!
//! Path segments and query values are percent-decoded (RFC 3986) after splitting, so an
//! encoded `/` stays inside its segment and `[::1]:3000` can be named as
//! `%5B%3A%3A1%5D%3A3000`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use percent_encoding::percent_decode_str;

use crate::routing::{BackendRoute, Routing};
use crate::Ballast;

/// A request as the routes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path as sent (still percent-encoded).
    pub path: String,
    /// The query as sent (still percent-encoded), without the `?`.
    pub query: String,
    /// Header names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
    /// The admin endpoint's address as this client reached it: what a same-origin
    /// request's `Origin` names.
    pub admin_addr: SocketAddr,
}

impl Request {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower case).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer: status, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// The `Allow` header of a 405 answer.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: None,
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: format!("{value}\n"),
            allow: None,
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    fn not_allowed(method: &str, allow: &'static str) -> Response {
        Response {
            allow: Some(allow),
            ..Response::error(
                405,
                &format!(
                    "{method} is not allowed here; use {}",
                    allow.replace(", ", " or ")
                ),
            )
        }
    }
}

/// Whether a request only reads the process's health or metrics: what the connections
/// let in over the cap may still ask.
pub fn is_health_or_metrics(request: &Request) -> bool {
    matches!(request.method.as_str(), "GET" | "HEAD")
        && matches!(request.path.as_str(), "/healthz" | "/readyz" | "/metrics")
}

/// The admin API: the cross-site checks, then one flat match on method and path
/// segments. `HEAD` is answered as `GET` (hyper leaves the body out).
pub async fn route(ballast: &Ballast, request: &Request) -> Response {
    if let Err(refused) = check_origin(ballast, request) {
        return refused;
    }
    let segments = match decode_segments(&request.path) {
        Ok(segments) => segments,
        Err(refused) => return refused,
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = request.method.as_str();
    if method == "POST" {
        if let Err(refused) = check_mutation(ballast, request) {
            return refused;
        }
    }
    let read = matches!(method, "GET" | "HEAD");
    match (method, segments.as_slice()) {
        (_, ["healthz"]) if read => Response::text(200, "ok\n"),
        (_, ["readyz"]) if read => {
            if ballast.is_shutting_down() {
                Response::text(503, "shutting down\n")
            } else if ballast.is_ready() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready\n")
            }
        }
        (_, ["metrics"]) if read => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Response::text(200, ballast.render_metrics())
        },
        (_, ["api", "v1", "status"]) if read => Response::json(200, &ballast.status()),
        ("POST", ["api", "v1", "reload"]) => reload(ballast).await,
        ("POST", ["api", "v1", "listeners", listener, "backends", backend, action])
            if *action == "drain" || *action == "undrain" =>
        {
            drain(ballast, listener, backend, *action == "drain")
        }
        ("POST", ["api", "v1", "listeners", listener, "backends", backend, "weight"]) => {
            set_weight(ballast, listener, backend, &request.body)
        }
        (_, ["api", "v1", "listeners", listener, "pick"]) if read => {
            pick(ballast, listener, &request.query)
        }
        (_, ["healthz" | "readyz" | "metrics"] | ["api", "v1", "status"])
        | (_, ["api", "v1", "listeners", _, "pick"]) => Response::not_allowed(method, "GET, HEAD"),
        (_, ["api", "v1", "reload"])
        | (_, ["api", "v1", "listeners", _, "backends", _, "drain" | "undrain" | "weight"]) => {
            Response::not_allowed(method, "POST")
        }
        _ => Response::error(404, &format!("no such route: {method} {}", request.path)),
    }
}

/// The path's segments, each percent-decoded after splitting on `/`.
fn decode_segments(path: &str) -> Result<Vec<String>, Response> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|segment| {
            decode(segment).ok_or_else(|| {
                Response::error(
                    400,
                    &format!("path segment {segment:?} is not UTF-8 once percent-decoded"),
                )
            })
        })
        .collect()
}

/// The query's `name=value` pairs, each side percent-decoded (`+` stays a `+`, as RFC
/// 3986 has it).
fn decode_query(query: &str) -> Result<Vec<(String, String)>, Response> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (decode(name), decode(value)) {
                (Some(name), Some(value)) => Ok((name, value)),
                _ => Err(Response::error(
                    400,
                    &format!("query parameter {pair:?} is not UTF-8 once percent-decoded"),
                )),
            }
        })
        .collect()
}

fn decode(text: &str) -> Option<String> {
    percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Refuses a request sent by a web page of another site: an `Origin` that is not the
/// admin endpoint's own address, or a `Host` that is neither an IP address, nor
/// `localhost`, nor a name in `admin.allowed_hosts` (DNS rebinding).
fn check_origin(ballast: &Ballast, request: &Request) -> Result<(), Response> {
    let routing = ballast.routing();
    let allowed: &[String] = routing
        .config
        .admin
        .as_ref()
        .map_or(&[], |a| &a.allowed_hosts);
    for host in request.headers_named("host") {
        if !host_allowed(host, allowed) {
            return Err(Response::error(
                403,
                &format!(
                    "Host {host:?} is not an address of this admin endpoint; to accept it, \
                     list the name in admin.allowed_hosts"
                ),
            ));
        }
    }
    for origin in request.headers_named("origin") {
        if !origin_allowed(origin, request.admin_addr, allowed) {
            return Err(Response::error(
                403,
                &format!(
                    "cross-site request refused: Origin {origin:?} is not this admin \
                     endpoint (http://{})",
                    request.admin_addr
                ),
            ));
        }
    }
    Ok(())
}

/// A `Host` value a browser sends only for this endpoint: an IP address or `localhost`
/// (a DNS name can be pointed anywhere), or a name the operator listed.
fn host_allowed(value: &str, allowed: &[String]) -> bool {
    let Some((host, _port)) = split_authority(value) else {
        return false;
    };
    host.parse::<IpAddr>().is_ok()
        || same_name(host, "localhost")
        || allowed.iter().any(|name| same_name(host, name))
}

/// An `Origin` that is the admin endpoint itself: `http://` and its address, or, bound
/// to loopback, `localhost`, `127.0.0.1` or `[::1]` with its port; or a listed name with
/// its port.
fn origin_allowed(origin: &str, admin: SocketAddr, allowed: &[String]) -> bool {
    let Some(authority) = origin
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
        .and(origin.get(7..))
    else {
        return false;
    };
    let Some((host, port)) = split_authority(authority) else {
        return false;
    };
    if port.unwrap_or(80) != admin.port() {
        return false;
    }
    let loopback = admin.ip().is_loopback();
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            ip == admin.ip()
                || (loopback
                    && (ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
                        || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)))
        }
        Err(_) => {
            (loopback && same_name(host, "localhost"))
                || allowed.iter().any(|name| same_name(host, name))
        }
    }
}

/// `host[:port]` or `[ipv6][:port]`: the host (without brackets) and the port.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after)
    } else {
        match authority.rsplit_once(':') {
            // Two colons and no brackets: a bare IPv6 address, no port.
            Some((host, _)) if host.contains(':') => (authority, ""),
            Some((host, _)) => (host, &authority[host.len()..]),
            None => (authority, ""),
        }
    };
    let port = match port {
        "" | ":" => None,
        port => Some(port.strip_prefix(':')?.parse().ok()?),
    };
    (!host.is_empty()).then_some((host, port))
}

/// DNS names compare without case and without a final dot.
fn same_name(a: &str, b: &str) -> bool {
    let strip = |s: &str| s.strip_suffix('.').unwrap_or(s).to_string();
    strip(a).eq_ignore_ascii_case(&strip(b))
}

/// A POST must carry the bearer token when `admin.token_file` is set (401), and
/// otherwise `Content-Type: application/json` (415): a web page can send that to
/// another site only when the site allows it (a CORS preflight this endpoint never
/// answers), unlike the `text/plain` of a plain form or `fetch`.
fn check_mutation(ballast: &Ballast, request: &Request) -> Result<(), Response> {
    match ballast.admin_token() {
        Some(expected) if !token_matches(request, &expected) => {
            Err(Response::error(401, "missing or wrong bearer token"))
        }
        Some(_) => Ok(()),
        None if is_json(request.header("content-type")) => Ok(()),
        None => Err(Response::error(
            415,
            "a POST needs the header Content-Type: application/json \
             (or, with admin.token_file set, Authorization: Bearer <token>)",
        )),
    }
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn token_matches(request: &Request, expected: &str) -> bool {
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

/// Backend `backend` of listener `listener`, or the 404 that says which is missing.
fn find<'r>(
    routing: &'r Routing,
    listener: &str,
    backend: &str,
) -> Result<&'r BackendRoute, Response> {
    let Some(l) = routing.listener(listener) else {
        return Err(Response::error(
            404,
            &format!("no listener named {listener:?}"),
        ));
    };
    l.backend(backend).ok_or_else(|| {
        Response::error(
            404,
            &format!("listener {listener:?} has no backend named {backend:?}"),
        )
    })
}

fn drain(ballast: &Ballast, listener: &str, backend: &str, drained: bool) -> Response {
    let routing = ballast.routing();
    let b = match find(&routing, listener, backend) {
        Ok(b) => b,
        Err(missing) => return missing,
    };
    if drained {
        b.state.set_drained(true);
    } else {
        // Back in service unless its config says `max_conns = 0`.
        b.state.undrain(b.config.max_conns == Some(0));
    }
    tracing::info!(
        listener,
        backend,
        drained,
        "backend drain state changed by the admin API"
    );
    Response::json(
        200,
        &serde_json::json!({ "listener": listener, "backend": backend, "state": b.phase().as_str() }),
    )
}

/// `POST .../backends/{b}/weight` with `{"weight": N}`: the backend's weight from now
/// until the next reload, or an agent's report (the latest word wins). 0 takes it out of
/// new picks without draining its connections.
fn set_weight(ballast: &Ballast, listener: &str, backend: &str, body: &[u8]) -> Response {
    let routing = ballast.routing();
    let b = match find(&routing, listener, backend) {
        Ok(b) => b,
        Err(missing) => return missing,
    };
    let weight = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("weight").and_then(serde_json::Value::as_u64));
    let Some(weight) = weight.filter(|w| *w <= crate::config::MAX_WEIGHT) else {
        return Response::error(
            400,
            &format!(
                "the body must be {{\"weight\": N}} with N a whole number from 0 to {}",
                crate::config::MAX_WEIGHT
            ),
        );
    };
    b.state
        .set_runtime_weight(Some(crate::state::RuntimeWeight::Api(weight as u32)));
    tracing::info!(
        listener,
        backend,
        weight,
        "backend weight set by the admin API"
    );
    Response::json(
        200,
        &serde_json::json!({
            "listener": listener,
            "backend": backend,
            "weight": weight,
            "configured_weight": b.config.weight,
            "state": b.phase().as_str(),
        }),
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
    let pairs = match decode_query(query) {
        Ok(pairs) => pairs,
        Err(refused) => return refused,
    };
    let mut client = IpAddr::from([0, 0, 0, 0]);
    for (name, value) in pairs {
        match name.as_str() {
            "client" => match value.parse() {
                Ok(ip) => client = ip,
                Err(_) => {
                    return Response::error(400, &format!("client {value:?} is not an IP address"))
                }
            },
            _ => {
                return Response::error(
                    400,
                    &format!("unknown query parameter {name:?}; expected client=IP"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Hostile paths and queries: a verdict, no panic; what decodes is what was
        /// encoded, segment by segment.
        #[test]
        fn any_path_or_query_decodes_or_is_refused_and_encoded_segments_come_back(
            path in "\\PC{0,200}",
            query in "[%a-zA-Z0-9=&+/:.]{0,100}",
            segments in proptest::collection::vec("\\PC{1,20}", 1..6),
        ) {
            let _ = decode_segments(&path);
            let _ = decode_query(&query);
            let encoded: Vec<String> = segments
                .iter()
                .map(|s| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string())
                .collect();
            let decoded = decode_segments(&format!("/{}", encoded.join("/"))).ok().unwrap_or_default();
            prop_assert_eq!(decoded, segments);
        }

        #[test]
        fn any_host_or_origin_gets_a_verdict(host in "\\PC{0,80}", origin in "\\PC{0,80}") {
            let admin: SocketAddr = "127.0.0.1:9090".parse().unwrap();
            let _ = host_allowed(&host, &[]);
            let _ = origin_allowed(&origin, admin, &["lb.internal".to_string()]);
            let _ = split_authority(&host);
        }
    }

    #[test]
    fn segments_are_decoded_after_splitting() {
        assert_eq!(
            decode_segments("/api/v1/listeners/web/backends/%5B%3A%3A1%5D%3A3000/drain").unwrap(),
            [
                "api",
                "v1",
                "listeners",
                "web",
                "backends",
                "[::1]:3000",
                "drain"
            ]
        );
        assert_eq!(decode_segments("/a%2Fb/c").unwrap(), ["a/b", "c"]);
        assert_eq!(decode_segments("/%FF").unwrap_err().status, 400);
    }

    #[test]
    fn query_values_are_decoded_and_plus_stays_a_plus() {
        assert_eq!(
            decode_query("client=%3A%3A1&x=a+b&flag").unwrap(),
            [
                ("client".to_string(), "::1".to_string()),
                ("x".into(), "a+b".into()),
                ("flag".into(), String::new())
            ]
        );
        assert_eq!(decode_query("client=%C3%28").unwrap_err().status, 400);
    }

    #[test]
    fn hosts_are_ip_addresses_localhost_or_listed_names() {
        let allowed = ["lb.internal".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "[::1]:9901",
            "[::1]",
            "::1",
            "10.1.2.3:80",
            "localhost",
            "LOCALHOST:9901",
            "lb.internal",
            "Lb.Internal.:9901",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for refused in [
            "attacker.example",
            "attacker.example:9901",
            "127.0.0.1.nip.io",
            "localhost.attacker.example",
            "lb.internal.attacker.example",
            "",
            ":9901",
            "[::1",
            "127.0.0.1:notaport",
        ] {
            assert!(!host_allowed(refused, &allowed), "{refused}");
        }
    }

    #[test]
    fn origins_must_be_the_admin_address_itself() {
        let loopback: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        let allowed = ["lb.internal".to_string()];
        for ok in [
            "http://127.0.0.1:9901",
            "HTTP://localhost:9901",
            "http://[::1]:9901",
            "http://lb.internal:9901",
        ] {
            assert!(origin_allowed(ok, loopback, &allowed), "{ok}");
        }
        for refused in [
            "https://attacker.example",
            "http://attacker.example:9901",
            "https://127.0.0.1:9901",
            "http://127.0.0.1:9902",
            "http://127.0.0.1",
            "http://127.0.0.2:9901",
            "null",
            "",
        ] {
            assert!(!origin_allowed(refused, loopback, &allowed), "{refused}");
        }
        let public: SocketAddr = "10.0.0.5:80".parse().unwrap();
        assert!(origin_allowed("http://10.0.0.5", public, &[]));
        assert!(!origin_allowed("http://localhost", public, &[]));
        assert!(!origin_allowed("http://127.0.0.1", public, &[]));
    }

    #[test]
    fn a_json_content_type_may_carry_parameters() {
        assert!(is_json(Some("application/json")));
        assert!(is_json(Some("Application/JSON; charset=utf-8")));
        assert!(!is_json(Some("text/plain")));
        assert!(!is_json(Some("application/jsonx")));
        assert!(!is_json(None));
    }
}
