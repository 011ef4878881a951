//! The config file, from text to a validated [`Config`].
//!
//! The pipeline is `text -> tree -> read -> Config`:
//!
//! 1. [`tree`]: the TOML parser turns the text into a tree in which every key and every
//!    value keeps its position (a syntax error stops here: the parser cannot go on);
//! 2. [`read`]: each table is read by hand against the schema of the user-facing
//!    contract: unknown keys (with the nearest known key as a hint), wrong types (in plain
//!    words, with an example), values out of range, what holds within one listener (a
//!    health timeout no longer than its interval, unique backend names, backends that can
//!    be reached), then what holds across listeners (unique names, binds that do not
//!    clash, no backend that loops back into ballast).
//!
//! Reading goes on after a problem, so one `ballast check` lists every problem of the
//! file, each as `FILE:LINE:COL: message` at the key's or the value's own position. Both
//! `ballast check` and every (re)load go through [`Config::load`] or [`Config::parse`], so
//! `check` says exactly what `run` and a reload would.
//!
//! Counts are bounded by what a machine can do (this module's constants and
//! [`max_threads`]), so that a typo such as `threads = 100000` is refused by `check`
//! instead of exhausting the process when it starts.

mod read;
mod tree;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

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
    // Read once: a config may bound thousands of backends with it.
    static NR_OPEN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nr_open = NR_OPEN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
    });
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// Which PROXY protocol header a listener reads from its upstream balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceptProxy {
    V1,
    V2,
    /// Either, told apart by the first bytes.
    #[default]
    Any,
}

impl AcceptProxy {
    const NAMES: [(&'static str, AcceptProxy); 3] = [
        ("v1", AcceptProxy::V1),
        ("v2", AcceptProxy::V2),
        ("any", AcceptProxy::Any),
    ];
}

/// Which PROXY protocol header ballast writes to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendProxy {
    /// Text: `PROXY TCP4 ...\r\n`.
    V1,
    /// Binary.
    #[default]
    V2,
}

impl SendProxy {
    const NAMES: [(&'static str, SendProxy); 2] = [("v1", SendProxy::V1), ("v2", SendProxy::V2)];
}

/// Who may connect to a listener, by the client's real address: `deny` wins over
/// `allow`; an empty `allow` allows everyone not denied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientRules {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl ClientRules {
    pub fn permits(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        !self.deny.iter().any(|net| net.contains(&client))
            && (self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&client)))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `None` when the file has no `[admin]` table: no admin endpoint is served.
    pub admin: Option<AdminConfig>,
    pub runtime: RuntimeConfig,
    /// `[cluster]`: live counts shared with other instances through Redis.
    pub cluster: Option<ClusterConfig>,
    pub listeners: Vec<ListenerConfig>,
}

/// `[cluster]`: every `report_interval` this instance writes its live count per
/// (listener, backend) to Redis under its own key, which expires after `peer_ttl`, and
/// reads its peers' reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The Redis URL, as the `redis` crate reads it (`redis://`, `rediss://`, user and
    /// password, database number).
    pub redis: String,
    /// This instance's name among its peers (default: host name and pid).
    pub instance: String,
    pub report_interval: Duration,
    pub peer_ttl: Duration,
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
    /// The Unix socket on which `ballast run --upgrade` waits for the listening sockets
    /// of the running process (a relative path is taken from the config file's folder,
    /// so that the old and the new process agree whatever their working directories).
    pub upgrade_sock: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            threads: 0,
            shutdown_timeout: read::DEFAULT_SHUTDOWN_TIMEOUT,
            upgrade_sock: PathBuf::from(read::DEFAULT_UPGRADE_SOCK),
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

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
    pub outlier: Option<OutlierConfig>,
    pub agent: Option<AgentConfig>,
    /// One line per connection when it ends (`access_log = true`).
    pub access_log: bool,
    /// Read a PROXY protocol header first (`accept_proxy`), from these upstream
    /// balancers only (`trusted_proxies`).
    pub accept_proxy: Option<(AcceptProxy, Vec<IpNet>)>,
    /// Write a PROXY protocol header to every backend (a backend's own setting wins).
    pub send_proxy: Option<SendProxy>,
    /// Live connections from one client address.
    pub max_conns_per_ip: Option<u64>,
    pub clients: ClientRules,
    /// The backends written with an address.
    pub backends: Vec<BackendConfig>,
    /// The entries written with `discover`: each becomes a backend per address found.
    pub discover: Vec<DiscoverConfig>,
    /// How often host names are resolved again (`discover` entries).
    pub resolve_interval: Duration,
    /// The DNS server asked (`resolver`); the system's when `None`.
    pub resolver: Option<SocketAddr>,
}

