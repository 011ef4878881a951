//! Logging: tracing to stderr, in text or JSON, that never fails anything and never
//! holds anything up.
//!
//! Once [`init`] has run, every line (tracing's and the access log's) goes to one writer
//! thread through a queue of [`QUEUE_LINES`] lines; the thread writes whatever is queued
//! in one `write` (up to [`BATCH_BYTES`]). A stderr that does not take lines (journald
//! stalled, a pipe nobody reads) then stalls that thread alone, never a worker and the
//! connections on it: when the queue is full a line is dropped and counted
//! ([`dropped_lines`], `ballast_log_lines_dropped_total`). [`flush`] waits for the queue
//! to be written, as the process exits, a panic is reported, or a message meant for a
//! person is printed ([`eprint_line`]), so that those come after the lines before them.
//! (tracing-appender's non-blocking writer queues the same way, but flushes only by
//! ending its worker, once.)
//!
//! The terminal that started ballast may go away (an ssh session dropped without
//! nohup): stderr is then a pipe or tty whose reader is gone and every write fails with
//! `EPIPE` or `EIO`. A log line is never worth a failed reload or a reset connection, so
//! the sink swallows write errors and counts them ([`dropped_lines`]); and the fmt
//! layer's own error report (an `eprintln!`, which panics on a closed stderr) is turned
//! off.
//!
//! pingora's own bootstrap lines (through the `log` crate) are shown only at `debug` and
//! below: at the default level an operator sees ballast's lines alone. That holds for
//! its upgrade socket's errors too (it logs an error every second while `run --upgrade`
//! legitimately waits): [`crate::upgrade`] reports the outcome with the path. Colour codes are
//! written only to a terminal, never to a file or pipe.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
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

/// The part of [`DROPPED`] already handed to a counter by [`newly_dropped_lines`].
static REPORTED: AtomicU64 = AtomicU64::new(0);

/// How many log lines were dropped because stderr could not take them.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Log lines dropped since the last call: what a counter should add now. Two callers at
/// once get disjoint parts (one swap), so a counter fed by it never counts a line twice.
pub fn newly_dropped_lines() -> u64 {
    let total = DROPPED.load(Ordering::Relaxed);
    total.saturating_sub(REPORTED.swap(total, Ordering::Relaxed))
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
        Level::Error => {
            ",pingora_core=error,pingora=error,notify=error,pingora_core::server::transfer_fd=off"
        }
        Level::Warn | Level::Info => {
            ",pingora_core=warn,pingora=warn,notify=error,pingora_core::server::transfer_fd=off"
        }
    };
    EnvFilter::new(format!("{}{quiet_deps}", level.as_str()))
}

/// The format of every line, set by [`init`]; text until then.
static FORMAT: std::sync::OnceLock<Format> = std::sync::OnceLock::new();

/// The format log lines are written in.
pub fn format() -> Format {
    FORMAT.get().copied().unwrap_or(Format::Text)
}

/// Writes one whole line (an access log line) as it is, never failing the caller.
pub fn write_line(line: &str) {
    emit(line.as_bytes());
}

/// Lines the writer thread's queue holds at most.
pub const QUEUE_LINES: usize = 4096;

/// The most bytes the writer thread writes at once.
pub const BATCH_BYTES: usize = 64 * 1024;

/// The queue to the writer thread, once [`init`] started it.
static QUEUE: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();

/// Lines that entered the queue, and lines the writer thread took from it (written, or
/// dropped when stderr failed), since start: the queue holds nothing older than a
/// moment when the second reaches what the first was then. A line dropped because the
/// queue was full is in neither.
static QUEUED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

/// Starts the writer thread. Without one (it could not be started, or [`init`] was not
/// called), lines are written by whoever logs them.
fn start_writer() {
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let started = std::thread::Builder::new()
        .name("ballast-log".into())
        .spawn(move || write_queued(&lines));
    if started.is_ok() {
        let _ = QUEUE.set(queue);
    }
}

