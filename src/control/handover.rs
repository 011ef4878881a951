//! Handing established connections to a new process on upgrade: what each process does
//! around [`crate::handover`]'s wire.
//!
//! The new process (`run --upgrade`) listens on [`inbox_path`] before it says it serves.
//! Once it does, the old process, which has stopped accepting, asks every connection to
//! park ([`crate::conn::Ask::Park`]). Each connection's task stops its relay at a safe
//! point (between two chunks; a WebSocket frame may be in flight, its cursor goes with
//! it) and gives its two sockets and its state to the outbox ([`Conn::park`]). One
//! thread sends what is parked in batches, as it comes, so neither process stalls while
//! the others go on relaying. The new process registers each connection (live counts
//! from that moment), answers, and after the old one's commit resumes the relays where
//! they stood. A connection the new process refuses (its listener is not in the new
//! config, its state cannot be read), or every connection of a batch that fails (the new
//! process died, did not answer within
//! [`ANSWER_WITHIN`](crate::handover::ANSWER_WITHIN)), goes back to its task, which
//! resumes relaying in the old process as if nothing happened; the old process then ends
//! what it kept as a graceful shutdown does.
//!
//! [`Conn::park`]: crate::conn::Conn::park

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::conn::{Ask, Handoff};
use crate::control::RemovedBackend;
use crate::handover::{
    self, answer, commit, committed, fits, inbox_path, receive_batch, send_batch, Handed, Parked,
    BATCH, MAX_BATCH_BYTES,
};
use crate::proxy::{Resumed, Via};
use crate::routing::ListenerRoute;
use crate::state::{BackendGuard, Health};
use crate::Ballast;

/// How long the old process goes on handing connections over (those still connecting
/// park once they relay) before it ends what is left as a graceful shutdown does.
pub const HANDOVER_WITHIN: Duration = Duration::from_secs(30);

/// How often the old process asks connections that were not relaying yet to park.
const ROUND: Duration = Duration::from_millis(20);

/// How long the new process waits for the old one to connect, once it serves.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);

/// What an upgrade's hand-over of established connections came to, in the old process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Taken by the new process.
    pub sent: u64,
    /// Kept here (refused, or the new process failed).
    pub kept: u64,
}

// ---------------------------------------------------------------------------
// The old process.

/// Hands every established connection to the new process listening on
/// `upgrade_sock`'s [`inbox_path`]: until none is left to hand over, the new process
/// fails, or [`HANDOVER_WITHIN`] passes. Call once accepting has stopped.
pub async fn send_connections(ballast: &Ballast, upgrade_sock: &Path) -> Sent {
    let path = inbox_path(upgrade_sock);
    let shown = path.display().to_string();
    let link = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || UnixStream::connect(path)).await
    };
    let link = match link.map(|l| {
        l.and_then(|l| {
            l.set_write_timeout(Some(handover::ANSWER_WITHIN))
                .map(|()| l)
        })
    }) {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            warn!("upgrade: the new process takes no established connections ({shown}: {e}); they stay here until they end");
            return Sent::default();
        }
        Err(e) => {
            error!("upgrade: cannot reach {shown} ({e}); the established connections stay here until they end");
            return Sent::default();
        }
    };
    let conns = Arc::clone(ballast.conns());
    let metrics = ballast.registry().metrics().handover.clone();
    let (outbox, parked) = mpsc::unbounded_channel();
    let broken = Arc::new(AtomicBool::new(false));
    let driver = {
        let broken = Arc::clone(&broken);
        std::thread::Builder::new()
            .name("ballast-handover".into())
            .spawn(move || drive(link, parked, &metrics, &broken))
    };
    let driver = match driver {
        Ok(driver) => driver,
        Err(e) => {
            error!("upgrade: cannot start the hand-over of established connections ({e}); they stay here until they end");
            return Sent::default();
        }
    };
    let started = Instant::now();
    info!(
        open = conns.len(),
        "upgrade: handing the established connections over"
    );
    conns.set_outbox(Some(outbox));
    let deadline = started + HANDOVER_WITHIN;
    loop {
        conns.park_all();
        // Those closing anyway (drain, rebalance) are not waited for.
        let parking = conns.count(|e| e.asked() == Some(Ask::Park));
        if parking == 0 || broken.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(ROUND).await;
    }
    // Whatever parks from now on is taken back at once; the driver ends once it has
    // answered every connection given to it. Those that never reached their relay
    // stay, asked to park until they do (and are taken back then): the graceful
    // shutdown that follows closes them as any other, a close replacing the park.
    conns.set_outbox(None);
    let sent = tokio::task::spawn_blocking(move || driver.join())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    info!(
        sent = sent.sent,
        kept = sent.kept,
        took_ms = started.elapsed().as_millis() as u64,
        "upgrade: established connections handed over"
    );
    sent
}

