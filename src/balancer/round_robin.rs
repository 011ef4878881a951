//! `round_robin`: cycles the available backends in config order; weights are ignored.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, Candidate};

#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Where the next scan for an available backend starts.
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn pick(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let start = turn % n;
        let skipped = first_available(candidates, start)?;
        // Continue after the chosen one, so that an unavailable backend does not make
        // its successor get two turns in a row. Lost to a concurrent pick, this only
        // costs one extra turn for the successor.
        if skipped > 0 {
            let _ = self.next.compare_exchange(
                turn.wrapping_add(1),
                turn.wrapping_add(1 + skipped),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Some((start + skipped) % n)
    }

    fn peek(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let n = candidates.len();
        let start = self.next.load(Ordering::Relaxed) % n.max(1);
        first_available(candidates, start).map(|skipped| (start + skipped) % n)
    }
}

/// How many backends after `start` (cyclically) the first available one is.
fn first_available(candidates: &[Candidate], start: usize) -> Option<usize> {
    let n = candidates.len();
    (0..n).find(|&k| candidates[(start + k) % n].available)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn cycles_in_config_order_ignoring_weights() {
        let rr = RoundRobin::default();
        let mut c = weights(&[5, 1, 1]);
        assert_eq!(sequence(&rr, &mut c, 7), "abcabca");
    }

    #[test]
    fn skips_unavailable_backends_without_doubling_the_next() {
        let rr = RoundRobin::default();
        let mut c = weights(&[1, 1, 1, 1]);
        c[1].available = false;
        // a (b skipped) c d a c d ...
        assert_eq!(sequence(&rr, &mut c, 6), "acdacd");
    }

    #[test]
    fn an_unavailable_backends_turns_are_shared_by_the_others_not_inherited_by_one() {
        for unavailable in 0..3 {
            let rr = RoundRobin::default();
            let mut c = weights(&[1, 1, 1]);
            c[unavailable].available = false;
            let s: String = (0..60)
                .map(|_| (b'a' + rr.pick(&c, CLIENT).unwrap() as u8) as char)
                .collect();
            for (i, name) in ['a', 'b', 'c'].into_iter().enumerate() {
                let expected = if i == unavailable { 0 } else { 30 };
                assert_eq!(s.matches(name).count(), expected, "{s}");
            }
        }
    }

    #[test]
    fn peek_names_the_next_pick_without_advancing_it() {
        let rr = RoundRobin::default();
        let mut c = weights(&[1, 1, 1]);
        c[1].available = false;
        for _ in 0..6 {
            let peeked = rr.peek(&c, CLIENT);
            assert_eq!(rr.peek(&c, CLIENT), peeked);
            assert_eq!(rr.pick(&c, CLIENT), peeked);
        }
    }

    #[test]
    fn none_when_nothing_is_available() {
        let rr = RoundRobin::default();
        let mut c = weights(&[1, 1]);
        c.iter_mut().for_each(|c| c.available = false);
        assert_eq!(rr.pick(&c, CLIENT), None);
        assert_eq!(rr.pick(&[], CLIENT), None);
    }
}
