//! The connection table: every client connection from accept to its end, and the one way
//! ballast ends one.
//!
//! A connection is registered the moment it is accepted ([`Conns::open`]) and leaves the
//! table when its task drops the [`Conn`] handle, whatever path it took. Its entry holds
//! what the control plane needs to choose connections (listener, backend once picked,
//! start time) and an [`Ask`] cell: drain, rebalance and shutdown each end connections
//! with one call here, and the connection's task sees the request at its next poll and
//! ends with the reason it was given. Nothing else ends a connection from outside.
//!
//! The table is split in shards by connection id so that accepts on several threads do
//! not all queue on one lock; a scan (drain, rebalance, shutdown) takes the shards one
//! after the other and never holds a lock while a connection wakes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwapOption;
use std::time::Instant;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::handover::{Outbox, Parked};
use crate::state::{BackendState, ListenerState};

/// Why a connection ended: the `reason` of the access log and of
/// `ballast_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EndReason {
    /// The client ended its side first (FIN or reset).
    ClientClosed = 1,
    /// The backend ended its side first.
    BackendClosed,
    /// Nothing moved for the listener's `idle_timeout`.
    IdleTimeout,
    /// Its backend drained (operator, `max_conns = 0`, reload) past `drain_timeout`.
    Drain,
    /// Rebalance moved it away from an overloaded backend.
    Migrated,
    /// ballast shut down.
    Shutdown,
    /// No backend could be reached (every attempt failed or timed out).
    ConnectFailed,
    /// No backend was available to pick.
    NoBackend,
    /// A limit refused it (the listener's `max_conns`).
    Limit,
    /// Handed to another process on upgrade.
    Handover,
    /// A local failure (out of file descriptors or memory, a socket error of ballast's).
    Error,
}

impl EndReason {
    pub const ALL: [EndReason; 11] = [
        EndReason::ClientClosed,
        EndReason::BackendClosed,
        EndReason::IdleTimeout,
        EndReason::Drain,
        EndReason::Migrated,
        EndReason::Shutdown,
        EndReason::ConnectFailed,
        EndReason::NoBackend,
        EndReason::Limit,
        EndReason::Handover,
        EndReason::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ClientClosed => "client_closed",
            EndReason::BackendClosed => "backend_closed",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::Drain => "drain",
            EndReason::Migrated => "migrated",
            EndReason::Shutdown => "shutdown",
            EndReason::ConnectFailed => "connect_failed",
            EndReason::NoBackend => "no_backend",
            EndReason::Limit => "limit",
            EndReason::Handover => "handover",
            EndReason::Error => "error",
        }
    }

    /// The index of this reason in [`EndReason::ALL`].
    pub fn index(self) -> usize {
        self as usize - 1
    }

    fn from_u8(v: u8) -> Option<EndReason> {
        EndReason::ALL.get(usize::from(v).checked_sub(1)?).copied()
    }
}

/// What ballast asks of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// End it cleanly: let the frame in flight complete, then close both sides.
    Close(EndReason),
    /// End it now, no grace (the operator's second SIGTERM, a shutdown deadline).
    Abort(EndReason),
    /// Stop relaying at the next safe point and hand the connection over to a new
    /// process (an upgrade). A connection not relaying yet parks once it is; a close or
    /// an abort asked later replaces it, and a connection taken back resumes as if
    /// nothing had been asked ([`Entry::take_back`]).
    Park,
}

impl Ask {
    pub fn reason(self) -> EndReason {
        match self {
            Ask::Close(r) | Ask::Abort(r) => r,
            Ask::Park => EndReason::Handover,
        }
    }

    fn encode(self) -> u8 {
        match self {
            Ask::Close(r) => r as u8,
            Ask::Abort(r) => r as u8 | ABORT,
            Ask::Park => PARK,
        }
    }

    fn decode(v: u8) -> Option<Ask> {
        if v == PARK {
            return Some(Ask::Park);
        }
        let reason = EndReason::from_u8(v & !ABORT)?;
        Some(if v & ABORT != 0 {
            Ask::Abort(reason)
        } else {
            Ask::Close(reason)
        })
    }
}

/// The bit of an encoded [`Ask`] that says "abort".
const ABORT: u8 = 0x80;
/// An encoded [`Ask::Park`]: no reason has this value.
const PARK: u8 = 0x40;

