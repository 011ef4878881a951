//! `least_conn`: the available backend with the lowest `active / weight`.
//!
//! Ties go by smooth weighted round-robin over just the tied backends (the algorithm of
//! [`weighted`](super::weighted)): each backend keeps a running score, and a pick adds
//! every tied backend's weight to its score, takes the highest and subtracts the tied
//! backends' total weight from the winner. So a weight means the same for short
//! connections, which close before the next one opens and leave every pick a tie at 0
//! (2:1:1 gives `a b c a`, 30/15/15 over 60), as for long ones, which fill by load (2:1:1
//! holds 20/10/10 of 40). An unavailable backend is not among the tied, so its turns are
//! shared by the others by weight instead of falling to one neighbour.

use std::cmp::Ordering as CmpOrdering;
use std::net::IpAddr;
use std::sync::Mutex;

use super::{Balancer, Candidate, Turn};

#[derive(Debug, Default)]
pub struct LeastConn {
    /// A short critical section per pick; the listener's accept loop is the main caller.
    ties: Mutex<Ties>,
}

#[derive(Debug, Default, Clone)]
struct Ties {
    /// The tie-breaking score of each backend, in config order.
    scores: Vec<i128>,
    /// Scratch: the candidates tied at the lowest load, kept to reuse its allocation.
    tied: Vec<usize>,
}

/// Compares `a.load() / a.weight` with `b.load() / b.weight` without division: live
/// connections cluster-wide (peers' included) per weight.
fn load_cmp(a: &Candidate, b: &Candidate) -> CmpOrdering {
    let lhs = u128::from(a.load()) * u128::from(b.weight.max(1));
    let rhs = u128::from(b.load()) * u128::from(a.weight.max(1));
    lhs.cmp(&rhs)
}

impl Balancer for LeastConn {
    fn pick(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut ties = self.ties.lock().unwrap_or_else(|e| e.into_inner());
        ties.least_loaded_with(candidates, Turn::Pick)
    }

    fn peek(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut scratch = self.ties.lock().unwrap_or_else(|e| e.into_inner()).clone();
        scratch.least_loaded_with(candidates, Turn::Pick)
    }

    /// A retry is a turn among the backends not tried yet; the ones tried keep their
    /// scores (they are unavailable only for this client), so a backend that fails every
    /// connect gets only its share of first tries, and its clients spread over the
    /// others by weight instead of falling to one neighbour.
    fn retry(&self, candidates: &[Candidate], _client: IpAddr) -> Option<usize> {
        let mut ties = self.ties.lock().unwrap_or_else(|e| e.into_inner());
        ties.least_loaded_with(candidates, Turn::Retry)
    }
}

