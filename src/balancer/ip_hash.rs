//! `ip_hash`: consistent hashing of the client IP with a Maglev lookup table.
//!
//! The table has a prime number of entries, at least 100 per backend (and at least
//! 65,537), each naming a backend. Backends take turns, and at each turn one backend takes
//! the next free entry along its own permutation of the table, derived from a hash of its
//! *name*; so a backend keeps almost all of its entries when others are added or removed
//! (Eisenbud et al., "Maglev", NSDI 2016). The turns are interleaved by weight: a backend
//! of weight `w` has its `k`-th turn at time `k / w`, and turns go in order of time (ties
//! in config order). Each backend then has its weight's share of the turns, so of the
//! entries, within one entry, for any weights: 70000:69999 alternate, where taking a
//! weight's worth of turns in a row would let the first backend fill the whole table.
//!
//! A client IP hashes to one entry. When that entry's backend is unavailable, the client
//! goes to the next entry (in table order) whose backend is available: deterministic,
//! and spread over the other backends because neighbouring entries are interleaved.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::net::IpAddr;

use super::{Balancer, Candidate};

/// The smallest table ballast builds; large enough that shares are even to a fraction of
/// a percent, small enough (256 KiB) to rebuild at every reload.
const MIN_TABLE_SIZE: usize = 65_537;

