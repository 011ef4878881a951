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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

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
}
