//! `ballast status`: a running instance's `/api/v1/status`, as a table for a terminal.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, HOST};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use serde_json::Value;

/// Width of the live-connections bar at its longest.
const BAR_WIDTH: usize = 20;

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot reach the admin endpoint at {addr}: {source} (is ballast running, with [admin] bind = \"{addr}\"?)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin endpoint at {addr} answered badly: {why}")]
    BadAnswer { addr: SocketAddr, why: String },
}

/// How long `ballast status` waits for the connection and for the answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches `/api/v1/status` from the admin endpoint at `addr`.
pub fn fetch(addr: SocketAddr) -> Result<Value, StatusError> {
    // One request from a command-line tool: a runtime of its own on this thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StatusError::Connect { addr, source })?;
    runtime.block_on(fetch_async(addr))
}

async fn fetch_async(addr: SocketAddr) -> Result<Value, StatusError> {
    let connect = |source| StatusError::Connect { addr, source };
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let bad = |why: String| StatusError::BadAnswer { addr, why };
    let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| connect(timed_out()))?
        .map_err(connect)?;
    let exchange = async {
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| bad(e.to_string()))?;
        // Drives the connection while the request is sent and the answer read.
        tokio::spawn(connection);
        let mut request = hyper::Request::new(Empty::<Bytes>::new());
        *request.uri_mut() = hyper::Uri::from_static("/api/v1/status");
        // The admin endpoint accepts an IP address as Host (and no names it was not told).
        let host = HeaderValue::try_from(addr.to_string()).map_err(|e| bad(e.to_string()))?;
        request.headers_mut().insert(HOST, host);
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| bad(e.to_string()))?;
        let status = answer.status();
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| bad(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            return Err(bad(format!("{status}: {}", text.trim())));
        }
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid JSON: {e}")))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| bad(format!("no answer within {TIMEOUT:?}")))?
}

