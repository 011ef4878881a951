//! Moving bulk bytes in the kernel: socket → pipe → socket with `splice(2)`, as
//! HAProxy's `splice-auto` does, so a bulk direction's bytes are never copied into
//! ballast and out again.
//!
//! A [`Pipe`] belongs to one direction of one relayed connection and holds at most its
//! size in bytes read but not yet written (the relay counts them as pending). Splicing
//! is an optimisation only: wherever it cannot be had, the relay copies, as before —
//! the kernel refuses it (a seccomp profile, a socket type without splice support), no
//! pipe can be made, the pipe granted is smaller than one relay read (past
//! `fs.pipe-user-pages-soft` the kernel hands out 2-page pipes), or pipes already hold
//! a quarter of the file descriptors this process may open (HAProxy's `maxpipes` is
//! `maxconn / 4` the same way), which leaves the rest for connections.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The pipe size asked for: four relay reads.
const PIPE_SIZE: usize = 256 * 1024;

/// The smallest pipe worth splicing through: one relay read.
const MIN_PIPE_SIZE: usize = 64 * 1024;

/// Pipes open in this process now.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// How many pipes this process has open now (two descriptors each).
pub fn open_pipes() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// The most pipes open at once: an eighth of the descriptor limit (`RLIMIT_NOFILE`), so
/// that their two descriptors each take a quarter of it at most.
fn max_pipes() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return 0;
        }
        usize::try_from(limit.rlim_cur).map_or(usize::MAX, |n| n / 8)
    })
}

/// Whether `error` says splicing is not to be had here (rather than that a socket
/// failed): copy instead.
pub fn refused(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM | libc::EACCES)
    )
}

/// Why [`Pipe::open`] gave no pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPipe {
    /// Pipes hold their share of the descriptors now; one may be had later.
    AllInUse,
    /// No pipe, or none large enough, could be made: do not ask again.
    Refused,
}

/// A pipe that one direction's bytes pass through, and how many of them it holds.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe: spliced in, not yet spliced out.
    held: u32,
    /// The pipe's size, what one splice in may move at most.
    size: u32,
}

impl Pipe {
    /// A new pipe, or why there is none (see the module doc).
    pub fn open() -> Result<Pipe, NoPipe> {
        if OPEN.fetch_add(1, Ordering::Relaxed) >= max_pipes() {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return Err(NoPipe::AllInUse);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return Err(NoPipe::Refused);
        }
        // SAFETY: both descriptors were just made and belong to nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The size is a wish: the kernel may keep the default, or grant less.
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        // SAFETY: as above.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        // From here the pipe's Drop gives its place back.
        let pipe = Pipe {
            read,
            write,
            held: 0,
            size: u32::try_from(size).unwrap_or(0),
        };
        if (pipe.size as usize) < MIN_PIPE_SIZE {
            return Err(NoPipe::Refused);
        }
        Ok(pipe)
    }

    /// Bytes in the pipe, not yet written on.
    pub fn held(&self) -> usize {
        self.held as usize
    }

    /// Moves what `from` has (up to the room in the pipe) into the pipe; returns how
    /// much (0: nothing to move now, or the end of the stream, or urgent data ahead,
    /// which `splice` does not pass; a read tells them apart).
    pub fn fill_from(&mut self, from: &impl AsRawFd) -> io::Result<usize> {
        let room = (self.size - self.held) as usize;
        let moved = splice(from.as_raw_fd(), self.write.as_raw_fd(), room)?;
        self.held += moved as u32;
        Ok(moved)
    }

    /// Moves what the pipe holds to `to`, as much as it takes now; returns how much.
    pub fn empty_into(&mut self, to: &impl AsRawFd) -> io::Result<usize> {
        let moved = splice(self.read.as_raw_fd(), to.as_raw_fd(), self.held())?;
        self.held -= moved as u32;
        Ok(moved)
    }

    /// Reads what the pipe holds out into `into` (appended), so that the bytes can be
    /// written from user space or carried elsewhere.
    pub fn take_into(&mut self, into: &mut Vec<u8>) {
        while self.held > 0 {
            let start = into.len();
            into.resize(start + self.held(), 0);
            let buf = &mut into[start..];
            // SAFETY: reads at most buf.len() bytes into buf.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let n = usize::try_from(n).unwrap_or(0);
            into.truncate(start + n);
            if n == 0 {
                // Cannot happen for bytes the pipe holds; give up rather than spin.
                self.held = 0;
                return;
            }
            self.held -= n as u32;
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One non-blocking `splice` of up to `len` bytes from `from` to `to`. splice into a
/// socket cannot ask for `MSG_NOSIGNAL`: a peer gone raises SIGPIPE, which Rust's
/// runtime ignores in every binary (set before `main`), so it is an EPIPE here too.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice with null offsets, on descriptors the caller keeps open.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Splices from `from` until the pipe holds `len` bytes, for 5 s at most.
    fn fill(pipe: &mut Pipe, from: &std::net::TcpStream, len: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pipe.held() < len {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {len} bytes",
                pipe.held()
            );
            match pipe.fill_from(from) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn bytes_spliced_in_come_out_whole_or_are_taken_back_into_memory() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        let mut pipe = Pipe::open().expect("a pipe");
        assert!(pipe.size as usize >= MIN_PIPE_SIZE);
        writer.write_all(b"hello, pipe").unwrap();
        reader.set_nonblocking(true).unwrap();
        fill(&mut pipe, &reader, 11);
        assert_eq!(pipe.held(), 11);
        let mut taken = b">".to_vec();
        pipe.take_into(&mut taken);
        assert_eq!(taken, b">hello, pipe");
        assert_eq!(pipe.held(), 0);

        writer.write_all(b"again").unwrap();
        let listener2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = std::net::TcpStream::connect(listener2.local_addr().unwrap()).unwrap();
        let (mut far, _) = listener2.accept().unwrap();
        fill(&mut pipe, &reader, 5);
        assert_eq!(pipe.empty_into(&out).unwrap(), 5);
        let mut got = [0u8; 5];
        far.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"again");
    }

    #[test]
    fn a_refusal_is_told_from_a_socket_error() {
        assert!(refused(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(refused(&io::Error::from_raw_os_error(libc::EPERM)));
        assert!(!refused(&io::Error::from_raw_os_error(libc::ECONNRESET)));
        assert!(!refused(&io::Error::from_raw_os_error(libc::EAGAIN)));
    }
}