/// Shards of the table; a power of two.
const SHARDS: usize = 16;

/// One connection's entry, shared by its task and the table.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub listener: Arc<ListenerState>,
    /// The socket's peer.
    peer: SocketAddr,
    /// The client a stage before the pick named (a PROXY protocol header), if any.
    named: OnceLock<SocketAddr>,
    pub started: Instant,
    /// The backend it counts against: the pick, then the backend a retry went to.
    backend: ArcSwapOption<BackendState>,
    /// An encoded [`Ask`], 0 while nobody asked. A later ask may only turn a close into
    /// an abort.
    ask: AtomicU8,
    /// Taken back from an upgrade's hand-over: not asked to park again.
    kept: AtomicBool,
    wake: Notify,
}

impl Entry {
    pub fn backend(&self) -> Option<Arc<BackendState>> {
        self.backend.load_full()
    }

    /// The client as the pick, the limits and the logs see it: the one a stage named,
    /// else the socket's peer.
    pub fn client(&self) -> SocketAddr {
        *self.named.get().unwrap_or(&self.peer)
    }

    /// Whether this connection counts against `backend` now.
    fn is_on(&self, backend: &Arc<BackendState>) -> bool {
        self.backend
            .load()
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, backend))
    }

    /// What was asked of the connection so far.
    pub fn asked(&self) -> Option<Ask> {
        Ask::decode(self.ask.load(Ordering::Acquire))
    }

    /// Asks the connection to end (or park); `false` when it had been asked already (an
    /// abort still upgrades an earlier close, and a close or an abort replaces a park).
    fn ask(&self, ask: Ask) -> bool {
        let mut current = self.ask.load(Ordering::Acquire);
        loop {
            let replace = current == PARK && ask != Ask::Park;
            let upgrade = matches!(ask, Ask::Abort(_)) && current != PARK && current & ABORT == 0;
            if current != 0 && !replace && !upgrade {
                return false;
            }
            let next = if current == 0 || replace {
                ask.encode()
            } else {
                current | ABORT
            };
            match self
                .ask
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // Every waiter: the relay's stop and the watch for an abort.
                    self.wake.notify_waiters();
                    return current == 0 || replace;
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// A connection asked to park and taken back (no hand-over going on, the new
    /// process refused it or failed) is as if never asked, and is not asked to park
    /// again; `false` when something else was asked meanwhile.
    pub fn take_back(&self) -> bool {
        self.kept.store(true, Ordering::Relaxed);
        self.ask
            .compare_exchange(PARK, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether it was taken back from a hand-over.
    pub fn is_kept(&self) -> bool {
        self.kept.load(Ordering::Relaxed)
    }

    /// Whether it was asked to end (a close or an abort; a park is no end, and a close
    /// replaces it).
    pub fn is_ending(&self) -> bool {
        matches!(self.asked(), Some(Ask::Close(_) | Ask::Abort(_)))
    }

    /// Resolves when the connection is asked to end (a close or an abort; not a park,
    /// which waits for the relay). Cancel-safe.
    pub async fn wait_end(&self) -> Ask {
        let mut seen = None;
        loop {
            match self.wait_ask(seen).await {
                Ask::Park => seen = Some(Ask::Park),
                ask => return ask,
            }
        }
    }

    /// Resolves with what ballast asks of this connection other than `seen`, at once if
    /// it asked already. Cancel-safe; a close that later turns into an abort is seen by
    /// a new wait with the close as `seen`.
    ///
    /// Cheap to poll again and again (a relay polls its stop on every wake-up): after
    /// the first poll has registered the task's waker, a poll is one atomic load.
    pub fn wait_ask(&self, seen: Option<Ask>) -> WaitAsk<'_> {
        WaitAsk {
            entry: self,
            seen,
            registered: None,
            // Created before any look, so an ask made in between still wakes it.
            notified: self.wake.notified(),
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Entry::wait_ask`].
    pub struct WaitAsk<'a> {
        entry: &'a Entry,
        seen: Option<Ask>,
        // The waker the `Notified` holds, once it holds one.
        registered: Option<Waker>,
        #[pin]
        notified: Notified<'a>,
    }
}

impl Future for WaitAsk<'_> {
    type Output = Ask;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ask> {
        let mut this = self.project();
        loop {
            if let Some(ask) = this.entry.asked().filter(|a| Some(*a) != *this.seen) {
                return Poll::Ready(ask);
            }
            if this
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                // The `Notified` already holds this waker, and an ask wakes every
                // waiter: nothing to do until then (a connection's task keeps its waker
                // for its whole life, so this is the common case).
                return Poll::Pending;
            }
            match this.notified.as_mut().poll(cx) {
                Poll::Pending => {
                    *this.registered = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                // Woken by an ask this future does not want (an earlier one): wait anew.
                Poll::Ready(()) => this.notified.set(this.entry.wake.notified()),
            }
        }
    }
}

/// Every open client connection.
#[derive(Debug)]
pub struct Conns {
    shards: [Mutex<HashMap<u64, Arc<Entry>>>; SHARDS],
    next_id: AtomicU64,
    /// Where parked connections go while an upgrade hands them over.
    outbox: Mutex<Option<Outbox>>,
}

impl Default for Conns {
    fn default() -> Conns {
        Conns {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            outbox: Mutex::new(None),
        }
    }
}

/// What became of a parked connection given to the hand-over.
#[derive(Debug)]
pub enum Handoff {
    /// The new process has it; this one keeps nothing of it.
    Sent,
    /// Taken back (no hand-over going on, the new process refused it or is gone):
    /// resume it.
    Back(Box<Parked>),
    /// Lost on the way: its sockets were closed.
    Lost,
}

/// A connection's place in the table; it leaves the table when this is dropped.
#[derive(Debug)]
pub struct Conn {
    table: Arc<Conns>,
    entry: Arc<Entry>,
}

impl std::ops::Deref for Conn {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl Conn {
    /// Notes the backend this connection counts against now (the pick, then each
    /// retry's), so that drain and rebalance find it under the backend it is on.
    pub fn set_backend(&self, backend: &Arc<BackendState>) {
        self.entry.backend.store(Some(Arc::clone(backend)));
    }

    /// The client a stage before the pick found (set once, before the pick).
    pub fn set_client(&self, client: SocketAddr) {
        let _ = self.entry.named.set(client);
    }

    /// Gives a parked connection to the hand-over going on, and waits for what became
    /// of it.
    pub async fn park(&self, parked: Parked) -> Handoff {
        let outbox = self
            .table
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(outbox) = outbox else {
            return Handoff::Back(Box::new(parked));
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        if let Err(refused) = outbox.send((parked, answer)) {
            return Handoff::Back(Box::new(refused.0 .0));
        }
        answered.await.unwrap_or(Handoff::Lost)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.shard(self.entry.id).remove(&self.entry.id);
    }
}

impl Conns {
    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection just accepted.
    pub fn open(self: &Arc<Self>, listener: &Arc<ListenerState>, client: SocketAddr) -> Conn {
        self.open_at(listener, client, Instant::now())
    }

    fn open_at(
        self: &Arc<Self>,
        listener: &Arc<ListenerState>,
        client: SocketAddr,
        started: Instant,
    ) -> Conn {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            id,
            listener: Arc::clone(listener),
            peer: client,
            named: OnceLock::new(),
            started,
            backend: ArcSwapOption::empty(),
            ask: AtomicU8::new(0),
            kept: AtomicBool::new(false),
            wake: Notify::new(),
        });
        self.shard(id).insert(id, Arc::clone(&entry));
        Conn {
            table: Arc::clone(self),
            entry,
        }
    }

    /// Where parked connections go from now on (`None`: nowhere, they are taken back
    /// at once).
    pub(crate) fn set_outbox(&self, outbox: Option<Outbox>) {
        *self.outbox.lock().unwrap_or_else(|e| e.into_inner()) = outbox;
    }

    /// Registers a connection another process accepted `age` ago (an upgrade's hand-over).
    pub fn open_handed(
        self: &Arc<Self>,
        listener: &Arc<ListenerState>,
        client: SocketAddr,
        age: std::time::Duration,
    ) -> Conn {
        let now = Instant::now();
        self.open_at(listener, client, now.checked_sub(age).unwrap_or(now))
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries that `keep` selects, oldest first (by when the connection was
    /// accepted: one handed over by an upgrade keeps its age).
    pub fn select(&self, keep: impl Fn(&Entry) -> bool) -> Vec<Arc<Entry>> {
        let mut chosen: Vec<Arc<Entry>> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            chosen.extend(shard.values().filter(|e| keep(e)).cloned());
        }
        chosen.sort_unstable_by_key(|e| (e.started, e.id));
        chosen
    }

    /// How many entries `keep` selects.
    pub fn count(&self, keep: impl Fn(&Entry) -> bool) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let shard = s.lock().unwrap_or_else(|e| e.into_inner());
                shard.values().filter(|e| keep(e)).count()
            })
            .sum()
    }

    /// Connections of `backend` not asked to end yet, oldest first.
    fn of_backend(&self, backend: &Arc<BackendState>) -> Vec<Arc<Entry>> {
        self.select(|e| !e.is_ending() && e.is_on(backend))
    }

    /// Asks up to `n` connections of `backend` to close cleanly with `reason`, the
    /// newest first when `newest`, else the oldest first. Returns how many were asked.
    pub fn close_backend(
        &self,
        backend: &Arc<BackendState>,
        n: usize,
        newest: bool,
        reason: EndReason,
    ) -> usize {
        let open = self.of_backend(backend);
        let chosen: Box<dyn Iterator<Item = &Arc<Entry>>> = if newest {
            Box::new(open.iter().rev().take(n))
        } else {
            Box::new(open.iter().take(n))
        };
        chosen.filter(|e| e.ask(Ask::Close(reason))).count()
    }

    /// Asks every connection not asked anything yet to park; returns how many.
    pub fn park_all(&self) -> usize {
        self.select(|e| e.asked().is_none() && !e.is_kept())
            .iter()
            .filter(|e| e.ask(Ask::Park))
            .count()
    }

    /// Asks every connection `ask`; returns how many had not been asked before.
    pub fn ask_all(&self, ask: Ask) -> usize {
        self.select(|_| true).iter().filter(|e| e.ask(ask)).count()
    }

    /// Asks the oldest connections not asked yet to close with `reason`: as many as
    /// `share` says of how many are left; one scan of the table.
    pub fn close_share(&self, share: impl FnOnce(usize) -> usize, reason: EndReason) -> usize {
        let left = self.select(|e| !e.is_ending());
        let n = share(left.len());
        left.iter()
            .take(n)
            .filter(|e| e.ask(Ask::Close(reason)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn listener() -> Arc<ListenerState> {
        Arc::new(ListenerState::new("web", Metrics::new().listener("web")))
    }

    fn client() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    #[test]
    fn a_connection_leaves_the_table_when_its_handle_drops() {
        let table = Arc::new(Conns::default());
        let l = listener();
        let a = table.open(&l, client());
        let b = table.open(&l, client());
        assert_eq!(table.len(), 2);
        drop(a);
        assert_eq!(table.len(), 1);
        drop(b);
        assert!(table.is_empty());
    }

    #[test]
    fn the_first_ask_wins_and_an_abort_upgrades_a_close() {
        let table = Arc::new(Conns::default());
        let c = table.open(&listener(), client());
        assert_eq!(c.asked(), None);
        assert!(c.ask(Ask::Close(EndReason::Drain)));
        assert!(!c.ask(Ask::Close(EndReason::Migrated)));
        assert_eq!(c.asked(), Some(Ask::Close(EndReason::Drain)));
        assert!(!c.ask(Ask::Abort(EndReason::Shutdown)), "asked before");
        assert_eq!(c.asked(), Some(Ask::Abort(EndReason::Drain)));
    }

    #[test]
    fn a_park_gives_way_to_a_close_and_one_taken_back_is_not_parked_again() {
        let table = Arc::new(Conns::default());
        let l = listener();
        let (a, b, c) = (
            table.open(&l, client()),
            table.open(&l, client()),
            table.open(&l, client()),
        );
        assert!(a.ask(Ask::Close(EndReason::Drain)));
        // Only those asked nothing yet park.
        assert_eq!(table.park_all(), 2);
        assert_eq!((b.asked(), c.asked()), (Some(Ask::Park), Some(Ask::Park)));
        assert_eq!(a.asked(), Some(Ask::Close(EndReason::Drain)));
        // A close replaces a park; a park never replaces anything.
        assert!(b.ask(Ask::Close(EndReason::Shutdown)));
        assert_eq!(b.asked(), Some(Ask::Close(EndReason::Shutdown)));
        assert!(!b.ask(Ask::Park));
        assert!(!b.take_back(), "b was asked to close meanwhile");
        // Taken back: as if never asked, and left alone by the next round.
        assert!(c.take_back());
        assert_eq!(c.asked(), None);
        assert_eq!(table.park_all(), 0);
        // An abort replaces a park as a close does.
        let d = table.open(&l, client());
        assert_eq!(table.park_all(), 1);
        assert!(d.ask(Ask::Abort(EndReason::Shutdown)));
        assert_eq!(d.asked(), Some(Ask::Abort(EndReason::Shutdown)));
    }

    #[tokio::test]
    async fn waiting_for_an_end_passes_over_a_park() {
        let table = Arc::new(Conns::default());
        let c = table.open(&listener(), client());
        assert_eq!(table.park_all(), 1);
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), c.wait_end()).await;
        assert!(early.is_err(), "a park is no end");
        assert!(c.ask(Ask::Close(EndReason::Shutdown)));
        assert_eq!(c.wait_end().await, Ask::Close(EndReason::Shutdown));
    }

    #[test]
    fn a_connection_handed_over_keeps_its_age_and_counts_as_older_than_those_opened_here() {
        let table = Arc::new(Conns::default());
        let l = listener();
        let here = table.open(&l, client());
        let handed = table.open_handed(&l, client(), std::time::Duration::from_secs(5));
        assert!(handed.started.elapsed() >= std::time::Duration::from_secs(5));
        let oldest_first: Vec<u64> = table.select(|_| true).iter().map(|e| e.id).collect();
        assert_eq!(oldest_first, [handed.id, here.id]);
    }

    #[test]
    fn connections_still_asked_to_park_after_a_hand_over_can_still_be_closed() {
        let table = Arc::new(Conns::default());
        let l = listener();
        let c = table.open(&l, client());
        assert_eq!(table.park_all(), 1);
        // A shutdown's close (or a drain's) finds it, and replaces the park.
        assert_eq!(table.close_share(|left| left, EndReason::Shutdown), 1);
        assert_eq!(c.asked(), Some(Ask::Close(EndReason::Shutdown)));
        assert!(c.is_ending());
        assert_eq!(table.close_share(|left| left, EndReason::Shutdown), 0);
    }

    #[test]
    fn a_backend_s_connections_close_oldest_or_newest_first_and_once() {
        let registry = crate::state::Registry::default();
        let a = registry.backend("web", "a", crate::state::Health::Up);
        let other = registry.backend("web", "b", crate::state::Health::Up);
        let table = Arc::new(Conns::default());
        let l = listener();
        let conns: Vec<Conn> = (0..5)
            .map(|i| {
                let c = table.open(&l, client());
                c.set_backend(if i == 2 { &other } else { &a });
                c
            })
            .collect();
        assert_eq!(table.close_backend(&a, 1, false, EndReason::Drain), 1);
        assert_eq!(conns[0].asked(), Some(Ask::Close(EndReason::Drain)));
        assert_eq!(table.close_backend(&a, 1, true, EndReason::Migrated), 1);
        assert_eq!(conns[4].asked(), Some(Ask::Close(EndReason::Migrated)));
        assert_eq!(table.close_backend(&a, 10, false, EndReason::Drain), 2);
        assert_eq!(conns[2].asked(), None, "another backend's");
        assert_eq!(table.close_backend(&a, 10, false, EndReason::Drain), 0);
    }

    #[tokio::test]
    async fn a_waiting_connection_hears_the_ask_made_before_it_waited() {
        let table = Arc::new(Conns::default());
        let c = table.open(&listener(), client());
        table.ask_all(Ask::Close(EndReason::Shutdown));
        assert_eq!(c.wait_ask(None).await, Ask::Close(EndReason::Shutdown));
        table.ask_all(Ask::Abort(EndReason::Shutdown));
        let seen = Some(Ask::Close(EndReason::Shutdown));
        assert_eq!(c.wait_ask(seen).await, Ask::Abort(EndReason::Shutdown));
    }

    #[test]
    fn reasons_have_their_contract_names() {
        let names: Vec<&str> = EndReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "client_closed",
                "backend_closed",
                "idle_timeout",
                "drain",
                "migrated",
                "shutdown",
                "connect_failed",
                "no_backend",
                "limit",
                "handover",
                "error"
            ]
        );
        for (i, r) in EndReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(EndReason::from_u8(*r as u8), Some(*r));
        }
    }
}