/// What a `discover` entry asks DNS for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Discover {
    /// `dns:host:port`: one backend per A/AAAA record, on `port`.
    Dns { host: String, port: u16 },
    /// `srv:_service._proto.name`: one backend per SRV target address, with its port and
    /// weight (the lowest priority only; higher ones are backups).
    Srv { name: String },
}

impl fmt::Display for Discover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Discover::Dns { host, port } => write!(f, "dns:{host}:{port}"),
            Discover::Srv { name } => write!(f, "srv:{name}"),
        }
    }
}

/// One address a `discover` entry found, with the SRV record's weight when it had one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Found {
    pub addr: SocketAddr,
    pub weight: Option<u32>,
}

/// A `[[listeners.backends]]` entry with `discover` instead of `addr`: the settings every
/// backend it finds gets.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverConfig {
    /// Discovered backends are named `name@address` (default name: the host asked).
    pub name: String,
    pub target: Discover,
    /// For `dns:`; an SRV record's own weight wins.
    pub weight: u32,
    pub max_conns: Option<u64>,
    pub send_proxy: Option<SendProxy>,
}

impl DiscoverConfig {
    /// The backend for one address found: `name@ip` for `dns:` (one port for all),
    /// `name@ip:port` for `srv:`.
    pub fn backend(&self, found: &Found) -> BackendConfig {
        let shown = match self.target {
            Discover::Dns { .. } => found.addr.ip().to_string(),
            Discover::Srv { .. } => found.addr.to_string(),
        };
        BackendConfig {
            name: format!("{}@{shown}", self.name),
            addr_text: found.addr.to_string(),
            addr: found.addr,
            weight: found
                .weight
                .unwrap_or(self.weight)
                .clamp(1, MAX_WEIGHT as u32),
            max_conns: self.max_conns,
            send_proxy: self.send_proxy,
            agent_addr: None,
        }
    }
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

/// Passive ejection (outlier detection): a backend whose connects fail, or that resets
/// connections before sending a byte, `consecutive_failures` times in a row is taken out
/// for `base_ejection`, doubled on each repeat up to `max_ejection`, while no more than
/// `max_ejected_percent` of the listener's backends are out at once.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

/// HAProxy's agent-check: each backend's agent is asked for one line of words that
/// report its load (`75%`, `maxconn:30`, `drain`, `ready`, `up`, `down`, `maint`).
/// How often agents are asked when `[listeners.agent]` does not say.
pub const DEFAULT_AGENT_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The agent's port on each backend's host (a backend's `agent_addr` wins).
    pub port: Option<u16>,
    pub interval: Duration,
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
    /// This backend's own `send_proxy`, over the listener's.
    pub send_proxy: Option<SendProxy>,
    /// Where this backend's agent answers, over the listener's `[listeners.agent]` port.
    pub agent_addr: Option<SocketAddr>,
}

impl ListenerConfig {
    /// Where the agent of backend `b` answers, if it has one.
    pub fn agent_of(&self, b: &BackendConfig) -> Option<SocketAddr> {
        b.agent_addr.or_else(|| {
            let port = self.agent.as_ref()?.port?;
            Some(SocketAddr::new(b.addr.ip(), port))
        })
    }
}

/// Why no connection can reach `addr` (port 0, any-address, multicast, broadcast), if
/// so: what the config refuses for a backend's address, for addresses found by DNS.
pub fn unreachable(addr: SocketAddr) -> Option<String> {
    read::reachable(&addr.to_string(), addr).err()
}

impl Config {
    /// Whether a connection to `addr` would land on one of ballast's own sockets (a
    /// listener's bind, or the admin endpoint's), as the config refuses for a backend.
    pub fn loops_back(&self, addr: SocketAddr) -> bool {
        let admin = self.admin.as_ref().map(|a| a.bind);
        self.listeners
            .iter()
            .map(|l| l.bind)
            .chain(admin)
            .any(|bind| read::lands_on(addr, bind))
    }

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
        read::parse(text, file)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::read::binds_conflict;
    use super::*;

