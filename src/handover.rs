//! A parked connection as bytes: what one process will hand another, beside the
//! connection's two sockets, when an upgrade hands over established connections.
//!
//! A relay parks at a safe point ([`crate::relay::Stop::Park`]) and gives back its
//! sockets and a [`RelayState`] of plain data. [`Handed`] is that state with what the
//! connection path knows of the connection besides (listener, backend by name, the real
//! client, how long it has lived, how long its connect took), and [`encode`] /
//! [`decode`] carry it across a process boundary. The format is versioned, every length
//! is bounded before anything is allocated, and any bytes decode to a value or an error,
//! never a panic: a new binary must refuse what it cannot read, not crash on it.
//!
//! Layout (integers little-endian): the magic `BHO1`; listener and backend names (u16
//! length, UTF-8); the client (family 4 or 6, address, port); age and connect time (ms
//! and µs, u64, `u64::MAX` for none); the protocol (a tag, with the head bytes kept for
//! the two heads); which side finished first (0 none, 1 client, 2 backend); then each
//! direction, client to backend first: finished (0/1), bytes delivered (u64), the
//! WebSocket frame cursor (0 none, or 1, the header bytes seen (u8 length) and the
//! payload left (u64)), and the pending bytes (u32 length).
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::conn::Handoff;

use crate::relay::{DirectionState, Protocol, RelayState, Side, MAX_HEAD};
use crate::websocket::FrameCursor;

const MAGIC: &[u8; 4] = b"BHO1";

/// The most bytes a direction may have read and not yet written when it is handed over:
/// far above what a relay holds (its buffer, or a pipe's worth), far below memory.
pub const MAX_PENDING: usize = 16 << 20;

/// One parked connection, without its sockets.
#[derive(Debug, Clone)]
pub struct Handed {
    pub listener: String,
    /// The backend by name (the new process finds it in its own config, or drains it).
    pub backend: String,
    /// The real client (the one a PROXY header named, where there was one).
    pub client: SocketAddr,
    /// How long the connection has lived.
    pub age: Duration,
    /// How long its backend connect took.
    pub connect: Option<Duration>,
    pub relay: RelayState,
}

/// Why bytes are not a [`Handed`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a handed-over connection of this version")]
    Magic,
    #[error("cut short")]
    Truncated,
    #[error("{0} is longer than it may be")]
    TooLong(&'static str),
    #[error("{0} has a value no connection has")]
    Invalid(&'static str),
    #[error("bytes left after the connection")]
    Trailing,
}

/// The bytes of `handed`.
pub fn encode(handed: &Handed) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + pending_len(&handed.relay));
    out.extend_from_slice(MAGIC);
    for name in [&handed.listener, &handed.backend] {
        let bytes = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    match handed.client.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&handed.client.port().to_le_bytes());
    out.extend_from_slice(&(handed.age.as_millis().min(u64::MAX as u128 - 1) as u64).to_le_bytes());
    let connect = handed
        .connect
        .map_or(u64::MAX, |d| d.as_micros().min(u64::MAX as u128 - 1) as u64);
    out.extend_from_slice(&connect.to_le_bytes());
    let head = |out: &mut Vec<u8>, tag: u8, bytes: &[u8]| {
        out.push(tag);
        let bytes = &bytes[..bytes.len().min(MAX_HEAD)];
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    match &handed.relay.protocol {
        Protocol::Unknown => out.push(0),
        Protocol::ClientHead(bytes) => head(&mut out, 1, bytes),
        Protocol::UpgradeAsked => out.push(2),
        Protocol::BackendHead(bytes) => head(&mut out, 3, bytes),
        Protocol::WebSocket => out.push(4),
        Protocol::Plain => out.push(5),
    }
    out.push(match handed.relay.first_finished {
        None => 0,
        Some(Side::Client) => 1,
        Some(Side::Backend) => 2,
    });
    for dir in [&handed.relay.to_backend, &handed.relay.to_client] {
        out.push(u8::from(dir.finished));
        out.extend_from_slice(&dir.delivered.to_le_bytes());
        match &dir.frames {
            None => out.push(0),
            Some(cursor) => {
                let (header, payload_left) = cursor.parts();
                out.push(1);
                out.push(header.len() as u8);
                out.extend_from_slice(header);
                out.extend_from_slice(&payload_left.to_le_bytes());
            }
        }
        let pending = &dir.pending[..dir.pending.len().min(MAX_PENDING)];
        out.extend_from_slice(&(pending.len() as u32).to_le_bytes());
        out.extend_from_slice(pending);
    }
    out
}

