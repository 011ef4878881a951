//! Reading the tree against the schema of the user-facing contract: every table by hand,
//! every problem collected with its position, reading going on after each.
//!
//! A key reads as a [`Field`]: left out, given and right, or wrong (already reported). A
//! wrong value keeps the config from being built but not the other checks; a check that
//! needs a wrong value is skipped rather than guessed at, so one mistake is reported once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::tree::{Entry, Node, Span, Value};
use super::{
    cores, max_connections, max_threads, AcceptProxy, AdminConfig, AgentConfig, BackendConfig,
    ClientRules, ClusterConfig, Config, ConfigError, Discover, DiscoverConfig, HealthConfig,
    HealthKind, HumanDuration, ListenAddr, ListenerConfig, OutlierConfig, Problem, RebalanceConfig,
    RuntimeConfig, SendProxy, Strategy, DEFAULT_AGENT_INTERVAL, MAX_RETRIES, MAX_RISE_FALL,
    MAX_THREADS, MAX_UNIX_SOCKET_PATH, MAX_WEIGHT, THREADS_PER_CORE,
};

/// Parses `text` into the tree and reads it: the config, or every problem found.
pub(super) fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let mut reader = Reader {
        text,
        file,
        problems: Vec::new(),
    };
    let config = match super::tree::parse(text) {
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

// ---------------------------------------------------------------------------
// Defaults.

pub(super) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_UPGRADE_SOCK: &str = "/run/ballast/upgrade.sock";
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
const DEFAULT_CONSECUTIVE_FAILURES: u64 = 5;
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTED_PERCENT: u64 = 50;
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_PEER_TTL: Duration = Duration::from_secs(5);
/// Reporting more often than this would only load Redis.
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// Resolving more often than this would only load the DNS server.
const MIN_RESOLVE_INTERVAL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------
// The schema: the keys of each table.

const TOP_KEYS: &[&str] = &["admin", "runtime", "cluster", "listeners"];
const CLUSTER_KEYS: &[&str] = &["redis", "instance", "report_interval", "peer_ttl"];
const ADMIN_KEYS: &[&str] = &["bind", "token_file", "allowed_hosts"];
const RUNTIME_KEYS: &[&str] = &["threads", "shutdown_timeout", "upgrade_sock"];
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
    "outlier",
    "agent",
    "access_log",
    "accept_proxy",
    "trusted_proxies",
    "send_proxy",
    "max_conns_per_ip",
    "allow",
    "deny",
    "resolve_interval",
    "resolver",
    "backends",
];
const HEALTH_KEYS: &[&str] = &["kind", "path", "interval", "timeout", "rise", "fall"];
const REBALANCE_KEYS: &[&str] = &["interval", "precision", "step_size"];
const OUTLIER_KEYS: &[&str] = &[
    "consecutive_failures",
    "base_ejection",
    "max_ejection",
    "max_ejected_percent",
];
const BACKEND_KEYS: &[&str] = &[
    "name",
    "addr",
    "discover",
    "weight",
    "max_conns",
    "send_proxy",
    "agent_addr",
];
const AGENT_KEYS: &[&str] = &["port", "interval"];

/// Every table by how it is written, for "it belongs in ..." hints.
const TABLES: &[(&str, &[&str])] = &[
    ("the top level", TOP_KEYS),
    ("[admin]", ADMIN_KEYS),
    ("[runtime]", RUNTIME_KEYS),
    ("[cluster]", CLUSTER_KEYS),
    ("[[listeners]]", LISTENER_KEYS),
    ("[listeners.health]", HEALTH_KEYS),
    ("[listeners.rebalance]", REBALANCE_KEYS),
    ("[listeners.outlier]", OUTLIER_KEYS),
    ("[listeners.agent]", AGENT_KEYS),
    ("[[listeners.backends]]", BACKEND_KEYS),
];

