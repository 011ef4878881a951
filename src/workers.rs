//! The worker threads that carry connections: one single-threaded tokio runtime per
//! thread, nothing shared between them on the way of a byte.
//!
//! Every worker runs an accept loop of its own for every listener (on the same
//! listening socket), and a connection's task stays on the worker it starts on for its
//! whole life: its wake-ups, timers and socket events never cross threads, and no
//! idle worker steals or is woken to look for work — the costs that grew with the number
//! of cores under a work-stealing runtime. nginx's workers and HAProxy's threads work
//! the same way. Picks stay serialised by the listener's pick lock.
//!
//! Whichever worker wakes first accepts, and a worker that accepts a burst of
//! connections would keep them all: a burst of long-lived ones (a client fleet
//! reconnecting, a load test's connections) would then load one core and leave the
//! others idle. So a worker that carries more than [`SLACK`] connections beyond the
//! least loaded one starts a new connection's task on that one instead ([`Spread`]), as
//! HAProxy hands an accepted connection to its least loaded thread. While the workers
//! are even, a connection stays where it was accepted, with no cross-thread wake-up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

/// How many connections one worker may carry beyond the least loaded one before it
/// passes new ones on (at least this, or an eighth of the least loaded one's).
pub const SLACK: usize = 2;

/// The worker runtimes.
#[derive(Debug, Clone)]
pub struct Workers {
    handles: Vec<Handle>,
}

impl Workers {
    /// Starts `n` worker threads (at least one), each running a single-threaded runtime
    /// until the process ends.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("ballast-worker-{i}"))
                .spawn(move || runtime.block_on(keep_a_timer()))?;
        }
        Ok(Workers { handles })
    }

    /// The runtime of each worker.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// How often a worker's idle timer fires: see [`keep_a_timer`].
const TICK: Duration = Duration::from_secs(1);

/// Keeps a timer pending on the worker's runtime, forever. tokio wakes its own driver
/// (a write to its eventfd, and a turn of its loop) whenever a new timer is due before
/// the next wake-up it planned, and always when it planned none: without a timer that
/// is always there, every new connection's connect timeout cost that system call. With
/// this one due within a second, a connect timeout (seconds) never comes first; it
/// fires once a second on a worker with nothing else to do.
async fn keep_a_timer() {
    loop {
        tokio::time::sleep(TICK).await;
    }
}

/// The worker runtimes that carry connections, and how many each carries: where a new
/// connection's task goes.
#[derive(Debug)]
pub struct Spread {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    live: Live,
}

/// A worker's count of live connections, on a cache line of its own: the worker that
/// accepts a connection adds it to its worker's count, and that worker takes it off
/// when the connection ends.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Live(AtomicUsize);

impl Spread {
    pub fn new(handles: Vec<Handle>) -> Spread {
        Spread {
            workers: handles
                .into_iter()
                .map(|handle| Worker {
                    handle,
                    live: Live::default(),
                })
                .collect(),
        }
    }

    /// The worker runtimes, in order.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.workers.iter().map(|w| &w.handle)
    }

    pub fn handle(&self, worker: usize) -> &Handle {
        &self.workers[worker].handle
    }

    /// Live connections on each worker.
    pub fn loads(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.live.0.load(Ordering::Relaxed))
            .collect()
    }

    /// The worker that should carry a connection worker `me` accepted: `me`, unless it
    /// carries more than [`SLACK`] (or an eighth) beyond the least loaded worker.
    pub fn choose(&self, me: usize) -> usize {
        if self.workers.len() < 2 {
            return me;
        }
        let live = |i: usize| self.workers[i].live.0.load(Ordering::Relaxed);
        let mine = live(me);
        let (least, fewest) = (0..self.workers.len())
            .map(|i| (i, live(i)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        if mine > fewest + SLACK.max(fewest / 8) {
            least
        } else {
            me
        }
    }

    /// Places a connection worker `me` accepted ([`Spread::choose`]) and counts it there
    /// at once, so that the next choice (on any worker) sees it.
    pub fn place(self: &Arc<Self>, me: usize) -> OnWorker {
        self.enter(self.choose(me))
    }

    /// Counts a connection on `worker` until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>, worker: usize) -> OnWorker {
        self.workers[worker].live.0.fetch_add(1, Ordering::Relaxed);
        OnWorker {
            spread: Arc::clone(self),
            worker,
        }
    }
}

/// A connection counted on its worker (see [`Spread::enter`]).
#[derive(Debug)]
pub struct OnWorker {
    spread: Arc<Spread>,
    worker: usize,
}

impl OnWorker {
    /// The worker that carries the connection.
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for OnWorker {
    fn drop(&mut self) {
        self.spread.workers[self.worker]
            .live
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread() {
        let workers = Workers::start(3).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for handle in workers.handles() {
            for _ in 0..2 {
                let tx = tx.clone();
                handle.spawn(async move {
                    let before = std::thread::current().id();
                    tokio::task::yield_now().await;
                    let _ = tx.send((before, std::thread::current().id()));
                });
            }
        }
        let seen: Vec<_> = (0..6).map(|_| rx.recv().unwrap()).collect();
        assert!(seen.iter().all(|(a, b)| a == b), "a task moved threads");
        let threads: std::collections::HashSet<_> = seen.iter().map(|(a, _)| *a).collect();
        assert_eq!(threads.len(), 3);
    }

    #[test]
    fn a_worker_ahead_of_the_least_loaded_one_passes_new_connections_on() {
        let workers = Workers::start(3).unwrap();
        let spread = Arc::new(Spread::new(workers.handles().to_vec()));
        // Worker 0 accepts every connection of a burst.
        let burst: Vec<OnWorker> = (0..30).map(|_| spread.place(0)).collect();
        let loads = spread.loads();
        assert_eq!(loads.iter().sum::<usize>(), 30);
        let (most, least) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
        assert!(most - least <= SLACK + 1, "{loads:?}");
        drop(burst);
        assert_eq!(spread.loads(), vec![0, 0, 0]);
        // A worker within SLACK of the least loaded one keeps what it accepts; one
        // past it passes it on.
        let mut held: Vec<OnWorker> = [0, 0, 0, 1, 2, 2].map(|w| spread.enter(w)).into();
        assert_eq!(spread.loads(), vec![3, 1, 2]);
        assert_eq!(spread.choose(0), 0);
        assert_eq!(spread.choose(2), 2);
        held.push(spread.enter(0));
        assert_eq!(spread.choose(0), 1);
        assert_eq!(spread.place(0).worker(), 1);
    }
}
