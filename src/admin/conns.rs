//! The admin endpoint's open connections: a bounded table, oldest first, each marked
//! idle or busy, so that a new connection over the cap can close the oldest idle one.
//!
//! A connection is busy from the moment its request head has been read until its answer
//! has been written; otherwise it is idle (waiting for a first or a keep-alive request).
//! Each connection's task watches its own `close` signal; asking it to close is
//! cancel-safe and may come before the task first waits on it (a stored permit).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// One open admin connection, shared by its task and the table.
#[derive(Debug)]
pub(super) struct Conn {
    /// Order of arrival: the table closes the lowest idle id first.
    id: u64,
    /// Let in over the cap while every other connection was busy: it answers only the
    /// health and metrics routes.
    pub(super) reserve: bool,
    /// When the request being served started; `None` while idle.
    busy_since: Mutex<Option<Instant>>,
    /// Set once the table asked the connection to close, so it is not counted or
    /// asked again while it goes.
    closing: AtomicBool,
    /// Wakes the connection's task to close it.
    close: Notify,
    /// Signalled when the task has ended and its socket is closed.
    gone: Notify,
}

impl Conn {
    /// Marks the connection busy until the guard is dropped.
    pub(super) fn start_request(self: &Arc<Self>) -> Busy {
        *self.busy_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Busy(Arc::clone(self))
    }

    /// Resolves once the table has asked this connection to close.
    pub(super) async fn close_requested(&self) {
        self.close.notified().await
    }

    /// Resolves once the connection's task has ended.
    pub(super) async fn gone(&self) {
        self.gone.notified().await
    }