    #[test]
    fn client_rules_match_a_client_in_either_form_whichever_form_the_cidr_is_written_in() {
        let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
            allow = [\"::ffff:192.0.2.0/120\", \"198.51.100.0/24\", \"2001:db8::/32\"]\n\
            deny = [\"::ffff:192.0.2.128/121\", \"198.51.100.7\"]\n\
            [[listeners.backends]]\naddr = \"127.0.0.1:3001\"\n";
        let rules = Config::parse(text, "test.toml").unwrap().listeners[0]
            .clients
            .clone();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (client, permitted) in [
            ("192.0.2.7", true),
            ("::ffff:192.0.2.7", true),
            ("192.0.2.200", false),
            ("::ffff:192.0.2.200", false),
            ("198.51.100.1", true),
            ("::ffff:198.51.100.7", false),
            ("2001:db8::1", true),
            ("203.0.113.1", false),
        ] {
            assert_eq!(rules.permits(ip(client)), permitted, "{client}");
        }
    }

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

    /// `count` listeners named `l0`, `l1`, ... bound to `127.0.0.1:20000 + i`, each with
    /// a backend at every port `backends(i)` gives.
    fn generated(count: usize, backends: impl Fn(usize) -> Vec<u16>) -> String {
        let mut text = String::new();
        for i in 0..count {
            text.push_str(&format!(
                "[[listeners]]\nname = \"l{i}\"\nbind = \"127.0.0.1:{}\"\n",
                20000 + i
            ));
            for port in backends(i) {
                text.push_str(&format!(
                    "  [[listeners.backends]]\n  addr = \"127.0.0.1:{port}\"\n"
                ));
            }
        }
        text
    }

    #[test]
    fn many_listeners_that_send_to_each_other_without_a_loop_are_checked_at_once() {
        // 300 listeners of 30 backends each; listener i sends to listeners i+1..=i+30
        // (to ports no listener binds past the last), so nothing loops back. Every
        // backend lands on a listener that leads on, which is the worst case for a
        // search per backend.
        let text = generated(300, |i| {
            (i + 1..=i + 30)
                .map(|j| if j < 300 { 20000 + j } else { 40000 + j } as u16)
                .collect()
        });
        let started = std::time::Instant::now();
        let config = Config::parse(&text, "x.toml");
        let took = started.elapsed();
        eprintln!("300 listeners x 30 backends checked in {took:?}");
        assert!(config.is_ok(), "{}", config.unwrap_err());
        assert!(took < Duration::from_secs(5), "checked in {took:?}");
    }

    #[test]
    fn a_loop_through_every_listener_is_reported_at_each_backend_on_it() {
        // Listener i sends to listener i+1, the last back to the first.
        let count = 300;
        let text = generated(count, |i| vec![20000 + ((i + 1) % count) as u16]);
        let started = std::time::Instant::now();
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, "x.toml") else {
            panic!("a loop through {count} listeners should be refused");
        };
        let took = started.elapsed();
        assert_eq!(problems.len(), count, "{problems:#?}");
        assert_eq!(
            problems[0].message,
            "listener \"l0\": backends[0].addr 127.0.0.1:20001 is the bind address of listener \"l1\", which sends clients back to listener \"l0\": each client would loop between them until every file descriptor is used",
        );
        assert_eq!((problems[0].line, problems[0].column), (5, 10));
        let last = &problems[count - 1];
        assert!(
            last.message.contains(
                "127.0.0.1:20000 is the bind address of listener \"l0\", which sends clients back to listener \"l299\""
            ),
            "{last:?}"
        );
        assert!(took < Duration::from_secs(5), "checked in {took:?}");

        // Cut anywhere, the chain is fine.
        let text = generated(count, |i| vec![20000 + i as u16 + 1]);
        assert!(Config::parse(&text, "x.toml").is_ok());
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
