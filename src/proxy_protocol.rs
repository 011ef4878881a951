//! HAProxy's PROXY protocol, both ways: the stage that reads an upstream balancer's
//! header before the pick (`accept_proxy`), and the header written to a backend
//! (`send_proxy`). Parsing and writing are the `ppp` crate's; what is believed, and
//! from whom, is ballast's.
//!
//! A listener with `accept_proxy` serves only its `trusted_proxies`: a connection from
//! any other address is refused before a byte is read, so a client that reaches the
//! listener directly cannot name itself someone else. From a trusted address the header
//! is required; a missing, malformed or over-long one refuses the connection. A `LOCAL`
//! header (v2, an upstream's health check) or `UNKNOWN` (v1) leaves the connection's own
//! addresses in place.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};

use crate::config::{AcceptProxy, SendProxy};
use crate::stage::{Inspect, Stage};
use crate::state::RejectReason;

/// How long an upstream balancer may take to send its header: it sends it at once.
const HEADER_DEADLINE: Duration = Duration::from_secs(3);
/// The longest v1 header (the protocol's own limit, with its CRLF).
const MAX_V1: usize = 107;
/// The most bytes read for a v2 header: its addresses and the TLVs upstream balancers
/// add (a cloud's endpoint id, TLS details) fit many times over.
const MAX_V2: usize = 4096;
const V1_PREFIX: &[u8] = b"PROXY ";

/// The stage of a listener with `accept_proxy`.
#[derive(Debug)]
pub struct ReadHeader {
    accept: AcceptProxy,
    trusted: Vec<IpNet>,
}

impl ReadHeader {
    pub fn new(accept: AcceptProxy, trusted: Vec<IpNet>) -> ReadHeader {
        ReadHeader { accept, trusted }
    }

    fn not_a_header(&self) -> &'static str {
        match self.accept {
            AcceptProxy::V1 => "not a PROXY protocol v1 header",
            AcceptProxy::V2 => "not a PROXY protocol v2 header",
            AcceptProxy::Any => "not a PROXY protocol header",
        }
    }
}

impl Stage for ReadHeader {
    fn admits(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|net| net.contains(&peer))
    }

    fn inspect(&self, bytes: &[u8]) -> Inspect {
        // v2 starts with CR, v1 with "PROXY".
        let v2 = match self.accept {
            AcceptProxy::V1 => false,
            AcceptProxy::V2 => true,
            AcceptProxy::Any => bytes.first() == Some(&b'\r'),
        };
        let parsed = if v2 {
            HeaderResult::V2(v2::Header::try_from(bytes))
        } else if !(bytes.starts_with(V1_PREFIX) || V1_PREFIX.starts_with(bytes)) {
            return Inspect::Refuse(self.not_a_header());
        } else if !bytes[..bytes.len().min(MAX_V1)]
            .windows(2)
            .any(|w| w == b"\r\n")
        {
            // ppp takes some cuts of a v1 line for wrong ones (after a port's space), and
            // some whole wrong lines for cuts: the line is judged once whole.
            if bytes.len() >= MAX_V1 {
                return Inspect::Refuse(self.not_a_header());
            }
            return Inspect::More;
        } else {
            match v1::Header::try_from(bytes) {
                Ok(header) => HeaderResult::V1(Ok(header)),
                Err(_) => return Inspect::Refuse(self.not_a_header()),
            }
        };
        if parsed.is_incomplete() {
            return Inspect::More;
        }
        let (addresses, consumed) = match parsed {
            HeaderResult::V1(Ok(header)) => {
                let addresses = match header.addresses {
                    v1::Addresses::Tcp4(a) => Some((
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    )),
                    v1::Addresses::Tcp6(a) => Some((
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    )),
                    v1::Addresses::Unknown => None,
                };
                (addresses, header.header.len())
            }
            // ppp reads TLVs lazily: one that runs past the header refuses it here.
            HeaderResult::V2(Ok(header)) if header.tlvs().any(|tlv| tlv.is_err()) => {
                return Inspect::Refuse(self.not_a_header())
            }
            HeaderResult::V2(Ok(header)) => {
                let addresses = match (header.command, header.addresses) {
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some((
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    )),
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some((
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    )),
                    // LOCAL, or a family that names no TCP client: the connection's own.
                    _ => None,
                };
                (addresses, header.len())
            }
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
                return Inspect::Refuse(self.not_a_header())
            }
        };
        Inspect::Done {
            client: addresses.map(|(client, _)| client),
            destination: addresses.map(|(_, destination)| destination),
            nobody: addresses.is_none(),
            server_name: None,
            consumed,
        }
    }

    fn deadline(&self) -> Duration {
        HEADER_DEADLINE
    }

    fn max_bytes(&self) -> usize {
        match self.accept {
            AcceptProxy::V1 => MAX_V1,
            AcceptProxy::V2 | AcceptProxy::Any => MAX_V2,
        }
    }

    fn refusal(&self) -> RejectReason {
        RejectReason::ProxyProtocol
    }
}