/// The hand-over thread: sends what connections park, in batches as they come, and
/// tells each task what became of its connection. Returns once every sender is gone.
fn drive(
    link: UnixStream,
    mut parked: mpsc::UnboundedReceiver<(Parked, oneshot::Sender<Handoff>)>,
    metrics: &IntCounterVec,
    broken: &AtomicBool,
) -> Sent {
    let mut total = Sent::default();
    let mut next = None;
    loop {
        let Some(first) = next.take().or_else(|| parked.blocking_recv()) else {
            break;
        };
        let mut bytes = size(&first.0.handed);
        let mut batch = vec![first];
        while batch.len() < BATCH {
            let Ok(item) = parked.try_recv() else { break };
            let more = size(&item.0.handed);
            if bytes + more > MAX_BATCH_BYTES {
                next = Some(item);
                break;
            }
            bytes += more;
            batch.push(item);
        }
        let (travel, stay): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|(p, _)| fits(&p.handed));
        for (parked, told) in stay {
            warn!(listener = %parked.handed.listener, client = %parked.handed.client, "upgrade: a connection holds more unsent bytes than a hand-over carries; it stays here");
            total.kept += 1;
            let _ = told.send(Handoff::Back(Box::new(parked)));
        }
        if travel.is_empty() {
            continue;
        }
        let taken = if broken.load(Ordering::Relaxed) {
            None
        } else {
            match exchange(&link, &travel) {
                Ok(taken) => Some(taken),
                Err(e) => {
                    error!("upgrade: the new process failed during the hand-over ({e}); this process keeps every connection it still has and ends them as a graceful shutdown does");
                    broken.store(true, Ordering::Relaxed);
                    None
                }
            }
        };
        for (i, (parked, told)) in travel.into_iter().enumerate() {
            if taken.as_ref().is_some_and(|t| t[i]) {
                total.sent += 1;
                let _ = told.send(Handoff::Sent);
            } else {
                total.kept += 1;
                let _ = told.send(Handoff::Back(Box::new(parked)));
            }
        }
    }
    metrics.with_label_values(&["sent"]).inc_by(total.sent);
    metrics.with_label_values(&["failed"]).inc_by(total.kept);
    total
}

/// One batch: sent, answered, committed. Which connections the new process took.
fn exchange(
    link: &UnixStream,
    batch: &[(Parked, oneshot::Sender<Handoff>)],
) -> std::io::Result<Vec<bool>> {
    let parked: Vec<&Parked> = batch.iter().map(|(p, _)| p).collect();
    let taken = send_batch(link, &parked)?;
    commit(link)?;
    Ok(taken)
}

/// About how many bytes `handed` takes in a batch.
fn size(handed: &Handed) -> usize {
    let relay = &handed.relay;
    256 + handed.listener.len()
        + handed.backend.len()
        + relay.to_backend.pending.len()
        + relay.to_client.pending.len()
        + 2 * crate::relay::MAX_HEAD
}

// ---------------------------------------------------------------------------
// The new process.

/// Listens on `upgrade_sock`'s [`inbox_path`] for the old process's established
/// connections, and takes them on a thread of its own. Call before saying it serves.
pub fn open_inbox(ballast: &Ballast, upgrade_sock: &Path) -> std::io::Result<()> {
    let path = inbox_path(upgrade_sock);
    // One left by an earlier upgrade that ended badly.
    if std::fs::symlink_metadata(&path).is_ok() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let ballast = ballast.clone();
    std::thread::Builder::new()
        .name("ballast-handover".into())
        .spawn(move || take_connections(&ballast, &listener, &path))?;
    Ok(())
}

/// Waits for the old process, then takes its connections batch by batch until it
/// closes the link.
fn take_connections(ballast: &Ballast, listener: &UnixListener, path: &PathBuf) {
    let link = accept_within(listener, CONNECT_WITHIN);
    let _ = std::fs::remove_file(path);
    let Some(link) = link else {
        return;
    };
    let metrics = ballast.registry().metrics().handover.clone();
    let mut received = 0u64;
    let next_worker = AtomicUsize::new(0);
    loop {
        let batch = match receive_batch(&link) {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(e) => {
                warn!("upgrade: the hand-over of established connections ended ({e}); the old process keeps those not taken yet");
                break;
            }
        };
        let mut taken = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        // No reload between a connection's look at the routing and its count.
        let reloads = ballast.lock_reload();
        for (handed, client, backend) in batch {
            let registered = handed
                .map_err(|e| format!("its state cannot be read: {e}"))
                .and_then(|handed| register(ballast, handed, client, backend, &next_worker));
            match registered {
                Ok(go) => {
                    taken.push(true);
                    waiting.push(go);
                }
                Err(why) => {
                    // Usually one that was ending (a socket no longer connected).
                    info!("upgrade: refused a connection handed over ({why}); the old process keeps it");
                    taken.push(false);
                }
            }
        }
        drop(reloads);
        // Dropped without a go, the connections registered here let go of their
        // sockets: the old process relays them on.
        if answer(&link, &taken).is_err() || !committed(&link).unwrap_or(false) {
            warn!("upgrade: the old process did not commit a batch; it keeps those connections");
            break;
        }
        received += waiting.len() as u64;
        metrics
            .with_label_values(&["received"])
            .inc_by(waiting.len() as u64);
        for go in waiting {
            let _ = go.send(());
        }
    }
    info!(received, "upgrade: took over established connections");
}