fn pending_len(relay: &RelayState) -> usize {
    relay.to_backend.pending.len() + relay.to_client.pending.len()
}

/// The connection `bytes` encode.
pub fn decode(bytes: &[u8]) -> Result<Handed, DecodeError> {
    let mut r = Reader { rest: bytes };
    if r.take(4)? != MAGIC {
        return Err(DecodeError::Magic);
    }
    let listener = r.name("listener")?;
    let backend = r.name("backend")?;
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(r.take(4)?).map_err(|_| DecodeError::Truncated)?,
        )),
        6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(r.take(16)?).map_err(|_| DecodeError::Truncated)?,
        )),
        _ => return Err(DecodeError::Invalid("the client's address family")),
    };
    let client = SocketAddr::new(ip, r.u16()?);
    let age = Duration::from_millis(r.u64()?);
    let connect = match r.u64()? {
        u64::MAX => None,
        us => Some(Duration::from_micros(us)),
    };
    let protocol = match r.u8()? {
        0 => Protocol::Unknown,
        1 => Protocol::ClientHead(r.bytes(MAX_HEAD, "the client's head")?),
        2 => Protocol::UpgradeAsked,
        3 => Protocol::BackendHead(r.bytes(MAX_HEAD, "the backend's head")?),
        4 => Protocol::WebSocket,
        5 => Protocol::Plain,
        _ => return Err(DecodeError::Invalid("the protocol")),
    };
    let first_finished = match r.u8()? {
        0 => None,
        1 => Some(Side::Client),
        2 => Some(Side::Backend),
        _ => return Err(DecodeError::Invalid("the side that finished first")),
    };
    let to_backend = r.direction()?;
    let to_client = r.direction()?;
    if !r.rest.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(Handed {
        listener,
        backend,
        client,
        age,
        connect,
        relay: RelayState {
            to_backend,
            to_client,
            protocol,
            first_finished,
        },
    })
}

/// Reads `bytes` from the front.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }

    fn name(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| DecodeError::Invalid(what))
    }

    /// A u32 length, at most `max`, then that many bytes.
    fn bytes(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::TooLong(what));
        }
        Ok(self.take(len)?.to_vec())
    }

    fn direction(&mut self) -> Result<DirectionState, DecodeError> {
        let finished = match self.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("a direction's end")),
        };
        let delivered = self.u64()?;
        let frames = match self.u8()? {
            0 => None,
            1 => {
                let len = usize::from(self.u8()?);
                let header = self.take(len)?;
                let payload_left = self.u64()?;
                let cursor = FrameCursor::from_parts(header, payload_left)
                    .ok_or(DecodeError::Invalid("a WebSocket frame cursor"))?;
                Some(cursor)
            }
            _ => return Err(DecodeError::Invalid("a WebSocket frame cursor")),
        };
        let pending = self.bytes(MAX_PENDING, "a direction's pending bytes")?;
        Ok(DirectionState {
            pending,
            frames,
            finished,
            delivered,
        })
    }
}

