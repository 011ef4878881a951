//! The config file, from text to a validated [`Config`].
//!
//! The pipeline is `text -> Node tree -> read each table -> check across tables -> Config`:
//!
//! 1. the TOML parser turns the text into a tree of [`Node`]s in which every key and
//!    every value keeps its position (a syntax error stops here: the parser cannot go on);
//! 2. each table is read by hand against the schema of the user-facing contract: unknown
//!    keys (with the nearest known key as a hint), wrong types (in plain words, with an
//!    example), values out of range, and what holds within one listener (a health timeout
//!    no longer than its interval, unique backend names, addresses that can be reached);
//! 3. what holds across tables: unique listener names, bind addresses that do not clash,
//!    no backend that loops back into ballast itself.
//!
//! Reading goes on after a problem, so one run of `ballast check` lists every problem of
//! the file, each as `FILE:LINE:COL: message` at the key's or the value's own position.
//! Every default lives in a named constant or function next to the reader. Both `ballast
//! check` and every (re)load go through [`Config::load`] or [`Config::parse`], so `check`
//! says exactly what `run` and a reload would.
//!
//! Counts are bounded by what a machine can do, so that a typo such as `threads = 100000`
//! is refused by `check` instead of exhausting the process when it starts.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// How many problems an error lists before it says how many more there are.
const MAX_SHOWN: usize = 20;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Everything found wrong with the file, in file order: the TOML syntax error (the
    /// parser stops at the first), or every unknown key, wrong type and value that does
    /// not make sense. One line each, `FILE:LINE:COL: message`.
    #[error("{}", render(.file, .problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// One thing wrong with a config file, at the position of the key or value it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

fn render(file: &str, problems: &[Problem]) -> String {
    let mut lines: Vec<String> = problems
        .iter()
        .take(MAX_SHOWN)
        .map(|p| format!("{file}:{}:{}: {}", p.line, p.column, p.message))
        .collect();
    if problems.len() > MAX_SHOWN {
        lines.push(format!(
            "{file}: and {} more problems",
            problems.len() - MAX_SHOWN
        ));
    }
    lines.join("\n")
}

// ---------------------------------------------------------------------------
// Values with a human syntax: durations and listen addresses.

/// The longest duration accepted: far beyond any sensible timeout, and far from the
/// overflow of a clock plus a duration.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration written as `"250ms"`, `"2s"`, `"5m"`, `"1h"` or a sum such as `"1m30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid duration {text:?}: expected a number and a unit, such as \"250ms\", \"2s\", \"5m\" or \"1h\"")
        };
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match &rest[..unit_len] {
                "ms" => Duration::from_millis(number),
                "s" => Duration::from_secs(number),
                "m" => Duration::from_secs(number.saturating_mul(60)),
                "h" => Duration::from_secs(number.saturating_mul(3600)),
                _ => return Err(bad()),
            };
            total = total.saturating_add(part);
            rest = &rest[unit_len..];
        }
        if total > MAX_DURATION {
            return Err(format!(
                "duration {text:?} is too long: at most 10 years (87600h)"
            ));
        }
        Ok(HumanDuration(total))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A listen address: `"IPv4:port"` or `"[IPv6]:port"`, no host names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        text.parse().map(ListenAddr).map_err(|_| {
            let host = text.rsplit_once(':').map_or(text, |(host, _)| host);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let hint = if !host.is_empty() && host.parse::<IpAddr>().is_err() {
                " (a host name is not accepted here: bind to an IP address such as 127.0.0.1 or 0.0.0.0)"
            } else {
                " (the port is a number from 0 to 65535)"
            };
            format!("invalid listen address {text:?}: expected \"IPv4:port\" or \"[IPv6]:port\"{hint}")
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// What one machine can do: the bounds of counts.

/// Worker threads per CPU core that `runtime.threads` may ask for. A byte relay is bound
/// by cores; threads beyond a few per core only add switching and memory, and a typo
/// such as 100000 would exhaust the process's threads at start.
const THREADS_PER_CORE: usize = 4;
/// The most worker threads on any machine, however many cores it has.
const MAX_THREADS: usize = 1024;

/// The most worker threads `runtime.threads` may ask for on this machine.
pub fn max_threads() -> usize {
    (THREADS_PER_CORE * cores()).min(MAX_THREADS)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most connections one process can hold: each proxied connection takes two file
/// descriptors, and the kernel caps one process's descriptors at `fs.nr_open`
/// (1,048,576 unless raised), whatever `ulimit -n` or `LimitNOFILE=` say. Bounds every
/// count of connections (`max_conns`, `precision`, `step_size`).
fn max_connections() -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    nr_open / 2
}

/// The largest backend weight: finer than any share needs, and far from overflowing a
/// sum of weights or a table built from them.
pub const MAX_WEIGHT: u64 = 1_000_000;
/// The most retries: each one can add `connect_timeout` to a client's wait.
const MAX_RETRIES: u64 = 100;
/// The most consecutive health checks `rise` and `fall` may ask for.
const MAX_RISE_FALL: u64 = 1000;

// ---------------------------------------------------------------------------
// The validated config that the rest of ballast uses.

/// How a listener picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    Weighted,
    #[default]
    LeastConn,
    IpHash,
}

impl Strategy {
    /// Every strategy by its name in the config.
    const NAMES: [(&'static str, Strategy); 4] = [
        ("round_robin", Strategy::RoundRobin),
        ("weighted", Strategy::Weighted),
        ("least_conn", Strategy::LeastConn),
        ("ip_hash", Strategy::IpHash),
    ];
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastConn => "least_conn",
            Strategy::IpHash => "ip_hash",
        })
    }
}

/// What an active health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// The backend accepts a TCP connection.
    #[default]
    Tcp,
    /// The backend answers `GET path` with a 2xx or 3xx status.
    Http,
}

