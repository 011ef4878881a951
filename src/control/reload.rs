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

use super::RemovedBackend;
use crate::config::{Config, ConfigError, DiscoverConfig};
use crate::listen::bind_listener;
use crate::logging::unix_now;
use crate::routing::Routing;
use crate::{systemd, Ballast, BindError};

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
        let changes = changes(&old.config, &config);

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

        // 2. Swap the routing snapshot; note what left it. What discover entries found
        //    stays (they are resolved again at once); entries that left are forgotten.
        let generation = old.generation + 1;
        self.registry().keep_discovered(|listener, target| {
            config
                .listener(listener)
                .is_some_and(|l| l.discover.iter().any(|d| &d.target == target))
        });
        // A backend whose host name moved at run time stays where it is while it is
        // written and asked the same way; the pass this reload asks for checks it again
        // (records rotate: the load took the first).
        self.registry().retain_resolved(|listener, backend| {
            asked_alike(&old.config, &config, listener, backend)
        });
        super::discover::resolve_new_entries(self, &config);
        let routing = Routing::build(config, generation, self.registry());
        let names: HashSet<String> = routing
            .listeners
            .iter()
            .map(|l| l.config.name.clone())
            .collect();
        self.swap_in(&old, routing);
        self.resolve_now();

        // 3. Stop removed listeners; start new and moved ones (a moved listener's old
        //    loop is stopped as its new one starts).
        for name in running.keys().filter(|n| !names.contains(*n)) {
            self.close_listener(name);
        }
        for (name, bind, socket) in fresh {
            if let Err(e) = self.open_listener(&name, bind, socket) {
                error!(listener = %name, error = %e, "cannot serve listener");
            }
        }
        if changes.is_empty() {
            info!(generation, "reload: no change");
        }
        for change in &changes {
            info!(generation, "reload: {change}");
        }
        Ok(generation)
    }

    /// Swaps in `routing`, the successor of `old`: backends and listeners that left it
    /// drain as removed ones (see [`crate::drain`]); ones that came back are in service
    /// again.
    pub(crate) fn swap_in(&self, old: &Routing, routing: Routing) {
        let kept: HashSet<(&str, &str)> = routing
            .listeners
            .iter()
            .flat_map(|l| {
                l.backends
                    .iter()
                    .map(|b| (l.config.name.as_str(), b.config.name.as_str()))
            })
            .collect();
        let mut gone = Vec::new();
        {
            let mut removed = self.removed();
            // A backend or listener that comes back before its connections ended is the
            // same one again (the new snapshot put the backend back in service).
            removed
                .backends
                .retain(|r| !kept.contains(&(r.state.listener.as_str(), r.state.name.as_str())));
            removed
                .listeners
                .retain(|l| routing.listener(&l.name).is_none());
            for l in &old.listeners {
                for b in &l.backends {
                    if !kept.contains(&(l.config.name.as_str(), b.config.name.as_str())) {
                        gone.push(Arc::clone(&b.state));
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
        self.swap_routing(routing);
        // Out of service only once the new snapshot is in place: a connection that finds
        // nothing left in the old one then always finds the new one (see
        // `proxy::pick_newest`).
        for state in gone {
            state.set_removed(true);
        }
    }
}

/// Whether backend `backend` of `listener` is written with the same address and asked of
/// the same DNS server in `old` and `new`.
fn asked_alike(old: &Config, new: &Config, listener: &str, backend: &str) -> bool {
    let find = |config: &Config| {
        let l = config.listener(listener)?;
        let b = l.backends.iter().find(|b| b.name == backend)?;
        Some((b.addr_text.clone(), l.resolver))
    };
    find(old).is_some_and(|was| find(new) == Some(was))
}

/// What a reload changes, in an operator's words, one line per change: listeners added,
/// removed or rebound, strategy changes, backends added, removed, moved or re-weighted,
/// and other settings of a listener or backend that changed. Empty when nothing did.
pub fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for l in &new.listeners {
        let Some(was) = old.listener(&l.name) else {
            out.push(format!(
                "listener {:?} added on {} with {} backend(s)",
                l.name,
                l.bind,
                l.backends.len()
            ));
            continue;
        };
        if was.bind != l.bind {
            out.push(format!(
                "listener {:?} rebound: {} -> {}",
                l.name, was.bind, l.bind
            ));
        }
        if was.strategy != l.strategy {
            out.push(format!(
                "listener {:?} strategy: {} -> {}",
                l.name, was.strategy, l.strategy
            ));
        }
        for b in &l.backends {
            let Some(before) = was.backends.iter().find(|o| o.name == b.name) else {
                out.push(format!(
                    "listener {:?}: backend {:?} added ({}, weight {})",
                    l.name, b.name, b.addr_text, b.weight
                ));
                continue;
            };
            if before.addr != b.addr {
                out.push(format!(
                    "listener {:?}: backend {:?} moved: {} -> {}",
                    l.name, b.name, before.addr, b.addr
                ));
            }
            if before.weight != b.weight {
                out.push(format!(
                    "listener {:?}: backend {:?} re-weighted: {} -> {}",
                    l.name, b.name, before.weight, b.weight
                ));
            }
            if before.max_conns != b.max_conns {
                let show = |m: Option<u64>| m.map_or("unbounded".to_string(), |m| m.to_string());
                out.push(format!(
                    "listener {:?}: backend {:?} max_conns: {} -> {}",
                    l.name,
                    b.name,
                    show(before.max_conns),
                    show(b.max_conns)
                ));
            }
        }
        let same =
            |a: &DiscoverConfig, b: &DiscoverConfig| a.target == b.target && a.name == b.name;
        for d in &l.discover {
            match was.discover.iter().find(|o| same(o, d)) {
                None => out.push(format!(
                    "listener {:?}: discover {} added (backends {}@...)",
                    l.name, d.target, d.name
                )),
                Some(before) if before != d => out.push(format!(
                    "listener {:?}: discover {} (backends {}@...): weight, max_conns or send_proxy changed",
                    l.name, d.target, d.name
                )),
                Some(_) => {}
            }
        }
        for d in was
            .discover
            .iter()
            .filter(|o| !l.discover.iter().any(|d| same(o, d)))
        {
            out.push(format!(
                "listener {:?}: discover {} (backends {}@...) removed: they drain",
                l.name, d.target, d.name
            ));
        }
        for b in &was.backends {
            if !l.backends.iter().any(|n| n.name == b.name) {
                out.push(format!(
                    "listener {:?}: backend {:?} removed: draining",
                    l.name, b.name
                ));
            }
        }
        let settings = |c: &crate::config::ListenerConfig| {
            (
                c.max_conns,
                c.connect_timeout,
                c.idle_timeout,
                c.drain_timeout,
                c.retries,
                c.slow_start,
                c.health.clone(),
                c.rebalance.clone(),
                c.resolve_interval,
                c.resolver,
            )
        };
        if settings(was) != settings(l) {
            out.push(format!("listener {:?}: settings changed", l.name));
        }
    }
    for l in &old.listeners {
        if new.listener(&l.name).is_none() {
            out.push(format!(
                "listener {:?} removed: stopped accepting, its connections drain",
                l.name
            ));
        }
    }
    if old.cluster != new.cluster {
        out.push(match &new.cluster {
            Some(c) => format!(
                "[cluster]: reporting as {:?} to {}",
                c.instance,
                redacted(&c.redis)
            ),
            None => "[cluster] removed: balancing on this instance's own counts".into(),
        });
    }
    if old.admin != new.admin || old.runtime != new.runtime {
        out.push(
            "[admin] or [runtime] changed (bind and threads apply at the next restart)".into(),
        );
    }
    out
}

/// A Redis URL without its password, for the log.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", &url[at..]),
        _ => url.to_string(),
    }
}