// ---------------------------------------------------------------------------
// The wire between the two processes.
//
// The old process connects to the new one's Unix socket ([`inbox_path`]) and sends
// batches. A batch is a 16-byte head (`BHB1`, the number of connections n as u32, the
// payload's length as u64) that carries 2n descriptors with `SCM_RIGHTS` (each
// connection's client socket, then its backend socket), then the payload: each
// connection's [`encode`]d state with a u32 length before it. The new process registers
// what it can and answers `BHA1`, n, then one byte per connection (1 taken, 0 refused).
// The old process then writes one byte, `C`: only from then on does the new process
// relay, and only once it was written does the old one let go of its copies. So a new
// process that dies before the commit relayed nothing, and the old one takes back every
// connection of the batch and resumes it where it stood; the window in which both could
// lose a connection is the one between the commit's write and its read.

const BATCH_MAGIC: &[u8; 4] = b"BHB1";
const ANSWER_MAGIC: &[u8; 4] = b"BHA1";
const COMMIT: u8 = b'C';

/// Connections in one batch: 128 descriptors, well under the kernel's 253 a message.
pub const BATCH: usize = 64;

/// The most payload bytes one batch carries: more than one connection's most
/// ([`MAX_PENDING`] each way, two heads, names), so any connection fits a batch.
pub const MAX_BATCH_BYTES: usize = 48 << 20;

/// How long either side waits for the other's answer, or commit, before it gives up on
/// the batch (the old process then takes it back).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The Unix socket on which a new process takes established connections:
/// `<upgrade_sock>.conns`.
pub fn inbox_path(upgrade_sock: &Path) -> PathBuf {
    let mut path = upgrade_sock.as_os_str().to_owned();
    path.push(".conns");
    PathBuf::from(path)
}

/// A parked connection with its two sockets: what a connection's task gives the
/// hand-over, and gets back when the new process does not take it.
pub struct Parked {
    pub handed: Handed,
    pub client: TcpStream,
    pub backend: TcpStream,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("handed", &self.handed)
            .finish()
    }
}

/// Where connection tasks send what they parked, with where to say what became of it.
pub type Outbox = mpsc::UnboundedSender<(Parked, oneshot::Sender<Handoff>)>;

/// Whether `handed` can travel whole: each direction's pending bytes fit the format.
pub fn fits(handed: &Handed) -> bool {
    handed.relay.to_backend.pending.len() <= MAX_PENDING
        && handed.relay.to_client.pending.len() <= MAX_PENDING
}

/// Sends `batch` on `link` and reads which connections the new process took. Blocks,
/// at most [`ANSWER_WITHIN`] for the answer.
pub fn send_batch(link: &UnixStream, batch: &[&Parked]) -> io::Result<Vec<bool>> {
    let mut payload = Vec::new();
    let mut fds = Vec::with_capacity(batch.len() * 2);
    for parked in batch {
        let bytes = encode(&parked.handed);
        payload.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        payload.extend_from_slice(&bytes);
        fds.push(parked.client.as_raw_fd());
        fds.push(parked.backend.as_raw_fd());
    }
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(BATCH_MAGIC);
    head[4..8].copy_from_slice(&(batch.len() as u32).to_le_bytes());
    head[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let rights = [socket::ControlMessage::ScmRights(&fds)];
    let sent = loop {
        match socket::sendmsg::<()>(
            link.as_raw_fd(),
            &[io::IoSlice::new(&head)],
            &rights,
            socket::MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            // A signal (a reload) during the call: nothing was sent.
            Err(nix::errno::Errno::EINTR) => continue,
            sent => break sent.map_err(io::Error::from)?,
        }
    };
    let mut writer = link;
    writer.write_all(&head[sent..])?;
    writer.write_all(&payload)?;
    link.set_read_timeout(Some(ANSWER_WITHIN))?;
    let mut reader = link;
    let mut answer = [0u8; 8];
    reader.read_exact(&mut answer)?;
    let n = u32::from_le_bytes([answer[4], answer[5], answer[6], answer[7]]) as usize;
    if &answer[..4] != ANSWER_MAGIC || n != batch.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an answer to this batch",
        ));
    }
    let mut taken = vec![0u8; n];
    reader.read_exact(&mut taken)?;
    Ok(taken.into_iter().map(|t| t == 1).collect())
}