impl HealthKind {
    const NAMES: [(&'static str, HealthKind); 2] =
        [("tcp", HealthKind::Tcp), ("http", HealthKind::Http)];
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `None` when the file has no `[admin]` table: no admin endpoint is served.
    pub admin: Option<AdminConfig>,
    pub runtime: RuntimeConfig,
    pub listeners: Vec<ListenerConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// The bearer token read from `token_file` (a relative path is taken from the config
    /// file's folder); every POST must carry it when set.
    pub token: Option<String>,
    /// Host names accepted in a request's `Host` header besides IP addresses and
    /// `localhost` (a defence against DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Worker threads per service; 0 means one per core.
    pub threads: usize,
    pub shutdown_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: 0,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub strategy: Strategy,
    pub max_conns: Option<u64>,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub retries: u32,
    pub slow_start: Option<Duration>,
    pub health: Option<HealthConfig>,
    pub rebalance: Option<RebalanceConfig>,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub kind: HealthKind,
    /// The path of an `http` check (`/` when not given).
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    pub interval: Duration,
    pub precision: u64,
    pub step_size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub name: String,
    /// The address as written in the file (a host name stays a host name here).
    pub addr_text: String,
    /// `addr_text` resolved when the file was loaded.
    pub addr: SocketAddr,
    pub weight: u32,
    /// `None` = unbounded, `Some(0)` = out of service.
    pub max_conns: Option<u64>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and validates config text; `file` is used in error messages and to find a
    /// relative `token_file`.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut reader = Reader {
            text,
            file,
            problems: Vec::new(),
        };
        let config = match toml::from_str::<Node>(text) {
            Ok(mut root) => {
                root.fill_spans(&(0..0));
                reader.config(&root)
            }
            Err(e) => {
                let at = e.span().unwrap_or(0..0);
                // The parser's message may run over lines; one problem is one line.
                let message = e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                reader.problem(at, format!("TOML syntax error: {message}"));
                None
            }
        };
        match config {
            Some(config) if reader.problems.is_empty() => Ok(config),
            _ => Err(reader.into_error()),
        }
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

// ---------------------------------------------------------------------------
// Defaults.

const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u64 = 2;
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u64 = 2;
const DEFAULT_FALL: u64 = 3;
const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_PRECISION: u64 = 3;
const DEFAULT_STEP_SIZE: u64 = 1;
const DEFAULT_WEIGHT: u64 = 1;

// ---------------------------------------------------------------------------
// The schema: the keys of each table.

const TOP_KEYS: &[&str] = &["admin", "runtime", "listeners"];
const ADMIN_KEYS: &[&str] = &["bind", "token_file", "allowed_hosts"];
const RUNTIME_KEYS: &[&str] = &["threads", "shutdown_timeout"];
const LISTENER_KEYS: &[&str] = &[
    "name",
    "bind",
    "strategy",
    "max_conns",
    "connect_timeout",
    "idle_timeout",
    "drain_timeout",
    "retries",
    "slow_start",
    "health",
    "rebalance",
    "backends",
];
const HEALTH_KEYS: &[&str] = &["kind", "path", "interval", "timeout", "rise", "fall"];
const REBALANCE_KEYS: &[&str] = &["interval", "precision", "step_size"];
const BACKEND_KEYS: &[&str] = &["name", "addr", "weight", "max_conns"];

/// Every table by how it is written, for "it belongs in ..." hints.
const TABLES: &[(&str, &[&str])] = &[
    ("the top level", TOP_KEYS),
    ("[admin]", ADMIN_KEYS),
    ("[runtime]", RUNTIME_KEYS),
    ("[[listeners]]", LISTENER_KEYS),
    ("[listeners.health]", HEALTH_KEYS),
    ("[listeners.rebalance]", REBALANCE_KEYS),
    ("[[listeners.backends]]", BACKEND_KEYS),
];

// ---------------------------------------------------------------------------
// The file as a tree that keeps positions.

/// A byte range of the config text.
type Span = Range<usize>;

/// Stands for "not known yet" until [`Node::fill_spans`] gives it the parent's position
/// (the parser knows no position of a table that is only implied by a dotted key).
const NO_SPAN: Span = usize::MAX..usize::MAX;

/// A TOML value and where it is written.
#[derive(Debug)]
struct Node {
    span: Span,
    value: Value,
}

#[derive(Debug)]
enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

/// A key of a table, where the key is written, and its value.
#[derive(Debug)]
struct Entry {
    key: String,
    key_span: Span,
    node: Node,
}

impl Node {
    fn bare(value: Value) -> Node {
        Node {
            span: NO_SPAN,
            value,
        }
    }

    /// Gives every node and key without a position its parent's.
    fn fill_spans(&mut self, parent: &Span) {
        if self.span == NO_SPAN {
            self.span = parent.clone();
        }
        let own = self.span.clone();
        match &mut self.value {
            Value::Array(items) => items.iter_mut().for_each(|n| n.fill_spans(&own)),
            Value::Table(entries) => {
                for e in entries {
                    if e.key_span == NO_SPAN {
                        e.key_span = own.clone();
                    }
                    e.node.fill_spans(&e.key_span);
                }
            }
            _ => {}
        }
    }

    /// The value in words, for "..., not the string \"2\"".
    fn describe(&self) -> String {
        match &self.value {
            Value::String(s) => format!("the string {s:?}"),
            Value::Integer(n) => format!("the number {n}"),
            Value::Float(n) => format!("the number {n:?}"),
            Value::Boolean(b) => format!("the value {b}"),
            Value::Datetime(d) => format!("the date {d}"),
            Value::Array(_) => "a list".into(),
            Value::Table(_) => "a table".into(),
        }
    }
}

// The toml crate hands a value's position to a type that asks for it under these names
// (the protocol of `toml::Spanned`, from the serde_spanned crate), and a date as a map
// with one private key. Asking for them directly lets one visitor take any value, with or
// without a position, dates included, where `Spanned<T>` would fail on a date or on a
// table that is only implied by a dotted key.
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME_FIELD: &str = "$__toml_private_datetime";

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_struct(SPANNED, SPANNED_FIELDS, NodeVisitor)
    }
}

/// A value without asking for its position (the inside of a positioned value).
struct Bare;