#[derive(Debug)]
pub struct Maglev {
    /// Entry -> backend index (config order).
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table for backends given as (name, weight) in config order.
    pub fn new(backends: &[(&str, u32)]) -> Maglev {
        let n = backends.len();
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        let size = next_prime(MIN_TABLE_SIZE.max(100 * n));
        let perms: Vec<(u64, u64)> = backends
            .iter()
            .map(|&(name, _)| {
                let offset = hash_bytes(name.as_bytes(), 0x6d61676c6576) % size as u64;
                let skip = hash_bytes(name.as_bytes(), 0x736b6970) % (size as u64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut turns: BinaryHeap<Turn> = backends
            .iter()
            .enumerate()
            .map(|(i, &(_, w))| Turn {
                number: 1,
                weight: u64::from(w.max(1)),
                backend: i as u32,
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; size];
        for _ in 0..size {
            // The earliest turn; moved on to the backend's next one when `turn` drops.
            let Some(mut turn) = turns.peek_mut() else {
                break;
            };
            let i = turn.backend as usize;
            let (offset, skip) = perms[i];
            // Every backend's permutation visits every entry, and an entry is still free.
            let mut entry = ((offset + next[i] * skip) % size as u64) as usize;
            while table[entry] != u32::MAX {
                next[i] += 1;
                entry = ((offset + next[i] * skip) % size as u64) as usize;
            }
            table[entry] = turn.backend;
            next[i] += 1;
            turn.number += 1;
        }
        Maglev { table }
    }

    /// The backend index of every table entry.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The entry a client IP hashes to.
    pub fn entry_of(&self, client: IpAddr) -> usize {
        let key = match client {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            // An IPv4-mapped IPv6 client hashes as its IPv4 address.
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(u128::from(v6), |v4| u128::from(u32::from(v4))),
        };
        (hash_bytes(&key.to_le_bytes(), 0x636c69656e74) % self.table.len() as u64) as usize
    }
}

impl Balancer for Maglev {
    fn pick(&self, candidates: &[Candidate], client: IpAddr) -> Option<usize> {
        if self.table.is_empty() || !candidates.iter().any(|c| c.available) {
            return None;
        }
        let start = self.entry_of(client);
        let size = self.table.len();
        (0..size)
            .map(|k| self.table[(start + k) % size] as usize)
            .find(|&i| candidates.get(i).is_some_and(|c| c.available))
    }

    fn peek(&self, candidates: &[Candidate], client: IpAddr) -> Option<usize> {
        self.pick(candidates, client)
    }
}

/// FNV-1a over the bytes, then a SplitMix64 finalizer: stable across builds and
/// platforms (so every ballast instance maps a client the same way), and well mixed.
fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

/// A backend's next turn at filling the table: its `number`-th, due at time
/// `number / weight`. Ordered so that [`BinaryHeap`], a max-heap, has the earliest turn on
/// top, and of turns due at the same time the first backend in config order (so equal
/// weights take one turn each in config order, as in the Maglev paper).
#[derive(Debug, Clone, Copy)]
struct Turn {
    number: u64,
    weight: u64,
    backend: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Turn) -> CmpOrdering {
        // Compares number / weight across the two without division: exact, as both
        // factors fit in a u64.
        let this = u128::from(self.number) * u128::from(other.weight);
        let that = u128::from(other.number) * u128::from(self.weight);
        that.cmp(&this)
            .then_with(|| other.backend.cmp(&self.backend))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Turn) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Turn) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Turn {}

fn next_prime(mut n: usize) -> usize {
    let is_prime = |n: usize| {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    };
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::super::Candidate;
    use super::*;
    use std::net::Ipv4Addr;

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn table_size_is_a_prime_of_at_least_a_hundred_per_backend() {
        let names: Vec<String> = (0..1000).map(|i| format!("b{i}")).collect();
        let backends: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let m = Maglev::new(&backends);
        assert!(m.table().len() >= 100_000);
        assert_eq!(next_prime(m.table().len()), m.table().len());
        assert_eq!(Maglev::new(&[("a", 1)]).table().len(), 65_537);
    }

    #[test]
    fn shares_follow_weights() {
        let m = Maglev::new(&[("a", 3), ("b", 1), ("c", 1)]);
        let mut counts = [0usize; 3];
        m.table().iter().for_each(|&i| counts[i as usize] += 1);
        let size = m.table().len() as f64;
        assert!((counts[0] as f64 / size - 0.6).abs() < 0.01, "{counts:?}");
        assert!((counts[1] as f64 / size - 0.2).abs() < 0.01, "{counts:?}");
    }

    /// How many of 3,000 clients land on each backend.
    fn clients_per_backend(m: &Maglev, n: usize) -> Vec<usize> {
        let cands = vec![Candidate::new(true, 1, 0); n];
        let mut counts = vec![0usize; n];
        for i in 0..3000 {
            counts[m.pick(&cands, client(i)).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn weights_seventy_thousand_to_69999_split_3000_clients_about_evenly() {
        let m = Maglev::new(&[("a", 70_000), ("b", 69_999)]);
        let counts = clients_per_backend(&m, 2);
        // 50% each; a few percent either way is the spread of 3,000 random clients.
        for &n in &counts {
            assert!(
                (1400..=1600).contains(&n),
                "clients per backend: {counts:?}"
            );
        }
    }

    #[test]
    fn weights_fifty_thousand_to_30001_give_the_second_about_37_percent() {
        let m = Maglev::new(&[("a", 50_000), ("b", 30_001)]);
        let counts = clients_per_backend(&m, 2);
        // 30001 / 80001 = 37.5% of 3,000 = 1,125.
        assert!(
            (1035..=1215).contains(&counts[1]),
            "clients per backend: {counts:?}"
        );
        let mut table = [0usize; 2];
        m.table().iter().for_each(|&i| table[i as usize] += 1);
        let share = table[1] as f64 / m.table().len() as f64;
        assert!(
            (share - 30_001.0 / 80_001.0).abs() < 0.001,
            "table share {share}"
        );
    }

    #[test]
    fn the_largest_weights_keep_their_shares_and_build_in_time() {
        let names: Vec<String> = (0..100).map(|i| format!("b{i}")).collect();
        let backends: Vec<(&str, u32)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), u32::MAX - i as u32 * 7_919))
            .collect();
        let started = std::time::Instant::now();
        let m = Maglev::new(&backends);
        let took = started.elapsed();
        let mut counts = vec![0usize; 100];
        m.table().iter().for_each(|&i| counts[i as usize] += 1);
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 2, "entries per backend from {lo} to {hi}");
        // Generous for an unoptimised build on a busy machine; a release build takes
        // a few milliseconds.
        assert!(
            took < std::time::Duration::from_secs(2),
            "built in {took:?}"
        );
    }

    #[test]
    fn same_client_same_backend_and_a_deterministic_fallback() {
        let m = Maglev::new(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut cands = vec![Candidate::new(true, 1, 0); 3];
        for i in 0..200 {
            let first = m.pick(&cands, client(i)).unwrap();
            assert_eq!(m.pick(&cands, client(i)), Some(first));
            cands[first].available = false;
            let fallback = m.pick(&cands, client(i)).unwrap();
            assert_ne!(fallback, first);
            assert_eq!(m.pick(&cands, client(i)), Some(fallback));
            cands[first].available = true;
        }
        cands.iter_mut().for_each(|c| c.available = false);
        assert_eq!(m.pick(&cands, client(1)), None);
    }
}