/// Tells the new process that it may relay the batch it answered.
pub fn commit(link: &UnixStream) -> io::Result<()> {
    let mut writer = link;
    writer.write_all(&[COMMIT])
}

/// One received connection: its state (or why it cannot be read) and its sockets.
pub type Received = (Result<Handed, DecodeError>, OwnedFd, OwnedFd);

/// Reads the next batch from `link`; `None` when the old process closed it after its
/// last batch. Blocks until a batch comes (the old process sends as connections park).
pub fn receive_batch(link: &UnixStream) -> io::Result<Option<Vec<Received>>> {
    // Batches come as connections park: wait as long as the old process is there.
    link.set_read_timeout(None)?;
    let mut head = [0u8; 16];
    let mut space = nix::cmsg_space!([RawFd; 2 * BATCH]);
    let (got, fds) = {
        let mut iov = [io::IoSliceMut::new(&mut head)];
        let msg = loop {
            match socket::recvmsg::<()>(
                link.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                socket::MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                // A signal during the call: nothing was received.
                Err(nix::errno::Errno::EINTR) => continue,
                msg => break msg.map_err(io::Error::from)?,
            }
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let socket::ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: each descriptor was just received with SCM_RIGHTS: new in
                // this process, and owned by nothing else.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let truncated = msg.flags.contains(socket::MsgFlags::MSG_CTRUNC);
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more descriptors than a batch has",
            ));
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Ok(None);
    }
    // The rest of a batch comes at once.
    link.set_read_timeout(Some(ANSWER_WITHIN))?;
    let mut reader = link;
    reader.read_exact(&mut head[got..])?;
    let n = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[8..]);
    let len = u64::from_le_bytes(len);
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if &head[..4] != BATCH_MAGIC {
        return Err(invalid("not a batch of connections"));
    }
    if n == 0 || n > BATCH || fds.len() != 2 * n {
        return Err(invalid(
            "a batch whose descriptors do not match its connections",
        ));
    }
    if len > MAX_BATCH_BYTES as u64 {
        return Err(invalid("a batch longer than one may be"));
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    let mut rest = &payload[..];
    let mut fds = fds.into_iter();
    let mut received = Vec::with_capacity(n);
    for _ in 0..n {
        let handed = (|| {
            let mut r = Reader { rest };
            let len = r.u32()? as usize;
            let bytes = r.take(len)?;
            rest = r.rest;
            decode(bytes)
        })();
        let (Some(client), Some(backend)) = (fds.next(), fds.next()) else {
            return Err(invalid(
                "a batch whose descriptors do not match its connections",
            ));
        };
        received.push((handed, client, backend));
    }
    Ok(Some(received))
}

/// Answers a batch: which connections this process took.
pub fn answer(link: &UnixStream, taken: &[bool]) -> io::Result<()> {
    let mut out = Vec::with_capacity(8 + taken.len());
    out.extend_from_slice(ANSWER_MAGIC);
    out.extend_from_slice(&(taken.len() as u32).to_le_bytes());
    out.extend(taken.iter().map(|&t| u8::from(t)));
    let mut writer = link;
    writer.write_all(&out)
}