impl<'de> DeserializeSeed<'de> for Bare {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::bare(Value::Boolean(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::bare(Value::Integer(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        // TOML integers are i64; a larger one is at least too large for every key.
        Ok(Node::bare(Value::Integer(
            i64::try_from(v).unwrap_or(i64::MAX),
        )))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::bare(Value::Float(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::bare(Value::String(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::bare(Value::String(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::bare(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(first) = map.next_key::<Key>()? else {
            return Ok(Node::bare(Value::Table(Vec::new())));
        };
        // A key of the file always has a position; these private ones never do.
        if first.span.is_none() && first.text == SPANNED_START {
            let start: usize = map.next_value()?;
            let mut end = start;
            let mut node = None;
            while let Some(key) = map.next_key::<Key>()? {
                match key.text.as_str() {
                    SPANNED_END => end = map.next_value()?,
                    SPANNED_VALUE => node = Some(map.next_value_seed(Bare)?),
                    _ => {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
            }
            let mut node = node.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?;
            node.span = start..end;
            return Ok(node);
        }
        if first.span.is_none() && first.text == DATETIME_FIELD {
            let text: String = map.next_value()?;
            while map.next_key::<de::IgnoredAny>()?.is_some() {
                map.next_value::<de::IgnoredAny>()?;
            }
            return Ok(Node::bare(Value::Datetime(text)));
        }
        let mut entries = Vec::new();
        let mut key = Some(first);
        while let Some(k) = key {
            let node: Node = map.next_value()?;
            entries.push(Entry {
                key: k.text,
                key_span: k.span.unwrap_or(NO_SPAN),
                node,
            });
            key = map.next_key()?;
        }
        Ok(Node::bare(Value::Table(entries)))
    }
}

/// A table's key with its position when the parser knows it.
struct Key {
    text: String,
    span: Option<Span>,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_struct(SPANNED, SPANNED_FIELDS, KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key {
            text: v.to_owned(),
            span: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        let (mut start, mut end, mut text) = (0, 0, None);
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                SPANNED_START => start = map.next_value()?,
                SPANNED_END => end = map.next_value()?,
                SPANNED_VALUE => text = Some(map.next_value::<String>()?),
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(Key {
            text: text.ok_or_else(|| de::Error::missing_field(SPANNED_VALUE))?,
            span: Some(start..end),
        })
    }
}

// ---------------------------------------------------------------------------
// Reading the tree: every problem is collected, reading goes on.

/// A value read from the file and where it is written.
#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    span: Span,
}

/// A key as read: left out, present and right, or present and wrong (already reported).
#[derive(Debug, Clone)]
enum Field<T> {
    Absent,
    Given(At<T>),
    Wrong,
}

impl<T> Field<T> {
    /// The value, or `default` when the key is left out; `None` when it is wrong.
    fn or(self, default: T) -> Option<T> {
        match self {
            Field::Absent => Some(default),
            Field::Given(at) => Some(at.value),
            Field::Wrong => None,
        }
    }

    /// `Some(None)` when the key is left out; `None` when it is wrong.
    fn optional(self) -> Option<Option<T>> {
        match self {
            Field::Absent => Some(None),
            Field::Given(at) => Some(Some(at.value)),
            Field::Wrong => None,
        }
    }

    fn given(&self) -> Option<&At<T>> {
        match self {
            Field::Given(at) => Some(at),
            _ => None,
        }
    }
}

/// One table of the file: its keys, where it starts, and how messages name its keys.
struct Table<'t> {
    entries: &'t [Entry],
    /// The header (or the first key) of the table: where a missing key is reported.
    span: Span,
    /// Put before a key's name in messages: `listener "web": backends[0].`, `admin.`.
    prefix: String,
}

impl<'t> Table<'t> {
    fn get(&self, key: &str) -> Option<&'t Node> {
        self.entries.iter().find(|e| e.key == key).map(|e| &e.node)
    }

    fn what(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Bounds of a count, with the words that explain them.
struct Bounds {
    min: u64,
    max: u64,
    /// Why the maximum, in parentheses after it.
    why_max: String,
    /// After "must be at least N" (what to do instead), or empty.
    why_min: String,
    /// A good value, for "like weight = 2".
    example: u64,
}

impl Bounds {
    fn new(min: u64, max: u64, why_max: impl Into<String>, example: u64) -> Bounds {
        Bounds {
            min,
            max,
            why_max: why_max.into(),
            why_min: String::new(),
            example,
        }
    }

    fn connections(min: u64, example: u64) -> Bounds {
        let max = max_connections();
        Bounds::new(
            min,
            max,
            format!(
                "a process can hold at most {max} connections on this machine: two file descriptors each, fs.nr_open = {}",
                max * 2
            ),
            example,
        )
    }
}

/// A listener as read, with what the checks across listeners need even when some of
/// its keys are wrong.
struct ReadListener {
    /// `None` when a key of it is wrong.
    config: Option<ListenerConfig>,
    name: Option<At<String>>,
    bind: Option<At<SocketAddr>>,
    /// Each backend's resolved address, where it is written, and how messages name it.
    backends: Vec<(At<SocketAddr>, String)>,
}

/// Walks the tree, collecting problems.
struct Reader<'a> {
    text: &'a str,
    file: &'a str,
    problems: Vec<(Span, String)>,
}

impl Reader<'_> {
    fn problem(&mut self, span: Span, message: String) {
        self.problems.push((span, message));
    }

    fn into_error(mut self) -> ConfigError {
        // In file order; problems at the same place stay in the order they were found.
        self.problems.sort_by_key(|(span, _)| span.start);
        let problems = self
            .problems
            .iter()
            .map(|(span, message)| {
                let (line, column) = position(self.text, span.start);
                Problem {
                    line,
                    column,
                    message: message.clone(),
                }
            })
            .collect();
        ConfigError::Invalid {
            file: self.file.to_string(),
            problems,
        }
    }

    // -- tables and keys -----------------------------------------------------------

    /// `node` as a table of `known` keys; reports every other key. `None` (reported)
    /// when `node` is not a table.
    fn table<'t>(
        &mut self,
        node: &'t Node,
        what: &str,
        header: &'static str,
        known: &'static [&'static str],
        prefix: String,
    ) -> Option<Table<'t>> {
        let Value::Table(entries) = &node.value else {
            self.problem(
                node.span.clone(),
                format!(
                    "{what} must be a table, written {header}, not {}",
                    node.describe()
                ),
            );
            return None;
        };
        for entry in entries {
            if !known.contains(&entry.key.as_str()) {
                let message = unknown_key(&entry.key, header, known);
                self.problem(entry.key_span.clone(), message);
            }
        }
        Some(Table {
            entries,
            span: node.span.clone(),
            prefix,
        })
    }

    /// The tables of an array of tables such as `[[listeners]]`.
    fn tables<'t>(&mut self, node: &'t Node, what: &str, header: &str) -> Vec<&'t Node> {
        let items = match &node.value {
            Value::Array(items) => items,
            Value::Table(_) => {
                self.problem(
                    node.span.clone(),
                    format!("{what} must be written {header} (two brackets), one table each"),
                );
                return Vec::new();
            }
            _ => {
                self.problem(
                    node.span.clone(),
                    format!("{what} must be {header} tables, not {}", node.describe()),
                );
                return Vec::new();
            }
        };
        let mut tables = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if matches!(item.value, Value::Table(_)) {
                tables.push(item);
            } else {
                self.problem(
                    item.span.clone(),
                    format!(
                        "{what}[{i}] must be a {header} table, not {}",
                        item.describe()
                    ),
                );
            }
        }
        tables
    }

    /// Reports a required key that is left out; `true` when it is there.
    fn required(&mut self, t: &Table, key: &str, like: &str) -> bool {
        if t.get(key).is_some() {
            return true;
        }
        self.problem(
            t.span.clone(),
            format!("{}missing {key}, like {like}", t.prefix),
        );
        false
    }

    /// Turns a given value that fails `ok` into a reported problem.
    fn check<T>(
        &mut self,
        field: Field<T>,
        ok: impl FnOnce(&T) -> bool,
        message: impl FnOnce() -> String,
    ) -> Field<T> {
        match field {
            Field::Given(at) if !ok(&at.value) => {
                self.problem(at.span, message());
                Field::Wrong
            }
            field => field,
        }
    }

    fn count(&mut self, t: &Table, key: &str, bounds: &Bounds) -> Field<u64> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        let what = t.what(key);
        let message = match node.value {
            Value::Integer(n)
                if n >= 0 && (bounds.min..=bounds.max).contains(&n.unsigned_abs()) =>
            {
                return Field::Given(At {
                    value: n.unsigned_abs(),
                    span: node.span.clone(),
                })
            }
            Value::Integer(n) if n < 0 && bounds.min == 0 => {
                format!(
                    "{what} must not be negative, like {key} = {}",
                    bounds.example
                )
            }
            Value::Integer(n) if n < 0 || n.unsigned_abs() < bounds.min => {
                format!("{what} must be at least {}{}", bounds.min, bounds.why_min)
            }
            Value::Integer(n) => format!(
                "{what} = {n} is too large: at most {} ({})",
                bounds.max, bounds.why_max
            ),
            _ => {
                let quoted = match &node.value {
                    Value::String(s) if s.trim().parse::<i64>().is_ok() => {
                        " (numbers go without quotes)"
                    }
                    _ => "",
                };
                format!(
                    "{what} must be a whole number >= {}, like {key} = {}, not {}{quoted}",
                    bounds.min,
                    bounds.example,
                    node.describe()
                )
            }
        };
        self.problem(node.span.clone(), message);
        Field::Wrong
    }

    fn duration(&mut self, t: &Table, key: &str, example: &str) -> Field<Duration> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        let what = t.what(key);
        let message = match &node.value {
            Value::String(text) => match text.parse::<HumanDuration>() {
                Ok(d) => {
                    return Field::Given(At {
                        value: d.0,
                        span: node.span.clone(),
                    })
                }
                Err(why) => format!("{what}: {why}"),
            },
            Value::Integer(n) => format!(
                "{what} must be a duration in quotes, like \"{n}s\" (units ms, s, m, h), not {}",
                node.describe()
            ),
            _ => format!(
                "{what} must be a duration in quotes, like \"{example}\" (units ms, s, m, h), not {}",
                node.describe()
            ),
        };
        self.problem(node.span.clone(), message);
        Field::Wrong
    }

    fn string(&mut self, t: &Table, key: &str, example: &str) -> Field<String> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        if let Value::String(s) = &node.value {
            return Field::Given(At {
                value: s.clone(),
                span: node.span.clone(),
            });
        }
        let message = format!(
            "{} must be a string in quotes, like {key} = \"{example}\", not {}",
            t.what(key),
            node.describe()
        );
        self.problem(node.span.clone(), message);
        Field::Wrong
    }

    fn listen_addr(&mut self, t: &Table, key: &str, example: &str) -> Field<SocketAddr> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        let message = match &node.value {
            Value::String(text) => match text.parse::<ListenAddr>() {
                Ok(addr) => {
                    return Field::Given(At {
                        value: addr.0,
                        span: node.span.clone(),
                    })
                }
                Err(why) => format!("{}: {why}", t.what(key)),
            },
            _ => format!(
                "{} must be an address in quotes, like {key} = \"{example}\", not {}",
                t.what(key),
                node.describe()
            ),
        };
        self.problem(node.span.clone(), message);
        Field::Wrong
    }

