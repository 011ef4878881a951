//! The config file, from text to a validated [`Config`].
//!
//! The pipeline is `file -> RawConfig (serde, deny_unknown_fields) -> validate() -> Config`.
//! The raw structs mirror the TOML schema of the user-facing contract one to one; every
//! default lives in a named function next to them. Validation is a separate step so that
//! the rest of ballast only ever sees a [`Config`] that holds together: unique names,
//! resolved addresses, weights >= 1, and so on. Both `ballast check` and every (re)load go
//! through [`Config::load`], so `check` says exactly what `run` would.
//!
//! Errors name the file and, where the parser or a span knows it, line and column.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a wrong type or an unparsable value.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// The file parses but does not make sense (duplicate names, weight 0, ...).
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
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
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A listen address: `"IPv4:port"` or `"[IPv6]:port"`, no host names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(ListenAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid listen address {text:?}: expected \"IPv4:port\" or \"[IPv6]:port\""
            ))
        })
    }
}

// ---------------------------------------------------------------------------
// The raw file, exactly as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    admin: Option<RawAdmin>,
    runtime: Option<RawRuntime>,
    #[serde(default)]
    listeners: Vec<Spanned<RawListener>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: ListenAddr,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    #[serde(default)]
    threads: usize,
    #[serde(default = "default_shutdown_timeout")]
    shutdown_timeout: HumanDuration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    bind: Spanned<ListenAddr>,
    #[serde(default)]
    strategy: Strategy,
    max_conns: Option<u64>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: HumanDuration,
    idle_timeout: Option<HumanDuration>,
    #[serde(default = "default_drain_timeout")]
    drain_timeout: HumanDuration,
    #[serde(default = "default_retries")]
    retries: u32,
    slow_start: Option<HumanDuration>,
    health: Option<Spanned<RawHealth>>,
    rebalance: Option<Spanned<RawRebalance>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    kind: HealthKind,
    path: Option<String>,
    #[serde(default = "default_health_interval")]
    interval: HumanDuration,
    #[serde(default = "default_health_timeout")]
    timeout: HumanDuration,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRebalance {
    #[serde(default = "default_rebalance_interval")]
    interval: HumanDuration,
    #[serde(default = "default_precision")]
    precision: u64,
    #[serde(default = "default_step_size")]
    step_size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<String>,
    addr: String,
    #[serde(default = "default_weight")]
    weight: u32,
    max_conns: Option<u64>,
}

fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_retries() -> u32 {
    2
}
fn default_health_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_rebalance_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_precision() -> u64 {
    3
}
fn default_step_size() -> u64 {
    1
}
fn default_weight() -> u32 {
    1
}

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
            shutdown_timeout: default_shutdown_timeout().0,
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

    /// Parses and validates config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Validator { text, file }.validate(raw)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// Turns semantic problems into errors that point at the offending table.
struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn error(&self, span: std::ops::Range<usize>, message: String) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            file: self.file.to_string(),
            line,
            column,
            message,
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.listeners.is_empty() {
            return Err(self.error(
                0..0,
                "no listeners: add at least one [[listeners]] table".into(),
            ));
        }
        let runtime = raw
            .runtime
            .map_or_else(RuntimeConfig::default, |r| RuntimeConfig {
                threads: r.threads,
                shutdown_timeout: r.shutdown_timeout.0,
            });
        let admin = match raw.admin {
            None => None,
            Some(a) => {
                let token = match &a.token_file {
                    None => None,
                    Some(path) => Some(self.read_token(path)?),
                };
                Some(AdminConfig {
                    bind: a.bind.0,
                    token_file: a.token_file,
                    token,
                })
            }
        };

        let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.listeners.len());
        for raw_listener in raw.listeners {
            let span = raw_listener.span();
            let listener = self.listener(raw_listener.into_inner())?;
            if listeners.iter().any(|l| l.name == listener.name) {
                return Err(
                    self.error(span, format!("duplicate listener name {:?}", listener.name))
                );
            }
            if let Some(other) = listeners
                .iter()
                .find(|l| binds_conflict(l.bind, listener.bind))
            {
                return Err(self.error(
                    span,
                    format!(
                        "listener {:?}: bind address {} is already used by listener {:?}",
                        listener.name, listener.bind, other.name
                    ),
                ));
            }
            if let Some(admin) = &admin {
                if binds_conflict(admin.bind, listener.bind) {
                    return Err(self.error(
                        span,
                        format!(
                            "listener {:?}: bind address {} is already used by [admin]",
                            listener.name, listener.bind
                        ),
                    ));
                }
            }
            listeners.push(listener);
        }
        Ok(Config {
            admin,
            runtime,
            listeners,
        })
    }

    fn read_token(&self, path: &Path) -> Result<String, ConfigError> {
        let path = match Path::new(self.file).parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        let at = self.text.find("token_file").unwrap_or(0);
        let token = std::fs::read_to_string(&path).map_err(|e| {
            self.error(
                at..at,
                format!("admin.token_file: cannot read {}: {e}", path.display()),
            )
        })?;
        let token = token.trim();
        if token.is_empty() || token.chars().any(char::is_whitespace) {
            return Err(self.error(
                at..at,
                format!(
                    "admin.token_file: {} must hold one token with no spaces",
                    path.display()
                ),
            ));
        }
        Ok(token.to_string())
    }

    fn listener(&self, raw: RawListener) -> Result<ListenerConfig, ConfigError> {
        let name_span = raw.name.span();
        let name = raw.name.into_inner();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(self.error(
                name_span,
                format!("invalid listener name {name:?}: use only letters, digits, '_' and '-'"),
            ));
        }
        let at = |key: &str| format!("listener {name:?}: {key}");
        if raw.backends.is_empty() {
            return Err(self.error(
                name_span,
                format!(
                    "{}: a listener needs at least one [[listeners.backends]]",
                    at("backends")
                ),
            ));
        }
        if raw.connect_timeout.0.is_zero() {
            return Err(self.error(
                name_span,
                format!("{} must be more than 0", at("connect_timeout")),
            ));
        }
        if raw.idle_timeout.is_some_and(|d| d.0.is_zero()) {
            return Err(self.error(
                name_span,
                format!(
                    "{} must be more than 0 (leave it out for none)",
                    at("idle_timeout")
                ),
            ));
        }

        let health = match raw.health {
            None => None,
            Some(h) => {
                let span = h.span();
                let h = h.into_inner();
                if h.rise == 0 || h.fall == 0 {
                    let key = if h.rise == 0 {
                        "health.rise"
                    } else {
                        "health.fall"
                    };
                    return Err(self.error(span, format!("{} must be at least 1", at(key))));
                }
                if h.timeout.0 > h.interval.0 {
                    return Err(self.error(
                        span,
                        format!(
                            "{} must not be longer than health.interval (checks would overlap)",
                            at("health.timeout")
                        ),
                    ));
                }
                if h.interval.0.is_zero() || h.timeout.0.is_zero() {
                    let key = if h.interval.0.is_zero() {
                        "health.interval"
                    } else {
                        "health.timeout"
                    };
                    return Err(self.error(span, format!("{} must be more than 0", at(key))));
                }
                let path = match (h.kind, h.path) {
                    (HealthKind::Tcp, Some(_)) => {
                        return Err(self.error(
                            span,
                            format!("{} is only for kind = \"http\"", at("health.path")),
                        ))
                    }
                    (HealthKind::Http, Some(p))
                        if !p.starts_with('/') || p.contains(char::is_whitespace) =>
                    {
                        return Err(self.error(
                            span,
                            format!(
                                "{} {p:?} must start with '/' and contain no spaces",
                                at("health.path")
                            ),
                        ))
                    }
                    (_, path) => path.unwrap_or_else(|| "/".into()),
                };
                Some(HealthConfig {
                    kind: h.kind,
                    path,
                    interval: h.interval.0,
                    timeout: h.timeout.0,
                    rise: h.rise,
                    fall: h.fall,
                })
            }
        };

        let rebalance = match raw.rebalance {
            None => None,
            Some(r) => {
                let span = r.span();
                let r = r.into_inner();
                if raw.strategy == Strategy::IpHash {
                    return Err(self.error(
                        span,
                        format!(
                            "{}: ip_hash cannot be combined with [listeners.rebalance] (a hashed client would be sent straight back to the backend it was migrated from)",
                            at("rebalance")
                        ),
                    ));
                }
                if r.interval.0.is_zero() {
                    return Err(self.error(
                        span,
                        format!("{} must be more than 0", at("rebalance.interval")),
                    ));
                }
                if r.step_size == 0 {
                    return Err(self.error(
                        span,
                        format!("{} must be at least 1", at("rebalance.step_size")),
                    ));
                }
                Some(RebalanceConfig {
                    interval: r.interval.0,
                    precision: r.precision,
                    step_size: r.step_size,
                })
            }
        };

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backends.len());
        for (i, raw_backend) in raw.backends.into_iter().enumerate() {
            let span = raw_backend.span();
            let b = raw_backend.into_inner();
            let key = |k: &str| at(&format!("backends[{i}].{k}"));
            let addr = resolve(&b.addr)
                .map_err(|why| self.error(span.clone(), format!("{}: {why}", key("addr"))))?;
            let backend_name = b.name.unwrap_or_else(|| b.addr.clone());
            if backend_name.is_empty()
                || backend_name.chars().any(|c| {
                    c == '/'
                        || c == '?'
                        || c == '#'
                        || c == '%'
                        || c.is_whitespace()
                        || c.is_control()
                })
            {
                return Err(self.error(
                    span,
                    format!("{} {backend_name:?} is invalid: it must be non-empty and contain no '/', '?', '#', '%' or spaces", key("name")),
                ));
            }
            if b.weight == 0 {
                return Err(self.error(
                    span,
                    format!("{} must be at least 1 (to take backend {backend_name:?} out of service, set max_conns = 0 or drain it)", key("weight")),
                ));
            }
            if backends.iter().any(|other| other.name == backend_name) {
                return Err(self.error(
                    span,
                    format!("{}: duplicate backend name {backend_name:?}", key("name")),
                ));
            }
            backends.push(BackendConfig {
                name: backend_name,
                addr_text: b.addr,
                addr,
                weight: b.weight,
                max_conns: b.max_conns,
            });
        }

        Ok(ListenerConfig {
            name,
            bind: raw.bind.into_inner().0,
            strategy: raw.strategy,
            max_conns: raw.max_conns,
            connect_timeout: raw.connect_timeout.0,
            idle_timeout: raw.idle_timeout.map(|d| d.0),
            drain_timeout: raw.drain_timeout.0,
            retries: raw.retries,
            slow_start: raw.slow_start.map(|d| d.0).filter(|d| !d.is_zero()),
            health,
            rebalance,
            backends,
        })
    }
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

    #[test]
    fn semantic_errors_point_at_the_table() {
        let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  addr = \"127.0.0.1:1\"\n  weight = 0\n";
        let err = Config::parse(text, "x.toml").unwrap_err().to_string();
        assert!(err.starts_with("x.toml:5:3:"), "{err}");
        assert!(err.contains("weight must be at least 1"), "{err}");
    }
}
