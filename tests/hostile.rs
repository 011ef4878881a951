//! Hostile bytes: every parser that reads bytes from the network, over a corpus of
//! hostile inputs kept in `tests/corpus/` and over arbitrary and mangled input
//! (proptest). No panic, no unbounded work, and the right verdict.
//!
//! Parsers covered here and in their modules' own property tests: the PROXY protocol
//! header (`proxy_protocol`), an agent's reply (`control::agent`), the WebSocket upgrade
//! detection and frame cursor (`websocket`). The admin endpoint's HTTP and the health
//! check's HTTP answer are parsed by hyper.

use std::path::Path;

use ballast::config::AcceptProxy;
use ballast::control::agent;
use ballast::proxy_protocol::ReadHeader;
use ballast::stage::{Inspect, Stage};
use ballast::websocket::{
    encode_frame, encode_masked_frame, parse_header, switching_protocols_len, upgrade_request_len,
    FrameCursor,
};
use proptest::prelude::*;

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn verdict(inspect: &Inspect) -> &'static str {
    match inspect {
        Inspect::More => "more",
        Inspect::Refuse(_) => "refuse",
        Inspect::Done { .. } => "done",
    }
}

#[test]
fn every_hostile_proxy_header_in_the_corpus_is_refused_or_waits_for_more() {
    let stage = ReadHeader::new(AcceptProxy::Any, vec!["127.0.0.0/8".parse().unwrap()]);
    let files = corpus("proxy");
    assert!(files.len() >= 10);
    for (name, bytes) in files {
        // A cut header waits for the rest (the read's deadline and size cap end it);
        // anything else is refused at once.
        let expected =
            if name.contains("_cut") || name.contains("no_body") || name.contains("lf_only") {
                "more"
            } else {
                "refuse"
            };
        assert_eq!(verdict(&stage.inspect(&bytes)), expected, "{name}");
        // No prefix of it is taken for a header either.
        for cut in 1..bytes.len() {
            assert_ne!(
                verdict(&stage.inspect(&bytes[..cut])),
                "done",
                "{name} cut at {cut}"
            );
        }
    }
}

#[test]
fn every_hostile_agent_reply_in_the_corpus_gets_a_verdict() {
    let files = corpus("agent");
    assert!(files.len() >= 5);
    for (name, bytes) in files {
        let words = agent::parse(&bytes);
        let expected = match name.as_str() {
            "control_chars.bin" => Ok(vec![agent::Word::Percent(75)]),
            "not_utf8.bin" => Ok(vec![agent::Word::Drain]),
            "no_newline_long.txt" => Ok(vec![agent::Word::Up; 400]),
            _ => Err(()),
        };
        assert_eq!(words.map_err(|_| ()), expected, "{name}");
    }
}

#[test]
fn every_hostile_websocket_input_in_the_corpus_is_followed_without_panic() {
    let files = corpus("websocket");
    assert!(files.len() >= 5);
    for (name, bytes) in files {
        let upgrade = upgrade_request_len(&bytes);
        let switching = switching_protocols_len(&bytes);
        assert!(upgrade.is_none_or(|n| n <= bytes.len()), "{name}");
        assert!(switching.is_none_or(|n| n <= bytes.len()), "{name}");
        let mut cursor = FrameCursor::default();
        cursor.feed(&bytes);
        let whole_at_boundary = cursor.at_boundary();
        let mut pieces = FrameCursor::default();
        for byte in &bytes {
            pieces.feed(std::slice::from_ref(byte));
        }
        assert_eq!(pieces.at_boundary(), whole_at_boundary, "{name}");
        match name.as_str() {
            "many_tiny_frames.bin" => assert!(whole_at_boundary),
            n if n.contains("_cut") || n.contains("max") => assert!(!whole_at_boundary, "{name}"),
            _ => {}
        }
    }
}

fn frame() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(0x1u8), Just(0x2), Just(0x8), Just(0x9)],
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::option::of(any::<[u8; 4]>()),
    )
        .prop_map(|(opcode, payload, mask)| match mask {
            Some(mask) => encode_masked_frame(opcode, &payload, mask),
            None => encode_frame(opcode, &payload),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_any_websocket_parser(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Some(h) = parse_header(&bytes) {
            prop_assert!(h.header_len <= bytes.len() && h.header_len <= 14);
        }
        prop_assert!(upgrade_request_len(&bytes).is_none_or(|n| n <= bytes.len()));
        prop_assert!(switching_protocols_len(&bytes).is_none_or(|n| n <= bytes.len()));
        let mut cursor = FrameCursor::default();
        cursor.feed(&bytes);
        let mut other = FrameCursor::default();
        prop_assert!(other.until_boundary(&bytes) <= bytes.len());
    }

    #[test]
    fn the_frame_cursor_finds_every_boundary_however_the_stream_is_cut(
        frames in proptest::collection::vec(frame(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let stream: Vec<u8> = frames.concat();
        let mut ends = Vec::new();
        let mut at = 0;
        for f in &frames {
            at += f.len();
            ends.push(at);
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.extend(&ends);
        points.sort();
        points.dedup();
        let mut cursor = FrameCursor::default();
        let mut from = 0;
        for to in points {
            cursor.feed(&stream[from..to]);
            from = to;
            prop_assert_eq!(cursor.at_boundary(), ends.contains(&to) || to == 0, "at {}", to);
        }
    }

    #[test]
    fn a_mangled_proxy_header_is_never_taken_past_its_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        v2 in any::<bool>(),
    ) {
        let mut input = if v2 { b"\r\n\r\n\0\r\nQUIT\n".to_vec() } else { b"PROXY ".to_vec() };
        input.extend_from_slice(&bytes);
        let stage = ReadHeader::new(AcceptProxy::Any, vec!["127.0.0.0/8".parse().unwrap()]);
        if let Inspect::Done { consumed, .. } = stage.inspect(&input) {
            prop_assert!(consumed <= input.len());
        }
    }
}