    /// One of `names`, written as its name.
    fn choice<T: Copy + Default + PartialEq>(
        &mut self,
        t: &Table,
        key: &str,
        noun: &str,
        names: &[(&'static str, T)],
    ) -> Field<T> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        let list = names
            .iter()
            .map(|(name, _)| format!("{name:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let message = match &node.value {
            Value::String(text) => {
                if let Some((_, value)) = names.iter().find(|(name, _)| name == text) {
                    return Field::Given(At {
                        value: *value,
                        span: node.span.clone(),
                    });
                }
                let hint = nearest(text, names.iter().map(|(name, _)| *name))
                    .map(|near| format!(": did you mean {near:?}?"))
                    .unwrap_or_else(|| format!(": use one of {list}"));
                format!("{}: unknown {noun} {text:?}{hint}", t.what(key))
            }
            _ => {
                let default = names
                    .iter()
                    .find(|(_, v)| *v == T::default())
                    .map_or("", |(name, _)| name);
                format!(
                    "{} must be one of {list}, like {key} = \"{default}\", not {}",
                    t.what(key),
                    node.describe()
                )
            }
        };
        self.problem(node.span.clone(), message);
        Field::Wrong
    }

    // -- the tables of the schema --------------------------------------------------

    fn config(&mut self, root: &Node) -> Option<Config> {
        let top = self.table(
            root,
            "the file",
            "key = value lines",
            TOP_KEYS,
            String::new(),
        )?;
        let admin = top.get("admin").map(|node| self.admin(node));
        let runtime = match top.get("runtime") {
            None => Some(RuntimeConfig::default()),
            Some(node) => self.runtime(node),
        };
        let mut listeners = Vec::new();
        match top.get("listeners") {
            None => self.problem(
                0..0,
                "no listeners: add at least one [[listeners]] table".into(),
            ),
            Some(node) => {
                let tables = self.tables(node, "listeners", "[[listeners]]");
                if tables.is_empty()
                    && matches!(&node.value, Value::Array(items) if items.is_empty())
                {
                    self.problem(
                        node.span.clone(),
                        "no listeners: add at least one [[listeners]] table".into(),
                    );
                }
                for (i, table) in tables.into_iter().enumerate() {
                    listeners.push(self.listener(i, table));
                }
            }
        }
        let admin_bind = admin.as_ref().and_then(|a| a.as_ref()).map(|a| a.bind);
        self.across_listeners(&listeners, admin_bind);

        let admin = match admin {
            None => None,
            Some(admin) => Some(admin?),
        };
        let listeners = listeners
            .into_iter()
            .map(|l| l.config)
            .collect::<Option<Vec<_>>>()?;
        Some(Config {
            admin,
            runtime: runtime?,
            listeners,
        })
    }

    fn admin(&mut self, node: &Node) -> Option<AdminConfig> {
        let t = self.table(node, "admin", "[admin]", ADMIN_KEYS, "admin.".into())?;
        let bind = if self.required(&t, "bind", "bind = \"127.0.0.1:9090\"") {
            self.listen_addr(&t, "bind", "127.0.0.1:9090")
        } else {
            Field::Wrong
        };
        let token_file = self.string(&t, "token_file", "/etc/ballast/admin.token");
        let token = match token_file.given() {
            None => Some(None),
            Some(at) => self.read_token(at).map(Some),
        };
        let allowed_hosts = self.host_names(&t, "allowed_hosts");
        Some(AdminConfig {
            bind: bind.or(SocketAddr::from(([0, 0, 0, 0], 0)))?,
            token_file: token_file.optional()?.map(PathBuf::from),
            token: token?,
            allowed_hosts: allowed_hosts?,
        })
    }

    fn read_token(&mut self, path: &At<String>) -> Option<String> {
        let file = match Path::new(self.file).parent() {
            Some(dir) if Path::new(&path.value).is_relative() => dir.join(&path.value),
            _ => PathBuf::from(&path.value),
        };
        let token = match std::fs::read_to_string(&file) {
            Ok(token) => token,
            Err(e) => {
                self.problem(
                    path.span.clone(),
                    format!("admin.token_file: cannot read {}: {e}", file.display()),
                );
                return None;
            }
        };
        let token = token.trim();
        if token.is_empty() || token.chars().any(char::is_whitespace) {
            self.problem(
                path.span.clone(),
                format!(
                    "admin.token_file: {} must hold one token with no spaces",
                    file.display()
                ),
            );
            return None;
        }
        Some(token.to_string())
    }

    /// `allowed_hosts`: host names as a browser sends them in `Host`, without a port.
    fn host_names(&mut self, t: &Table, key: &str) -> Option<Vec<String>> {
        let Some(node) = t.get(key) else {
            return Some(Vec::new());
        };
        let what = t.what(key);
        let Value::Array(items) = &node.value else {
            self.problem(
                node.span.clone(),
                format!(
                    "{what} must be a list of host names in quotes, like {key} = [\"lb.internal\"], not {}",
                    node.describe()
                ),
            );
            return None;
        };
        let mut names = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let Value::String(name) = &item.value else {
                self.problem(
                    item.span.clone(),
                    format!(
                        "{what}[{i}] must be a host name in quotes, like \"lb.internal\", not {}",
                        item.describe()
                    ),
                );
                ok = false;
                continue;
            };
            let why = if name.is_empty() {
                Some("is empty")
            } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Some("contains a space")
            } else if name.contains(['/', '@', '?', '#']) {
                Some("is not a host name: list it without scheme, path or user")
            } else if name.contains(':') {
                Some("has a port: list the host name alone (any port is accepted)")
            } else {
                None
            };
            match why {
                Some(why) => {
                    self.problem(item.span.clone(), format!("{what}[{i}] {name:?} {why}"));
                    ok = false;
                }
                None => names.push(name.clone()),
            }
        }
        ok.then_some(names)
    }

    fn runtime(&mut self, node: &Node) -> Option<RuntimeConfig> {
        let t = self.table(
            node,
            "runtime",
            "[runtime]",
            RUNTIME_KEYS,
            "runtime.".into(),
        )?;
        let max = max_threads();
        let threads = self.count(
            &t,
            "threads",
            &Bounds::new(
                0,
                max as u64,
                format!(
                    "{THREADS_PER_CORE} per CPU core, {} cores here, and never more than {MAX_THREADS}; 0 means one per core",
                    cores()
                ),
                cores() as u64,
            ),
        );
        let shutdown_timeout = self.duration(&t, "shutdown_timeout", "30s");
        Some(RuntimeConfig {
            threads: threads.or(0)? as usize,
            shutdown_timeout: shutdown_timeout.or(DEFAULT_SHUTDOWN_TIMEOUT)?,
        })
    }

