//! sd_notify: tells systemd (a `Type=notify` service) where ballast is in its life.
//!
//! `READY=1` once listeners are bound, `RELOADING=1` (with `MONOTONIC_USEC`, as systemd
//! wants) and `READY=1` around a reload, `STOPPING=1` on shutdown. Messages go to the
//! datagram socket in `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace);
//! without it, nothing is sent.
#![allow(unsafe_code)]

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process is the one systemd follows, and so the one that speaks: a new
/// process started for an upgrade is silent until it takes over ([`become_main`]), and
/// the old one from the moment it has handed over ([`step_down`]). Otherwise a process
/// that is not the main one (a failed upgrade's, the replaced one) could tell systemd
/// that the service stops.
static MAIN: AtomicBool = AtomicBool::new(true);

/// A process started for an upgrade: silent until [`become_main`].
pub fn wait_to_be_main() {
    MAIN.store(false, Ordering::Relaxed);
}

/// This process serves in the old one's place: systemd follows it from now on
/// (`MAINPID=`; the unit has `NotifyAccess=all`).
pub fn become_main() {
    MAIN.store(true, Ordering::Relaxed);
    notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
}

/// A new process serves in this one's place: nothing more to say.
pub fn step_down() {
    MAIN.store(false, Ordering::Relaxed);
}

/// Sends `state` to `$NOTIFY_SOCKET`, if set and this process is the main one. Failures
/// are logged, never fatal.
pub fn notify(state: &str) {
    if !MAIN.load(Ordering::Relaxed) {
        return;
    }
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        _ => {
            socket.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(())
}

/// The message systemd wants at the start of a reload.
pub fn reloading_message() -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec())
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_MONOTONIC is always available on the platforms ballast runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
