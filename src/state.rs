//! Runtime state: what ballast knows about listeners and backends that is not config.
//!
//! Live counts, totals, byte counters, health and drain flags are atomics in an
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
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runtime state of one backend of one listener.
#[derive(Debug)]
pub struct BackendState {
    pub listener: String,
    pub name: String,
    /// Connections counted against this backend right now (from pick to close).
    active: AtomicU64,
    /// Connections established to this backend since start.
    total: AtomicU64,
    connect_failures: AtomicU64,
    /// Bytes relayed client -> backend.
    sent_bytes: AtomicU64,
    /// Bytes relayed backend -> client.
    received_bytes: AtomicU64,
    /// Health: `false` after `fall` failed checks, `true` again after `rise` good ones.
    up: AtomicBool,
    /// Drained through the admin API; survives reloads while the backend exists.
    drained: AtomicBool,
    /// Consecutive health check results of the current streak (for rise/fall).
    health_streak: AtomicU32,
    /// When the backend (re)entered service, for slow start; millis since `epoch`.
    in_service_since_ms: AtomicU64,
    epoch: Instant,
}

impl BackendState {
    pub fn new(listener: &str, name: &str) -> BackendState {
        BackendState {
            listener: listener.to_string(),
            name: name.to_string(),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            up: AtomicBool::new(true),
            drained: AtomicBool::new(false),
            health_streak: AtomicU32::new(0),
            in_service_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Takes the backend out of service (`true`) or puts it back (`false`).
    pub fn set_drained(&self, drained: bool) {
        if self.drained.swap(drained, Ordering::Relaxed) && !drained {
            self.mark_in_service();
        }
    }

    /// Counts a new connection against this backend until the guard is dropped.
    pub fn acquire(self: &Arc<Self>) -> BackendGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard {
            backend: Arc::clone(self),
        }
    }

    pub fn record_connected(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
    }
    pub fn record_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_sent(&self, bytes: u64) {
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn add_received(&self, bytes: u64) {
        self.received_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Feeds one health check result; returns the new up/down state when it flipped.
    /// Up goes down after `fall` consecutive failures, down goes up after `rise`
    /// consecutive successes.
    pub fn record_health(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        let up = self.is_up();
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
        self.up.store(ok, Ordering::Relaxed);
        if ok {
            self.mark_in_service();
        }
        Some(ok)
    }

    fn mark_in_service(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.in_service_since_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the backend has been in service, for slow start.
    pub fn in_service_for(&self) -> Duration {
        let since = self.in_service_since_ms.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(since))
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
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a client connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The listener is at its `max_conns`.
    MaxConns,
    /// No backend is available (or none could be reached).
    NoBackend,
}

/// Runtime state of one listener.
#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    active: AtomicU64,
    total: AtomicU64,
    rejected_max_conns: AtomicU64,
    rejected_no_backend: AtomicU64,
}

impl ListenerState {
    pub fn new(name: &str) -> ListenerState {
        ListenerState {
            name: name.to_string(),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            rejected_max_conns: AtomicU64::new(0),
            rejected_no_backend: AtomicU64::new(0),
        }
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        match reason {
            RejectReason::MaxConns => self.rejected_max_conns.load(Ordering::Relaxed),
            RejectReason::NoBackend => self.rejected_no_backend.load(Ordering::Relaxed),
        }
    }
    pub fn record_rejected(&self, reason: RejectReason) {
        match reason {
            RejectReason::MaxConns => &self.rejected_max_conns,
            RejectReason::NoBackend => &self.rejected_no_backend,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an accepted client connection until the guard is dropped.
    pub fn accept(self: &Arc<Self>) -> ListenerGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ListenerGuard {
            listener: Arc::clone(self),
        }
    }
}

/// One client connection's slot in its listener's live count.
#[derive(Debug)]
pub struct ListenerGuard {
    listener: Arc<ListenerState>,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.listener.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All runtime state by name; outlives every config snapshot.
#[derive(Debug, Default)]
pub struct Registry {
    listeners: Mutex<HashMap<String, Arc<ListenerState>>>,
    backends: Mutex<HashMap<(String, String), Arc<BackendState>>>,
}

impl Registry {
    /// The state of listener `name`, created on first use.
    pub fn listener(&self, name: &str) -> Arc<ListenerState> {
        let mut map = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry(name.to_string())
                .or_insert_with(|| Arc::new(ListenerState::new(name))),
        )
    }

    /// The state of backend `name` of `listener`, created (in service) on first use.
    pub fn backend(&self, listener: &str, name: &str) -> Arc<BackendState> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry((listener.to_string(), name.to_string()))
                .or_insert_with(|| Arc::new(BackendState::new(listener, name))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_gives_the_slot_back_on_every_path() {
        let b = Arc::new(BackendState::new("web", "a"));
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
    fn health_flips_only_after_rise_or_fall_consecutive_results() {
        let b = BackendState::new("web", "a");
        assert_eq!(b.record_health(false, 2, 3), None);
        assert_eq!(b.record_health(false, 2, 3), None);
        assert_eq!(
            b.record_health(true, 2, 3),
            None,
            "a success breaks the streak"
        );
        assert_eq!(b.record_health(false, 2, 3), None);
        assert_eq!(b.record_health(false, 2, 3), None);
        assert_eq!(b.record_health(false, 2, 3), Some(false));
        assert!(!b.is_up());
        assert_eq!(b.record_health(true, 2, 3), None);
        assert_eq!(b.record_health(true, 2, 3), Some(true));
        assert!(b.is_up());
    }

    #[test]
    fn the_registry_hands_out_the_same_state_for_the_same_names() {
        let r = Registry::default();
        let a = r.backend("web", "a");
        let _g = a.acquire();
        assert_eq!(r.backend("web", "a").active(), 1);
        assert_eq!(r.backend("api", "a").active(), 0);
    }
}