    fn listener(&mut self, index: usize, node: &Node) -> ReadListener {
        let mut read = ReadListener {
            config: None,
            name: None,
            bind: None,
            backends: Vec::new(),
        };
        let Some(mut t) = self.table(
            node,
            &format!("listeners[{index}]"),
            "[[listeners]]",
            LISTENER_KEYS,
            format!("listeners[{index}]: "),
        ) else {
            return read;
        };

        let name = if self.required(&t, "name", "name = \"web\"") {
            self.string(&t, "name", "web")
        } else {
            Field::Wrong
        };
        if let Some(at) = name.given() {
            t.prefix = format!("listener {:?}: ", at.value);
        }
        let name = self.check(
            name,
            |name| {
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            },
            || {
                let name = match t.get("name").map(|n| &n.value) {
                    Some(Value::String(name)) => name.as_str(),
                    _ => "",
                };
                format!("invalid listener name {name:?}: use only letters, digits, '_' and '-'")
            },
        );
        read.name = name.given().cloned();

        let bind = if self.required(&t, "bind", "bind = \"0.0.0.0:8080\"") {
            self.listen_addr(&t, "bind", "0.0.0.0:8080")
        } else {
            Field::Wrong
        };
        read.bind = bind.given().cloned();
        let strategy = self.choice(&t, "strategy", "strategy", &Strategy::NAMES);
        let max_conns = self.count(&t, "max_conns", &Bounds::connections(0, 50000));
        let connect_timeout = self.duration(&t, "connect_timeout", "2s");
        let connect_timeout = self.check(
            connect_timeout,
            |d| !d.is_zero(),
            || format!("{} must be more than 0", t.what("connect_timeout")),
        );
        let idle_timeout = self.duration(&t, "idle_timeout", "1h");
        let idle_timeout = self.check(
            idle_timeout,
            |d| !d.is_zero(),
            || {
                format!(
                    "{} must be more than 0 (leave it out for none)",
                    t.what("idle_timeout")
                )
            },
        );
        let drain_timeout = self.duration(&t, "drain_timeout", "30s");
        let retries = self.count(
            &t,
            "retries",
            &Bounds::new(
                0,
                MAX_RETRIES,
                "each retry can add connect_timeout to a client's wait",
                DEFAULT_RETRIES,
            ),
        );
        let slow_start = self.duration(&t, "slow_start", "30s");
        let health = match t.get("health") {
            None => Some(None),
            Some(node) => self.health(&t.prefix, node).map(Some),
        };
        let rebalance = match t.get("rebalance") {
            None => Some(None),
            Some(node) => self.rebalance(&t.prefix, node, strategy.given()).map(Some),
        };

        let mut backends = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let tables = match t.get("backends") {
            None => Vec::new(),
            Some(node) => self.tables(node, &t.what("backends"), "[[listeners.backends]]"),
        };
        if tables.is_empty()
            && t.get("backends")
                .is_none_or(|n| matches!(&n.value, Value::Array(items) if items.is_empty()))
        {
            self.problem(
                t.span.clone(),
                format!(
                    "{}: a listener needs at least one [[listeners.backends]]",
                    t.what("backends")
                ),
            );
        }
        for (i, node) in tables.into_iter().enumerate() {
            let prefix = format!("{}backends[{i}].", t.prefix);
            let (backend, addr, name) = self.backend(&prefix, node);
            if let Some(name) = name {
                if names.contains(&name.value) {
                    self.problem(
                        name.span,
                        format!("{prefix}name: duplicate backend name {:?}", name.value),
                    );
                    backends.push(None);
                    continue;
                }
                names.push(name.value);
            }
            if let Some(addr) = addr {
                read.backends.push((addr, format!("{prefix}addr")));
            }
            backends.push(backend);
        }

        read.config = (|| {
            Some(ListenerConfig {
                name: name.or(String::new())?,
                bind: bind.or(SocketAddr::from(([0, 0, 0, 0], 0)))?,
                strategy: strategy.or(Strategy::default())?,
                max_conns: max_conns.optional()?,
                connect_timeout: connect_timeout.or(DEFAULT_CONNECT_TIMEOUT)?,
                idle_timeout: idle_timeout.optional()?,
                drain_timeout: drain_timeout.or(DEFAULT_DRAIN_TIMEOUT)?,
                retries: retries.or(DEFAULT_RETRIES)? as u32,
                slow_start: slow_start.optional()?.filter(|d| !d.is_zero()),
                health: health?,
                rebalance: rebalance?,
                backends: backends.into_iter().collect::<Option<Vec<_>>>()?,
            })
        })();
        read
    }

    fn health(&mut self, prefix: &str, node: &Node) -> Option<HealthConfig> {
        let t = self.table(
            node,
            &format!("{prefix}health"),
            "[listeners.health]",
            HEALTH_KEYS,
            format!("{prefix}health."),
        )?;
        let kind = self.choice(&t, "kind", "health check kind", &HealthKind::NAMES);
        let path = self.string(&t, "path", "/healthz");
        let tcp = matches!(
            kind,
            Field::Absent
                | Field::Given(At {
                    value: HealthKind::Tcp,
                    ..
                })
        );
        let path = match path {
            Field::Given(at) if tcp => {
                self.problem(
                    at.span,
                    format!("{} is only for kind = \"http\"", t.what("path")),
                );
                Field::Wrong
            }
            path => self.check(
                path,
                |p| p.starts_with('/') && !p.contains(char::is_whitespace),
                || {
                    let p = match t.get("path").map(|n| &n.value) {
                        Some(Value::String(p)) => p.as_str(),
                        _ => "",
                    };
                    format!(
                        "{} {p:?} must start with '/' and contain no spaces",
                        t.what("path")
                    )
                },
            ),
        };
        let interval = self.duration(&t, "interval", "2s");
        let interval = self.check(
            interval,
            |d| !d.is_zero(),
            || format!("{} must be more than 0", t.what("interval")),
        );
        let timeout = self.duration(&t, "timeout", "1s");
        let timeout = self.check(
            timeout,
            |d| !d.is_zero(),
            || format!("{} must be more than 0", t.what("timeout")),
        );
        let overlap = format!(
            "{} must not be longer than health.interval (checks would overlap)",
            t.what("timeout")
        );
        let timeout = match (&interval, timeout) {
            (Field::Given(i), Field::Given(at)) if at.value > i.value => {
                self.problem(at.span, overlap);
                Field::Wrong
            }
            (Field::Absent, Field::Given(at)) if at.value > DEFAULT_HEALTH_INTERVAL => {
                self.problem(at.span, format!("{overlap}, 2s when left out"));
                Field::Wrong
            }
            (Field::Given(i), Field::Absent) if DEFAULT_HEALTH_TIMEOUT > i.value => {
                self.problem(
                    i.span.clone(),
                    format!("{overlap}: it is 1s when left out, so set it too"),
                );
                Field::Wrong
            }
            (_, timeout) => timeout,
        };
        let counts = |default| Bounds::new(1, MAX_RISE_FALL, "consecutive checks", default);
        let rise = self.count(&t, "rise", &counts(DEFAULT_RISE));
        let fall = self.count(&t, "fall", &counts(DEFAULT_FALL));
        let kind = kind.or(HealthKind::default())?;
        Some(HealthConfig {
            kind,
            path: path.or("/".into())?,
            interval: interval.or(DEFAULT_HEALTH_INTERVAL)?,
            timeout: timeout.or(DEFAULT_HEALTH_TIMEOUT)?,
            rise: rise.or(DEFAULT_RISE)? as u32,
            fall: fall.or(DEFAULT_FALL)? as u32,
        })
    }