/// The link from the old process, once it connects within `within`.
fn accept_within(listener: &UnixListener, within: Duration) -> Option<UnixStream> {
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((link, _)) => {
                if link.set_nonblocking(false).is_ok() {
                    return Some(link);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                warn!("upgrade: cannot take established connections ({e})");
                return None;
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Registers one connection handed over: its place in the table, its counts (live from
/// now on), and its task on a worker, which relays once `go` is sent (the old process
/// committed) and lets the sockets go if it is dropped.
fn register(
    ballast: &Ballast,
    handed: Handed,
    client: std::os::fd::OwnedFd,
    backend: std::os::fd::OwnedFd,
    next_worker: &AtomicUsize,
) -> Result<oneshot::Sender<()>, String> {
    let routing = ballast.routing();
    let route = routing
        .listener(&handed.listener)
        .cloned()
        .ok_or_else(|| format!("listener {} is not in this config", handed.listener))?;
    drop(routing);
    let spread = ballast.spread().ok_or("no worker runtime yet")?;
    let client = std::net::TcpStream::from(client);
    let backend = std::net::TcpStream::from(backend);
    let peer = client
        .peer_addr()
        .map_err(|e| format!("the client socket: {e}"))?;
    let backend_addr = backend
        .peer_addr()
        .map_err(|e| format!("the backend socket: {e}"))?;
    for socket in [&client, &backend] {
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("a socket: {e}"))?;
    }
    let conn = ballast.conns().open_handed(&route.state, peer, handed.age);
    // In the table first, then the look: a shutdown that began before either sees this
    // entry (and waits for it) or is seen here.
    if ballast.is_shutting_down() {
        return Err("this process is shutting down".into());
    }
    if handed.client != peer {
        conn.set_client(handed.client);
    }
    let accepted = route.state.accept();
    let per_ip = route
        .config
        .max_conns_per_ip
        .and_then(|_| route.state.enter_client(handed.client.ip(), u64::MAX));
    let (via, guard) = match route
        .backends
        .iter()
        .position(|b| b.config.name == handed.backend)
    {
        Some(i) => (Via::Route(i), route.backends[i].state.acquire()),
        None => (
            Via::Gone(Box::new((handed.backend.clone(), backend_addr))),
            gone_backend(ballast, &route, &handed.backend),
        ),
    };
    conn.set_backend(guard.backend());
    let resumed = Resumed {
        route,
        conn,
        accepted,
        guard,
        per_ip,
        via,
        connect: handed.connect,
    };
    let (go, going) = oneshot::channel::<()>();
    let workers = spread.handles().count().max(1);
    let on_worker = spread.place(next_worker.fetch_add(1, Ordering::Relaxed) % workers);
    spread.handle(on_worker.worker()).spawn(async move {
        let _on_worker = on_worker;
        if going.await.is_ok() {
            crate::proxy::resume(resumed, client, backend, handed.relay).await;
        }
    });
    Ok(go)
}

/// A connection's count against a backend the old process relayed to and this config
/// does not have: it drains here as if a reload had removed it.
fn gone_backend(ballast: &Ballast, route: &ListenerRoute, name: &str) -> BackendGuard {
    // The drain supervisor's order: the removed list, then the registry.
    let mut removed = ballast.removed();
    let state = ballast
        .registry()
        .backend(&route.config.name, name, Health::Up);
    if !removed
        .backends
        .iter()
        .any(|r| Arc::ptr_eq(&r.state, &state))
    {
        info!(listener = %route.config.name, backend = %name, "upgrade: a connection handed over goes to a backend this config does not have; it drains");
        state.set_removed(true);
        removed.backends.push(RemovedBackend {
            state: Arc::clone(&state),
            drain_timeout: route.config.drain_timeout,
        });
    }
    // Counted before the lock goes: the drain supervisor forgets a removed backend with
    // no connection.
    state.acquire()
}
