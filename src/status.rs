//! `ballast status`: a running instance's `/api/v1/status`, as a table for a terminal.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// Fetches `/api/v1/status` from the admin endpoint at `addr`.
pub fn fetch(addr: SocketAddr) -> Result<Value, StatusError> {
    let timeout = Duration::from_secs(5);
    let connect = |source| StatusError::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect)?;
    stream
        .write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: ballast\r\nConnection: close\r\n\r\n")
        .map_err(connect)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(connect)?;
    let bad = |why: String| StatusError::BadAnswer { addr, why };
    let answer = String::from_utf8(answer).map_err(|_| bad("not UTF-8".into()))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("not an HTTP answer".into()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or_default().to_string()));
    }
    serde_json::from_str(body).map_err(|e| bad(format!("invalid JSON: {e}")))
}

/// Renders a status document as a table: one block per listener, one row per backend.
pub fn render(status: &Value) -> String {
    let mut out = format!("generation {}\n", status["generation"]);
    let empty = Vec::new();
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
        let mut rows = vec![[
            "BACKEND".to_string(),
            "ADDR".into(),
            "STATE".into(),
            "WEIGHT".into(),
            "MAX".into(),
            "ACTIVE".into(),
            "TOTAL".into(),
            "SINCE".into(),
        ]];
        let mut failures = Vec::new();
        for b in backends {
            let active = b["active"].as_u64().unwrap_or(0);
            let bar = if most == 0 {
                String::new()
            } else {
                let len = (active as usize * BAR_WIDTH).div_ceil(most as usize);
                "#".repeat(len)
            };
            rows.push([
                text(&b["name"]),
                text(&b["addr"]),
                text(&b["state"]),
                b["weight"].to_string(),
                b["max_conns"]
                    .as_u64()
                    .map_or("-".into(), |m| m.to_string()),
                format!("{active:>6} {bar:<BAR_WIDTH$}"),
                b["total"].to_string(),
                seconds(&b["since"]),
            ]);
            if let Some(failure) = b["last_check_failure"].as_object() {
                failures.push(format!(
                    "  {}: last failed check {}: {}\n",
                    text(&b["name"]),
                    seconds(&failure["at"]),
                    text(&failure["reason"])
                ));
            }
        }
        let widths: Vec<usize> = (0..8)
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
            {"name": "app1", "addr": "127.0.0.1:3001", "weight": 2, "max_conns": null, "state": "up", "active": 10, "total": 40},
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
            table.contains("app2: last failed check 2026-11-23T05:19:58Z: connection refused"),
            "{table}"
        );
    }
}