    fn rebalance(
        &mut self,
        prefix: &str,
        node: &Node,
        strategy: Option<&At<Strategy>>,
    ) -> Option<RebalanceConfig> {
        let t = self.table(
            node,
            &format!("{prefix}rebalance"),
            "[listeners.rebalance]",
            REBALANCE_KEYS,
            format!("{prefix}rebalance."),
        )?;
        let mut ok = true;
        if strategy.is_some_and(|s| s.value == Strategy::IpHash) {
            self.problem(
                t.span.clone(),
                format!(
                    "{prefix}rebalance: ip_hash cannot be combined with [listeners.rebalance] (a hashed client would be sent straight back to the backend it was migrated from)"
                ),
            );
            ok = false;
        }
        let interval = self.duration(&t, "interval", "1s");
        let interval = self.check(
            interval,
            |d| !d.is_zero(),
            || format!("{} must be more than 0", t.what("interval")),
        );
        let precision = self.count(&t, "precision", &Bounds::connections(0, DEFAULT_PRECISION));
        let step_size = self.count(&t, "step_size", &Bounds::connections(1, DEFAULT_STEP_SIZE));
        let config = RebalanceConfig {
            interval: interval.or(DEFAULT_REBALANCE_INTERVAL)?,
            precision: precision.or(DEFAULT_PRECISION)?,
            step_size: step_size.or(DEFAULT_STEP_SIZE)?,
        };
        ok.then_some(config)
    }

    /// One backend: its config when it is right, its resolved address and its name
    /// (for the checks across backends and listeners) when they are.
    fn backend(
        &mut self,
        prefix: &str,
        node: &Node,
    ) -> (
        Option<BackendConfig>,
        Option<At<SocketAddr>>,
        Option<At<String>>,
    ) {
        let Some(t) = self.table(
            node,
            prefix.trim_end_matches('.'),
            "[[listeners.backends]]",
            BACKEND_KEYS,
            prefix.to_string(),
        ) else {
            return (None, None, None);
        };
        let addr_text = if self.required(&t, "addr", "addr = \"127.0.0.1:3000\"") {
            self.string(&t, "addr", "127.0.0.1:3000")
        } else {
            Field::Wrong
        };
        let addr = match addr_text.given() {
            None => None,
            Some(text) => {
                match resolve(&text.value).and_then(|addr| reachable(&text.value, addr)) {
                    Ok(addr) => Some(At {
                        value: addr,
                        span: text.span.clone(),
                    }),
                    Err(why) => {
                        self.problem(text.span.clone(), format!("{}: {why}", t.what("addr")));
                        None
                    }
                }
            }
        };
        let name = match self.string(&t, "name", "app1") {
            Field::Absent => match addr_text.given() {
                Some(text) => Field::Given(text.clone()),
                None => Field::Wrong,
            },
            name => name,
        };
        let name = self.check(
            name,
            |name| {
                !name.is_empty()
                    && !name.chars().any(|c| {
                        matches!(c, '/' | '?' | '#' | '%') || c.is_whitespace() || c.is_control()
                    })
            },
            || {
                let name = match t.get("name").or(t.get("addr")).map(|n| &n.value) {
                    Some(Value::String(name)) => name.as_str(),
                    _ => "",
                };
                format!(
                    "{} {name:?} is invalid: it must be non-empty and contain no '/', '?', '#', '%' or spaces",
                    t.what("name")
                )
            },
        );
        let shown = name
            .given()
            .map_or_else(String::new, |n| format!("{:?} ", n.value));
        let mut weight_bounds = Bounds::new(
            1,
            MAX_WEIGHT,
            "shares follow weights; finer steps mean nothing",
            2,
        );
        weight_bounds.why_min =
            format!(" (to take backend {shown}out of service, set max_conns = 0 or drain it)");
        let weight = self.count(&t, "weight", &weight_bounds);
        let max_conns = self.count(&t, "max_conns", &Bounds::connections(0, 1000));

        let config = (|| {
            Some(BackendConfig {
                name: name.clone().or(String::new())?,
                addr_text: addr_text.clone().or(String::new())?,
                addr: addr.as_ref()?.value,
                weight: weight.or(DEFAULT_WEIGHT)? as u32,
                max_conns: max_conns.optional()?,
            })
        })();
        (config, addr, name.given().cloned())
    }

