//! Upgrading the binary without refusing a connection.
//!
//! The new process (`ballast run --upgrade`) waits on the Unix socket
//! `runtime.upgrade_sock`. The running one, on SIGQUIT, sends it every listening socket
//! it has, each listener's (those a reload added too) and the admin endpoint's, keyed by
//! bind address; the new process takes the one whose address a listener of its own
//! config names and binds the others afresh. A listening socket passed this way is the
//! same kernel socket in both processes, with one accept queue: a client that connects
//! during the upgrade waits there for whichever process accepts next and is never
//! refused. The old process goes on accepting on its copies until the new one says it
//! serves: once ready, the new process creates `<upgrade_sock>.ready` ([`ready_mark`]).
//! A new process that fails after taking the sockets (a listener of its config it cannot
//! bind, threads it cannot start) thus leaves the old one serving, with nothing refused.
//! Seeing the mark, the old process removes it, stops accepting (its copies close; the
//! kernel keeps the sockets open in the new process), keeps its established connections
//! until they end or `runtime.shutdown_timeout` passes, and exits. With no mark within
//! [`SERVES_WITHIN`] it says so and goes on serving beside the new process, if that one
//! serves after all (a slow start, or a binary from before the mark): SIGTERM ends it.
//!
//! The transfer is pingora's: [`Fds`], the table behind pingora's `ListenFds`, its
//! wire format (`SCM_RIGHTS` with the keys as text) and its retries
//! (`Fds::send_to_sock`, `Fds::get_from_sock`). What pingora's `Server` does around it
//! does not fit ballast, so [`crate::shell`] drives the transfer itself instead of
//! returning `ShutdownSignal::GracefulUpgrade` to pingora (line numbers in
//! pingora-core 0.9.1):
//!
//! - a failed send is only logged and the old process shuts down anyway
//!   (`server/mod.rs:290-300`: `sent_fds` is `true` on error too), leaving nobody to
//!   accept on any port; ballast keeps serving instead;
//! - after sending, pingora sleeps a fixed `CLOSE_TIMEOUT` of 5 s (`server/mod.rs:66`,
//!   `:307`), then a fixed `grace_period_seconds` (`server/mod.rs:800-811`, 5 minutes
//!   when unset), then drops the service runtimes with
//!   `graceful_shutdown_timeout_seconds` (`server/mod.rs:815-836`), which cancels every
//!   task still on them, that is every established connection. The process can neither
//!   exit as soon as its last connection ends nor keep connections up to
//!   `shutdown_timeout` without always waiting all of it;
//! - nothing listens for signals meanwhile (its own TODO, `server/mod.rs:274`), so a
//!   second SIGTERM could not cut the wait short;
//! - on the receiving side, `Server::bootstrap` with `Opt::upgrade` ends the process
//!   with `exit(1)` when no socket comes (`server/bootstrap_services.rs:234`), not with
//!   ballast's exit code 2 for a failed start and a message naming the path.
//!
//! Limits of the transfer itself, which ballast checks first rather than crash on:
//! the receiver makes room for 32 descriptors (`MAX_FDS`, `server/transfer_fd/mod.rs:138`)
//! and panics when fewer arrived than keys (`assert_eq!`, `:64`); the keys travel in a
//! 2048-byte buffer that is cut short silently (`:75`, `:120`); and the receiver panics
//! (`unwrap`, `:146-177`) where the socket cannot be created (a missing folder, no
//! permission, a path too long). The socket file is made mode 0666 (`:162-171`): keep
//! its folder writable and searchable by ballast's user alone.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pingora_core::server::Fds;
use tracing::{info, warn};

use crate::config::Config;
use crate::listen::{bind_listener, bind_one};
use crate::{Ballast, BindError, Bound};

/// How many listening sockets one hand-over carries: what pingora's receiver makes room
/// for.
pub const MAX_SOCKETS: usize = 32;

/// The bytes pingora's wire format has for the keys, separated by spaces.
const MAX_KEYS_LEN: usize = 2048;

/// About how long the new process waits for the sockets: pingora's receiver tries to
/// accept once a second, six times.
const RECEIVE_WAIT: Duration = Duration::from_secs(6);