impl Ties {
    /// The available candidate with the lowest load; ties go by smooth weighted
    /// round-robin over the tied candidates' scores, which it updates.
    fn least_loaded_with(&mut self, candidates: &[Candidate], turn: Turn) -> Option<usize> {
        let Ties { scores, tied } = self;
        scores.resize(candidates.len(), 0);
        tied.clear();
        // The tied candidates' total weight and sum of scores.
        let (mut total, mut sum) = (0i128, 0i128);
        for (i, c) in candidates.iter().enumerate() {
            if !c.available {
                // An unavailable backend takes no part and builds up no credit.
                if turn == Turn::Pick {
                    scores[i] = 0;
                }
                continue;
            }
            match tied.first().map(|&l| load_cmp(c, &candidates[l])) {
                Some(CmpOrdering::Greater) => continue,
                Some(CmpOrdering::Equal) => {}
                Some(CmpOrdering::Less) | None => {
                    tied.clear();
                    (total, sum) = (0, 0);
                }
            }
            tied.push(i);
            total += i128::from(c.weight.max(1));
            sum += scores[i];
        }
        // The tied set changes as connections open and close and backends come and go,
        // and each member's score was earned against other sets. Centring the set's
        // scores on 0 (which changes no order among them) and bounding each to one round
        // of this set keeps old credit from buying more than a turn or two now; with a
        // fixed set, both leave plain smooth weighted round-robin untouched.
        // A retry is a step of the first pick's round among those left: no re-centring.
        let shift = match turn {
            Turn::Pick => sum.div_euclid(tied.len().max(1) as i128),
            Turn::Retry => 0,
        };
        let mut best: Option<usize> = None;
        for &i in tied.iter() {
            let weight = i128::from(candidates[i].weight.max(1));
            let kept = scores[i] - shift;
            scores[i] = match turn {
                Turn::Pick => kept.clamp(-total, total),
                Turn::Retry => kept,
            } + weight;
            if best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        scores[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn a_backend_that_fails_every_connect_gets_only_its_share_and_its_clients_spread() {
        for ws in [[1, 1, 1], [2, 1, 1]] {
            let lc = LeastConn::default();
            let c = weights(&ws);
            let (mut firsts, mut served) = ([0u32; 3], [0u32; 3]);
            // Short connections: every pick is a tie at 0.
            for _ in 0..1200 {
                let first = lc.pick(&c, CLIENT).expect("a backend");
                firsts[first] += 1;
                let mut at = first;
                if first == 0 {
                    let mut retry = c.clone();
                    retry[0].available = false;
                    at = lc.retry(&retry, CLIENT).expect("a live backend");
                }
                served[at] += 1;
            }
            let sum: u32 = ws.iter().sum();
            let share = |w: u32| 1200 * w / sum;
            let due = ws.map(share);
            assert!(
                (0..3).all(|i| firsts[i].abs_diff(due[i]) <= 1),
                "weights {ws:?}: first tries {firsts:?}, due {due:?}"
            );
            // Not all to one neighbour: the two others share the dead one's clients.
            // b and c weigh the same: each serves half of all clients.
            let rest = 600;
            assert_eq!(served[0], 0);
            assert!(
                served[1].abs_diff(rest) <= 1 && served[2].abs_diff(rest) <= 1,
                "weights {ws:?}: {served:?}"
            );
        }
    }

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

    /// Picks `n` connections that each close before the next opens, as a run of short
    /// requests does: every pick sees the same live counts. Names them a, b, c...
    fn short(lc: &LeastConn, cands: &[Candidate], n: usize) -> String {
        (0..n)
            .map(|_| (b'a' + lc.pick(cands, CLIENT).expect("a backend") as u8) as char)
            .collect()
    }

    fn counts(s: &str) -> [usize; 3] {
        [
            s.matches('a').count(),
            s.matches('b').count(),
            s.matches('c').count(),
        ]
    }

    #[test]
    fn an_unavailable_backends_turns_are_shared_by_the_others_not_inherited_by_one() {
        for unavailable in 0..3 {
            let lc = LeastConn::default();
            let mut c = weights(&[1, 1, 1]);
            c[unavailable].available = false;
            let s = short(&lc, &c, 60);
            let mut expected = [30, 30, 30];
            expected[unavailable] = 0;
            assert_eq!(counts(&s), expected, "{s}");
        }
    }

    #[test]
    fn weights_two_one_one_split_short_connections_thirty_fifteen_fifteen() {
        let lc = LeastConn::default();
        let c = weights(&[2, 1, 1]);
        let s = short(&lc, &c, 60);
        assert_eq!(counts(&s), [30, 15, 15], "{s}");
        // Interleaved as smooth weighted round-robin, not a a b c in blocks.
        assert_eq!(&s[..8], "abcaabca");
    }

    #[test]
    fn ties_go_by_weight_among_the_least_loaded_only() {
        let lc = LeastConn::default();
        let mut c = weights(&[2, 1, 1]);
        // a holds a long connection (load 1/2); b and c are idle and share the ties.
        c[0].active = 1;
        let s = short(&lc, &c, 10);
        assert_eq!(counts(&s), [0, 5, 5], "{s}");
    }

    #[test]
    fn peek_names_the_next_pick_without_advancing_it() {
        let lc = LeastConn::default();
        let c = weights(&[2, 1, 1]);
        for _ in 0..12 {
            let peeked = lc.peek(&c, CLIENT);
            assert_eq!(lc.peek(&c, CLIENT), peeked);
            assert_eq!(lc.pick(&c, CLIENT), peeked);
        }
    }
}