    /// Unique names, binds that do not clash, and no backend that is ballast itself.
    fn across_listeners(&mut self, listeners: &[ReadListener], admin: Option<SocketAddr>) {
        for (i, l) in listeners.iter().enumerate() {
            let earlier = &listeners[..i];
            if let Some(name) = &l.name {
                if earlier
                    .iter()
                    .any(|o| o.name.as_ref().is_some_and(|n| n.value == name.value))
                {
                    self.problem(
                        name.span.clone(),
                        format!("duplicate listener name {:?}", name.value),
                    );
                }
            }
            let label = l.name.as_ref().map_or_else(
                || format!("listeners[{i}]"),
                |n| format!("listener {:?}", n.value),
            );
            if let Some(bind) = &l.bind {
                let clash = earlier.iter().find(|o| {
                    o.bind
                        .as_ref()
                        .is_some_and(|b| binds_conflict(b.value, bind.value))
                });
                if let Some(other) = clash {
                    let other = other
                        .name
                        .as_ref()
                        .map_or_else(String::new, |n| format!(" {:?}", n.value));
                    self.problem(
                        bind.span.clone(),
                        format!(
                            "{label}: bind address {} is already used by listener{other}",
                            bind.value
                        ),
                    );
                } else if admin.is_some_and(|a| binds_conflict(a, bind.value)) {
                    self.problem(
                        bind.span.clone(),
                        format!(
                            "{label}: bind address {} is already used by [admin]",
                            bind.value
                        ),
                    );
                }
            }
            for (addr, what) in &l.backends {
                if admin.is_some_and(|a| lands_on(addr.value, a)) {
                    self.problem(
                        addr.span.clone(),
                        format!(
                            "{what} {} is this ballast's own admin endpoint ([admin] bind): clients of {label} would reach the admin API",
                            addr.value
                        ),
                    );
                }
                for (j, target) in listeners.iter().enumerate() {
                    if !target
                        .bind
                        .as_ref()
                        .is_some_and(|b| lands_on(addr.value, b.value))
                    {
                        continue;
                    }
                    if j == i {
                        self.problem(
                            addr.span.clone(),
                            format!(
                                "{what} {} is the bind address of {label} itself: each client would be sent back to it, again and again, until every file descriptor is used",
                                addr.value
                            ),
                        );
                    } else if leads_to(listeners, j, i) {
                        let other = target.name.as_ref().map_or_else(
                            || format!("listeners[{j}]"),
                            |n| format!("listener {:?}", n.value),
                        );
                        self.problem(
                            addr.span.clone(),
                            format!(
                                "{what} {} is the bind address of {other}, which sends clients back to {label}: each client would loop between them until every file descriptor is used",
                                addr.value
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// Whether listener `from` sends clients, through one or more listeners of this same
/// ballast, to listener `to`.
fn leads_to(listeners: &[ReadListener], from: usize, to: usize) -> bool {
    let mut seen = vec![false; listeners.len()];
    let mut stack = vec![from];
    while let Some(l) = stack.pop() {
        if l == to {
            return true;
        }
        if std::mem::replace(&mut seen[l], true) {
            continue;
        }
        for (addr, _) in &listeners[l].backends {
            for (next, target) in listeners.iter().enumerate() {
                if target
                    .bind
                    .as_ref()
                    .is_some_and(|b| lands_on(addr.value, b.value))
                {
                    stack.push(next);
                }
            }
        }
    }
    false
}

/// Whether a connection to `backend` arrives at a socket bound to `bind` on this
/// machine: the same address and port, or loopback to a wildcard bind. A bind to port 0
/// gets a free port of the kernel's choosing, so nothing lands on it by configuration.
/// (Another address of this machine on a wildcard bind cannot be told without listing
/// its interfaces; such a loop is not caught.)
fn lands_on(backend: SocketAddr, bind: SocketAddr) -> bool {
    let (ip, bind_ip) = (backend.ip().to_canonical(), bind.ip().to_canonical());
    bind.port() != 0
        && backend.port() == bind.port()
        && (ip == bind_ip
            || (bind_ip.is_unspecified() && ip.is_loopback() && ip.is_ipv4() == bind_ip.is_ipv4()))
}

/// Two listen addresses that the kernel would not let both bind. Port 0 (any free port)
/// never conflicts.
fn binds_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Resolves `host:port` (or `[v6]:port`) to one address, preferring IPv4.
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("invalid address {text:?}: expected host:port"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("invalid address {text:?}: expected host:port"));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// Refuses a backend address that no connection can reach.
fn reachable(text: &str, addr: SocketAddr) -> Result<SocketAddr, String> {
    let shown = if text.parse::<SocketAddr>().is_ok() {
        format!("{text:?}")
    } else {
        format!("{text:?} ({addr})")
    };
    let ip = addr.ip().to_canonical();
    let why = if addr.port() == 0 {
        "has port 0, which no connection can reach: give the backend's port".to_string()
    } else if ip.is_unspecified() {
        format!("is the \"any address\" {ip}, which only means something to bind: give the backend's own address (127.0.0.1 for this machine)")
    } else if ip.is_multicast() {
        "is a multicast address: a TCP backend needs a unicast address".to_string()
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        "is the broadcast address: a TCP backend needs a unicast address".to_string()
    } else {
        return Ok(addr);
    };
    Err(format!("{shown} {why}"))
}

/// The nearest of `known` to a misspelt `word`, if one is near enough to be meant.
fn nearest<'k>(word: &str, known: impl IntoIterator<Item = &'k str>) -> Option<&'k str> {
    let word = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(&word, k), k))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// The message for a key the schema does not have in `header`.
fn unknown_key(key: &str, header: &str, known: &[&str]) -> String {
    let place = if header.starts_with('[') {
        format!("in {header}")
    } else {
        "at the top level".to_string()
    };
    if let Some(near) = nearest(key, known.iter().copied()) {
        return format!("unknown key {key:?} {place}: did you mean {near:?}?");
    }
    let homes: Vec<&str> = TABLES
        .iter()
        .filter(|(_, keys)| keys.contains(&key))
        .map(|(table, _)| *table)
        .collect();
    if !homes.is_empty() {
        return format!(
            "unknown key {key:?} {place}: it belongs in {}",
            homes.join(" or ")
        );
    }
    format!(
        "unknown key {key:?} {place}; the keys here are {}",
        known.join(", ")
    )
}

/// The 1-based line and column (in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(d("1m30s"), Ok(Duration::from_secs(90)));
        for bad in [
            "",
            "2",
            "s",
            "2x",
            "-1s",
            "1.5s",
            "2 s",
            "ms",
            "9999999999999999h",
            "87601h",
        ] {
            assert!(d(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn port_zero_binds_never_conflict_but_wildcards_do() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(!binds_conflict(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(binds_conflict(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(!binds_conflict(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!binds_conflict(a("127.0.0.1:80"), a("[::1]:80")));
    }

    /// The problems of `text`, one line each.
    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, "x.toml") {
            Ok(_) => panic!("{text} should be refused"),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    /// A listener with one backend and `extra` lines in the backend's table.
    fn with_backend(extra: &str) -> String {
        format!("[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:3001\"\n{extra}")
    }

    #[test]
    fn semantic_errors_point_at_the_key_not_its_table() {
        let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:1\"\n  weight = 0\n";
        let err = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(err.starts_with("x.toml:7:12: "), "{err}");
        assert!(err.contains("weight must be at least 1"), "{err}");
    }

    #[test]
    fn every_mistake_of_a_file_is_reported_each_at_its_own_line() {
        let text = "[runtime]\nthreads = \"4\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstratgy = \"round_robin\"\nconnect_timeout = 2\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:3001\"\n  weight = \"2\"\n\n[[listeners]]\nname = \"api\"\nbind = \"127.0.0.1:0\"\nretries = -1\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:3002\"\n  wieght = 2\n";
        let lines = problems(text);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        let at: Vec<&str> = lines
            .iter()
            .map(|l| l.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            at,
            [
                "x.toml:2:11",
                "x.toml:7:1",
                "x.toml:8:19",
                "x.toml:12:12",
                "x.toml:17:11",
                "x.toml:21:3"
            ]
        );
        assert!(lines[1]
            .ends_with("unknown key \"stratgy\" in [[listeners]]: did you mean \"strategy\"?"));
        assert!(lines[5].contains(
            "unknown key \"wieght\" in [[listeners.backends]]: did you mean \"weight\"?"
        ));
    }

    #[test]
    fn type_mistakes_are_told_in_plain_words_with_an_example() {
        let cases = [
            (
                "  weight = \"2\"\n",
                "x.toml:7:12: listener \"web\": backends[0].weight must be a whole number >= 1, like weight = 2, not the string \"2\" (numbers go without quotes)",
            ),
            (
                "  weight = 1.5\n",
                "weight must be a whole number >= 1, like weight = 2, not the number 1.5",
            ),
            (
                "  max_conns = true\n",
                "max_conns must be a whole number >= 0, like max_conns = 1000, not the value true",
            ),
            (
                "  name = 7\n",
                "backends[0].name must be a string in quotes, like name = \"app1\", not the number 7",
            ),
            (
                "  weight = 1979-05-27\n",
                "weight must be a whole number >= 1, like weight = 2, not the date 1979-05-27",
            ),
        ];
        for (extra, expect) in cases {
            let lines = problems(&with_backend(extra));
            assert!(
                lines.len() == 1 && lines[0].contains(expect),
                "{extra}: {lines:#?}"
            );
        }
        let lines = problems("[[listeners]]\nname = \"web\"\nbind = 8080\nconnect_timeout = 2\nstrategy = 1\n[[listeners.backends]]\naddr = \"127.0.0.1:1\"\n");
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].contains("bind must be an address in quotes, like bind = \"0.0.0.0:8080\", not the number 8080"), "{lines:#?}");
        assert!(
            lines[1].contains("connect_timeout must be a duration in quotes, like \"2s\""),
            "{lines:#?}"
        );
        assert!(lines[2].contains("strategy must be one of \"round_robin\", \"weighted\", \"least_conn\", \"ip_hash\", like strategy = \"least_conn\", not the number 1"), "{lines:#?}");
    }

    #[test]
    fn a_misspelt_value_or_a_key_in_the_wrong_table_gets_a_hint() {
        let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least-conn\"\nweight = 2\n[[listeners.backends]]\naddr = \"127.0.0.1:1\"\n";
        let lines = problems(text);
        assert!(
            lines[0].ends_with(
                "strategy: unknown strategy \"least-conn\": did you mean \"least_conn\"?"
            ),
            "{lines:#?}"
        );
        assert!(
            lines[1].ends_with(
                "unknown key \"weight\" in [[listeners]]: it belongs in [[listeners.backends]]"
            ),
            "{lines:#?}"
        );
    }

    #[test]
    fn keys_in_dotted_and_inline_tables_are_pointed_at_too() {
        let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nhealth.rise = 0\nrebalance = { step_size = 0 }\n[[listeners.backends]]\naddr = \"127.0.0.1:1\"\n";
        let lines = problems(text);
        assert!(
            lines[0].starts_with("x.toml:4:15: listener \"web\": health.rise must be at least 1"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with(
                "x.toml:5:27: listener \"web\": rebalance.step_size must be at least 1"
            ),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_syntax_error_is_one_line_at_its_position() {
        let lines = problems("[[listeners]]\nname = \"web\nbind = \"127.0.0.1:0\"\n");
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].starts_with("x.toml:2:"), "{lines:#?}");
        assert!(lines[0].contains("TOML syntax error"), "{lines:#?}");
    }

    #[test]
    fn past_twenty_problems_the_rest_are_counted() {
        let mut text = String::from("[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n");
        for i in 0..25 {
            text.push_str(&format!(
                "  [[listeners.backends]]\n  addr = \"127.0.0.1:{}\"\n  weight = 0\n",
                i + 1
            ));
        }
        let lines = problems(&text);
        assert_eq!(lines.len(), 21, "{lines:#?}");
        assert_eq!(lines[20], "x.toml: and 5 more problems");
    }

    #[test]
    fn counts_are_bounded_by_what_the_machine_can_do_naming_the_key_and_the_rule() {
        let lines = problems(&format!(
            "[runtime]\nthreads = 100000\n{}",
            with_backend("")
        ));
        assert!(
            lines[0].starts_with(&format!(
                "x.toml:2:11: runtime.threads = 100000 is too large: at most {} (4 per CPU core, ",
                max_threads()
            )),
            "{lines:#?}"
        );
        let threads = format!(
            "[runtime]\nthreads = {}\n{}",
            max_threads(),
            with_backend("")
        );
        assert!(Config::parse(&threads, "x.toml").is_ok());

        let huge = "  weight = 1000001\n  max_conns = 100000000000\n";
        let lines = problems(&with_backend(huge));
        assert!(
            lines[0].contains("weight = 1000001 is too large: at most 1000000"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("max_conns = 100000000000 is too large: at most "),
            "{lines:#?}"
        );
        assert!(lines[1].contains("fs.nr_open"), "{lines:#?}");
        let lines = problems("[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nretries = 101\nhealth = { rise = 1001, fall = 4294967297 }\n[[listeners.backends]]\naddr = \"127.0.0.1:1\"\n");
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].contains("retries = 101 is too large: at most 100"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("health.rise = 1001 is too large: at most 1000"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains("health.fall = 4294967297 is too large"),
            "{lines:#?}"
        );
    }

    #[test]
    fn a_backend_nobody_can_reach_is_refused() {
        for (addr, why) in [
            ("127.0.0.1:0", "has port 0"),
            ("0.0.0.0:3000", "is the \"any address\" 0.0.0.0"),
            ("[::]:3000", "is the \"any address\" ::"),
            ("[::ffff:0.0.0.0]:3000", "is the \"any address\" 0.0.0.0"),
            ("224.0.0.1:3000", "is a multicast address"),
            ("[ff02::1]:3000", "is a multicast address"),
            ("255.255.255.255:3000", "is the broadcast address"),
        ] {
            let text = format!("[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n[[listeners.backends]]\naddr = \"{addr}\"\n");
            let lines = problems(&text);
            assert!(
                lines.len() == 1
                    && lines[0].starts_with("x.toml:5:8: listener \"web\": backends[0].addr: ")
                    && lines[0].contains(why),
                "{addr}: {lines:#?}"
            );
        }
    }

    #[test]
    fn a_backend_that_loops_back_into_ballast_is_refused() {
        let listener = |name: &str, bind: &str, backend: &str| {
            format!("[[listeners]]\nname = \"{name}\"\nbind = \"{bind}\"\n[[listeners.backends]]\naddr = \"{backend}\"\n")
        };
        // Its own bind, also through a wildcard bind.
        for (bind, backend) in [
            ("127.0.0.1:18080", "127.0.0.1:18080"),
            ("0.0.0.0:18080", "127.0.0.1:18080"),
            ("[::]:18080", "[::1]:18080"),
        ] {
            let lines = problems(&listener("web", bind, backend));
            assert!(
                lines.len() == 1
                    && lines[0].contains("is the bind address of listener \"web\" itself"),
                "{lines:#?}"
            );
            assert!(lines[0].starts_with("x.toml:5:8: "), "{lines:#?}");
        }
        // Two listeners that send to each other.
        let text = listener("a", "127.0.0.1:18080", "127.0.0.1:18081")
            + &listener("b", "127.0.0.1:18081", "127.0.0.1:18080");
        let lines = problems(&text);
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains(
                "is the bind address of listener \"b\", which sends clients back to listener \"a\""
            ),
            "{lines:#?}"
        );
        // The admin endpoint.
        let text = format!(
            "[admin]\nbind = \"127.0.0.1:19090\"\n{}",
            listener("web", "127.0.0.1:0", "127.0.0.1:19090")
        );
        let lines = problems(&text);
        assert!(
            lines.len() == 1 && lines[0].contains("is this ballast's own admin endpoint"),
            "{lines:#?}"
        );

        // A chain without a loop is fine, and nothing lands on a bind to port 0.
        let chain = listener("front", "127.0.0.1:18080", "127.0.0.1:18081")
            + &listener("back", "127.0.0.1:18081", "127.0.0.1:3000");
        assert!(Config::parse(&chain, "x.toml").is_ok());
        let free_port = listener("web", "127.0.0.1:0", "127.0.0.1:3000");
        assert!(Config::parse(&free_port, "x.toml").is_ok());
        let other_host = listener("web", "0.0.0.0:18080", "10.0.0.5:18080");
        assert!(Config::parse(&other_host, "x.toml").is_ok());
    }

    #[test]
    fn allowed_hosts_are_kept_and_each_entry_checked() {
        let ok = format!("[admin]\nbind = \"127.0.0.1:0\"\nallowed_hosts = [\"lb.internal\", \"LB.example.com\"]\n{}", with_backend(""));
        let config = Config::parse(&ok, "x.toml").unwrap();
        assert_eq!(
            config.admin.unwrap().allowed_hosts,
            ["lb.internal", "LB.example.com"]
        );

        let bad = format!("[admin]\nbind = \"127.0.0.1:0\"\nallowed_hosts = [\"\", \"a b\", \"lb:9090\", \"http://lb\", 5]\n{}", with_backend(""));
        let lines = problems(&bad);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines[0].starts_with("x.toml:3:18: admin.allowed_hosts[0] \"\" is empty"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("[1] \"a b\" contains a space"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains("[2] \"lb:9090\" has a port"),
            "{lines:#?}"
        );
        assert!(
            lines[3].contains("[3] \"http://lb\" is not a host name"),
            "{lines:#?}"
        );
        assert!(
            lines[4].contains("[4] must be a host name in quotes"),
            "{lines:#?}"
        );
        let lines = problems(&format!(
            "[admin]\nbind = \"127.0.0.1:0\"\nallowed_hosts = \"lb\"\n{}",
            with_backend("")
        ));
        assert!(lines[0].contains("allowed_hosts must be a list of host names in quotes, like allowed_hosts = [\"lb.internal\"]"), "{lines:#?}");
    }

    #[test]
    fn a_table_written_wrong_says_how_to_write_it() {
        let lines = problems("[listeners]\nname = \"web\"\n");
        assert!(
            lines[0].contains("listeners must be written [[listeners]] (two brackets)"),
            "{lines:#?}"
        );
        let lines = problems(&format!("admin = 5\n{}", with_backend("")));
        assert!(
            lines[0].starts_with(
                "x.toml:1:9: admin must be a table, written [admin], not the number 5"
            ),
            "{lines:#?}"
        );
        let lines = problems("[[listeners]]\nbind = \"127.0.0.1:0\"\n");
        assert_eq!(
            lines[0],
            "x.toml:1:1: listeners[0]: missing name, like name = \"web\""
        );
    }
}
