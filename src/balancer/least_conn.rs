//! `least_conn`: the available backend with the lowest `active / weight`.
//!
//! Ties go round-robin: the scan for the minimum starts one backend further at every
//! pick, and the first backend with the minimum wins, so equal backends fill evenly
//! instead of the first one always winning a tie.

use std::cmp::Ordering as CmpOrdering;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Balancer, Candidate};

#[derive(Debug, Default)]
pub struct LeastConn {
    /// Where the next scan starts; it decides ties.
    next: AtomicUsize,
}

/// Compares `a.active / a.weight` with `b.active / b.weight` without division.
fn load_cmp(a: &Candidate, b: &Candidate) -> CmpOrdering {
    let lhs = u128::from(a.active) * u128::from(b.weight.max(1));
    let rhs = u128::from(b.active) * u128::from(a.weight.max(1));
    lhs.cmp(&rhs)
}

impl Balancer for LeastConn {
    fn pick(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        least_loaded(candidates, start)
    }

    fn peek(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let start = self.next.load(Ordering::Relaxed) % candidates.len().max(1);
        least_loaded(candidates, start)
    }
}

/// The available candidate with the lowest load; ties go to the first from `start`.
fn least_loaded(candidates: &[Candidate], start: usize) -> Option<usize> {
    let n = candidates.len();
    let mut best: Option<usize> = None;
    for i in (0..n).map(|k| (start + k) % n) {
        let c = &candidates[i];
        if c.available && best.is_none_or(|b| load_cmp(c, &candidates[b]).is_lt()) {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn equal_backends_fill_evenly() {
        let lc = LeastConn::default();
        let mut c = weights(&[1, 1, 1]);
        let s = sequence(&lc, &mut c, 9);
        assert_eq!(
            c.iter().map(|c| c.active).collect::<Vec<_>>(),
            [3, 3, 3],
            "{s}"
        );
    }

    #[test]
    fn weights_two_one_one_fill_twenty_ten_ten() {
        let lc = LeastConn::default();
        let mut c = weights(&[2, 1, 1]);
        sequence(&lc, &mut c, 40);
        assert_eq!(c.iter().map(|c| c.active).collect::<Vec<_>>(), [20, 10, 10]);
    }

    #[test]
    fn an_emptied_backend_is_refilled_first() {
        let lc = LeastConn::default();
        let mut c = weights(&[1, 1, 1]);
        c[0].active = 10;
        c[1].active = 10;
        c[2].active = 0;
        // c gets every pick until it catches up with a and b.
        assert_eq!(sequence(&lc, &mut c, 10), "cccccccccc");
    }
}