/// Renders a status document as a table: one block per listener, one row per backend.
pub fn render(status: &Value) -> String {
    let mut out = format!("generation {}\n", status["generation"]);
    let empty = Vec::new();
    let cluster = status.get("cluster").filter(|c| c.is_object());
    if let Some(cluster) = cluster {
        let peers: Vec<String> = cluster["peers"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|p| {
                format!(
                    "{} {:.1}s ago",
                    text(&p["instance"]),
                    p["age_seconds"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        let up = if cluster["up"].as_bool() == Some(true) {
            "up"
        } else {
            "DOWN (Redis does not answer; balancing on own counts)"
        };
        out.push_str(&format!(
            "cluster {up}, {} peer(s){}{}\n",
            peers.len(),
            if peers.is_empty() { "" } else { ": " },
            peers.join(", ")
        ));
    }
    for listener in status["listeners"].as_array().unwrap_or(&empty) {
        out.push_str(&format!(
            "\nlistener {}  {}  {}  active {}\n",
            text(&listener["name"]),
            text(&listener["bind"]),
            text(&listener["strategy"]),
            listener["active"]
        ));
        let backends = listener["backends"].as_array().unwrap_or(&empty);
        let most = backends
            .iter()
            .filter_map(|b| b["active"].as_u64())
            .max()
            .unwrap_or(0);
        let mut rows = vec![vec![
            "BACKEND".to_string(),
            "ADDR".into(),
            "STATE".into(),
            "WEIGHT".into(),
            "MAX".into(),
            "ACTIVE".into(),
            "TOTAL".into(),
            "SINCE".into(),
        ]];
        if cluster.is_some() {
            rows[0].insert(6, "CLUSTER".into());
        }
        let mut failures = Vec::new();
        for b in backends {
            let active = b["active"].as_u64().unwrap_or(0);
            let bar = if most == 0 {
                String::new()
            } else {
                let len = (active as usize * BAR_WIDTH).div_ceil(most as usize);
                "#".repeat(len)
            };
            let mut row = vec![
                text(&b["name"]),
                text(&b["addr"]),
                text(&b["state"]),
                weight(b),
                b["max_conns"]
                    .as_u64()
                    .into_iter()
                    .chain(b["agent_max_conns"].as_u64())
                    .min()
                    .map_or("-".into(), |m| m.to_string()),
                format!("{active:>6} {bar:<BAR_WIDTH$}"),
                b["total"].to_string(),
                seconds(&b["since"]),
            ];
            if cluster.is_some() {
                row.insert(6, b["cluster_active"].to_string());
            }
            rows.push(row);
            if let Some(failure) = b["last_check_failure"].as_object() {
                failures.push(format!(
                    "  {}: last failed check {}: {}\n",
                    text(&b["name"]),
                    seconds(&failure["at"]),
                    text(&failure["reason"])
                ));
            }
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(&format!("  {}\n", cells.join("  ").trim_end()));
        }
        failures.iter().for_each(|f| out.push_str(f));
    }
    out
}

/// The configured weight, and the one in use when it differs (set at run time, or in
/// slow start): `2->0.5`.
fn weight(b: &Value) -> String {
    let configured = b["weight"].to_string();
    match (b["weight"].as_f64(), b["effective_weight"].as_f64()) {
        (Some(w), Some(e)) if (w - e).abs() > 1e-9 => {
            let e = format!("{e:.2}");
            let e = e.trim_end_matches('0').trim_end_matches('.');
            format!("{configured}->{e}")
        }
        _ => configured,
    }
}

/// An RFC 3339 time without its fraction of a second (`-` when absent).
fn seconds(v: &Value) -> String {
    match v.as_str() {
        Some(t) => match t.split_once('.') {
            Some((whole, _)) => format!("{whole}Z"),
            None => t.to_string(),
        },
        None => "-".into(),
    }
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_backend_with_a_bar_scaled_to_the_busiest() {
        let status = serde_json::json!({"generation": 3, "listeners": [{
        "name": "web", "bind": "127.0.0.1:8080", "strategy": "least_conn", "active": 15,
        "backends": [
            {"name": "app1", "addr": "127.0.0.1:3001", "weight": 2, "effective_weight": 0.5, "max_conns": null, "agent_max_conns": 30, "state": "up", "active": 10, "total": 40},
            {"name": "app2", "addr": "127.0.0.1:3002", "weight": 1, "max_conns": 0, "state": "draining", "active": 5, "total": 7,
             "since": "2026-11-23T05:20:08.123Z",
             "last_check_failure": {"at": "2026-11-23T05:19:58.001Z", "reason": "connection refused"}},
        ]}]});
        let table = render(&status);
        assert!(table.contains("generation 3"), "{table}");
        assert!(
            table.contains("listener web  127.0.0.1:8080  least_conn  active 15"),
            "{table}"
        );
        let app1 = table.lines().find(|l| l.contains("app1")).unwrap();
        let app2 = table.lines().find(|l| l.contains("app2")).unwrap();
        assert_eq!(app1.matches('#').count(), 20, "{table}");
        assert_eq!(app2.matches('#').count(), 10, "{table}");
        assert!(
            app2.contains("draining") && app1.contains(" up "),
            "{table}"
        );
        assert!(app2.contains("2026-11-23T05:20:08Z"), "{table}");
        assert!(
            app1.contains(" 2->0.5 ") && app1.contains(" 30 "),
            "{table}"
        );
        assert!(
            table.contains("app2: last failed check 2026-11-23T05:19:58Z: connection refused"),
            "{table}"
        );
        assert!(!table.contains("CLUSTER"), "{table}");
    }

    #[test]
    fn with_a_cluster_the_peers_and_cluster_wide_counts_are_shown() {
        let status = serde_json::json!({"generation": 1,
        "cluster": {"up": true, "peers": [{"instance": "edge-2", "age_seconds": 0.42}]},
        "listeners": [{
        "name": "web", "bind": "127.0.0.1:8080", "strategy": "least_conn", "active": 3,
        "backends": [
            {"name": "app1", "addr": "127.0.0.1:3001", "weight": 1, "state": "up", "active": 3, "cluster_active": 17, "total": 4},
        ]}]});
        let table = render(&status);
        assert!(
            table.contains("cluster up, 1 peer(s): edge-2 0.4s ago"),
            "{table}"
        );
        let head = table.lines().find(|l| l.contains("BACKEND")).unwrap();
        assert!(head.contains("CLUSTER  TOTAL"), "{table}");
        let app1 = table.lines().find(|l| l.contains("app1")).unwrap();
        assert!(app1.contains(" 17 "), "{table}");
        let down = serde_json::json!({"generation": 1, "cluster": {"up": false, "peers": []}, "listeners": []});
        assert!(render(&down).contains("cluster DOWN"), "{}", render(&down));
    }
}