// ---------------------------------------------------------------------------
// Reading.

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

    /// The value of a required key (a missing one is reported as such).
    fn value(self) -> Option<T> {
        match self {
            Field::Given(at) => Some(at.value),
            _ => None,
        }
    }

    /// The value, or `default()` when the key is left out; `None` when it is wrong.
    fn or_else(self, default: impl FnOnce() -> T) -> Option<T> {
        match self {
            Field::Absent => Some(default()),
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
                    // One problem, one line, whatever a message quotes.
                    message: message.replace('\n', " "),
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

    fn flag(&mut self, t: &Table, key: &str) -> Field<bool> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        if let Value::Boolean(b) = &node.value {
            return Field::Given(At {
                value: *b,
                span: node.span.clone(),
            });
        }
        let message = format!(
            "{} must be true or false, like {key} = true, not {}",
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
        let cluster = match top.get("cluster") {
            None => Some(None),
            Some(node) => self.cluster(node).map(Some),
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
            cluster: cluster?,
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
            bind: bind.value()?,
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

    /// The IPv4 network that an IPv4-mapped IPv6 network stands for; others as they are.
    fn ipv4_form(net: IpNet) -> IpNet {
        match net {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
                None => net,
            },
            net => net,
        }
    }

    /// A list of CIDRs (`"10.0.0.0/8"`; a bare address is one host).
    fn cidrs(&mut self, t: &Table, key: &str) -> Field<Vec<IpNet>> {
        let Some(node) = t.get(key) else {
            return Field::Absent;
        };
        let what = t.what(key);
        let Value::Array(items) = &node.value else {
            self.problem(
                node.span.clone(),
                format!(
                    "{what} must be a list of CIDRs in quotes, like {key} = [\"10.0.0.0/8\"], not {}",
                    node.describe()
                ),
            );
            return Field::Wrong;
        };
        let mut nets = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let net = match &item.value {
                Value::String(text) => text
                    .parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{what}[{i}] {text:?} is not a CIDR like \"10.0.0.0/8\" or an address like \"192.0.2.7\"")),
                _ => Err(format!(
                    "{what}[{i}] must be a CIDR in quotes, like \"10.0.0.0/8\", not {}",
                    item.describe()
                )),
            };
            match net {
                // An address inside the network (10.1.2.3/8) means the network; an
                // IPv4-mapped one (::ffff:10.0.0.0/104) the IPv4 network, as clients are
                // matched by their IPv4 form.
                Ok(net) => nets.push(Self::ipv4_form(net.trunc())),
                Err(message) => {
                    self.problem(item.span.clone(), message);
                    ok = false;
                }
            }
        }
        if !ok {
            return Field::Wrong;
        }
        Field::Given(At {
            value: nets,
            span: node.span.clone(),
        })
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
        let upgrade_sock = self.upgrade_sock(&t);
        Some(RuntimeConfig {
            threads: threads.or(0)? as usize,
            shutdown_timeout: shutdown_timeout.or(DEFAULT_SHUTDOWN_TIMEOUT)?,
            upgrade_sock: upgrade_sock.or(PathBuf::from(DEFAULT_UPGRADE_SOCK))?,
        })
    }

    /// `[cluster]`: a Redis URL the `redis` crate accepts, and a `peer_ttl` longer than
    /// `report_interval` (else peers' reports would expire between two of them).
    fn cluster(&mut self, node: &Node) -> Option<ClusterConfig> {
        let t = self.table(
            node,
            "cluster",
            "[cluster]",
            CLUSTER_KEYS,
            "cluster.".into(),
        )?;
        let redis = if self.required(&t, "redis", "redis = \"redis://127.0.0.1:6379/0\"") {
            self.string(&t, "redis", "redis://127.0.0.1:6379/0")
        } else {
            Field::Wrong
        };
        let redis = match redis {
            Field::Given(url) => match redis::Client::open(url.value.as_str()) {
                Ok(_) => Field::Given(url),
                Err(e) => {
                    self.problem(
                        url.span,
                        format!(
                            "{} is not a Redis URL ({e}), like \"redis://127.0.0.1:6379/0\"",
                            t.what("redis")
                        ),
                    );
                    Field::Wrong
                }
            },
            other => other,
        };
        let instance = self.string(&t, "instance", "edge-1");
        let instance = self.check(
            instance,
            |name| !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c.is_control()),
            || format!("{} must be non-empty, with no spaces", t.what("instance")),
        );
        let report_interval = self.duration(&t, "report_interval", "1s");
        let report_interval = self.check(
            report_interval,
            |d| *d >= MIN_REPORT_INTERVAL,
            || {
                format!(
                    "{} must be at least {MIN_REPORT_INTERVAL:?}: each report is a round trip to Redis",
                    t.what("report_interval")
                )
            },
        );
        let peer_ttl = self.duration(&t, "peer_ttl", "5s");
        let every = report_interval.clone().or(DEFAULT_REPORT_INTERVAL);
        let peer_ttl = match (peer_ttl, every) {
            (Field::Given(ttl), Some(every)) if ttl.value < every * 3 => {
                self.problem(
                    ttl.span,
                    format!(
                        "{} must be at least 3 x report_interval ({:?}): a live peer's report is up to one interval old, and a dead one's must be gone within peer_ttl",
                        t.what("peer_ttl"),
                        every * 3
                    ),
                );
                Field::Wrong
            }
            (Field::Absent, Some(every)) if every * 3 > DEFAULT_PEER_TTL => {
                // The default follows a long report interval.
                Field::Given(At {
                    value: every * 3,
                    span: t.span.clone(),
                })
            }
            (ttl, _) => ttl,
        };
        Some(ClusterConfig {
            redis: redis.value()?,
            instance: instance.or_else(default_instance)?,
            report_interval: report_interval.or(DEFAULT_REPORT_INTERVAL)?,
            peer_ttl: peer_ttl.or(DEFAULT_PEER_TTL)?,
        })
    }

    /// `runtime.upgrade_sock`: a path a Unix socket can be bound at, a relative one taken
    /// from the config file's folder (as `admin.token_file`), so that the old and the new
    /// process find the same socket whatever their working directories.
    fn upgrade_sock(&mut self, t: &Table) -> Field<PathBuf> {
        let field = match self.string(t, "upgrade_sock", DEFAULT_UPGRADE_SOCK) {
            Field::Given(at) => Field::Given(At {
                value: match Path::new(self.file).parent() {
                    // The folder made absolute too: a config named by a relative path
                    // (`--config conf/ballast.toml`) must not leave the socket relative to
                    // the working directory.
                    Some(dir) if Path::new(&at.value).is_relative() => {
                        std::path::absolute(dir.join(&at.value))
                            .unwrap_or_else(|_| dir.join(&at.value))
                    }
                    _ => PathBuf::from(&at.value),
                },
                span: at.span,
            }),
            Field::Absent => Field::Absent,
            Field::Wrong => Field::Wrong,
        };
        let field = self.check(
            field,
            |p| !p.as_os_str().is_empty() && p.file_name().is_some(),
            || "runtime.upgrade_sock must name a file, like upgrade_sock = \"/run/ballast/upgrade.sock\"".into(),
        );
        let field = self.check(
            field,
            |p| p.to_str().is_some_and(|p| !p.contains('\0')),
            || "runtime.upgrade_sock must be a path in UTF-8 without NUL characters".into(),
        );
        let shown = field
            .given()
            .map(|at| (at.value.display().to_string(), at.value.as_os_str().len()));
        self.check(
            field,
            |p| p.as_os_str().len() <= MAX_UNIX_SOCKET_PATH,
            || {
                let (path, long) = shown.unwrap_or_default();
                format!(
                    "runtime.upgrade_sock: {path} is {long} bytes long; a Unix socket path holds at most {MAX_UNIX_SOCKET_PATH}"
                )
            },
        )
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
        let access_log = self.flag(&t, "access_log");
        let accept_proxy = self.choice(
            &t,
            "accept_proxy",
            "PROXY protocol version",
            &AcceptProxy::NAMES,
        );
        let trusted_proxies = self.cidrs(&t, "trusted_proxies");
        let accept_proxy = match (accept_proxy, trusted_proxies) {
            (Field::Given(version), Field::Given(trusted)) if !trusted.value.is_empty() => {
                Field::Given(At {
                    value: Some((version.value, trusted.value)),
                    span: version.span,
                })
            }
            (Field::Given(_), Field::Given(trusted)) => {
                self.problem(
                    trusted.span,
                    format!(
                        "{} is empty: list the upstream balancers whose headers are believed, like trusted_proxies = [\"10.0.0.0/8\"]",
                        t.what("trusted_proxies")
                    ),
                );
                Field::Wrong
            }
            (Field::Given(version), Field::Absent) => {
                self.problem(
                    version.span,
                    format!(
                        "{} needs trusted_proxies, the upstream balancers whose headers are believed, like trusted_proxies = [\"10.0.0.0/8\"]",
                        t.what("accept_proxy")
                    ),
                );
                Field::Wrong
            }
            (Field::Absent, Field::Given(trusted)) => {
                self.problem(
                    trusted.span,
                    format!(
                        "{} is read only with accept_proxy = \"v1\", \"v2\" or \"any\"",
                        t.what("trusted_proxies")
                    ),
                );
                Field::Wrong
            }
            (Field::Absent, Field::Absent) => Field::Given(At {
                value: None,
                span: t.span.clone(),
            }),
            _ => Field::Wrong,
        };
        let send_proxy = self.choice(
            &t,
            "send_proxy",
            "PROXY protocol version",
            &SendProxy::NAMES,
        );
        let max_conns_per_ip = self.count(&t, "max_conns_per_ip", &Bounds::connections(1, 100));
        let allow = match self.cidrs(&t, "allow") {
            Field::Given(at) if at.value.is_empty() => {
                self.problem(
                    at.span,
                    format!(
                        "{} is empty, which would refuse every client: leave it out to allow all, or list the CIDRs allowed",
                        t.what("allow")
                    ),
                );
                Field::Wrong
            }
            allow => allow,
        };
        let deny = self.cidrs(&t, "deny");
        let resolve_interval = self.duration(&t, "resolve_interval", "5s");
        let resolve_interval = self.check(
            resolve_interval,
            |d| *d >= MIN_RESOLVE_INTERVAL,
            || {
                format!(
                    "{} must be at least {MIN_RESOLVE_INTERVAL:?}: each pass asks the DNS server again",
                    t.what("resolve_interval")
                )
            },
        );
        let resolver = match self.string(&t, "resolver", "127.0.0.1:53") {
            Field::Given(text) => match text.value.parse::<SocketAddr>() {
                Ok(addr) => Field::Given(At {
                    value: addr,
                    span: text.span,
                }),
                Err(_) => {
                    self.problem(
                        text.span,
                        format!(
                            "{} must be a DNS server's IP address and port, like \"127.0.0.1:53\", not {:?}",
                            t.what("resolver"),
                            text.value
                        ),
                    );
                    Field::Wrong
                }
            },
            Field::Absent => Field::Absent,
            Field::Wrong => Field::Wrong,
        };
        let health = match t.get("health") {
            None => Some(None),
            Some(node) => self.health(&t.prefix, node).map(Some),
        };
        let rebalance = match t.get("rebalance") {
            None => Some(None),
            Some(node) => self.rebalance(&t.prefix, node, strategy.given()).map(Some),
        };

        let outlier = match t.get("outlier") {
            None => Some(None),
            Some(node) => self.outlier(&t.prefix, node).map(Some),
        };
        let agent = match t.get("agent") {
            None => Some(None),
            Some(node) => self.agent(&t.prefix, node).map(Some),
        };

        let mut backends = Vec::new();
        let mut discover = Vec::new();
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
                    "{}: a listener needs at least one [[listeners.backends]] (with addr or discover)",
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
            match backend {
                None => backends.push(None),
                Some(ReadBackend::Addr(b)) => backends.push(Some(b)),
                Some(ReadBackend::Discover(d)) => discover.push(d),
            }
        }

        if let (Some(Some(AgentConfig { port: None, .. })), Some(node)) = (&agent, t.get("agent")) {
            // Backends without an agent are fine beside ones with one; a table that
            // reaches no agent at all is a mistake.
            if backends.iter().flatten().all(|b| b.agent_addr.is_none()) {
                self.problem(
                    node.span.clone(),
                    format!(
                        "{} asks no backend: give its port, or agent_addr to the backends that have an agent",
                        t.what("agent")
                    ),
                );
            }
        }
        read.config = (|| {
            Some(ListenerConfig {
                name: name.value()?,
                bind: bind.value()?,
                strategy: strategy.or(Strategy::default())?,
                max_conns: max_conns.optional()?,
                connect_timeout: connect_timeout.or(DEFAULT_CONNECT_TIMEOUT)?,
                idle_timeout: idle_timeout.optional()?,
                drain_timeout: drain_timeout.or(DEFAULT_DRAIN_TIMEOUT)?,
                retries: retries.or(DEFAULT_RETRIES)? as u32,
                slow_start: slow_start.optional()?.filter(|d| !d.is_zero()),
                health: health?,
                rebalance: rebalance?,
                outlier: outlier?,
                agent: agent?,
                access_log: access_log.or(false)?,
                accept_proxy: accept_proxy.value()?,
                send_proxy: send_proxy.optional()?,
                max_conns_per_ip: max_conns_per_ip.optional()?,
                clients: ClientRules {
                    allow: allow.or(Vec::new())?,
                    deny: deny.or(Vec::new())?,
                },
                backends: backends.into_iter().collect::<Option<Vec<_>>>()?,
                discover,
                resolve_interval: resolve_interval.or(DEFAULT_RESOLVE_INTERVAL)?,
                resolver: resolver.optional()?,
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

    fn agent(&mut self, prefix: &str, node: &Node) -> Option<AgentConfig> {
        let t = self.table(
            node,
            &format!("{prefix}agent"),
            "[listeners.agent]",
            AGENT_KEYS,
            format!("{prefix}agent."),
        )?;
        let port = self.count(
            &t,
            "port",
            &Bounds::new(1, u64::from(u16::MAX), "it is a TCP port", 9999),
        );
        let interval = self.duration(&t, "interval", "2s");
        let interval = self.check(
            interval,
            |d| !d.is_zero(),
            || format!("{} must be more than 0", t.what("interval")),
        );
        Some(AgentConfig {
            port: port.optional()?.map(|p| p as u16),
            interval: interval.or(DEFAULT_AGENT_INTERVAL)?,
        })
    }

    fn outlier(&mut self, prefix: &str, node: &Node) -> Option<OutlierConfig> {
        let t = self.table(
            node,
            &format!("{prefix}outlier"),
            "[listeners.outlier]",
            OUTLIER_KEYS,
            format!("{prefix}outlier."),
        )?;
        let failures = self.count(
            &t,
            "consecutive_failures",
            &Bounds::new(
                1,
                MAX_RISE_FALL,
                "a backend failing that often is long known to be failing",
                DEFAULT_CONSECUTIVE_FAILURES,
            ),
        );
        let base = self.duration(&t, "base_ejection", "30s");
        let base = self.check(
            base,
            |d| !d.is_zero(),
            || format!("{} must be more than 0", t.what("base_ejection")),
        );
        let max = self.duration(&t, "max_ejection", "5m");
        let percent = self.count(
            &t,
            "max_ejected_percent",
            &Bounds::new(
                1,
                100,
                "it is a percentage of the backends",
                DEFAULT_MAX_EJECTED_PERCENT,
            ),
        );
        let base_value = base.clone().or(DEFAULT_BASE_EJECTION);
        let max = match (max, base_value) {
            (Field::Given(at), Some(base)) if at.value < base => {
                self.problem(
                    at.span,
                    format!(
                        "{} must be at least base_ejection ({base:?})",
                        t.what("max_ejection"),
                    ),
                );
                Field::Wrong
            }
            (max, _) => max,
        };
        Some(OutlierConfig {
            consecutive_failures: failures.or(DEFAULT_CONSECUTIVE_FAILURES)? as u32,
            base_ejection: base.or(DEFAULT_BASE_EJECTION)?,
            max_ejection: max.or(DEFAULT_MAX_EJECTION.max(base_value?))?,
            max_ejected_percent: percent.or(DEFAULT_MAX_EJECTED_PERCENT)? as u32,
        })
    }

    /// One backend entry: its config when it is right, its resolved address and its
    /// name (for the checks across backends and listeners) when they are.
    fn backend(
        &mut self,
        prefix: &str,
        node: &Node,
    ) -> (
        Option<ReadBackend>,
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
        let discover = match self.string(&t, "discover", "dns:app.internal:3000") {
            Field::Given(text) => match parse_discover(&text.value) {
                Ok(target) => Field::Given(At {
                    value: target,
                    span: text.span,
                }),
                Err(why) => {
                    self.problem(text.span, format!("{}: {why}", t.what("discover")));
                    Field::Wrong
                }
            },
            Field::Absent => Field::Absent,
            Field::Wrong => Field::Wrong,
        };
        let discovers = !matches!(discover, Field::Absent);
        for key in ["addr", "agent_addr"].into_iter().filter(|_| discovers) {
            if let Some(node) = t.get(key) {
                let instead = match key {
                    "addr" => "give one of addr and discover",
                    _ => "each address found is asked on [listeners.agent] port",
                };
                self.problem(
                    node.span.clone(),
                    format!("{} cannot be set with discover: {instead}", t.what(key)),
                );
            }
        }
        let addr_text = if discovers {
            Field::Absent
        } else if self.required(
            &t,
            "addr",
            "addr = \"127.0.0.1:3000\" (or discover = \"dns:app.internal:3000\")",
        ) {
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
            Field::Absent => match (addr_text.given(), discover.given()) {
                (Some(text), _) => Field::Given(text.clone()),
                (None, Some(target)) => Field::Given(At {
                    value: match &target.value {
                        Discover::Dns { host, .. } => host.clone(),
                        Discover::Srv { name } => name.clone(),
                    },
                    span: target.span.clone(),
                }),
                (None, None) => Field::Wrong,
            },
            name => name,
        };
        let name = self.check(
            name,
            |name| {
                !name.is_empty()
                    && !name.chars().any(|c| {
                        // '@' is kept for backends found by discover (name@address).
                        matches!(c, '/' | '?' | '#' | '%' | '@') || c.is_whitespace() || c.is_control()
                    })
            },
            || {
                let name = match t.get("name").or(t.get("addr")).map(|n| &n.value) {
                    Some(Value::String(name)) => name.as_str(),
                    _ => "",
                };
                format!(
                    "{} {name:?} is invalid: it must be non-empty and contain no '/', '?', '#', '%', '@' (kept for discovered backends) or spaces",
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
        let send_proxy = self.choice(
            &t,
            "send_proxy",
            "PROXY protocol version",
            &SendProxy::NAMES,
        );
        let agent_addr = match self.string(&t, "agent_addr", "127.0.0.1:9999") {
            Field::Given(text) => match resolve(&text.value) {
                Ok(addr) => Field::Given(At {
                    value: addr,
                    span: text.span,
                }),
                Err(why) => {
                    self.problem(text.span, format!("{}: {why}", t.what("agent_addr")));
                    Field::Wrong
                }
            },
            Field::Absent => Field::Absent,
            Field::Wrong => Field::Wrong,
        };

        let config = (|| {
            let name = name.clone().or(String::new())?;
            let weight = weight.or(DEFAULT_WEIGHT)? as u32;
            let (max_conns, send_proxy) = (max_conns.optional()?, send_proxy.optional()?);
            if discovers {
                return Some(ReadBackend::Discover(DiscoverConfig {
                    name,
                    target: discover.value()?,
                    weight,
                    max_conns,
                    send_proxy,
                }));
            }
            Some(ReadBackend::Addr(BackendConfig {
                name,
                addr_text: addr_text.clone().value()?,
                addr: addr.as_ref()?.value,
                weight,
                max_conns,
                send_proxy,
                agent_addr: agent_addr.optional()?,
            }))
        })();
        (config, addr, name.given().cloned())
    }

    /// Unique names, binds that do not clash, and no backend that is ballast itself.
    ///
    /// Each check looks up what it needs in an index built once, so a file of many
    /// listeners and backends is checked in time near its size: reload runs this too.
    fn across_listeners(&mut self, listeners: &[ReadListener], admin: Option<SocketAddr>) {
        let mut names = HashSet::new();
        let mut binds = FirstBinds::default();
        // Listener -> for each of its backends, the listeners it lands on.
        let lands: Vec<Vec<Vec<usize>>> = {
            let on = Landings::new(listeners);
            listeners
                .iter()
                .map(|l| l.backends.iter().map(|(a, _)| on.of(a.value)).collect())
                .collect()
        };
        let edges: Vec<Vec<usize>> = lands.iter().map(|b| b.concat()).collect();
        let component = components(&edges);
        let name_of = |i: usize| {
            listeners[i].name.as_ref().map_or_else(
                || format!("listeners[{i}]"),
                |n| format!("listener {:?}", n.value),
            )
        };
        for (i, l) in listeners.iter().enumerate() {
            if let Some(name) = &l.name {
                if !names.insert(name.value.as_str()) {
                    self.problem(
                        name.span.clone(),
                        format!("duplicate listener name {:?}", name.value),
                    );
                }
            }
            let label = name_of(i);
            if let Some(bind) = &l.bind {
                if let Some(other) = binds.clash(bind.value) {
                    let other = listeners[other]
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
                binds.add(bind.value, i);
            }
            for ((addr, what), targets) in l.backends.iter().zip(&lands[i]) {
                if admin.is_some_and(|a| lands_on(addr.value, a)) {
                    self.problem(
                        addr.span.clone(),
                        format!(
                            "{what} {} is this ballast's own admin endpoint ([admin] bind): clients of {label} would reach the admin API",
                            addr.value
                        ),
                    );
                }
                for &j in targets {
                    if j == i {
                        self.problem(
                            addr.span.clone(),
                            format!(
                                "{what} {} is the bind address of {label} itself: each client would be sent back to it, again and again, until every file descriptor is used",
                                addr.value
                            ),
                        );
                    } else if component[j] == component[i] {
                        // `i` sends to `j`; in one component, `j` leads back to `i`.
                        self.problem(
                            addr.span.clone(),
                            format!(
                                "{what} {} is the bind address of {}, which sends clients back to {label}: each client would loop between them until every file descriptor is used",
                                addr.value,
                                name_of(j)
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// The first listener bound where a new bind would clash, as [`binds_conflict`] tells,
/// found without comparing against every earlier bind.
#[derive(Default)]
struct FirstBinds {
    /// By address and port.
    exact: HashMap<(IpAddr, u16), usize>,
    /// By port and whether IPv4: the first bind of any address, and of the any address.
    any: HashMap<(u16, bool), usize>,
    wildcard: HashMap<(u16, bool), usize>,
}

impl FirstBinds {
    /// The first listener added whose bind clashes with `bind`.
    fn clash(&self, bind: SocketAddr) -> Option<usize> {
        let family = (bind.port(), bind.is_ipv4());
        if bind.port() == 0 {
            None
        } else if bind.ip().is_unspecified() {
            self.any.get(&family).copied()
        } else {
            let exact = self.exact.get(&(bind.ip(), bind.port())).copied();
            let wildcard = self.wildcard.get(&family).copied();
            exact.into_iter().chain(wildcard).min()
        }
    }

    fn add(&mut self, bind: SocketAddr, listener: usize) {
        if bind.port() == 0 {
            return;
        }
        let family = (bind.port(), bind.is_ipv4());
        self.exact
            .entry((bind.ip(), bind.port()))
            .or_insert(listener);
        self.any.entry(family).or_insert(listener);
        if bind.ip().is_unspecified() {
            self.wildcard.entry(family).or_insert(listener);
        }
    }
}

/// The listeners a backend address lands on, as [`lands_on`] tells, looked up by
/// address rather than tried one by one.
struct Landings {
    /// Listeners by their bind's (canonical) address and port, in file order; port 0
    /// binds are left out, as nothing lands on them.
    by_bind: HashMap<(IpAddr, u16), Vec<usize>>,
}

impl Landings {
    fn new(listeners: &[ReadListener]) -> Landings {
        let mut by_bind: HashMap<(IpAddr, u16), Vec<usize>> = HashMap::new();
        for (i, l) in listeners.iter().enumerate() {
            if let Some(bind) = l.bind.as_ref().filter(|b| b.value.port() != 0) {
                let key = (bind.value.ip().to_canonical(), bind.value.port());
                by_bind.entry(key).or_default().push(i);
            }
        }
        Landings { by_bind }
    }

    /// The listeners `backend` lands on, in file order.
    fn of(&self, backend: SocketAddr) -> Vec<usize> {
        let ip = backend.ip().to_canonical();
        let mut on = self.lookup(ip, backend.port()).to_vec();
        if ip.is_loopback() {
            // Loopback also reaches a wildcard bind of its family.
            let any = if ip.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            };
            on.extend_from_slice(self.lookup(any, backend.port()));
            on.sort_unstable();
        }
        on
    }

    fn lookup(&self, ip: IpAddr, port: u16) -> &[usize] {
        self.by_bind.get(&(ip, port)).map_or(&[], Vec::as_slice)
    }
}

/// The strongly connected component of each listener in the graph `edges` (listener ->
/// the listeners its backends land on): two listeners share one exactly when each leads
/// to the other. Tarjan's algorithm in time linear in listeners and edges, with its own
/// stack so that a long chain of listeners cannot overflow the thread's.
fn components(edges: &[Vec<usize>]) -> Vec<usize> {
    const UNSEEN: usize = usize::MAX;
    let n = edges.len();
    // The order each listener was reached in, and the earliest one it reaches back to.
    let (mut order, mut low) = (vec![UNSEEN; n], vec![0; n]);
    let mut component = vec![UNSEEN; n];
    // Listeners reached whose component is not yet known, in the order reached.
    let (mut open, mut is_open) = (Vec::new(), vec![false; n]);
    // The path being walked: each listener and the position of its next edge.
    let mut path: Vec<(usize, usize)> = Vec::new();
    let (mut reached, mut found) = (0, 0);
    for root in 0..n {
        if order[root] != UNSEEN {
            continue;
        }
        let mut next = Some(root);
        loop {
            if let Some(v) = next.take() {
                order[v] = reached;
                low[v] = reached;
                reached += 1;
                open.push(v);
                is_open[v] = true;
                path.push((v, 0));
            }
            let Some(top) = path.last_mut() else { break };
            let v = top.0;
            if let Some(&w) = edges[v].get(top.1) {
                top.1 += 1;
                if order[w] == UNSEEN {
                    next = Some(w);
                } else if is_open[w] {
                    low[v] = low[v].min(order[w]);
                }
                continue;
            }
            path.pop();
            if let Some(&(parent, _)) = path.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == order[v] {
                // `v` is the first reached of its component: close it.
                while let Some(w) = open.pop() {
                    is_open[w] = false;
                    component[w] = found;
                    if w == v {
                        break;
                    }
                }
                found += 1;
            }
        }
    }
    component
}

/// Whether a connection to `backend` arrives at a socket bound to `bind` on this
/// machine: the same address and port, or loopback to a wildcard bind. A bind to port 0
/// gets a free port of the kernel's choosing, so nothing lands on it by configuration.
/// (Another address of this machine on a wildcard bind cannot be told without listing
/// its interfaces; such a loop is not caught.)
pub(super) fn lands_on(backend: SocketAddr, bind: SocketAddr) -> bool {
    let (ip, bind_ip) = (backend.ip().to_canonical(), bind.ip().to_canonical());
    bind.port() != 0
        && backend.port() == bind.port()
        && (ip == bind_ip
            || (bind_ip.is_unspecified() && ip.is_loopback() && ip.is_ipv4() == bind_ip.is_ipv4()))
}

/// Two listen addresses that the kernel would not let both bind. Port 0 (any free port)
/// never conflicts.
pub(super) fn binds_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A backend entry as read: with an address, or with `discover`.
enum ReadBackend {
    Addr(BackendConfig),
    Discover(DiscoverConfig),
}

/// `dns:HOST:PORT` or `srv:NAME`.
fn parse_discover(text: &str) -> Result<Discover, String> {
    let like = "like \"dns:app.internal:3000\" or \"srv:_app._tcp.internal\"";
    let valid_name = |name: &str| {
        !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    if let Some(rest) = text.strip_prefix("dns:") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} needs a port after the host name, {like}"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?}: invalid port {port:?}, {like}"))?;
        if !valid_name(host) {
            return Err(format!("{text:?}: invalid host name {host:?}, {like}"));
        }
        return Ok(Discover::Dns {
            host: host.to_string(),
            port,
        });
    }
    if let Some(name) = text.strip_prefix("srv:") {
        if !valid_name(name) {
            return Err(format!("{text:?}: invalid SRV name {name:?}, {like}"));
        }
        return Ok(Discover::Srv {
            name: name.to_string(),
        });
    }
    Err(format!("{text:?} is neither dns: nor srv:, {like}"))
}

/// This instance's default name among its peers: the host name and the pid.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = match host.trim() {
        "" => "ballast",
        host => host,
    };
    format!("{host}-{}", std::process::id())
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
pub(super) fn reachable(text: &str, addr: SocketAddr) -> Result<SocketAddr, String> {
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
    use super::{
        binds_conflict, components, lands_on, At, FirstBinds, Landings, ReadListener, SocketAddr,
    };
    use proptest::prelude::*;

    /// Whether `to` can be reached from `from`, one listener at a time.
    fn reaches(edges: &[Vec<usize>], from: usize, to: usize) -> bool {
        let mut seen = vec![false; edges.len()];
        let mut stack = vec![from];
        while let Some(v) = stack.pop() {
            if v == to {
                return true;
            }
            if !std::mem::replace(&mut seen[v], true) {
                stack.extend(&edges[v]);
            }
        }
        false
    }

    /// A few addresses that land on and clash with each other in every way: one port
    /// and another, port 0, loopback and other hosts, wildcards, IPv4-mapped IPv6.
    fn addr() -> impl Strategy<Value = SocketAddr> {
        let ips = [
            "127.0.0.1",
            "127.0.0.2",
            "10.0.0.5",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
        ];
        (
            prop::sample::select(ips.to_vec()),
            prop::sample::select(vec![0u16, 80, 81]),
        )
            .prop_map(|(ip, port)| SocketAddr::new(ip.parse().unwrap(), port))
    }

    fn read_listener(bind: Option<SocketAddr>, backends: &[SocketAddr]) -> ReadListener {
        let at = |value| At { value, span: 0..0 };
        ReadListener {
            config: None,
            name: None,
            bind: bind.map(at),
            backends: backends.iter().map(|&a| (at(a), String::new())).collect(),
        }
    }

    proptest! {
        #[test]
        fn listeners_share_a_component_exactly_when_each_leads_to_the_other(
            edges in prop::collection::vec(prop::collection::vec(0..8usize, 0..4), 8)
        ) {
            let component = components(&edges);
            for a in 0..edges.len() {
                for b in 0..edges.len() {
                    prop_assert_eq!(
                        component[a] == component[b],
                        reaches(&edges, a, b) && reaches(&edges, b, a),
                        "{} and {}", a, b
                    );
                }
            }
        }

        #[test]
        fn indexed_lookups_agree_with_comparing_every_pair(
            binds in prop::collection::vec(prop::option::of(addr()), 0..8),
            backend in addr(),
        ) {
            let listeners: Vec<ReadListener> =
                binds.iter().map(|&b| read_listener(b, &[])).collect();
            let on = Landings::new(&listeners);
            let expected: Vec<usize> = (0..binds.len())
                .filter(|&i| binds[i].is_some_and(|b| lands_on(backend, b)))
                .collect();
            prop_assert_eq!(on.of(backend), expected);

            let mut first = FirstBinds::default();
            for (i, bind) in binds.iter().enumerate() {
                let Some(bind) = *bind else { continue };
                let expected = (0..i).find(|&o| binds[o].is_some_and(|b| binds_conflict(b, bind)));
                prop_assert_eq!(first.clash(bind), expected, "{}", bind);
                first.add(bind, i);
            }
        }
    }
}