/// How long the file must be quiet after a change before it is reloaded: editors write
/// in several steps.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Reloads when the config file changes. Folders are watched, not the file, so that
/// editors that rename a new file over it are seen too; and when the path is a symlink
/// (a Kubernetes ConfigMap mount: `ballast.toml -> ..data/ballast.toml`, with `..data`
/// itself a symlink swapped atomically), the folder of what it resolves to is watched
/// as well and the link is resolved again after every event. Any event in a watched
/// folder leads to reading the file; a content equal to the last one loaded is ignored.
pub async fn watch_file(ballast: Ballast, path: PathBuf, mut stopped: watch::Receiver<bool>) {
    // One pending wake-up is enough: events coalesce, the channel never grows.
    let (tx, mut rx) = mpsc::channel(1);
    let names = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let relevant = Arc::clone(&names);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Reading the file is an event too (notify watches opens): only changes count,
        // and only to the names the path goes through, so that neither ballast's own
        // reads nor another busy file in the folder keep waking the watcher.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let relevant = relevant.lock().unwrap_or_else(|e| e.into_inner());
        if event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| relevant.contains(n)))
        {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP or the admin API");
            return;
        }
    };
    let mut watched: Vec<PathBuf> = Vec::new();
    rewatch(&mut watcher, &mut watched, &path);
    *names.lock().unwrap_or_else(|e| e.into_inner()) = names_of(&path);
    if watched.is_empty() {
        return;
    }
    // The file may have changed between its load and the first watch: look once first.
    let mut look_now = true;
    loop {
        if !std::mem::take(&mut look_now) {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                event = rx.recv() => if event.is_none() { break },
            }
        }
        // Debounce: wait until no event came for DEBOUNCE.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DEBOUNCE) => break,
                event = rx.recv() => if event.is_none() { return },
            }
        }
        // A swapped link may now point into another folder.
        rewatch(&mut watcher, &mut watched, &path);
        *names.lock().unwrap_or_else(|e| e.into_inner()) = names_of(&path);
        match std::fs::read(&path) {
            Ok(now) if !ballast.is_last_loaded(&now) => {}
            _ => continue,
        }
        info!(file = %path.display(), "config file changed: reloading");
        let ballast = ballast.clone();
        let _ = tokio::task::spawn_blocking(move || ballast.reload()).await;
    }
}