/// How long the old process gives the new one to take the sockets once they are sent.
/// pingora's receiver looks for them once a second; pingora's own `Server` waits 5 s
/// before it stops accepting.
pub const TAKEN_WITHIN: Duration = Duration::from_secs(5);

/// How long the old process gives the new one, once it took the sockets, to say that it
/// serves: its config's other sockets bound, its threads started.
pub const SERVES_WITHIN: Duration = Duration::from_secs(15);

/// The file a new process creates on `upgrade_sock`'s folder once it serves:
/// `<upgrade_sock>.ready`.
pub fn ready_mark(upgrade_sock: &Path) -> PathBuf {
    let mut mark = upgrade_sock.as_os_str().to_owned();
    mark.push(".ready");
    PathBuf::from(mark)
}

/// The new process says it serves: creates the [`ready_mark`] (mode 0600, never through
/// a symbolic link).
pub fn mark_ready(upgrade_sock: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(ready_mark(upgrade_sock))
        .map(drop)
}

/// Removes the [`ready_mark`] of an earlier upgrade, before a hand-over.
fn clear_ready_mark(upgrade_sock: &Path) {
    let _ = std::fs::remove_file(ready_mark(upgrade_sock));
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade: cannot wait on {}: {why}", path.display())]
    Unusable { path: PathBuf, why: String },
    #[error(
        "upgrade: no listening sockets came on {} within {}s ({source}): is a ballast running with this runtime.upgrade_sock, and was it sent SIGQUIT?",
        path.display(),
        RECEIVE_WAIT.as_secs()
    )]
    NothingCame {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "upgrade: {count} listening sockets, more than the {MAX_SOCKETS} that one hand-over carries"
    )]
    TooMany { count: usize },
    #[error(
        "upgrade: the addresses of {count} listening sockets take {len} bytes, more than the {MAX_KEYS_LEN} that one hand-over carries"
    )]
    KeysTooLong { count: usize, len: usize },
    #[error(
        "upgrade: cannot hand the listening sockets over on {} ({source}): is `ballast run --upgrade` waiting there?",
        path.display()
    )]
    NotSent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// The key of a listening socket in the table: its bind address as the config gives it
/// (pingora keys its listeners by their address too).
pub fn key(addr: SocketAddr) -> String {
    addr.to_string()
}

// ---------------------------------------------------------------------------
// The new process.

/// Listening sockets received from the running ballast, by key. Those that no listener
/// claims are closed when this is dropped.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: HashMap<String, TcpListener>,
}

impl Inherited {
    /// The socket the old process listened on at `addr`, if any.
    fn take(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        self.sockets.remove(&key(addr))
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

/// Waits on `path` for the listening sockets of the running ballast (until it is sent
/// SIGQUIT, about [`RECEIVE_WAIT`] at most), then binds `config`'s sockets: taken from
/// the old process where it listened on the same address, afresh otherwise.
pub fn take_over(config: &Config) -> Result<Bound, UpgradeError> {
    let inherited = receive(&config.runtime.upgrade_sock)?;
    Ok(bind(config, inherited)?)
}

/// Waits on `path` for the listening sockets of the running ballast. Blocks.
#[allow(unsafe_code)]
pub fn receive(path: &Path) -> Result<Inherited, UpgradeError> {
    let unusable = |why: String| UpgradeError::Unusable {
        path: path.to_path_buf(),
        why,
    };
    let text = path
        .to_str()
        .ok_or_else(|| unusable("the path is not UTF-8".into()))?;
    usable(path).map_err(unusable)?;
    info!("upgrade: waiting for listening sockets on {text}; send SIGQUIT to the running ballast");
    let mut table = Fds::new();
    // pingora's receiver unwraps where it cannot create the socket; `usable` checked
    // what usually fails, and whatever else does is an error here, not a crash.
    let received =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| table.get_from_sock(text)));
    match received {
        Ok(Ok(())) => {}
        Ok(Err(errno)) => {
            return Err(UpgradeError::NothingCame {
                path: path.to_path_buf(),
                source: io::Error::from(errno),
            })
        }
        Err(_) => return Err(unusable("pingora's receiver failed (see above)".into())),
    }
    let (keys, fds) = table.serialize();
    let mut sockets = HashMap::with_capacity(keys.len());
    for (key, fd) in keys.into_iter().zip(fds) {
        // SAFETY: `fd` was just received with SCM_RIGHTS, a new descriptor of this
        // process that nothing else knows of: `Fds` only holds the number and never
        // closes it (it has no `Drop`), and `table` is not used again.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        match listening_socket(&key, fd) {
            Ok(socket) => {
                sockets.insert(key, socket);
            }
            Err(why) => warn!("upgrade: ignored the socket received for {key}: {why}"),
        }
    }
    Ok(Inherited { sockets })
}

