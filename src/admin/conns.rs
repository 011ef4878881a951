//! The admin endpoint's open connections: a bounded table, oldest first, each marked
//! idle or busy, so that a new connection over the cap can close the oldest idle one.
//!
//! Only the endpoint's own work makes a connection busy: from the moment a request has
//! been read in full (its head, and its body where the route takes one) until its
//! answer has been handed to hyper. Whatever waits on the client (a request head or
//! body still to come, an answer the client does not read) leaves the connection idle,
//! so no client can hold a place by being slow; such a connection is closed when room
//! is needed. Each connection's task (and a body being read on it) watches its own
//! `close` signal; asking it to close is cancel-safe and may come before anyone waits.

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
    /// Where the connection is in a request.
    phase: Mutex<Phase>,
    /// Set once the table asked the connection to close, so it is not counted or
    /// asked again while it goes; also what a late waiter on `close` looks at.
    closing: AtomicBool,
    /// Wakes everyone waiting on the connection (its task, a body being read) to close.
    close: Notify,
    /// Signalled when the task has ended and its socket is closed.
    gone: Notify,
}

/// Where a connection is in a request.
#[derive(Debug, Default, Clone, Copy)]
struct Phase {
    /// When the request being served arrived (its head was read); `None` while the
    /// connection waits for a request head. The sweep closes a request older than
    /// the limit.
    request_since: Option<Instant>,
    /// The endpoint is working on the request (it has been read in full and its answer
    /// is being made): the connection may not be closed to make room.
    busy: bool,
}

impl Conn {
    /// Marks a request in progress (its head was read) until the guard is dropped. The
    /// connection stays idle for the table until [`Conn::start_work`].
    pub(super) fn start_request(self: &Arc<Self>) -> InRequest {
        self.update(|phase| phase.request_since = Some(Instant::now()));
        InRequest(Arc::clone(self))
    }

    /// Marks the connection busy (the request has been read, its answer is being made)
    /// until the guard is dropped.
    pub(super) fn start_work(self: &Arc<Self>) -> Busy {
        self.update(|phase| phase.busy = true);
        Busy(Arc::clone(self))
    }

    /// Whether a request is in progress: its head has been read and its answer not
    /// yet handed over in full.
    pub(super) fn in_request(&self) -> bool {
        self.phase().request_since.is_some()
    }

    /// Resolves once the table has asked this connection to close; any number may
    /// wait, and one that starts waiting after the ask resolves at once.
    pub(super) async fn close_requested(&self) {
        let notified = self.close.notified();
        tokio::pin!(notified);
        // Registered before the flag is read, so an ask in between is not lost.
        notified.as_mut().enable();
        if self.is_closing() {
            return;
        }
        notified.await
    }

    /// Resolves once the connection's task has ended.
    pub(super) async fn gone(&self) {
        self.gone.notified().await
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut Phase)) {
        change(&mut self.phase.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Asks the task to close; false when it was asked already.
    fn ask_to_close(&self) -> bool {
        let first = !self.closing.swap(true, Ordering::SeqCst);
        if first {
            self.close.notify_waiters();
        }
        first
    }
}

/// A request in progress on a connection; dropped when its answer has been handed to
/// hyper in full.
#[derive(Debug)]
pub(super) struct InRequest(Arc<Conn>);

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.update(|phase| phase.request_since = None);
    }
}

/// The endpoint working on a request; dropped when its answer has been made.
#[derive(Debug)]
pub(super) struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.update(|phase| phase.busy = false);
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
    /// cap the oldest idle one is asked to close for it (and the new one takes its
    /// place, in the reserve or not); when every one is busy it takes one of `reserve`
    /// places, and beyond those it is refused.
    pub(super) fn admit(self: &Arc<Self>, max_conns: usize, reserve: usize) -> Admission {
        let mut inner = self.lock();
        let open = inner.conns.values().filter(|c| !c.is_closing()).count();
        let mut evicted = None;
        let mut in_reserve = false;
        if open >= max_conns {
            evicted = Self::evict_oldest_idle_locked(&inner);
            match &evicted {
                Some(evicted) => in_reserve = evicted.reserve,
                None if open >= max_conns + reserve => return Admission::Refused,
                None => in_reserve = true,
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let conn = Arc::new(Conn {
            id,
            reserve: in_reserve,
            phase: Mutex::new(Phase::default()),
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
            .find(|c| !c.is_closing() && !c.phase().busy)?;
        oldest.ask_to_close();
        Some(Arc::clone(oldest))
    }

    /// Asks every connection in one request for longer than `limit` to close (a
    /// request the endpoint never finishes, a client that never takes its answer).
    /// Returns how many.
    pub(super) fn sweep(&self, now: Instant, limit: Duration) -> usize {
        self.lock()
            .conns
            .values()
            .filter(|c| {
                c.phase()
                    .request_since
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
        let _busy = first.start_work();
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
        let (_busy_a, _busy_b) = (a.start_work(), b.start_work());
        let (c, _rc, evicted) = open(&table);
        assert!(evicted.is_none());
        assert!(c.reserve, "let in as a reserve connection");
        let _busy_c = c.start_work();
        assert!(matches!(table.admit(2, 1), Admission::Refused));
    }

    #[test]
    fn a_finished_request_makes_its_connection_idle_again() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let (b, _rb, _) = open(&table);
        let busy = a.start_work();
        let _busy_b = b.start_work();
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
        let _request = a.start_request();
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(table.sweep(later, Duration::from_secs(60)), 1);
        assert!(a.is_closing() && !b.is_closing());
        assert_eq!(table.sweep(later, Duration::from_secs(60)), 0, "asked once");
    }

    #[test]
    fn a_request_still_being_sent_leaves_its_connection_idle() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let (b, _rb, _) = open(&table);
        // `a` has sent a request head and is slow with its body; `b` is being answered.
        let _waiting_for_body = a.start_request();
        let _busy_b = b.start_work();
        let (c, _rc, evicted) = open(&table);
        assert_eq!(evicted.unwrap().id, a.id, "the slow client makes room");
        assert!(!c.reserve);
    }

    #[test]
    fn a_connection_that_replaces_a_reserve_one_is_in_the_reserve_too() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let (b, _rb, _) = open(&table);
        let (_busy_a, _busy_b) = (a.start_work(), b.start_work());
        let (c, _rc, _) = open(&table);
        assert!(c.reserve);
        // `c` is idle: the next one closes it and takes its reserve place, so no more
        // than two connections ever serve every route.
        let (d, _rd, evicted) = open(&table);
        assert_eq!(evicted.unwrap().id, c.id);
        assert!(d.reserve);
    }

    #[tokio::test]
    async fn an_ask_to_close_reaches_every_waiter_and_a_late_one() {
        let table = Arc::new(Table::default());
        let (a, _ra, _) = open(&table);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let a = Arc::clone(&a);
                tokio::spawn(async move { a.close_requested().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(table.evict_oldest_idle().is_some());
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("woken")
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), a.close_requested())
            .await
            .expect("a late waiter resolves at once");
    }
}
