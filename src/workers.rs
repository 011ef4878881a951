//! The worker threads that carry connections: one single-threaded tokio runtime per
//! thread, nothing shared between them on the way of a byte.
//!
//! Every worker runs an accept loop of its own for every listener (on the same
//! listening socket), and a connection's task stays on the worker that accepted it for
//! its whole life: its wake-ups, timers and socket events never cross threads, and no
//! idle worker steals or is woken to look for work — the costs that grew with the number
//! of cores under a work-stealing runtime. nginx's workers and HAProxy's threads work
//! the same way. Picks stay serialised by the listener's pick lock.
//!
//! Every worker is woken by a new connection, and the first to call accept takes it. So
//! that a burst (eight bulk streams opened at once) does not all land on one worker, a
//! worker with more than one connection over the least loaded one lets the others take
//! new connections first.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

/// Live connections of each worker, each count on a cache line of its own (only its
/// worker writes it).
#[derive(Debug)]
struct Loads {
    counts: Box<[Count]>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Count(AtomicUsize);

thread_local! {
    /// The worker this thread is, if it is one.
    static WORKER: RefCell<Option<(Arc<Loads>, usize)>> = const { RefCell::new(None) };
}

/// How long a worker ahead of the others waits before it looks again.
const YIELD_ACCEPT: Duration = Duration::from_millis(1);

/// A connection counted against the worker that accepted it, until dropped.
#[derive(Debug)]
pub struct Counted {
    loads: Arc<Loads>,
    index: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.loads.counts[self.index]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection against the current worker (nothing outside the workers).
pub fn count_connection() -> Option<Counted> {
    WORKER.with(|w| {
        let (loads, index) = w.borrow().clone()?;
        loads.counts[index].0.fetch_add(1, Ordering::Relaxed);
        Some(Counted { loads, index })
    })
}

/// How long the current worker should leave new connections to the others: some time
/// while it holds more than one connection over the least loaded worker.
pub fn accept_later() -> Option<Duration> {
    WORKER.with(|w| {
        let w = w.borrow();
        let (loads, index) = w.as_ref()?;
        let mine = loads.counts[*index].0.load(Ordering::Relaxed);
        let least = loads
            .counts
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        (mine > least + 1).then_some(YIELD_ACCEPT)
    })
}

/// The worker runtimes.
#[derive(Debug, Clone)]
pub struct Workers {
    handles: Vec<Handle>,
}

impl Workers {
    /// Starts `n` worker threads (at least one), each running a single-threaded runtime
    /// until the process ends.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let n = n.max(1);
        let loads = Arc::new(Loads {
            counts: (0..n).map(|_| Count::default()).collect(),
        });
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let loads = Arc::clone(&loads);
            std::thread::Builder::new()
                .name(format!("ballast-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| *w.borrow_mut() = Some((loads, i)));
                    runtime.block_on(std::future::pending::<()>())
                })?;
        }
        Ok(Workers { handles })
    }

    /// The runtime of each worker.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
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
    fn a_worker_ahead_of_the_least_loaded_by_more_than_one_leaves_accepting_to_others() {
        let workers = Workers::start(2).unwrap();
        let ask = |handle: &Handle, add: usize| {
            let (tx, rx) = std::sync::mpsc::channel();
            handle.spawn(async move {
                let held: Vec<_> = (0..add).filter_map(|_| count_connection()).collect();
                let _ = tx.send((held, accept_later()));
            });
            rx.recv().unwrap()
        };
        let [first, second] = [&workers.handles()[0], &workers.handles()[1]];
        let (one, later) = ask(first, 1);
        assert_eq!(later, None, "1 over 0");
        let (two, later) = ask(first, 1);
        assert_eq!(later, Some(YIELD_ACCEPT), "2 over 0");
        let (other, later) = ask(second, 1);
        assert_eq!(later, None);
        let (_, later) = ask(first, 0);
        assert_eq!(later, None, "2 over 1");
        drop((other, two, one));
        assert_eq!(count_connection().map(|_| ()), None, "not a worker");
        assert_eq!(accept_later(), None);
    }
}