    fn busy_since(&self) -> Option<Instant> {
        *self.busy_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Asks the task to close; false when it was asked already.
    fn ask_to_close(&self) -> bool {
        let first = !self.closing.swap(true, Ordering::Relaxed);
        if first {
            self.close.notify_one();
        }
        first
    }
}

/// A request in progress on a connection; dropped when its answer has been written.
#[derive(Debug)]
pub(super) struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.busy_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// What the table decided for a new connection.
#[derive(Debug)]
pub(super) enum Admission {
    /// Serve it; `evicted` is the idle connection asked to close to make room.
    Open {
        conn: Arc<Conn>,
        registration: Registration,
        evicted: Option<Arc<Conn>>,
    },
    /// Over the cap and the reserve, every connection busy: close it at once.
    Refused,
}

/// The open connections, oldest first.
#[derive(Debug, Default)]
pub(super) struct Table {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    conns: BTreeMap<u64, Arc<Conn>>,
}

impl Table {
    /// Admits a new connection: below `max_conns` open ones it is simply added; at the
    /// cap the oldest idle one is asked to close for it; when every one is busy it
    /// takes one of `reserve` places, and beyond those it is refused.
    pub(super) fn admit(self: &Arc<Self>, max_conns: usize, reserve: usize) -> Admission {
        let mut inner = self.lock();
        let open = inner.conns.values().filter(|c| !c.is_closing()).count();
        let mut evicted = None;
        let mut in_reserve = false;
        if open >= max_conns {
            evicted = Self::evict_oldest_idle_locked(&inner);
            if evicted.is_none() {
                if open >= max_conns + reserve {
                    return Admission::Refused;
                }
                in_reserve = true;
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let conn = Arc::new(Conn {
            id,
            reserve: in_reserve,
            busy_since: Mutex::new(None),
            closing: AtomicBool::new(false),
            close: Notify::new(),
            gone: Notify::new(),
        });
        inner.conns.insert(id, Arc::clone(&conn));
        Admission::Open {
            registration: Registration {
                table: Arc::clone(self),
                conn: Arc::clone(&conn),
            },
            conn,
            evicted,
        }
    }

    /// Asks the oldest idle connection to close (the process is out of file
    /// descriptors and the accept loop needs one back).
    pub(super) fn evict_oldest_idle(&self) -> Option<Arc<Conn>> {
        Self::evict_oldest_idle_locked(&self.lock())
    }

    fn evict_oldest_idle_locked(inner: &Inner) -> Option<Arc<Conn>> {
        let oldest = inner
            .conns
            .values()
            .find(|c| !c.is_closing() && c.busy_since().is_none())?;
        oldest.ask_to_close();
        Some(Arc::clone(oldest))
    }

    /// Asks every connection busy with one request for longer than `limit` to close
    /// (a client that never reads its answer). Returns how many.
    pub(super) fn sweep(&self, now: Instant, limit: Duration) -> usize {
        self.lock()
            .conns
            .values()
            .filter(|c| {
                c.busy_since()
                    .is_some_and(|since| now.saturating_duration_since(since) > limit)
            })
            .filter(|c| c.ask_to_close())
            .count()
    }

    /// Asks every connection to close (the endpoint is stopping).
    pub(super) fn close_all(&self) {
        for conn in self.lock().conns.values() {
            conn.ask_to_close();
        }
    }

    /// Connections open and not asked to close.
    pub(super) fn open(&self) -> usize {
        self.lock()
            .conns
            .values()
            .filter(|c| !c.is_closing())
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place in the table, held by its task: dropping it (after the socket)
/// removes the connection and tells whoever waits that it is gone.
#[derive(Debug)]
pub(super) struct Registration {
    table: Arc<Table>,
    conn: Arc<Conn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().conns.remove(&self.conn.id);
        self.conn.gone.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(table: &Arc<Table>) -> (Arc<Conn>, Registration, Option<Arc<Conn>>) {
        match table.admit(2, 1) {
            Admission::Open {
                conn,
                registration,
                evicted,
            } => (conn, registration, evicted),
            Admission::Refused => panic!("refused"),
        }
    }

    #[test]
    fn over_the_cap_the_oldest_idle_connection_is_closed_first() {
        let table = Arc::new(Table::default());
        let (first, _r1, none) = open(&table);
        let (second, _r2, _) = open(&table);
        assert!(none.is_none());
        let _busy = first.start_request();
        // The first is busy, so the second (the oldest idle one) makes room.
        let (third, _r3, evicted) = open(&table);
        assert_eq!(evicted.unwrap().id, second.id);
        assert!(second.is_closing() && !first.is_closing());
        assert!(!third.reserve);
        assert_eq!(table.open(), 2);
    }

    #[test]
    fn with_every_connection_busy_the_reserve_lets_one_in_then_refuses() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let (b, _rb, _) = open(&table);
        let (_busy_a, _busy_b) = (a.start_request(), b.start_request());
        let (c, _rc, evicted) = open(&table);
        assert!(evicted.is_none());
        assert!(c.reserve, "let in as a reserve connection");
        let _busy_c = c.start_request();
        assert!(matches!(table.admit(2, 1), Admission::Refused));
    }

    #[test]
    fn a_finished_request_makes_its_connection_idle_again() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let (b, _rb, _) = open(&table);
        let busy = a.start_request();
        let _busy_b = b.start_request();
        drop(busy);
        let (_c, _rc, evicted) = open(&table);
        assert_eq!(evicted.unwrap().id, a.id);
    }

    #[test]
    fn a_connection_leaves_the_table_when_its_task_ends() {
        let table = Arc::new(Table::default());
        let (_a, ra, _) = open(&table);
        assert_eq!(table.open(), 1);
        drop(ra);
        assert_eq!(table.open(), 0);
    }

    #[test]
    fn the_sweep_closes_a_request_stuck_longer_than_the_limit() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let (b, _rb, _) = open(&table);
        let _busy = a.start_request();
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(table.sweep(later, Duration::from_secs(60)), 1);
        assert!(a.is_closing() && !b.is_closing());
        assert_eq!(table.sweep(later, Duration::from_secs(60)), 0, "asked once");
    }
}
