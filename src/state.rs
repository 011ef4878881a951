//! Runtime state: what ballast knows about listeners and backends that is not config.
//!
//! Live counts, totals, byte counters and a backend's state (its [`Phase`]: up,
//! checking, down, draining since when, removed) are atomics in an
//! `Arc<BackendState>` (and `Arc<ListenerState>`), kept in the [`Registry`] by name. A new
//! routing snapshot (at start or at a reload) looks its backends up by (listener, backend
//! name), so a backend that stays in the config keeps its live count, health and drain
//! state across reloads, and connections opened under an old snapshot still count
//! against the same backend. Nothing here is swapped with the config.
//!
//! A connection holds a [`BackendGuard`] for as long as it counts against a backend; the
//! guard's drop is the only place the live count goes down, so every exit path of a
//! connection (success, error, timeout, panic) gives its slot back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::config::{Discover, Found};
use crate::metrics::{BackendMetrics, ListenerMetrics, Metrics};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What the health checks say of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Added by a reload to a listener with health checks, and not checked yet: gets
    /// nothing until the first check passes (Envoy's rule for new hosts). The first
    /// result decides alone, pass or fail; `rise` and `fall` apply from then on.
    Checking = 0,
    /// Takes connections (also: every backend of a listener without health checks).
    Up = 1,
    /// `fall` consecutive checks failed; back up after `rise` good ones.
    Down = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            0 => Health::Checking,
            1 => Health::Up,
            _ => Health::Down,
        }
    }
}

/// The latest failed health check of a backend, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    pub at: SystemTime,
    pub reason: String,
}

/// Whether a backend takes new connections, as the operator and the config say; its
/// health is the other half of its state (see [`Phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Service {
    /// Takes connections when healthy.
    InService = 0,
    /// Drained through the admin API; survives reloads while the backend exists.
    Drained = 1,
    /// Configured with `max_conns = 0`.
    ConfigDrained = 2,
    /// Left the config in a reload; gets nothing new, even from an older snapshot.
    Removed = 3,
}

impl Service {
    fn from_u8(v: u8) -> Service {
        match v {
            0 => Service::InService,
            1 => Service::Drained,
            2 => Service::ConfigDrained,
            _ => Service::Removed,
        }
    }
}

/// A backend's whole state in one word: what status shows and what decides whether it
/// gets new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// In service and healthy.
    Up,
    /// In service, waiting for its first health check.
    Checking,
    /// In service, failing its health checks.
    Down,
    /// Out of service since `since` (drained or `max_conns = 0`); its connections are
    /// closed once `drain_timeout` has passed.
    Draining { since: Instant },
    /// Left the config at `since`; forgotten once its last connection ends.
    Removed { since: Instant },
    /// In service, but taken out by passive ejection (outlier detection) until `until`;
    /// back by itself then, or at a passing health check.
    Ejected { until: Instant },
    /// Its agent said `drain` or `maint`: no new connections, and its connections stay
    /// (no drain clock) until the agent says `ready`.
    AgentDrained,
}

impl Phase {
    /// What `/api/v1/status` calls it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Up => "up",
            Phase::Checking => "checking",
            Phase::Down => "down",
            Phase::Draining { .. } | Phase::Removed { .. } | Phase::AgentDrained => "draining",
            Phase::Ejected { .. } => "ejected",
        }
    }

    /// Out of service: its connections are on their way out.
    pub fn is_draining(self) -> bool {
        matches!(self, Phase::Draining { .. } | Phase::Removed { .. })
    }

    /// When it left service, if it did.
    pub fn draining_since(self) -> Option<Instant> {
        match self {
            Phase::Draining { since } | Phase::Removed { since } => Some(since),
            _ => None,
        }
    }
}

/// A weight set at run time, in place of the configured one: the latest word wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeWeight {
    /// By the admin API: this weight, until the next reload.
    Api(u32),
    /// By the backend's agent: this percentage of the configured weight, until the
    /// agent says otherwise or the backend has no agent any more.
    AgentPercent(u32),
}

impl RuntimeWeight {
    const AGENT: u64 = 1 << 32;

    fn encode(self) -> u64 {
        match self {
            RuntimeWeight::Api(weight) => u64::from(weight),
            RuntimeWeight::AgentPercent(percent) => Self::AGENT | u64::from(percent),
        }
    }

    fn decode(word: u64) -> Option<RuntimeWeight> {
        match word {
            u64::MAX => None,
            w if w & Self::AGENT != 0 => Some(RuntimeWeight::AgentPercent(w as u32)),
            w => Some(RuntimeWeight::Api(w as u32)),
        }
    }
}

/// The agent said `down` (it is down whatever its health checks say).
const AGENT_DOWN: u8 = 1;
/// The agent said `drain` or `maint`: no new connections; its connections stay.
const AGENT_DRAINED: u8 = 2;

