//! HAProxy's agent-check: backends that report their own load.
//!
//! Every `interval`, ballast connects to each backend's agent (`[listeners.agent] port`
//! on the backend's host, or the backend's `agent_addr`), reads one line and applies its
//! words, as HAProxy does:
//!
//! - `75%`: the weight is 75% of the configured one (`0%`: no new connections);
//! - `maxconn:30`: at most 30 live connections (`maxconn:0`: no new connections);
//! - `drain` and `maint`: no new connections, its connections stay; `ready`: back;
//! - `down` (also `fail`, `stopped`): down whatever the health checks say; `up` lifts
//!   the agent's own `down` only.
//!
//! Words are separated by spaces, tabs or commas, in any case; a `#` starts a comment;
//! words it does not know are left alone. The agent's words are its own state, apart
//! from the operator's drain and the health checks'. Its percentage and the admin API's
//! weight replace each other (the latest wins). An agent that cannot be reached or says
//! nothing useful changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::config::DEFAULT_AGENT_INTERVAL;
use crate::control::periodic::{self, Probe};
use crate::routing::{BackendRoute, ListenerRoute};
use crate::state::{BackendState, RuntimeWeight};
use crate::Ballast;

/// The longest reply read: a line of words fits many times over.
const MAX_REPLY: usize = 512;
/// The highest percentage taken (HAProxy takes more than 100% too).
const MAX_PERCENT: u32 = 1000;

/// One word of an agent's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Word {
    /// The weight, as a percentage of the configured one.
    Percent(u32),
    MaxConn(u64),
    Drain,
    Maint,
    Ready,
    Up,
    Down,
}

/// The words of the first line of `reply`; `Err` when it holds none this protocol knows.
pub fn parse(reply: &[u8]) -> Result<Vec<Word>, String> {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.split(|&b| b == b'#').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let words: Vec<Word> = line
        .split(|c: char| c.is_ascii_whitespace() || c == ',')
        .filter_map(|word| {
            let word = word.to_ascii_lowercase();
            if let Some(percent) = word.strip_suffix('%') {
                return percent
                    .parse::<u32>()
                    .ok()
                    .map(|p| Word::Percent(p.min(MAX_PERCENT)));
            }
            if let Some(max) = word.strip_prefix("maxconn:") {
                return max.parse::<u64>().ok().map(Word::MaxConn);
            }
            match word.as_str() {
                "drain" => Some(Word::Drain),
                "maint" => Some(Word::Maint),
                "ready" => Some(Word::Ready),
                "up" => Some(Word::Up),
                "down" | "fail" | "stopped" => Some(Word::Down),
                _ => None,
            }
        })
        .collect();
    if words.is_empty() {
        let shown: String = line.chars().take(80).collect();
        return Err(format!("no word an agent may say in {shown:?}"));
    }
    Ok(words)
}

/// Applies an agent's words to a backend. They are the agent's own: its weight is a
/// percentage of the configured one, its `drain` keeps the backend's connections (the
/// operator's drain and its clock are the admin API's), its `down` holds whatever the
/// health checks say and its `up` only lifts its own `down`.
fn apply(state: &BackendState, words: &[Word]) {
    for word in words {
        match *word {
            Word::Percent(percent) => {
                state.set_runtime_weight(Some(RuntimeWeight::AgentPercent(percent)))
            }
            Word::MaxConn(max) => state.set_agent_max_conns(Some(max)),
            Word::Drain | Word::Maint => state.set_agent_drained(true),
            Word::Ready => state.set_agent_drained(false),
            Word::Up => state.set_agent_down(false),
            Word::Down => state.set_agent_down(true),
        }
    }
}

