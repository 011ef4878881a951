//! Strategies: how a listener picks a backend for a new connection.
//!
//! Every strategy is pure: [`Balancer::pick`] looks at a snapshot of the listener's
//! backends (their availability, effective weight and live count) and the client's IP,
//! does no I/O, and returns the index of the chosen backend, or `None` when no backend is
//! available. Strategies that rotate keep their position in atomics or a small lock of
//! their own, so one balancer is shared by every connection of a listener.
//!
//! One file per strategy: [`round_robin`], [`weighted`], [`least_conn`], [`ip_hash`].

use std::fmt;
use std::net::IpAddr;

use crate::config::Strategy;

pub mod ip_hash;
pub mod least_conn;
pub mod round_robin;
pub mod weighted;

/// One backend as a strategy sees it at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Up, not draining, below its `max_conns`, and not already tried for this client.
    pub available: bool,
    /// The configured weight, scaled by [`WEIGHT_SCALE`] and reduced during slow start.
    pub weight: u64,
    /// Connections open right now through this listener to this backend.
    pub active: u64,
    /// Connections to this backend through the other instances of the cluster, as their
    /// latest reports say (0 without `[cluster]`). Data, not a lookup: a strategy never
    /// asks anyone.
    pub peers: u64,
}

/// Weights are handed to strategies multiplied by this, so that slow start can ramp a
/// weight of 1 smoothly without fractions. Multiplying every weight by the same factor
/// changes no strategy's result.
pub const WEIGHT_SCALE: u64 = 1000;

impl Candidate {
    /// A candidate with its full configured weight.
    pub fn new(available: bool, weight: u32, active: u64) -> Candidate {
        Candidate {
            available,
            weight: u64::from(weight) * WEIGHT_SCALE,
            active,
            peers: 0,
        }
    }

    /// Its load cluster-wide: its live connections here and through the other instances.
    pub fn load(&self) -> u64 {
        self.active.saturating_add(self.peers)
    }
}

/// A load-balancing strategy over a fixed list of backends.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// Picks the backend for a new connection from `client`, or `None` when no candidate
    /// is available. `candidates` has one entry per configured backend, in config order.
    fn pick(&self, candidates: &[Candidate], client: IpAddr) -> Option<usize>;

    /// Where [`pick`](Balancer::pick) would send a connection from `client` now, without
    /// advancing any rotation (for the admin API's "pick" route).
    fn peek(&self, candidates: &[Candidate], client: IpAddr) -> Option<usize>;

    /// Picks again for a client whose earlier picks could not be connected to (they are
    /// unavailable in `candidates`). Strategies whose rotation weighs turns (weighted,
    /// least_conn) do not count a retry as a turn; round_robin moves on as for any pick.
    fn retry(&self, candidates: &[Candidate], client: IpAddr) -> Option<usize> {
        self.pick(candidates, client)
    }
}

/// Whether a step is a client's first pick or a retry after a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Unavailable backends are out of service: they build up no credit (nor debt).
    Pick,
    /// Unavailable backends were tried for this client: their scores stay as they are.
    Retry,
}

/// Builds the balancer of `strategy` for backends with these names and weights (config
/// order). Names matter only to `ip_hash`, whose table depends on them so that a backend
/// keeps its clients when others come or go.
pub fn build(strategy: Strategy, backends: &[(&str, u32)]) -> Box<dyn Balancer> {
    match strategy {
        Strategy::RoundRobin => Box::new(round_robin::RoundRobin::default()),
        Strategy::Weighted => Box::new(weighted::Weighted::default()),
        Strategy::LeastConn => Box::new(least_conn::LeastConn::default()),
        Strategy::IpHash => Box::new(ip_hash::Maglev::new(backends)),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Candidate;
    use std::net::{IpAddr, Ipv4Addr};

    pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// Available candidates with these weights and no live connections.
    pub fn weights(ws: &[u32]) -> Vec<Candidate> {
        ws.iter().map(|&w| Candidate::new(true, w, 0)).collect()
    }

    /// Runs `n` picks, counting each as a new live connection, and names them a, b, c...
    pub fn sequence(b: &dyn super::Balancer, cands: &mut [Candidate], n: usize) -> String {
        (0..n)
            .map(|_| {
                let i = b.pick(cands, CLIENT).expect("a backend");
                cands[i].active += 1;
                (b'a' + i as u8) as char
            })
            .collect()
    }
}