/// The folders to watch for `path`: its own, and that of the file it resolves to when
/// it is (or goes through) a symlink.
fn folders_of(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let mut folders = vec![parent(path)];
    if let Ok(real) = std::fs::canonicalize(path) {
        let real_parent = parent(&real);
        let same = std::fs::canonicalize(&folders[0]).is_ok_and(|f| f == real_parent);
        if !same {
            folders.push(real_parent);
        }
    }
    folders
}

/// The file names whose change can change what `path` reads: its own, those of every
/// link it goes through and of what they point at (`..data` of a ConfigMap mount), and
/// the name of the file it resolves to.
fn names_of(path: &Path) -> HashSet<std::ffi::OsString> {
    let mut names = HashSet::new();
    let mut at = path.to_path_buf();
    // A chain of links is short; the bound stops a loop of links.
    for _ in 0..16 {
        if let Some(name) = at.file_name() {
            names.insert(name.to_os_string());
        }
        let Ok(target) = std::fs::read_link(&at) else {
            break;
        };
        names.extend(target.iter().map(|c| c.to_os_string()));
        at = match at.parent() {
            Some(dir) => dir.join(&target),
            None => target,
        };
    }
    for dir_link in path.ancestors().skip(1) {
        if let Ok(target) = std::fs::read_link(dir_link) {
            names.extend(target.iter().map(|c| c.to_os_string()));
        }
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        names.extend(real.file_name().map(|n| n.to_os_string()));
    }
    names.remove(std::ffi::OsStr::new("."));
    names.remove(std::ffi::OsStr::new(".."));
    names
}

