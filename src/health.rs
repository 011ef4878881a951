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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{HealthConfig, HealthKind};
use crate::state::BackendState;
use crate::Ballast;

/// The longest the loop sleeps, so that a reload that adds checks is noticed quickly.
const MAX_NAP: Duration = Duration::from_secs(1);

/// Runs health checks until `stopped` turns true.
pub async fn run(ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    // When each (listener, backend) is next due.
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    let mut checks = JoinSet::new();
    loop {
        let routing = ballast.routing();
        let now = Instant::now();
        let mut wake = now + MAX_NAP;
        let mut next_due = HashMap::with_capacity(due.len());
        for listener in &routing.listeners {
            let Some(health) = &listener.config.health else {
                continue;
            };
            for backend in &listener.backends {
                let key = (listener.config.name.clone(), backend.config.name.clone());
                let mut at = due.get(&key).copied().unwrap_or(now);
                if at <= now {
                    checks.spawn(check_and_record(
                        backend.config.addr,
                        health.clone(),
                        Arc::clone(&backend.state),
                    ));
                    at = now + health.interval;
                }
                wake = wake.min(at);
                next_due.insert(key, at);
            }
        }
        due = next_due;
        drop(routing);
        while checks.try_join_next().is_some() {}
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    checks.shutdown().await;
}

async fn check_and_record(addr: SocketAddr, health: HealthConfig, state: Arc<BackendState>) {
    let result = tokio::time::timeout(health.timeout, probe(addr, &health)).await;
    let outcome = match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(why),
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

async fn probe(addr: SocketAddr, health: &HealthConfig) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if health.kind == HealthKind::Tcp {
        return Ok(());
    }
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: ballast-health/{}\r\nConnection: close\r\n\r\n",
        health.path,
        crate::VERSION
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let status =
        parse_status(status_line).ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status("HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(parse_status("HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(""), None);
    }
}
