//! Reload: one function, called by SIGHUP, the config file watcher and the admin API.
//!
//! Read, parse, validate, bind what is new, build the new routing snapshot, swap it
//! atomically, then start and stop accept loops. Any error before the swap changes
//! nothing: the old config keeps serving, the error is logged with its cause and counted
//! in `ballast_config_reloads_total{result="failure"}`.
//!
//! What is kept and what is not:
//! - listeners are matched by name: a listener whose bind address is unchanged keeps its
//!   socket and accept loop (no connection attempt is refused during a reload); a new
//!   one binds; a removed one stops accepting; a changed bind binds the new address
//!   before the old socket is closed;
//! - backends are matched by (listener, name): a kept backend keeps its live count,
//!   health and drain state (they live in the registry, not in the snapshot); a new one
//!   starts in service; a removed one drains (see [`crate::drain`]);
//! - no established connection is closed by a reload.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::routing::Routing;
use crate::{bind_listener, systemd, unix_now, Ballast, BindError, RemovedBackend};

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("ballast was started without a config file; there is nothing to reload")]
    NoFile,
    #[error("ballast is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
}

impl Ballast {
    /// Reloads the config file. Returns the new generation, or why nothing changed.
    pub fn reload(&self) -> Result<u64, ReloadError> {
        let _one_at_a_time = self.lock_reload();
        if self.is_shutting_down() {
            return Err(ReloadError::ShuttingDown);
        }
        systemd::notify(&systemd::reloading_message());
        let result = match self.config_path() {
            None => Err(ReloadError::NoFile),
            Some(path) => {
                let file = path.display().to_string();
                std::fs::read_to_string(path)
                    .map_err(|source| {
                        ConfigError::Read {
                            file: file.clone(),
                            source,
                        }
                        .into()
                    })
                    .and_then(|text| {
                        self.set_last_loaded(text.as_bytes());
                        Ok(Config::parse(&text, &file)?)
                    })
                    .and_then(|config| self.apply(config))
            }
        };
        let metrics = self.registry().metrics();
        match &result {
            Ok(generation) => {
                metrics.config_reloads.with_label_values(&["success"]).inc();
                metrics.config_generation.set(*generation as i64);
                metrics.config_last_reload_success.set(unix_now());
                info!(generation, "config reloaded");
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["failure"]).inc();
                error!(error = %e, "config reload failed; the previous config stays in use");
            }
        }
        systemd::notify("READY=1");
        result
    }

    /// Applies a validated config: binds new listen addresses first (a failure changes
    /// nothing), then swaps the routing snapshot, then moves accept loops.
    fn apply(&self, config: Config) -> Result<u64, ReloadError> {
        let old = self.routing();
        let running = self.listener_binds();

        // 1. Bind every new or moved listener before anything changes. An address that
        //    a running listener gives up (it is renamed or moves) is handed on as the
        //    same socket: binding it again would fail, and closing it would refuse
        //    connections.
        let mut fresh = Vec::new();
        for l in &config.listeners {
            if running.get(&l.name) == Some(&l.bind) {
                continue;
            }
            let donor = running.iter().find(|(name, bind)| {
                **bind == l.bind
                    && config
                        .listener(name)
                        .is_none_or(|moved| moved.bind != l.bind)
            });
            let socket = match donor.and_then(|(name, _)| self.clone_socket(name)) {
                Some(socket) => socket,
                None => bind_listener(l)?,
            };
            fresh.push((l.name.clone(), l.bind, socket));
        }
        if old.config.admin.as_ref().map(|a| a.bind) != config.admin.as_ref().map(|a| a.bind) {
            warn!("admin.bind changed: the admin endpoint moves at the next restart");
        }

        // 2. Swap the routing snapshot; note what left it.
        let generation = old.generation + 1;
        let routing = Routing::build(config, generation, self.registry());
        let kept: HashSet<(&str, &str)> = routing
            .listeners
            .iter()
            .flat_map(|l| {
                l.backends
                    .iter()
                    .map(|b| (l.config.name.as_str(), b.config.name.as_str()))
            })
            .collect();
        {
            let mut removed = self.removed();
            // A backend or listener that comes back before its connections ended is the
            // same one again; the backend starts in service.
            removed.backends.retain(|r| {
                let back = kept.contains(&(r.state.listener.as_str(), r.state.name.as_str()));
                if back {
                    r.state.set_removed(false);
                    r.state.set_drained(false);
                }
                !back
            });
            removed
                .listeners
                .retain(|l| routing.listener(&l.name).is_none());
            for l in &old.listeners {
                for b in &l.backends {
                    if !kept.contains(&(l.config.name.as_str(), b.config.name.as_str())) {
                        info!(listener = %l.config.name, backend = %b.config.name, "backend removed: draining");
                        b.state.set_removed(true);
                        removed.backends.push(RemovedBackend {
                            state: Arc::clone(&b.state),
                            drain_timeout: l.config.drain_timeout,
                        });
                    }
                }
                if routing.listener(&l.config.name).is_none() {
                    removed.listeners.push(Arc::clone(&l.state));
                }
            }
        }
        let names: HashSet<String> = routing
            .listeners
            .iter()
            .map(|l| l.config.name.clone())
            .collect();
        self.swap_routing(routing);

        // 3. Stop removed listeners; start new and moved ones (a moved listener's old
        //    loop is stopped as its new one starts).
        for name in running.keys().filter(|n| !names.contains(*n)) {
            info!(listener = %name, "listener removed: stopped accepting");
            self.close_listener(name);
        }
        for (name, bind, socket) in fresh {
            match self.open_listener(&name, bind, socket) {
                Ok(local) => info!(listener = %name, addr = %local, "listener bound"),
                Err(e) => error!(listener = %name, error = %e, "cannot serve listener"),
            }
        }
        Ok(generation)
    }
}

/// How long the file must be quiet after a change before it is reloaded: editors write
/// in several steps.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reloads when the config file changes. The folder is watched, not the file, so that
/// editors that replace the file by renaming a new one over it are seen too. A change
/// that leaves the file's content as it was is ignored.
pub async fn watch_file(ballast: Ballast, path: PathBuf, mut stopped: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
            {
                let _ = tx.send(());
            }
        }
    });
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let _watcher = match watcher {
        Ok(mut w) => match notify::Watcher::watch(&mut w, dir, notify::RecursiveMode::NonRecursive)
        {
            Ok(()) => w,
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot watch the config file; reload with SIGHUP or the admin API");
                return;
            }
        },
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP or the admin API");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            event = rx.recv() => if event.is_none() { break },
        }
        // Debounce: wait until no event came for DEBOUNCE.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DEBOUNCE) => break,
                event = rx.recv() => if event.is_none() { return },
            }
        }
        match std::fs::read(&path) {
            Ok(now) if !ballast.is_last_loaded(&now) => {}
            _ => continue,
        }
        info!(file = %path.display(), "config file changed: reloading");
        let ballast = ballast.clone();
        let _ = tokio::task::spawn_blocking(move || ballast.reload()).await;
    }
}