/// Runtime state of one backend of one listener.
#[derive(Debug)]
pub struct BackendState {
    pub listener: String,
    pub name: String,
    /// The live count (from pick to close: the one count strategies, rebalance, metrics
    /// and status read), totals and byte counters: the Prometheus handles themselves.
    metrics: BackendMetrics,
    /// A [`Health`], as its `u8`.
    health: AtomicU8,
    /// A [`Service`] in the low 8 bits and when it last left service (the drain clock,
    /// millis since `epoch`) above them: one word, so that no reader ever sees a new
    /// service with an old clock.
    service: AtomicU64,
    /// When the health or the service last changed (what status calls "since"); millis
    /// since `epoch`.
    changed_ms: AtomicU64,
    /// The wall-clock time at `epoch`, to show `changed_ms` as a date.
    epoch_wall: SystemTime,
    /// The latest failed health check; kept after the backend is up again.
    last_failure: Mutex<Option<CheckFailure>>,
    /// Consecutive health check results of the current streak (for rise/fall).
    health_streak: AtomicU32,
    /// When the backend (re)entered service, for slow start; millis since `epoch`.
    in_service_since_ms: AtomicU64,
    /// Passive ejection: connection failures in a row, and until when the backend is
    /// ejected (millis since `epoch`; 0 when it is not).
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Ejections in a row (each doubles the next one's length), and when the latest ended.
    ejections_in_row: AtomicU32,
    last_ejection_end_ms: AtomicU64,
    /// A [`RuntimeWeight`], encoded (see [`RuntimeWeight::encode`]); `u64::MAX` when none.
    runtime_weight: AtomicU64,
    /// A `max_conns` an agent reported (`maxconn:N`); `u64::MAX` when none.
    agent_max_conns: AtomicU64,
    /// What the backend's agent said of its service: [`AGENT_DOWN`], [`AGENT_DRAINED`].
    agent_flags: AtomicU8,
    /// Live connections to this backend through the other instances of the cluster, as
    /// their latest fresh reports say (`[cluster]`); 0 without one.
    peer_active: AtomicU64,
    epoch: Instant,
    /// Bytes to and from the backend: added on every write of every connection, so
    /// kept per thread (see [`Striped`]) and published to `metrics` at each scrape.
    sent: Striped,
    received: Striped,
}

/// A counter that each thread adds to on a cache line of its own, so that workers
/// relaying bytes for the same backend never contend for one line. Its total is the sum
/// of the stripes.
#[derive(Debug)]
pub struct Striped {
    stripes: Box<[Stripe]>,
    /// How much of the total a Prometheus counter has been given.
    published: AtomicU64,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// Stripes per counter: threads beyond this share stripes (still correct, just shared).
const STRIPES: usize = 16;

thread_local! {
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
    };
}

impl Default for Striped {
    fn default() -> Striped {
        Striped {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            published: AtomicU64::new(0),
        }
    }
}

impl Striped {
    pub fn add(&self, n: u64) {
        let i = STRIPE.with(|i| *i);
        self.stripes[i].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }

    /// Adds to `counter` what it has not been given yet. Concurrent callers add
    /// disjoint parts, so nothing is counted twice.
    pub fn publish(&self, counter: &prometheus::IntCounter) {
        let total = self.total();
        let before = self.published.fetch_max(total, Ordering::Relaxed);
        counter.inc_by(total.saturating_sub(before));
    }
}

impl BackendState {
    pub fn new(listener: &str, name: &str, metrics: BackendMetrics) -> BackendState {
        BackendState {
            listener: listener.to_string(),
            name: name.to_string(),
            metrics,
            health: AtomicU8::new(Health::Up as u8),
            service: AtomicU64::new(Service::InService as u64),
            changed_ms: AtomicU64::new(0),
            epoch_wall: SystemTime::now(),
            last_failure: Mutex::new(None),
            health_streak: AtomicU32::new(0),
            in_service_since_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections_in_row: AtomicU32::new(0),
            last_ejection_end_ms: AtomicU64::new(0),
            runtime_weight: AtomicU64::new(u64::MAX),
            agent_max_conns: AtomicU64::new(u64::MAX),
            agent_flags: AtomicU8::new(0),
            peer_active: AtomicU64::new(0),
            epoch: Instant::now(),
            sent: Striped::default(),
            received: Striped::default(),
        }
    }

    /// Live connections through the other instances of the cluster (their latest fresh
    /// reports); 0 without `[cluster]` or while Redis does not answer.
    pub fn peer_active(&self) -> u64 {
        self.peer_active.load(Ordering::Relaxed)
    }

    pub fn set_peer_active(&self, n: u64) {
        self.peer_active.store(n, Ordering::Relaxed);
    }