/// Asks every backend's agent until `stopped` turns true.
pub async fn run(ballast: Ballast, stopped: watch::Receiver<bool>) {
    let interval = |l: &ListenerRoute, b: &BackendRoute| {
        l.config.agent_of(&b.config)?;
        Some(
            l.config
                .agent
                .as_ref()
                .map_or(DEFAULT_AGENT_INTERVAL, |a| a.interval),
        )
    };
    let probe = |l: &ListenerRoute, b: &BackendRoute| -> Option<Probe> {
        let addr = l.config.agent_of(&b.config)?;
        let timeout = interval(l, b)?;
        let state = Arc::clone(&b.state);
        Some(Box::pin(async move {
            match tokio::time::timeout(timeout, ask(addr)).await {
                Ok(Ok(reply)) => match parse(&reply) {
                    Ok(words) => {
                        let before = (
                            state.phase(),
                            state.runtime_weight(),
                            state.agent_max_conns(),
                        );
                        apply(&state, &words);
                        let after = (
                            state.phase(),
                            state.runtime_weight(),
                            state.agent_max_conns(),
                        );
                        if before != after {
                            info!(
                                listener = %state.listener, backend = %state.name, %addr, ?words,
                                state = after.0.as_str(), weight = ?after.1, max_conns = ?after.2,
                                "agent report applied"
                            );
                        }
                    }
                    Err(why) => {
                        debug!(listener = %state.listener, backend = %state.name, %addr, "agent: {why}")
                    }
                },
                Ok(Err(e)) => {
                    debug!(listener = %state.listener, backend = %state.name, %addr, error = %e, "agent not reached")
                }
                Err(_) => {
                    debug!(listener = %state.listener, backend = %state.name, %addr, "agent: no answer in time")
                }
            }
        }))
    };
    periodic::run(ballast, stopped, interval, probe).await;
}

/// Connects to an agent and reads its reply: up to the first newline, the end of the
/// stream, or [`MAX_REPLY`] bytes.
async fn ask(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; MAX_REPLY];
    while reply.len() < MAX_REPLY && !reply.contains(&b'\n') {
        let n = stream.read(&mut chunk[..MAX_REPLY - reply.len()]).await?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::state::Phase;
    use proptest::prelude::*;

    #[test]
    fn the_words_of_haproxy_s_agent_protocol_are_read_in_any_case_and_order() {
        assert_eq!(
            parse(b"up 75%, MaxConn:30\tREADY # fine\n"),
            Ok(vec![
                Word::Up,
                Word::Percent(75),
                Word::MaxConn(30),
                Word::Ready
            ])
        );
        assert_eq!(parse(b"drain"), Ok(vec![Word::Drain]));
        assert_eq!(parse(b"maint\r\n"), Ok(vec![Word::Maint]));
        assert_eq!(parse(b"fail#overloaded"), Ok(vec![Word::Down]));
        assert_eq!(parse(b"5000%"), Ok(vec![Word::Percent(MAX_PERCENT)]));
        assert!(parse(b"").is_err());
        assert!(
            parse(b"hello world\n75%").is_err(),
            "only the first line counts"
        );
        assert!(parse(b"-5% maxconn:x").is_err());
    }

    #[test]
    fn a_report_sets_weight_max_conns_service_and_health_of_the_agent_s_own() {
        let b = BackendState::new("web", "a", Metrics::new().backend("web", "a"));
        apply(&b, &[Word::Percent(50), Word::MaxConn(5)]);
        assert_eq!(
            (b.runtime_weight(), b.agent_max_conns()),
            (Some(RuntimeWeight::AgentPercent(50)), Some(5))
        );
        apply(&b, &[Word::Drain]);
        assert_eq!(b.phase(), Phase::AgentDrained);
        apply(&b, &[Word::Ready, Word::Down]);
        assert_eq!(b.phase(), Phase::Down);
        apply(&b, &[Word::Up, Word::Percent(0)]);
        assert_eq!(
            (b.phase(), b.runtime_weight()),
            (Phase::Up, Some(RuntimeWeight::AgentPercent(0)))
        );
        // The agent's `ready` is no operator's undrain, and its `up` no passing check.
        b.set_drained(true);
        apply(&b, &[Word::Ready]);
        assert!(b.phase().is_draining());
        let c = BackendState::new("web", "c", Metrics::new().backend("web", "c"));
        c.record_health(Err("refused".into()), 1, 1);
        apply(&c, &[Word::Up]);
        assert_eq!(c.phase(), Phase::Down);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn any_reply_is_read_without_panic_and_only_its_first_line_counts(
            reply in proptest::collection::vec(any::<u8>(), 0..600),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let first = parse(&reply);
            let mut longer = reply.clone();
            if reply.contains(&b'\n') {
                longer.extend_from_slice(&rest);
                prop_assert_eq!(parse(&longer), first);
            }
        }

        #[test]
        fn every_word_written_is_read_back(
            percent in 0u32..=MAX_PERCENT, max in any::<u64>(), pick in 0usize..5,
        ) {
            let word = ["drain", "maint", "ready", "up", "down"][pick];
            let text = format!("{percent}% maxconn:{max} {word}\n");
            let words = parse(text.as_bytes()).unwrap();
            prop_assert_eq!(&words[..2], &[Word::Percent(percent), Word::MaxConn(max)]);
            prop_assert_eq!(words.len(), 3);
        }
    }
}