/// Waits for the old process's commit of the batch just answered: `Ok(true)` when it came.
pub fn committed(link: &UnixStream) -> io::Result<bool> {
    link.set_read_timeout(Some(ANSWER_WITHIN))?;
    let mut byte = [0u8; 1];
    let mut reader = link;
    reader.read_exact(&mut byte)?;
    Ok(byte[0] == COMMIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn direction() -> impl Strategy<Value = DirectionState> {
        (
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
            any::<u64>(),
            prop::option::of((0usize..2, any::<u64>())),
        )
            .prop_map(|(pending, finished, delivered, frames)| DirectionState {
                pending,
                finished,
                delivered,
                // A cursor mid-payload, or with the first byte of a header seen.
                frames: frames.map(|(kind, left)| match kind {
                    0 => FrameCursor::from_parts(&[], left).unwrap(),
                    _ => FrameCursor::from_parts(&[0x82], 0).unwrap(),
                }),
            })
    }

    fn handed() -> impl Strategy<Value = Handed> {
        let protocol = prop_oneof![
            Just(Protocol::Unknown),
            proptest::collection::vec(any::<u8>(), 0..32).prop_map(Protocol::ClientHead),
            Just(Protocol::UpgradeAsked),
            proptest::collection::vec(any::<u8>(), 0..32).prop_map(Protocol::BackendHead),
            Just(Protocol::WebSocket),
            Just(Protocol::Plain),
        ];
        let side = prop::option::of(prop_oneof![Just(Side::Client), Just(Side::Backend)]);
        (
            "[a-z0-9_@.:-]{0,20}",
            "[a-z0-9_@.:-]{0,20}",
            // An address and port: a scope or flow label is no client's.
            (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port)),
            any::<u32>(),
            prop::option::of(any::<u32>()),
            (protocol, side, direction(), direction()),
        )
            .prop_map(|(listener, backend, client, age, connect, relay)| Handed {
                listener,
                backend,
                client,
                age: Duration::from_millis(u64::from(age)),
                connect: connect.map(|us| Duration::from_micros(u64::from(us))),
                relay: RelayState {
                    protocol: relay.0,
                    first_finished: relay.1,
                    to_backend: relay.2,
                    to_client: relay.3,
                },
            })
    }

    /// What of a [`Handed`] its state's `Debug` leaves out, compared too.
    fn same(a: &Handed, b: &Handed) -> bool {
        let dirs = |h: &Handed| {
            [&h.relay.to_backend, &h.relay.to_client].map(|d| {
                (
                    d.pending.clone(),
                    d.finished,
                    d.delivered,
                    d.frames
                        .as_ref()
                        .map(|f| (f.parts().0.to_vec(), f.parts().1)),
                )
            })
        };
        (&a.listener, &a.backend, a.client, a.age, a.connect)
            == (&b.listener, &b.backend, b.client, b.age, b.connect)
            && a.relay.protocol == b.relay.protocol
            && a.relay.first_finished == b.relay.first_finished
            && dirs(a) == dirs(b)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_connection_encoded_decodes_back(h in handed()) {
            let decoded = decode(&encode(&h)).expect("decodes");
            prop_assert!(same(&decoded, &h), "{:?} != {:?}", decoded, h);
        }

        #[test]
        fn any_bytes_decode_to_a_connection_or_an_error_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_connection_cut_short_or_followed_by_more_is_refused(h in handed(), cut in any::<usize>()) {
            let bytes = encode(&h);
            let cut = cut % bytes.len();
            prop_assert!(decode(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert_eq!(decode(&longer).err(), Some(DecodeError::Trailing));
        }
    }

    #[test]
    fn a_frame_cursor_resumes_where_it_stood() {
        // A binary frame of 5 payload bytes, cut after its header and 2 bytes.
        let frame = [0x82, 0x05, 1, 2, 3, 4, 5];
        let mut cursor = FrameCursor::default();
        cursor.feed(&frame[..4]);
        let (header, left) = cursor.parts();
        let mut resumed = FrameCursor::from_parts(header, left).unwrap();
        assert!(!resumed.at_boundary());
        assert_eq!(resumed.until_boundary(&frame[4..]), 3);
        assert!(resumed.at_boundary());
        // Parts no stream leaves: a whole header kept, a header inside a payload.
        assert!(FrameCursor::from_parts(&[0x82, 0x05], 0).is_none());
        assert!(FrameCursor::from_parts(&[0x82], 3).is_none());
        assert!(FrameCursor::from_parts(&[0u8; 14], 0).is_none());
    }

    #[test]
    fn lengths_over_their_bounds_are_refused_before_anything_is_allocated() {
        let mut bytes = encode(&Handed {
            listener: "web".into(),
            backend: "a".into(),
            client: "127.0.0.1:4000".parse().unwrap(),
            age: Duration::from_secs(3),
            connect: None,
            relay: RelayState {
                protocol: Protocol::ClientHead(b"GET".to_vec()),
                ..RelayState::default()
            },
        });
        // The client head's length follows its tag: magic 4, names 2 + 3 and 2 + 1,
        // client 1 + 4 + 2, age 8, connect 8, tag 1. Claim 4 GiB.
        let at = 4 + 5 + 3 + 7 + 8 + 8 + 1;
        assert_eq!(bytes[at - 1], 1, "the tag of a client head");
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&bytes).err(),
            Some(DecodeError::TooLong("the client's head"))
        );
    }

    /// A connected pair of TCP sockets on loopback: (client end, server end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_carries_each_connection_s_sockets_and_state_and_the_answer_says_which_were_taken(
    ) {
        let (link, far) = UnixStream::pair().unwrap();
        let mut parked = Vec::new();
        let mut peers = Vec::new();
        for i in 0..3u8 {
            let (client_peer, client) = tcp_pair().await;
            let (backend, backend_peer) = tcp_pair().await;
            let mut relay = RelayState::default();
            relay.to_client.pending = vec![i; 100 * usize::from(i)];
            relay.to_backend.delivered = u64::from(i) * 1000;
            peers.push((
                client_peer.local_addr().unwrap(),
                backend_peer.local_addr().unwrap(),
            ));
            parked.push(Parked {
                handed: Handed {
                    listener: "web".into(),
                    backend: format!("b{i}"),
                    client: client_peer.local_addr().unwrap(),
                    age: Duration::from_millis(1500),
                    connect: None,
                    relay,
                },
                client,
                backend,
            });
            // The test's ends stay open while the batch travels.
            std::mem::forget((client_peer, backend_peer));
        }
        let receiver = std::thread::spawn(move || {
            let batch = receive_batch(&far).unwrap().unwrap();
            let seen: Vec<_> = batch
                .into_iter()
                .map(|(handed, client, backend)| {
                    let handed = handed.unwrap();
                    let client = std::net::TcpStream::from(client);
                    let backend = std::net::TcpStream::from(backend);
                    (
                        handed,
                        client.peer_addr().unwrap(),
                        backend.peer_addr().unwrap(),
                    )
                })
                .collect();
            answer(&far, &[true, false, true]).unwrap();
            let committed = committed(&far).unwrap();
            // The old process closed the link: no more batches.
            let end = receive_batch(&far).unwrap();
            (seen, committed, end.is_none())
        });
        let refs: Vec<&Parked> = parked.iter().collect();
        let taken = tokio::task::block_in_place(|| send_batch(&link, &refs)).unwrap();
        assert_eq!(taken, [true, false, true]);
        commit(&link).unwrap();
        drop(link);
        let (seen, committed, ended) = receiver.join().unwrap();
        assert!(committed && ended);
        for (i, (handed, client, backend)) in seen.iter().enumerate() {
            assert_eq!(handed.backend, format!("b{i}"));
            assert_eq!(handed.relay.to_client.pending, vec![i as u8; 100 * i]);
            assert_eq!(handed.relay.to_backend.delivered, i as u64 * 1000);
            assert_eq!((*client, *backend), peers[i]);
        }
    }

    #[test]
    fn a_batch_whose_descriptors_do_not_match_is_refused() {
        let (link, far) = UnixStream::pair().unwrap();
        // A head that says two connections, with no descriptors.
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(BATCH_MAGIC);
        head[4..8].copy_from_slice(&2u32.to_le_bytes());
        let mut writer = &link;
        writer.write_all(&head).unwrap();
        let err = receive_batch(&far).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
