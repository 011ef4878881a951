//! The drain supervisor: one mechanism for every way a backend leaves service.
//!
//! A backend drains when an operator drains it, when its config says `max_conns = 0`, or
//! when a reload removes it (or its whole listener). It gets no new connections from the
//! moment that happens (the strategies skip it); its established connections live on
//! until the listener's `drain_timeout`, and then ballast closes what remains. They are
//! closed *spread over a short window* (a quarter of `drain_timeout`, between 100 ms and
//! 5 s), oldest first, not all at once: a thousand clients reconnecting in the same
//! millisecond is the storm operators of other balancers complain about.
//!
//! A removed backend's (and listener's) runtime state is forgotten once its last
//! connection has ended; a backend that a later reload brings back before then keeps it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::info;

use crate::conn::{Conns, EndReason};
use crate::state::BackendState;
use crate::Ballast;

/// How often the supervisor looks.
pub const TICK: Duration = Duration::from_millis(50);

/// The window over which the connections left at the deadline are closed.
pub fn spread_window(drain_timeout: Duration) -> Duration {
    (drain_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// How many of `open` connections to close in this tick of length `tick`, so that the
/// last ones close as `left` (the time left in the spread window) runs out: all of them
/// once less than a tick is left, else `ceil(open * tick / left)`.
pub(crate) fn share_now(open: usize, tick: Duration, left: Duration) -> usize {
    if left <= tick {
        open
    } else {
        ((open as u128 * tick.as_micros()).div_ceil(left.as_micros())) as usize
    }
}

/// Runs until `stopped` turns true.
pub async fn run(ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(TICK) => {}
        }
        supervise(&ballast);
    }
}

/// One look at every draining backend.
fn supervise(ballast: &Ballast) {
    let routing = ballast.routing();
    let conns = ballast.conns();
    for listener in &routing.listeners {
        for backend in &listener.backends {
            if let Some(since) = backend.phase().draining_since() {
                enforce(conns, &backend.state, listener.config.drain_timeout, since);
            }
        }
    }
    let mut removed = ballast.removed();
    removed.backends.retain(|r| {
        if let Some(since) = r.state.phase().draining_since() {
            enforce(conns, &r.state, r.drain_timeout, since);
        }
        if r.state.active() > 0 {
            return true;
        }
        info!(listener = %r.state.listener, backend = %r.state.name, "removed backend has no connection left");
        ballast.registry().remove_backend(&r.state);
        false
    });
    removed.listeners.retain(|l| {
        if l.active() > 0 {
            return true;
        }
        ballast.registry().remove_listener(l);
        false
    });
}

/// Closes a share of `state`'s connections once `drain_timeout` has passed since it
/// began draining: so many per tick that the last ones close at the end of the spread
/// window.
fn enforce(conns: &Conns, state: &Arc<BackendState>, drain_timeout: Duration, since: Instant) {
    let Some(past) = since.elapsed().checked_sub(drain_timeout) else {
        return;
    };
    let open = state.active() as usize;
    if open == 0 {
        return;
    }
    let window = spread_window(drain_timeout);
    let left = window.saturating_sub(past);
    let n = share_now(open, TICK, left);
    let closed = conns.close_backend(state, n, false, EndReason::Drain);
    if closed > 0 {
        info!(
            listener = %state.listener, backend = %state.name, closed, open,
            "drain_timeout passed: closing connections"
        );
    }
}