    pub fn active(&self) -> u64 {
        self.metrics.active.get().max(0) as u64
    }
    pub fn total(&self) -> u64 {
        self.metrics.total.get()
    }
    pub fn connect_failures(&self) -> u64 {
        self.metrics.connect_failures.get()
    }
    /// Bytes delivered to the backend so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.total()
    }
    /// Bytes delivered from the backend to clients so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.total()
    }

    /// Brings the byte counters' Prometheus series up to date (at each scrape).
    pub fn publish_bytes(&self) {
        self.sent.publish(&self.metrics.sent_bytes);
        self.received.publish(&self.metrics.received_bytes);
    }
    pub fn metrics(&self) -> &BackendMetrics {
        &self.metrics
    }
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }
    pub fn is_up(&self) -> bool {
        self.health() == Health::Up
    }
    pub fn service(&self) -> Service {
        Service::from_u8(self.service.load(Ordering::Relaxed) as u8)
    }

    /// The backend's state, in one word.
    pub fn phase(&self) -> Phase {
        let word = self.service.load(Ordering::Relaxed);
        let since = || self.epoch + Duration::from_millis(word >> 8);
        match Service::from_u8(word as u8) {
            Service::InService => {
                let agent = self.agent_flags.load(Ordering::Relaxed);
                match (self.ejected_until(), self.health()) {
                    (Some(until), _) => Phase::Ejected { until },
                    (None, Health::Up | Health::Checking) if agent & AGENT_DOWN != 0 => Phase::Down,
                    (None, Health::Up | Health::Checking) if agent & AGENT_DRAINED != 0 => {
                        Phase::AgentDrained
                    }
                    (None, Health::Up) => Phase::Up,
                    (None, Health::Checking) => Phase::Checking,
                    (None, Health::Down) => Phase::Down,
                }
            }
            Service::Drained | Service::ConfigDrained => Phase::Draining { since: since() },
            Service::Removed => Phase::Removed { since: since() },
        }
    }

    /// When the health or service state last changed.
    pub fn since(&self) -> SystemTime {
        self.epoch_wall + Duration::from_millis(self.changed_ms.load(Ordering::Relaxed))
    }

    /// The latest failed health check, if any.
    pub fn last_failure(&self) -> Option<CheckFailure> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn mark_changed(&self) {
        self.changed_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Sets the health; returns the one before.
    fn set_health(&self, health: Health) -> Health {
        let before = Health::from_u8(self.health.swap(health as u8, Ordering::Relaxed));
        if before != health {
            self.mark_changed();
            if health == Health::Up {
                self.mark_in_service();
            }
        }
        before
    }

    /// Moves the service state from what `from` accepts to `to`; the drain clock starts
    /// when a backend leaves service and stops when it comes back, never in between.
    fn move_service(&self, from: impl Fn(Service) -> bool, to: Service) {
        let mut current = self.service.load(Ordering::Relaxed);
        let now = self.now_ms();
        loop {
            let before = Service::from_u8(current as u8);
            if before == to || !from(before) {
                return;
            }
            let since = if before == Service::InService {
                now
            } else {
                current >> 8
            };
            match self.service.compare_exchange(
                current,
                since << 8 | to as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.mark_changed();
        if to == Service::InService {
            self.mark_in_service();
        }
    }

    /// A backend new to a listener with health checks waits for its first check.
    pub fn set_checking(&self) {
        self.health_streak.store(0, Ordering::Relaxed);
        self.set_health(Health::Checking);
    }

    /// Without health checks a backend is up: a reload that drops `[listeners.health]`
    /// must not leave a backend down for good.
    pub fn set_up_unchecked(&self) {
        self.health_streak.store(0, Ordering::Relaxed);
        self.set_health(Health::Up);
    }

    /// The operator takes the backend out of service (`true`) or puts it back
    /// (`false`).
    pub fn set_drained(&self, drained: bool) {
        if drained {
            self.move_service(
                |s| matches!(s, Service::InService | Service::ConfigDrained),
                Service::Drained,
            );
        } else {
            self.move_service(|s| s == Service::Drained, Service::InService);
        }
    }

    /// The operator puts the backend back, and its config (`max_conns = 0`) says
    /// whether it is then in service; one that stays out keeps its drain clock.
    pub fn undrain(&self, config_drained: bool) {
        let to = if config_drained {
            Service::ConfigDrained
        } else {
            Service::InService
        };
        self.move_service(|s| s == Service::Drained, to);
    }

    /// The config says whether the backend is drained (`max_conns = 0`); an operator's
    /// drain is kept either way.
    pub fn set_config_drained(&self, drained: bool) {
        if drained {
            self.move_service(|s| s == Service::InService, Service::ConfigDrained);
        } else {
            self.move_service(|s| s == Service::ConfigDrained, Service::InService);
        }
    }

    /// A reload removed the backend (`true`) or brought it back (`false`, back in
    /// service: the operator's drain goes with the backend that left).
    pub fn set_removed(&self, removed: bool) {
        if removed {
            self.move_service(|s| s != Service::Removed, Service::Removed);
        } else {
            self.move_service(|s| s == Service::Removed, Service::InService);
        }
    }

    /// Counts a new connection against this backend until the guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> BackendGuard {
        self.metrics.active.inc();
        BackendGuard {
            backend: Arc::clone(self),
        }
    }

    pub fn record_connected(&self, took: Duration) {
        self.metrics.total.inc();
        self.metrics.connect_duration.observe(took.as_secs_f64());
    }
    pub fn record_connect_failure(&self, took: Duration) {
        self.metrics.connect_failures.inc();
        self.metrics.connect_duration.observe(took.as_secs_f64());
    }
    pub fn add_sent(&self, bytes: u64) {
        self.sent.add(bytes);
    }
    pub fn add_received(&self, bytes: u64) {
        self.received.add(bytes);
    }

    /// Feeds one health check result (`Err` carries why it failed); returns the new
    /// up/down state when it flipped. Up goes down after `fall` consecutive failures,
    /// down goes up after `rise` consecutive successes; a backend still checking takes
    /// the first result as it comes.
    pub fn record_health(&self, result: Result<(), String>, rise: u32, fall: u32) -> Option<bool> {
        let ok = result.is_ok();
        let ejected = self.ejected_until_ms.load(Ordering::Relaxed);
        if ok && ejected != 0 {
            self.end_ejection(ejected, self.now_ms(), "a health check passed");
        }
        if let Err(reason) = result {
            *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(CheckFailure {
                at: SystemTime::now(),
                reason,
            });
        }
        let health = self.health();
        if health == Health::Checking {
            self.health_streak.store(0, Ordering::Relaxed);
            self.set_health(if ok { Health::Up } else { Health::Down });
            return Some(ok);
        }
        let up = health == Health::Up;
        if ok == up {
            // A result that confirms the current state ends any opposite streak.
            self.health_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.health_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if up { fall } else { rise };
        if streak < needed {
            return None;
        }
        self.health_streak.store(0, Ordering::Relaxed);
        self.set_health(if ok { Health::Up } else { Health::Down });
        Some(ok)
    }

    /// Until when the backend is ejected, if it is. An ejection that has run out is
    /// ended here, by whichever reader sees it first.
    fn ejected_until(&self) -> Option<Instant> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return None;
        }
        if self.now_ms() < until {
            return Some(self.epoch + Duration::from_millis(until));
        }
        self.end_ejection(until, until, "its ejection ran out");
        None
    }

    /// Ends the ejection that was to last until `until` (millis since `epoch`), as of
    /// `ended` (its expiry, or now).
    fn end_ejection(&self, until: u64, ended: u64, why: &str) {
        if self
            .ejected_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.last_ejection_end_ms.store(ended, Ordering::Relaxed);
            // Failures seen while it was out (connections already on their way) do not
            // count towards the next ejection.
            self.failures.store(0, Ordering::Relaxed);
            self.changed_ms.store(ended, Ordering::Relaxed);
            tracing::info!(listener = %self.listener, backend = %self.name, "backend back in service: {why}");
        }
    }

    /// A connection to the backend failed (connect refused or timed out, or reset before
    /// the backend's first byte); returns the failures in a row.
    pub fn record_failure(&self) -> u32 {
        let before = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        before.saturating_add(1)
    }

    /// The backend answered (its first byte reached a client): the failures in a row
    /// start over.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Ends an ejection now (its listener no longer detects outliers).
    pub fn clear_ejection(&self) {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0 {
            self.end_ejection(until, self.now_ms(), "outlier detection is off");
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until().is_some()
    }

    /// Ejects the backend: for `base` at first, doubled for each ejection that follows
    /// the last one within `max`, never longer than `max`. Returns for how long.
    pub fn eject(&self, base: Duration, max: Duration) -> Duration {
        let now = self.now_ms();
        let last_end = self.last_ejection_end_ms.load(Ordering::Relaxed);
        let in_row = if last_end != 0 && now.saturating_sub(last_end) <= max.as_millis() as u64 {
            self.ejections_in_row.load(Ordering::Relaxed)
        } else {
            0
        };
        self.ejections_in_row.store(in_row + 1, Ordering::Relaxed);
        let length = base
            .checked_mul(1u32 << in_row.min(20))
            .unwrap_or(max)
            .min(max);
        self.ejected_until_ms
            .store((now + length.as_millis() as u64).max(1), Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.metrics.ejections.inc();
        self.mark_changed();
        length
    }

    /// The weight set at run time, if any.
    pub fn runtime_weight(&self) -> Option<RuntimeWeight> {
        RuntimeWeight::decode(self.runtime_weight.load(Ordering::Relaxed))
    }

    pub fn set_runtime_weight(&self, weight: Option<RuntimeWeight>) {
        let word = weight.map_or(u64::MAX, RuntimeWeight::encode);
        self.runtime_weight.store(word, Ordering::Relaxed);
    }

    /// The `max_conns` an agent reported, if any.
    pub fn agent_max_conns(&self) -> Option<u64> {
        let max = self.agent_max_conns.load(Ordering::Relaxed);
        (max != u64::MAX).then_some(max)
    }

    pub fn set_agent_max_conns(&self, max: Option<u64>) {
        let stored = max.map_or(u64::MAX, |m| m.min(u64::MAX - 1));
        self.agent_max_conns.store(stored, Ordering::Relaxed);
    }

    /// The agent says the backend is down (`true`) or up.
    pub fn set_agent_down(&self, down: bool) {
        self.set_agent_flag(AGENT_DOWN, down);
    }

    /// The agent says `drain` or `maint` (`true`), or `ready`.
    pub fn set_agent_drained(&self, drained: bool) {
        self.set_agent_flag(AGENT_DRAINED, drained);
    }

    fn set_agent_flag(&self, flag: u8, on: bool) {
        let before = if on {
            self.agent_flags.fetch_or(flag, Ordering::Relaxed)
        } else {
            self.agent_flags.fetch_and(!flag, Ordering::Relaxed)
        };
        if (before & flag != 0) != on {
            self.mark_changed();
        }
    }

    /// What a reload keeps of the settings made at run time: the admin API's weight
    /// goes (until the next reload, as the API says); an agent's words stay while the
    /// backend still has an agent, and go with it.
    pub fn after_reload(&self, has_agent: bool) {
        if matches!(self.runtime_weight(), Some(RuntimeWeight::Api(_)))
            || (!has_agent && self.runtime_weight().is_some())
        {
            self.set_runtime_weight(None);
        }
        if !has_agent {
            self.set_agent_max_conns(None);
            self.agent_flags.store(0, Ordering::Relaxed);
        }
    }

    pub fn ejections(&self) -> u64 {
        self.metrics.ejections.get()
    }

    fn mark_in_service(&self) {
        self.in_service_since_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long the backend has been in service, for slow start.
    pub fn in_service_for(&self) -> Duration {
        let since = self.in_service_since_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }
}

/// One connection's slot in a backend's live count.
#[derive(Debug)]
pub struct BackendGuard {
    backend: Arc<BackendState>,
}

impl BackendGuard {
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.backend
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.backend.metrics.active.dec();
    }
}

/// Why a client connection was refused: the `reason` of
/// `ballast_listener_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The listener is at its `max_conns`.
    MaxConns,
    /// No backend is available (or none could be reached).
    NoBackend,
    /// The client's address is in `deny`, or not in `allow`.
    Denied,
    /// The client's address has `max_conns_per_ip` live connections already.
    PerIpLimit,
    /// A PROXY protocol header was missing, malformed or late, or came from an address
    /// not in `trusted_proxies`.
    ProxyProtocol,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::MaxConns,
        RejectReason::NoBackend,
        RejectReason::Denied,
        RejectReason::PerIpLimit,
        RejectReason::ProxyProtocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MaxConns => "max_conns",
            RejectReason::NoBackend => "no_backend",
            RejectReason::Denied => "denied",
            RejectReason::PerIpLimit => "per_ip_limit",
            RejectReason::ProxyProtocol => "proxy_protocol",
        }
    }

    /// Its place in [`RejectReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Runtime state of one listener.