/// Makes `watcher` watch exactly the folders of `path` now.
fn rewatch(watcher: &mut impl notify::Watcher, watched: &mut Vec<PathBuf>, path: &Path) {
    let wanted = folders_of(path);
    if *watched == wanted {
        return;
    }
    // A folder that is gone (an old ConfigMap version) has lost its watch already.
    for old in watched.iter().filter(|d| !wanted.contains(d) && d.exists()) {
        let _ = watcher.unwatch(old);
    }
    let mut now = Vec::new();
    for dir in wanted {
        if watched.contains(&dir) {
            now.push(dir);
            continue;
        }
        match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => now.push(dir),
            Err(e) => warn!(
                error = %e, dir = %dir.display(),
                "cannot watch the config file's folder; reload with SIGHUP or the admin API"
            ),
        }
    }
    *watched = now;
}

#[cfg(test)]
mod tests {
    use super::{asked_alike, changes, redacted};
    use crate::config::Config;

    fn config(listeners: &str) -> Config {
        Config::parse(listeners, "test.toml").expect("valid")
    }

    #[test]
    fn a_moved_host_stays_put_across_a_reload_only_while_written_and_asked_alike() {
        let file = |addr: &str, resolver: &str| {
            config(&format!(
                "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{resolver}\n[[listeners.backends]]\nname = \"a\"\naddr = \"{addr}\"\n"
            ))
        };
        let before = file("localhost:3001", "");
        assert!(asked_alike(
            &before,
            &file("localhost:3001", ""),
            "web",
            "a"
        ));
        assert!(!asked_alike(
            &before,
            &file("localhost:3002", ""),
            "web",
            "a"
        ));
        assert!(!asked_alike(
            &before,
            &file("localhost:3001", "resolver = \"127.0.0.1:5353\""),
            "web",
            "a"
        ));
        assert!(
            !asked_alike(&before, &before, "web", "b"),
            "no such backend"
        );
    }

    #[test]
    fn a_redis_url_is_logged_without_its_password() {
        assert_eq!(
            redacted("redis://user:secret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(redacted("redis://10.0.0.5/0"), "redis://10.0.0.5/0");
    }

    #[cfg(unix)]
    #[test]
    fn the_watched_names_are_the_links_a_configmap_path_goes_through() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("..2026_v1")).unwrap();
        std::fs::write(dir.path().join("..2026_v1/ballast.toml"), "").unwrap();
        symlink("..2026_v1", dir.path().join("..data")).unwrap();
        symlink("..data/ballast.toml", dir.path().join("ballast.toml")).unwrap();
        let names = super::names_of(&dir.path().join("ballast.toml"));
        let mut names: Vec<_> = names.iter().map(|n| n.to_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["..data", "ballast.toml"]);
    }

    #[test]
    fn a_reload_names_every_change_and_nothing_else() {
        let old = config(
            r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
strategy = "round_robin"
  [[listeners.backends]]
  name = "a"
  addr = "127.0.0.1:3001"
  [[listeners.backends]]
  name = "b"
  addr = "127.0.0.1:3002"
[[listeners]]
name = "old"
bind = "127.0.0.1:0"
  [[listeners.backends]]
  addr = "127.0.0.1:3003"
"#,
        );
        assert!(changes(&old, &old).is_empty());
        let new = config(
            r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
strategy = "least_conn"
  [[listeners.backends]]
  name = "a"
  addr = "127.0.0.1:3001"
  weight = 3
  [[listeners.backends]]
  name = "c"
  addr = "127.0.0.1:3004"
[[listeners]]
name = "new"
bind = "127.0.0.1:0"
  [[listeners.backends]]
  addr = "127.0.0.1:3003"
"#,
        );
        assert_eq!(
            changes(&old, &new),
            [
                r#"listener "web" strategy: round_robin -> least_conn"#,
                r#"listener "web": backend "a" re-weighted: 1 -> 3"#,
                r#"listener "web": backend "c" added (127.0.0.1:3004, weight 1)"#,
                r#"listener "web": backend "b" removed: draining"#,
                r#"listener "new" added on 127.0.0.1:0 with 1 backend(s)"#,
                r#"listener "old" removed: stopped accepting, its connections drain"#,
            ]
        );
    }
}
