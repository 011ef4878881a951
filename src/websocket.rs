//! The bits of WebSocket (RFC 6455) ballast needs: the handshake's accept key, and
//! reading and writing frame headers.

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 section 1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header itself takes.
    pub header_len: usize,
}

/// Parses a frame header from the start of `buf`; `None` while it is incomplete.
pub fn parse_header(buf: &[u8]) -> Option<FrameHeader> {
    let [b0, b1, ..] = *buf else { return None };
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        mask,
        payload_len,
        header_len: at,
    })
}

/// A whole unmasked frame (as a server sends), final.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode(opcode, payload, None)
}

/// A whole masked frame (as a client must send), final.
pub fn encode_masked_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    encode(opcode, payload, Some(mask))
}

fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Unmasks (or masks) `payload` in place.
pub fn apply_mask(payload: &mut [u8], mask: [u8; 4]) {
    payload
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b ^= mask[i % 4]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_matches_rfc_6455() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_at_every_length_encoding() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frame = encode_masked_frame(OP_BINARY, &payload, [1, 2, 3, 4]);
            let h = parse_header(&frame).unwrap();
            assert!(h.fin);
            assert_eq!((h.opcode, h.payload_len), (OP_BINARY, len as u64));
            let mut body = frame[h.header_len..].to_vec();
            apply_mask(&mut body, h.mask.unwrap());
            assert_eq!(body, payload);
            assert_eq!(parse_header(&frame[..h.header_len - 1]), None);
        }
    }
}

/// Follows the frame boundaries of a WebSocket byte stream as it passes, so that ballast
/// knows when it may add a frame of its own (a Close) without tearing one.
#[derive(Debug, Clone, Default)]
pub struct FrameCursor {
    /// The current frame's header bytes seen so far (a header is at most 14 bytes).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: u64,
}

impl FrameCursor {
    /// Where it stands, as plain data: the current frame's header bytes seen so far and
    /// the payload bytes still to pass (to carry it to another process).
    pub fn parts(&self) -> (&[u8], u64) {
        (&self.header[..self.header_len], self.payload_left)
    }

    /// A cursor standing where [`FrameCursor::parts`] said; `None` for parts no stream
    /// can leave it at (a header that is already whole, or a header begun inside a
    /// payload).
    pub fn from_parts(header: &[u8], payload_left: u64) -> Option<FrameCursor> {
        let possible = header.len() < 14
            && (header.is_empty() || payload_left == 0)
            && (header.is_empty() || parse_header(header).is_none());
        if !possible {
            return None;
        }
        let mut cursor = FrameCursor {
            payload_left,
            ..FrameCursor::default()
        };
        cursor.header[..header.len()].copy_from_slice(header);
        cursor.header_len = header.len();
        Some(cursor)
    }

    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// Passes `bytes`, all of which are forwarded.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.advance(bytes, false);
    }

    /// Passes bytes up to the end of the current frame and returns how many of `bytes`
    /// that is (0 when already at a boundary; `bytes.len()` when the frame goes on).
    pub fn until_boundary(&mut self, bytes: &[u8]) -> usize {
        if self.at_boundary() {
            return 0;
        }
        self.advance(bytes, true)
    }

    fn advance(&mut self, bytes: &[u8], stop_at_boundary: bool) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.payload_left > 0 {
                let take = self.payload_left.min((bytes.len() - i) as u64);
                i += take as usize;
                self.payload_left -= take;
            } else {
                self.header[self.header_len] = bytes[i];
                self.header_len += 1;
                i += 1;
                match parse_header(&self.header[..self.header_len]) {
                    Some(h) => {
                        self.header_len = 0;
                        self.payload_left = h.payload_len;
                    }
                    None => continue,
                }
            }
            if stop_at_boundary && self.at_boundary() {
                return i;
            }
        }
        i
    }
}

/// Whether `head` (the first bytes a client sent) is a complete HTTP request head
/// asking for a WebSocket upgrade; returns the head's length.
pub fn upgrade_request_len(head: &[u8]) -> Option<usize> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&head[..end]).ok()?;
    if !text.starts_with("GET ") {
        return None;
    }
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(k, v)| {
            k.trim().eq_ignore_ascii_case("upgrade") && v.trim().eq_ignore_ascii_case("websocket")
        })
        .then_some(end)
}

/// Whether `head` (the first bytes a backend answered) is a complete `101 Switching
/// Protocols` head; returns its length.
pub fn switching_protocols_len(head: &[u8]) -> Option<usize> {
    if !(head.starts_with(b"HTTP/1.1 101") || head.starts_with(b"HTTP/1.0 101")) {
        return None;
    }
    Some(head.windows(4).position(|w| w == b"\r\n\r\n")? + 4)
}

/// The Close frame ballast sends a client when it migrates its connection: status 1012
/// (Service Restart), unmasked as a server's frames are.
pub fn close_to_client() -> Vec<u8> {
    encode_frame(OP_CLOSE, &1012u16.to_be_bytes())
}

/// The Close frame ballast sends a backend on the client's behalf: status 1001 (Going
/// Away), masked as a client's frames must be.
pub fn close_to_backend() -> Vec<u8> {
    encode_masked_frame(OP_CLOSE, &1001u16.to_be_bytes(), [0x5a, 0x1e, 0x7c, 0x33])
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn the_cursor_finds_every_boundary_whatever_the_chunking() {
        let mut stream = Vec::new();
        let frames = [
            encode_frame(OP_TEXT, b"hello"),
            encode_frame(OP_BINARY, &[7; 300]),
            encode_frame(OP_BINARY, &[1; 70_000]),
        ];
        let mut boundaries = vec![0];
        for f in &frames {
            stream.extend_from_slice(f);
            boundaries.push(stream.len());
        }
        for chunk in [1, 2, 3, 7, 100, 4096, 100_000] {
            let mut cursor = FrameCursor::default();
            let mut at = 0;
            for piece in stream.chunks(chunk) {
                cursor.feed(piece);
                at += piece.len();
                assert_eq!(
                    cursor.at_boundary(),
                    boundaries.contains(&at),
                    "chunk {chunk} at {at}"
                );
            }
        }
    }

    #[test]
    fn until_boundary_stops_at_the_end_of_the_current_frame() {
        let a = encode_frame(OP_TEXT, b"abc");
        let b = encode_frame(OP_TEXT, b"defg");
        let mut cursor = FrameCursor::default();
        cursor.feed(&a[..3]);
        let rest: Vec<u8> = a[3..].iter().chain(b.iter()).copied().collect();
        assert_eq!(cursor.until_boundary(&rest), a.len() - 3);
        assert!(cursor.at_boundary());
        assert_eq!(cursor.until_boundary(&b), 0);
    }

    #[test]
    fn upgrade_heads_are_recognised() {
        let req =
            b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(upgrade_request_len(req), Some(req.len()));
        assert_eq!(
            upgrade_request_len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            None
        );
        assert_eq!(
            upgrade_request_len(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n"),
            None
        );
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00";
        assert_eq!(switching_protocols_len(resp), Some(resp.len() - 2));
        assert_eq!(switching_protocols_len(b"HTTP/1.1 200 OK\r\n\r\n"), None);
    }
}