#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    /// Live count, totals and rejections: the Prometheus handles themselves.
    metrics: ListenerMetrics,
    /// Live connections by client address, for `max_conns_per_ip`. An address has an
    /// entry only while it has a connection counted here, so the table never holds more
    /// entries than the listener has live connections, whatever addresses a flood
    /// claims; the hasher is keyed per process, so chosen addresses cannot collide it.
    per_ip: Mutex<HashMap<IpAddr, u64>>,
    /// When rebalance last asked connections of this listener to migrate.
    last_migration: Mutex<Option<Instant>>,
}

impl ListenerState {
    pub fn new(name: &str, metrics: ListenerMetrics) -> ListenerState {
        ListenerState {
            name: name.to_string(),
            metrics,
            per_ip: Mutex::default(),
            last_migration: Mutex::default(),
        }
    }

    /// When rebalance last migrated connections of this listener, if ever.
    pub fn last_migration(&self) -> Option<Instant> {
        *self
            .last_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_last_migration(&self, at: Instant) {
        *self
            .last_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// Counts a connection from `client` until the guard is dropped, unless the address
    /// has `max` live connections already.
    pub fn enter_client(self: &Arc<Self>, client: IpAddr, max: u64) -> Option<ClientGuard> {
        let client = client.to_canonical();
        let mut table = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let live = table.entry(client).or_insert(0);
        if *live >= max {
            if *live == 0 {
                table.remove(&client);
            }
            return None;
        }
        *live += 1;
        Some(ClientGuard {
            listener: Arc::clone(self),
            client,
        })
    }

    /// Live connections counted for `client` (0 when it has none).
    pub fn client_conns(&self, client: IpAddr) -> u64 {
        let table = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        table.get(&client.to_canonical()).copied().unwrap_or(0)
    }

    /// How many client addresses have live connections counted.
    pub fn clients_counted(&self) -> usize {
        self.per_ip.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn active(&self) -> u64 {
        self.metrics.active.get().max(0) as u64
    }
    pub fn total(&self) -> u64 {
        self.metrics.total.get()
    }
    pub fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }
    fn rejected_counter(&self, reason: RejectReason) -> &prometheus::IntCounter {
        &self.metrics.rejected[reason.index()]
    }
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected_counter(reason).get()
    }
    /// Counts a client connection closed without a backend: one refused by the
    /// listener's limits at accept (which also counts in the listener's total, as every
    /// accepted connection does), or one that no backend could be reached for.
    pub fn record_rejected(&self, reason: RejectReason) {
        self.rejected_counter(reason).inc();
    }

    /// Counts a connection that ended, by why.
    pub fn record_end(&self, reason: crate::conn::EndReason) {
        self.metrics.closed[reason.index()].inc();
    }

    /// Counts an accepted client connection until the guard is dropped.
    pub fn accept(self: &Arc<Self>) -> ListenerGuard {
        self.metrics.active.inc();
        self.metrics.total.inc();
        ListenerGuard {
            listener: Arc::clone(self),
            opened: Instant::now(),
        }
    }
}

/// One client connection's slot in its listener's live count.
#[derive(Debug)]
pub struct ListenerGuard {
    listener: Arc<ListenerState>,
    opened: Instant,
}

/// One connection's place in its client address's live count (`max_conns_per_ip`).
#[derive(Debug)]
pub struct ClientGuard {
    listener: Arc<ListenerState>,
    client: IpAddr,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut table = self
            .listener
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(live) = table.get_mut(&self.client) {
            *live -= 1;
            if *live == 0 {
                table.remove(&self.client);
            }
        }
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.listener.metrics.active.dec();
        let lasted = self.opened.elapsed().as_secs_f64();
        self.listener.metrics.connection_duration.observe(lasted);
    }
}

