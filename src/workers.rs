//! The worker threads that carry connections: one single-threaded tokio runtime per
//! thread, nothing shared between them on the way of a byte.
//!
//! Every worker runs an accept loop of its own for every listener (on the same
//! listening socket), and a connection's task stays on the worker that accepted it for
//! its whole life: its wake-ups, timers and socket events never cross threads, and no
//! idle worker steals or is woken to look for work — the costs that grew with the number
//! of cores under a work-stealing runtime. nginx's workers and HAProxy's threads work
//! the same way. Picks stay serialised by the listener's pick lock.

use tokio::runtime::Handle;

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
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
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
}
