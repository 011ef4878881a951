//! Logging: tracing to stderr, in text or JSON, that never fails anything.
//!
//! The terminal that started ballast may go away (an ssh session dropped without
//! nohup): stderr is then a pipe or tty whose reader is gone and every write fails with
//! `EPIPE` or `EIO`. A log line is never worth a failed reload or a reset connection, so
//! the sink swallows write errors and counts them ([`dropped_lines`]); and the fmt
//! layer's own error report (an `eprintln!`, which panics on a closed stderr) is turned
//! off.
//!
//! pingora's own bootstrap lines (through the `log` crate) are shown only at `debug` and
//! below: at the default level an operator sees ballast's lines alone. Colour codes are
//! written only to a terminal, never to a file or pipe.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How verbose the log is (`--log-level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// How a log line is written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Log lines that could not be written (stderr gone or full), since start.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many log lines were dropped because stderr could not take them.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The filter for `level`: `RUST_LOG` when set, else `level` for ballast and at most
/// `warn` for pingora unless `level` asks for debugging.
fn filter(level: Level) -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    // notify reports at info and warn what ballast handles itself (a watched folder
    // that went away).
    let quiet_deps = match level {
        Level::Debug | Level::Trace => ",notify=error",
        Level::Error => ",pingora_core=error,pingora=error,notify=error",
        Level::Warn | Level::Info => ",pingora_core=warn,pingora=warn,notify=error",
    };
    EnvFilter::new(format!("{}{quiet_deps}", level.as_str()))
}

/// Installs the global subscriber. Call once, first thing; later calls do nothing.
pub fn init(level: Level, format: Format) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(Stderr)
        .with_ansi(io::stderr().is_terminal())
        .log_internal_errors(false);
    let _ = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// stderr that drops what it cannot write.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One write_all of the whole line under stderr's lock, so that lines of several
        // threads never interleave; a failure drops the line, never the caller.
        if io::stderr().lock().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Prints `message` on stderr for a person (command results, fatal errors), without
/// panicking when stderr is gone.
pub fn eprint_line(message: &str) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_is_quiet_at_the_default_level_and_speaks_when_debugging() {
        std::env::remove_var("RUST_LOG");
        assert!(filter(Level::Info)
            .to_string()
            .contains("pingora_core=warn"));
        assert!(!filter(Level::Debug).to_string().contains("pingora"));
        assert!(filter(Level::Info).to_string().contains("notify=error"));
    }
}