/// All runtime state by name; outlives every config snapshot.
#[derive(Debug, Default)]
pub struct Registry {
    /// Where the handles of new states come from.
    metrics: Metrics,
    listeners: Mutex<HashMap<String, Arc<ListenerState>>>,
    backends: Mutex<HashMap<(String, String), Arc<BackendState>>>,
    /// What each `discover` entry of each listener last found (sorted), kept across
    /// reloads; an entry not resolved yet has none.
    discovered: Mutex<HashMap<(String, Discover), Vec<Found>>>,
    /// Where a backend written with a host name resolves now, by (listener, backend),
    /// when that differs from where it resolved at the last (re)load.
    resolved: Mutex<HashMap<(String, String), SocketAddr>>,
}

impl Registry {
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The state of listener `name`, created on first use.
    pub fn listener(&self, name: &str) -> Arc<ListenerState> {
        let mut map = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry(name.to_string())
                .or_insert_with(|| Arc::new(ListenerState::new(name, self.metrics.listener(name)))),
        )
    }

    /// What `target` of `listener` last found; empty before its first answer.
    pub fn discovered(&self, listener: &str, target: &Discover) -> Vec<Found> {
        let map = self.discovered.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(listener.to_string(), target.clone()))
            .cloned()
            .unwrap_or_default()
    }

    /// Stores what `target` of `listener` found (sorted and without repeats); `true`
    /// when that differs from what it found before.
    pub fn set_discovered(&self, listener: &str, target: &Discover, mut found: Vec<Found>) -> bool {
        found.sort_unstable();
        found.dedup();
        let mut map = self.discovered.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.insert((listener.to_string(), target.clone()), found.clone());
        before.as_ref() != Some(&found)
    }

    /// Where backend `name` of `listener` resolves now, when it moved since the load.
    pub fn resolved(&self, listener: &str, name: &str) -> Option<SocketAddr> {
        let map = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(listener.to_string(), name.to_string())).copied()
    }

    /// Notes that backend `name` of `listener` (at `loaded` when the config was loaded)
    /// resolves to `addr` now; `true` when that changes where it is.
    pub fn set_resolved(
        &self,
        listener: &str,
        name: &str,
        addr: SocketAddr,
        loaded: SocketAddr,
    ) -> bool {
        let key = (listener.to_string(), name.to_string());
        let mut map = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.get(&key).copied().unwrap_or(loaded);
        if addr == loaded {
            map.remove(&key);
        } else {
            map.insert(key, addr);
        }
        before != addr
    }

    /// Keeps only the addresses resolved since the last load of the backends for which
    /// `keep(listener, backend)` holds.
    pub fn retain_resolved(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut map = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(listener, backend), _| keep(listener, backend));
    }

    /// Forgets what entries no longer in the config found.
    pub fn keep_discovered(&self, keep: impl Fn(&str, &Discover) -> bool) {
        let mut map = self.discovered.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(listener, target), _| keep(listener, target));
    }

    /// Client connections open right now over every listener, removed ones included.
    pub fn active_connections(&self) -> u64 {
        let map = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|l| l.active()).sum()
    }

    /// Forgets a backend whose last connection has ended after it left the config; its
    /// metric series go with it.
    pub fn remove_backend(&self, state: &Arc<BackendState>) {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let key = (state.listener.clone(), state.name.clone());
        if map.get(&key).is_some_and(|s| Arc::ptr_eq(s, state)) {
            map.remove(&key);
            self.metrics.remove_backend(&state.listener, &state.name);
        }
    }

    /// Forgets a listener that left the config once its last connection has ended.
    pub fn remove_listener(&self, state: &Arc<ListenerState>) {
        let mut map = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&state.name).is_some_and(|s| Arc::ptr_eq(s, state)) {
            map.remove(&state.name);
            self.metrics.remove_listener(&state.name);
        }
    }

    /// The state of backend `name` of `listener`, created on first use with health
    /// `initial`; a backend that exists keeps its state.
    pub fn backend(&self, listener: &str, name: &str, initial: Health) -> Arc<BackendState> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry((listener.to_string(), name.to_string()))
                .or_insert_with(|| {
                    let state =
                        BackendState::new(listener, name, self.metrics.backend(listener, name));
                    state.health.store(initial as u8, Ordering::Relaxed);
                    Arc::new(state)
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_gives_the_slot_back_on_every_path() {
        let b = Arc::new(BackendState::new(
            "web",
            "a",
            Metrics::new().backend("web", "a"),
        ));
        let g1 = b.acquire();
        let g2 = b.acquire();
        assert_eq!(b.active(), 2);
        drop(g1);
        fn fails_early(_guard: BackendGuard) -> Result<(), ()> {
            Err(())
        }
        assert!(fails_early(g2).is_err());
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn each_ejection_in_a_row_doubles_up_to_the_cap_and_a_quiet_spell_starts_over() {
        let mut b = BackendState::new("web", "a", Metrics::new().backend("web", "a"));
        b.epoch = Instant::now() - Duration::from_secs(100);
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(4));
        let mut lengths = Vec::new();
        for _ in 0..4 {
            lengths.push(b.eject(base, max));
            assert!(b.is_ejected());
            assert!(matches!(b.phase(), Phase::Ejected { .. }));
            let until = b.ejected_until_ms.load(Ordering::Relaxed);
            b.end_ejection(until, b.now_ms(), "test");
            assert!(!b.is_ejected());
            assert_eq!(b.phase(), Phase::Up);
        }
        let secs = |n| Duration::from_secs(n);
        assert_eq!(lengths, [secs(1), secs(2), secs(4), secs(4)]);
        assert_eq!(b.ejections(), 4);
        // The last one ended more than max_ejection ago: base again.
        let now = b.now_ms();
        b.last_ejection_end_ms.store(now - 4_001, Ordering::Relaxed);
        assert_eq!(b.eject(base, max), secs(1));
        // A passing health check ends an ejection at once.
        b.record_health(Ok(()), 2, 3);
        assert!(!b.is_ejected());
    }

    #[test]
    fn a_reload_drops_the_api_s_weight_and_keeps_an_agent_s_words_while_it_has_an_agent() {
        let b = BackendState::new("web", "a", Metrics::new().backend("web", "a"));
        assert_eq!((b.runtime_weight(), b.agent_max_conns()), (None, None));
        for weight in [
            RuntimeWeight::Api(0),
            RuntimeWeight::Api(u32::MAX),
            RuntimeWeight::AgentPercent(0),
            RuntimeWeight::AgentPercent(1000),
        ] {
            b.set_runtime_weight(Some(weight));
            assert_eq!(b.runtime_weight(), Some(weight));
        }
        b.set_agent_max_conns(Some(u64::MAX));
        assert_eq!(b.agent_max_conns(), Some(u64::MAX - 1));
        b.set_agent_drained(true);
        assert_eq!(b.phase(), Phase::AgentDrained);
        assert!(
            !b.phase().is_draining(),
            "no drain clock: its connections stay"
        );
        b.after_reload(true);
        assert_eq!(b.runtime_weight(), Some(RuntimeWeight::AgentPercent(1000)));
        assert_eq!(b.phase(), Phase::AgentDrained);
        b.set_runtime_weight(Some(RuntimeWeight::Api(3)));
        b.after_reload(true);
        assert_eq!(b.runtime_weight(), None);
        b.set_agent_down(true);
        assert_eq!(b.phase(), Phase::Down);
        b.set_runtime_weight(Some(RuntimeWeight::AgentPercent(50)));
        b.after_reload(false);
        assert_eq!(
            (b.runtime_weight(), b.agent_max_conns(), b.phase()),
            (None, None, Phase::Up)
        );
    }

    #[test]
    fn failures_in_a_row_start_over_at_a_success() {
        let b = BackendState::new("web", "a", Metrics::new().backend("web", "a"));
        assert_eq!((b.record_failure(), b.record_failure()), (1, 2));
        b.record_success();
        assert_eq!(b.record_failure(), 1);
    }

    #[test]
    fn health_flips_only_after_rise_or_fall_consecutive_results() {
        let b = BackendState::new("web", "a", Metrics::new().backend("web", "a"));
        assert_eq!(b.record_health(fail(), 2, 3), None);
        assert_eq!(b.record_health(fail(), 2, 3), None);
        assert_eq!(
            b.record_health(Ok(()), 2, 3),
            None,
            "a success breaks the streak"
        );
        assert_eq!(b.record_health(fail(), 2, 3), None);
        assert_eq!(b.record_health(fail(), 2, 3), None);
        assert_eq!(b.record_health(fail(), 2, 3), Some(false));
        assert!(!b.is_up());
        assert_eq!(b.record_health(Ok(()), 2, 3), None);
        assert_eq!(b.record_health(Ok(()), 2, 3), Some(true));
        assert!(b.is_up());
        assert_eq!(b.last_failure().map(|f| f.reason), Some("refused".into()));
    }

    fn fail() -> Result<(), String> {
        Err("refused".into())
    }

    #[test]
    fn a_checking_backend_takes_its_first_result_as_it_comes() {
        let r = Registry::default();
        let good = r.backend("web", "good", Health::Checking);
        assert!(!good.is_up());
        assert_eq!(good.record_health(Ok(()), 2, 3), Some(true));
        assert!(good.is_up());
        let bad = r.backend("web", "bad", Health::Checking);
        assert_eq!(bad.record_health(fail(), 2, 3), Some(false));
        assert_eq!(bad.health(), Health::Down);
        assert_eq!(bad.record_health(Ok(()), 2, 3), None, "then rise applies");
        assert_eq!(bad.record_health(Ok(()), 2, 3), Some(true));
        // An existing backend keeps its state whatever is asked for.
        assert!(r.backend("web", "good", Health::Checking).is_up());
    }

    #[test]
    fn a_backend_s_phase_follows_its_service_and_its_health_and_the_drain_clock_starts_once() {
        let b = BackendState::new("web", "a", Metrics::new().backend("web", "a"));
        assert_eq!(b.phase(), Phase::Up);
        b.set_drained(true);
        let Phase::Draining { since } = b.phase() else {
            panic!("{:?}", b.phase())
        };
        // The config draining it too, or the operator again, does not restart the clock.
        b.set_config_drained(true);
        b.set_drained(true);
        assert_eq!(b.phase(), Phase::Draining { since });
        b.set_drained(false);
        assert_eq!(b.phase(), Phase::Up);
        b.set_config_drained(true);
        b.set_drained(true);
        b.undrain(true);
        assert!(b.phase().is_draining(), "the config still drains it");
        let Phase::Draining { since: kept } = b.phase() else {
            panic!()
        };
        // Time passes, so that a restarted clock would show.
        std::thread::sleep(Duration::from_millis(5));
        b.set_drained(true);
        b.undrain(true);
        assert_eq!(
            b.phase(),
            Phase::Draining { since: kept },
            "the clock runs on"
        );
        b.set_config_drained(false);
        b.record_health(Err("refused".into()), 1, 1);
        assert_eq!(b.phase(), Phase::Down);
        b.set_removed(true);
        assert!(matches!(b.phase(), Phase::Removed { .. }));
        b.set_drained(false);
        assert!(
            matches!(b.phase(), Phase::Removed { .. }),
            "only a reload brings it back"
        );
        b.set_removed(false);
        assert_eq!(b.phase(), Phase::Down, "back in service, health as checked");
    }

    #[test]
    fn the_registry_hands_out_the_same_state_for_the_same_names() {
        let r = Registry::default();
        let a = r.backend("web", "a", Health::Up);
        let _g = a.acquire();
        assert_eq!(r.backend("web", "a", Health::Up).active(), 1);
        assert_eq!(r.backend("api", "a", Health::Up).active(), 0);
    }
}
