//! The stage before the pick: what a listener reads of a connection before it chooses
//! a backend.
//!
//! Some listeners must see a connection's first bytes to route it: a PROXY protocol
//! header from an upstream balancer names the real client, a TLS ClientHello names the
//! server asked for. A [`Stage`] looks at the bytes read so far and says whether it
//! needs more, what it found, or that the connection is refused. [`read`] feeds it,
//! bounded by the stage's deadline and size cap, and hands back a [`Hello`]: the client
//! as the pick, the limits and the logs should see it, the server name, and the bytes
//! read that the backend must still get.
//!
//! A listener without a stage never gets here: its pick happens at accept with no
//! extra read and no delay.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::state::RejectReason;

/// What a stage says of the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Inspect {
    /// Not enough yet.
    More,
    /// Done: what was found, and how many of the bytes were the stage's own (a PROXY
    /// header is consumed; a ClientHello is not, the backend needs it).
    Done {
        client: Option<SocketAddr>,
        /// Where the client connected to, when the bytes say (a PROXY header does).
        destination: Option<SocketAddr>,
        /// The bytes say the connection is made for nobody (a PROXY `LOCAL` or `UNKNOWN`
        /// header, an upstream's health check): a header passed on names nobody too.
        nobody: bool,
        server_name: Option<String>,
        consumed: usize,
    },
    /// The bytes cannot be what this listener expects.
    Refuse(&'static str),
}

/// A reader of a connection's first bytes.
pub trait Stage: Send + Sync + fmt::Debug {
    /// Whether a connection from `peer` (the socket's own address) may come in at all;
    /// checked at accept, before any byte is read.
    fn admits(&self, _peer: IpAddr) -> bool {
        true
    }
    fn inspect(&self, bytes: &[u8]) -> Inspect;
    /// How long a client may take to send what the stage needs.
    fn deadline(&self) -> Duration;
    /// The most bytes the stage reads before it must decide.
    fn max_bytes(&self) -> usize;
    /// What a connection this stage turns away (not admitted, refused, too slow or too
    /// long) is counted as.
    fn refusal(&self) -> RejectReason;
}

/// What the stage found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The client as the pick, limits and logs see it.
    pub client: SocketAddr,
    /// Where the client connected to, when the stage learnt it.
    pub destination: Option<SocketAddr>,
    /// Made for nobody (see [`Inspect::Done`]).
    pub nobody: bool,
    pub server_name: Option<String>,
    /// Bytes read and not consumed: the backend gets them first.
    pub early: Vec<u8>,
}

/// Why a connection did not pass its stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("nothing decisive within {0:?}")]
    Timeout(Duration),
    #[error("more than {0} bytes without a decision")]
    TooLarge(usize),
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("closed by the client before the stage could decide")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads from `stream` until `stage` decides, within its deadline and size cap. `peer`
/// is the socket's own peer address, the client unless the stage names another.
pub async fn read(
    stream: &TcpStream,
    peer: SocketAddr,
    stage: &dyn Stage,
) -> Result<Hello, StageError> {
    let deadline = stage.deadline();
    tokio::time::timeout(deadline, read_until_decided(stream, peer, stage))
        .await
        .unwrap_or(Err(StageError::Timeout(deadline)))
}

async fn read_until_decided(
    stream: &TcpStream,
    peer: SocketAddr,
    stage: &dyn Stage,
) -> Result<Hello, StageError> {
    let cap = stage.max_bytes();
    let mut buf = Vec::with_capacity(cap.min(4096));
    loop {
        stream.readable().await?;
        let start = buf.len();
        buf.resize(cap, 0);
        let n = match stream.try_read(&mut buf[start..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.truncate(start);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        buf.truncate(start + n);
        if n == 0 && buf.is_empty() {
            return Err(StageError::Closed);
        }
        if n == 0 {
            return Err(StageError::Refused("closed in the middle of it"));
        }
        match stage.inspect(&buf) {
            Inspect::More if buf.len() >= cap => return Err(StageError::TooLarge(cap)),
            Inspect::More => {}
            Inspect::Refuse(why) => return Err(StageError::Refused(why)),
            Inspect::Done {
                client,
                destination,
                nobody,
                server_name,
                consumed,
            } => {
                buf.drain(..consumed.min(buf.len()));
                buf.shrink_to_fit();
                return Ok(Hello {
                    client: client.unwrap_or(peer),
                    destination,
                    nobody,
                    server_name,
                    early: buf,
                });
            }
        }
    }
}

/// For tests: a line-based header, `FROM <addr>\n`, names the client and is consumed.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct FromLine;

#[cfg(test)]
impl Stage for FromLine {
    fn inspect(&self, bytes: &[u8]) -> Inspect {
        let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
            return if b"FROM ".starts_with(&bytes[..bytes.len().min(5)]) {
                Inspect::More
            } else {
                Inspect::Refuse("no FROM line")
            };
        };
        let line = std::str::from_utf8(&bytes[..end]).unwrap_or("");
        match line.strip_prefix("FROM ").and_then(|a| a.parse().ok()) {
            Some(addr) => Inspect::Done {
                client: Some(addr),
                destination: None,
                nobody: false,
                server_name: None,
                consumed: end + 1,
            },
            None => Inspect::Refuse("bad FROM line"),
        }
    }
    fn deadline(&self) -> Duration {
        Duration::from_millis(300)
    }
    fn max_bytes(&self) -> usize {
        64
    }
    fn refusal(&self) -> RejectReason {
        RejectReason::ProxyProtocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        (client, server, peer)
    }

    #[tokio::test]
    async fn a_header_in_pieces_names_the_client_and_the_rest_goes_on() {
        let (mut client, server, peer) = pair().await;
        let read = tokio::spawn(async move { read(&server, peer, &FromLine).await });
        client.write_all(b"FROM 192.0").await.unwrap();
        client.flush().await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(b".2.7:4000\nGET /").await.unwrap();
        let hello = read.await.unwrap().unwrap();
        assert_eq!(hello.client, "192.0.2.7:4000".parse().unwrap());
        assert_eq!(hello.early, b"GET /");
    }

    #[tokio::test]
    async fn a_silent_client_times_out_and_a_long_or_wrong_one_is_refused() {
        let (_client, server, peer) = pair().await;
        let started = std::time::Instant::now();
        let err = read(&server, peer, &FromLine).await.unwrap_err();
        assert!(matches!(err, StageError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));

        let (mut client, server, peer) = pair().await;
        client.write_all(&[b'F'; 1]).await.unwrap();
        client.write_all(b"ROM ").await.unwrap();
        client.write_all(&[b'9'; 100]).await.unwrap();
        let err = read(&server, peer, &FromLine).await.unwrap_err();
        assert!(matches!(err, StageError::TooLarge(64)), "{err}");

        let (mut client, server, peer) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let err = read(&server, peer, &FromLine).await.unwrap_err();
        assert!(matches!(err, StageError::Refused(_)), "{err}");

        let (client, server, peer) = pair().await;
        drop(client);
        let err = read(&server, peer, &FromLine).await.unwrap_err();
        assert!(matches!(err, StageError::Closed), "{err}");
    }
}