/// The header that tells a backend who the client is: `addresses` are the client's and
/// the one it connected to, `None` for a connection made for nobody (a health check:
/// v2 `LOCAL`, v1 `UNKNOWN`).
pub fn header(version: SendProxy, addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let addresses = addresses.map(|(client, destination)| same_family(client, destination));
    match version {
        SendProxy::V1 => match addresses {
            Some(pair) => v1::Addresses::from(pair).to_string().into_bytes(),
            None => v1::Addresses::Unknown.to_string().into_bytes(),
        },
        SendProxy::V2 => {
            let (command, protocol, addresses) = match addresses {
                Some(pair) => (
                    v2::Command::Proxy,
                    v2::Protocol::Stream,
                    v2::Addresses::from(pair),
                ),
                None => (
                    v2::Command::Local,
                    v2::Protocol::Unspecified,
                    v2::Addresses::Unspecified,
                ),
            };
            v2::Builder::with_addresses(v2::Version::Two | command, protocol, addresses)
                .build()
                // Writing into a Vec with a length that fits (no TLVs) cannot fail.
                .unwrap_or_default()
        }
    }
}

/// Both addresses in one family, as a header needs them: IPv4 when both are (an
/// IPv4-mapped IPv6 address counts as IPv4), IPv6 otherwise.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    let (a, b) = (canonical(a), canonical(b));
    if a.is_ipv4() == b.is_ipv4() {
        return (a, b);
    }
    let v6 = |s: SocketAddr| match s {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    };
    (v6(a), v6(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(accept: AcceptProxy) -> ReadHeader {
        ReadHeader::new(accept, vec!["127.0.0.0/8".parse().unwrap()])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_written_are_read_back_with_both_addresses_and_what_follows() {
        let pairs = [
            (addr("192.0.2.7:4000"), addr("10.0.0.1:443")),
            (addr("[2001:db8::7]:4000"), addr("[2001:db8::1]:443")),
        ];
        for version in [SendProxy::V1, SendProxy::V2] {
            for (client, destination) in pairs {
                let mut bytes = header(version, Some((client, destination)));
                let length = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                for accept in [
                    AcceptProxy::Any,
                    if version == SendProxy::V1 {
                        AcceptProxy::V1
                    } else {
                        AcceptProxy::V2
                    },
                ] {
                    assert_eq!(
                        stage(accept).inspect(&bytes),
                        Inspect::Done {
                            client: Some(client),
                            destination: Some(destination),
                            nobody: false,
                            server_name: None,
                            consumed: length,
                        },
                        "{version:?} read as {accept:?}"
                    );
                    // Every cut short of the whole header asks for more.
                    for cut in 1..length {
                        assert_eq!(
                            stage(accept).inspect(&bytes[..cut]),
                            Inspect::More,
                            "{version:?} cut at {cut}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_health_check_header_names_nobody() {
        for version in [SendProxy::V1, SendProxy::V2] {
            let bytes = header(version, None);
            match stage(AcceptProxy::Any).inspect(&bytes) {
                Inspect::Done {
                    client: None,
                    destination: None,
                    consumed,
                    ..
                } => assert_eq!(consumed, bytes.len()),
                other => panic!("{version:?}: {other:?}"),
            }
        }
        assert_eq!(header(SendProxy::V1, None), b"PROXY UNKNOWN\r\n");
        assert_eq!(&header(SendProxy::V2, None)[12..16], &[0x20, 0x00, 0, 0]);
    }

    #[test]
    fn mixed_families_are_written_as_ipv6_and_mapped_ipv4_as_ipv4() {
        let mapped = addr("[::ffff:192.0.2.7]:4000");
        assert_eq!(
            header(SendProxy::V1, Some((mapped, addr("10.0.0.1:80")))),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 4000 80\r\n"
        );
        assert_eq!(
            header(
                SendProxy::V1,
                Some((addr("192.0.2.7:4000"), addr("[2001:db8::1]:80")))
            ),
            b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 4000 80\r\n"
        );
    }

    #[test]
    fn other_bytes_or_the_other_version_are_refused() {
        let v2 = header(
            SendProxy::V2,
            Some((addr("192.0.2.7:1"), addr("10.0.0.1:2"))),
        );
        for (accept, bytes) in [
            (AcceptProxy::Any, &b"GET / HTTP/1.1\r\n"[..]),
            (AcceptProxy::V1, &v2[..]),
            (
                AcceptProxy::V2,
                &b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n"[..],
            ),
            (
                AcceptProxy::V1,
                &b"PROXY TCP4 300.0.2.7 10.0.0.1 1 2\r\n"[..],
            ),
        ] {
            assert!(
                matches!(stage(accept).inspect(bytes), Inspect::Refuse(_)),
                "{accept:?} {bytes:?}"
            );
        }
    }

    #[test]
    fn only_trusted_proxies_are_admitted() {
        let stage = ReadHeader::new(AcceptProxy::Any, vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(stage.admits("10.1.2.3".parse().unwrap()));
        assert!(stage.admits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!stage.admits("127.0.0.1".parse().unwrap()));
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        fn accept() -> impl Strategy<Value = AcceptProxy> {
            prop_oneof![
                Just(AcceptProxy::V1),
                Just(AcceptProxy::V2),
                Just(AcceptProxy::Any)
            ]
        }

        fn socket() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>())
                    .prop_map(|(ip, port)| SocketAddr::from((ip, port))),
                (any::<[u16; 8]>(), any::<u16>())
                    .prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            ]
        }

        /// A header found lies within the bytes given.
        fn sane(verdict: &Inspect, len: usize) -> bool {
            !matches!(verdict, Inspect::Done { consumed, .. } if *consumed > len)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn any_bytes_get_a_verdict_and_no_panic(accept in accept(), bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let stage = stage(accept);
                let verdict = stage.inspect(&bytes);
                prop_assert!(sane(&verdict, bytes.len()), "{verdict:?}");
            }

            #[test]
            fn a_header_with_one_byte_mangled_gets_a_verdict_and_no_panic(
                v2 in any::<bool>(), client in socket(), destination in socket(),
                at in any::<prop::sample::Index>(), byte in any::<u8>(), accept in accept(),
            ) {
                let version = if v2 { SendProxy::V2 } else { SendProxy::V1 };
                let mut bytes = header(version, Some((client, destination)));
                let at = at.index(bytes.len());
                bytes[at] = byte;
                let stage = stage(accept);
                let verdict = stage.inspect(&bytes);
                prop_assert!(sane(&verdict, bytes.len()), "{verdict:?}");
            }

            #[test]
            fn every_header_written_is_read_back_whatever_follows(
                v2 in any::<bool>(), client in socket(), destination in socket(),
                tail in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let version = if v2 { SendProxy::V2 } else { SendProxy::V1 };
                let written = header(version, Some((client, destination)));
                let (client, destination) = same_family(client, destination);
                let mut bytes = written.clone();
                bytes.extend_from_slice(&tail);
                prop_assert_eq!(
                    stage(AcceptProxy::Any).inspect(&bytes),
                    Inspect::Done { client: Some(client), destination: Some(destination), nobody: false, server_name: None, consumed: written.len() }
                );
            }
        }
    }
}