/// The writer thread: writes what is queued, a batch at a time.
fn write_queued(lines: &Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    while let Ok(line) = lines.recv() {
        batch.clear();
        batch.extend_from_slice(&line);
        let mut count = 1;
        while batch.len() < BATCH_BYTES {
            match lines.try_recv() {
                Ok(line) => {
                    batch.extend_from_slice(&line);
                    count += 1;
                }
                Err(_) => break,
            }
        }
        if io::stderr().lock().write_all(&batch).is_err() {
            DROPPED.fetch_add(count, Ordering::Relaxed);
        }
        DONE.fetch_add(count, Ordering::Release);
    }
}

/// Hands one whole line to the writer thread, or drops and counts it when the queue is
/// full; writes it at once when there is no writer thread.
fn emit(line: &[u8]) {
    let Some(queue) = QUEUE.get() else {
        write_now(line);
        return;
    };
    match queue.try_send(line.to_vec()) {
        Ok(()) => {
            QUEUED.fetch_add(1, Ordering::Release);
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One write_all of the whole line under stderr's lock, so that lines of several
/// threads never interleave; a failure drops the line, never the caller.
fn write_now(line: &[u8]) {
    if io::stderr().lock().write_all(line).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits until every line this thread queued so far (and any other thread's queued
/// before) is written, or dropped for a failed stderr, for `within` at most.
pub fn flush(within: Duration) {
    let queued = QUEUED.load(Ordering::Acquire);
    let deadline = Instant::now() + within;
    while DONE.load(Ordering::Acquire) < queued && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long a panic's report, a message for a person or the process's exit waits for
/// the lines queued before it.
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Installs the global subscriber and starts the writer thread. Call once, first thing;
/// later calls do nothing.
pub fn init(level: Level, format: Format) {
    if FORMAT.set(format).is_ok() {
        start_writer();
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The lines that lead up to a panic come before its report.
            flush(FLUSH_WAIT);
            report(info);
        }));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(Stderr)
        .with_ansi(io::stderr().is_terminal())
        .log_internal_errors(false);
    let _ = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
    };
}

/// One JSON object per line with every field at the top level (keys in alphabetical
/// order): `timestamp`, `level`, `target`, `message`, the fields of the spans the event
/// happened in (a connection's listener and client) and the event's own; an event's
/// field wins over a span's of the same name. The `log.*` fields of events that came
/// through the `log` crate (source paths of dependencies) are left out; `log.target`
/// becomes the target.
#[derive(Debug, Clone, Copy)]
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), rfc3339(SystemTime::now()).into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                    line.extend(fields);
                }
            }
        }
        let mut fields = FieldVisitor {
            line: &mut line,
            target: None,
        };
        event.record(&mut fields);
        if let Some(target) = fields.target.take() {
            line.insert("target".into(), target.into());
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Collects an event's fields into the line.
struct FieldVisitor<'a> {
    line: &'a mut Map<String, Value>,
    /// `log.target` of an event from the `log` crate.
    target: Option<String>,
}

impl FieldVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        match field.name() {
            "log.target" => self.target = value.as_str().map(str::to_string),
            name if name.starts_with("log.") => {}
            name => {
                self.line.insert(name.to_string(), value);
            }
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// stderr through the writer thread, dropping what it cannot take.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}

impl Write for Stderr {
    /// tracing writes each event's line whole, in one call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        emit(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Prints `message` on stderr for a person (command results, fatal errors), after the
/// log lines queued before it, without panicking when stderr is gone.
pub fn eprint_line(message: &str) {
    flush(FLUSH_WAIT);
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{message}");
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `time` as RFC 3339 in UTC with millisecond precision: `2026-11-23T05:20:08.123Z`.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
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

    #[test]
    fn times_read_as_rfc_3339_in_utc() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_411_208_123);
        assert_eq!(rfc3339(t), "2026-11-23T05:20:08.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