/// Whether a Unix socket can be created at `path`: its folder exists and takes new
/// files, and `path` is not a folder.
fn usable(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err("it is a folder".into());
    }
    let probe = dir.join(format!(".ballast-upgrade-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("cannot create files in {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `fd` as a listening TCP socket on the address `key` names, made non-blocking.
fn listening_socket(key: &str, fd: OwnedFd) -> Result<TcpListener, String> {
    let socket = TcpListener::from(fd);
    let addr: SocketAddr = key.parse().map_err(|_| "not an address".to_string())?;
    let sock = socket2::SockRef::from(&socket);
    let listening = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
        && sock.is_listener().unwrap_or(false);
    if !listening {
        return Err("not a listening TCP socket".into());
    }
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    if local.ip() != addr.ip() || (addr.port() != 0 && local.port() != addr.port()) {
        return Err(format!("it listens on {local}"));
    }
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// The sockets of `config`: each listener's and the admin endpoint's from `inherited`
/// where the old process listened on that address, bound afresh otherwise (a failure
/// names the listener, as at a plain start). Received sockets that nothing here claims
/// are closed.
pub fn bind(config: &Config, mut inherited: Inherited) -> Result<Bound, BindError> {
    let received = inherited.len();
    let mut fresh = Vec::new();
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let socket = match inherited.take(l.bind) {
            Some(socket) => socket,
            None => {
                fresh.push(l.name.clone());
                bind_listener(l)?
            }
        };
        listeners.push((l.name.clone(), socket));
    }
    let admin = match &config.admin {
        Some(admin) => Some(match inherited.take(admin.bind) {
            Some(socket) => socket,
            None => {
                fresh.push("admin".into());
                bind_one(admin.bind).map_err(|source| BindError {
                    what: "admin",
                    name: "admin".into(),
                    addr: admin.bind,
                    source,
                })?
            }
        }),
        None => None,
    };
    let taken = received - inherited.len();
    info!(
        "upgrade: took over {taken} listening sockets; bound afresh: {}",
        if fresh.is_empty() {
            "none".to_string()
        } else {
            fresh.join(", ")
        }
    );
    if !inherited.is_empty() {
        let mut unclaimed: Vec<&String> = inherited.sockets.keys().collect();
        unclaimed.sort();
        warn!(
            "upgrade: closed {} received listening sockets that no listener of this config claims: {}",
            unclaimed.len(),
            unclaimed
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(Bound { listeners, admin })
}

// ---------------------------------------------------------------------------
// The old process.

/// Another handle on every listening socket of `ballast`, keyed: each running
/// listener's and `admin`'s (its bind address and socket). A second socket on the same
/// key (two listeners on port 0) is left out: the new process binds its own.
pub(crate) fn listening_sockets(
    ballast: &Ballast,
    admin: Option<(SocketAddr, &TcpListener)>,
) -> Vec<(String, TcpListener)> {
    let mut binds: Vec<(String, SocketAddr)> = ballast.listener_binds().into_iter().collect();
    binds.sort();
    let mut sockets: Vec<(String, TcpListener)> = Vec::with_capacity(binds.len() + 1);
    let mut add = |addr: SocketAddr, socket: Option<TcpListener>| {
        let key = key(addr);
        if let Some(socket) = socket {
            if !sockets.iter().any(|(k, _)| *k == key) {
                sockets.push((key, socket));
            }
        }
    };
    for (name, bind) in binds {
        add(bind, ballast.clone_socket(&name));
    }
    if let Some((addr, socket)) = admin {
        add(addr, socket.try_clone().ok());
    }
    sockets
}

/// Sends `sockets` to the process waiting on `path`, after removing the ready mark an
/// earlier upgrade may have left. Blocks: pingora's sender tries again for about 5 s
/// while nobody listens there.
pub fn send(path: &Path, sockets: &[(String, TcpListener)]) -> Result<(), UpgradeError> {
    let not_sent = |source: io::Error| UpgradeError::NotSent {
        path: path.to_path_buf(),
        source,
    };
    if sockets.len() > MAX_SOCKETS {
        return Err(UpgradeError::TooMany {
            count: sockets.len(),
        });
    }
    let len = sockets.iter().map(|(k, _)| k.len() + 1).sum::<usize>();
    if len > MAX_KEYS_LEN {
        return Err(UpgradeError::KeysTooLong {
            count: sockets.len(),
            len,
        });
    }
    let text = path
        .to_str()
        .ok_or_else(|| not_sent(io::Error::other("the path is not UTF-8")))?;
    clear_ready_mark(path);
    let mut table = Fds::new();
    for (key, socket) in sockets {
        // The table borrows the numbers; `sockets` keeps them open until sent.
        table.add(key.clone(), socket.as_raw_fd());
    }
    table
        .send_to_sock(text)
        .map(drop)
        .map_err(|errno| not_sent(io::Error::from(errno)))
}

/// Waits until the new process has taken the sockets sent on `path`: pingora's
/// receiver removes the socket file once they arrived. `false` when that did not happen
/// `within`.
pub async fn taken(path: &Path, within: Duration) -> bool {
    within_time(within, || std::fs::symlink_metadata(path).is_err()).await
}

/// Waits until the new process that took the sockets sent on `path` says it serves (its
/// [`ready_mark`]), and removes the mark. `false` when it did not say so `within`.
pub async fn serving(path: &Path, within: Duration) -> bool {
    let mark = ready_mark(path);
    // A plain file only: not a link, not a folder someone put there.
    let is_mark = || std::fs::symlink_metadata(&mark).is_ok_and(|m| m.file_type().is_file());
    let seen = within_time(within, is_mark).await;
    if seen {
        let _ = std::fs::remove_file(&mark);
    }
    seen
}

/// Whether `done` holds within `within`, looking every 20 ms.
async fn within_time(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> TcpListener {
        bind_one("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    #[test]
    fn a_socket_sent_is_the_same_socket_received_and_keeps_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.sock");
        let socket = listener();
        let addr = socket.local_addr().unwrap();
        let sockets = vec![(key(addr), socket)];
        let receiver = {
            let path = path.clone();
            std::thread::spawn(move || receive(&path))
        };
        // The receiver creates the socket file, then the sender finds it.
        send(&path, &sockets).unwrap();
        let mut inherited = receiver.join().unwrap().unwrap();
        // A client queued now is accepted through the received socket.
        drop(sockets);
        let client = std::net::TcpStream::connect(addr).unwrap();
        let received = inherited.take(addr).expect("the socket came with its key");
        received.set_nonblocking(false).unwrap();
        let (_, peer) = received.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(!path.exists(), "the receiver removes the socket file");
    }

    #[test]
    fn a_socket_that_listens_elsewhere_than_its_key_says_is_refused() {
        let socket = listener();
        let fd = OwnedFd::from(socket);
        let err = listening_socket("127.0.0.1:1", fd).unwrap_err();
        assert!(err.starts_with("it listens on 127.0.0.1:"), "{err}");
    }

    #[test]
    fn a_connected_socket_is_not_taken_for_a_listener() {
        let server = listener();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let key = key(client.local_addr().unwrap());
        let err = listening_socket(&key, OwnedFd::from(client)).unwrap_err();
        assert_eq!(err, "not a listening TCP socket");
    }

    #[test]
    fn more_sockets_than_one_hand_over_carries_are_refused_before_anything_is_sent() {
        let sockets: Vec<(String, TcpListener)> = (0..=MAX_SOCKETS)
            .map(|i| (format!("127.0.0.1:{}", 1000 + i), listener()))
            .collect();
        let err = send(Path::new("/nonexistent/u.sock"), &sockets).unwrap_err();
        assert!(matches!(err, UpgradeError::TooMany { count } if count == MAX_SOCKETS + 1));
    }

    #[test]
    fn a_missing_folder_is_named_before_waiting() {
        let err = receive(Path::new("/nonexistent-ballast-dir/u.sock")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("upgrade: cannot wait on /nonexistent-ballast-dir/u.sock: cannot create files in /nonexistent-ballast-dir: "),
            "{text}"
        );
    }
}
