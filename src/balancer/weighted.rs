//! `weighted`: smooth weighted round-robin (the algorithm of nginx's upstream module).
//!
//! Each pick adds every available backend's weight to its running score, picks the
//! highest score and subtracts the total weight from the winner. Over any run of
//! sum(weights) picks each backend gets exactly its weight, and the picks interleave:
//! weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`.

use std::net::IpAddr;
use std::sync::Mutex;

use super::{Balancer, Candidate, Turn};

#[derive(Debug, Default)]
pub struct Weighted {
    /// The running score of each backend, in config order. A short critical section per
    /// pick; the listener's accept loop is the main caller.
    current: Mutex<Vec<i128>>,
}

impl Balancer for Weighted {
    fn pick(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        step(&mut current, candidates, Turn::Pick)
    }

    fn peek(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut scratch = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        step(&mut scratch, candidates, Turn::Pick)
    }

    /// A retry is a turn among the backends not tried yet; the ones tried keep their
    /// scores (they are unavailable only for this client), so a backend that fails every
    /// connect gets only its weight's share of first tries, and its clients spread over
    /// the others by weight instead of falling to one neighbour.
    fn retry(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        step(&mut current, candidates, Turn::Retry)
    }
}

fn step(current: &mut Vec<i128>, candidates: &[Candidate], turn: Turn) -> Option<usize> {
    current.resize(candidates.len(), 0);
    let mut total: i128 = 0;
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.available {
            // An unavailable backend takes no part and builds up no credit.
            if turn == Turn::Pick {
                current[i] = 0;
            }
            continue;
        }
        let weight = i128::from(c.weight.max(1));
        current[i] += weight;
        total += weight;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let best = best?;
    current[best] -= total;
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn five_one_one_interleaves() {
        let w = Weighted::default();
        let mut c = weights(&[5, 1, 1]);
        //            period 1   period 2   period 3
        let expected = "aabacaa".repeat(3);
        assert_eq!(sequence(&w, &mut c, 21), expected);
    }

    #[test]
    fn equal_weights_alternate() {
        let w = Weighted::default();
        let mut c = weights(&[2, 2]);
        assert_eq!(sequence(&w, &mut c, 6), "ababab");
    }

    #[test]
    fn an_unavailable_backend_is_never_picked_and_shares_stay_exact() {
        let w = Weighted::default();
        let mut c = weights(&[3, 1, 2]);
        c[0].available = false;
        let s = sequence(&w, &mut c, 30);
        assert_eq!(s.matches('a').count(), 0);
        assert_eq!(s.matches('b').count(), 10);
        assert_eq!(s.matches('c').count(), 20);
    }

    #[test]
    fn a_backend_that_fails_every_connect_gets_only_its_share_and_its_clients_spread() {
        let w = Weighted::default();
        let c = weights(&[2, 1, 1]);
        let (mut firsts, mut served) = ([0u32; 3], [0u32; 3]);
        for _ in 0..1200 {
            let first = w.pick(&c, CLIENT).expect("a backend");
            firsts[first] += 1;
            let mut at = first;
            if first == 0 {
                let mut retry = c.clone();
                retry[0].available = false;
                at = w.retry(&retry, CLIENT).expect("a live backend");
            }
            served[at] += 1;
        }
        assert_eq!(firsts, [600, 300, 300]);
        // Not all to one neighbour: the two others share the dead one's clients.
        assert_eq!(served[0], 0);
        assert!(
            served[1].abs_diff(600) <= 1 && served[2].abs_diff(600) <= 1,
            "{served:?}"
        );
    }
}
