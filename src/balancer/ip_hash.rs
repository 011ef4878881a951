//! `ip_hash`: consistent hashing of the client IP with a Maglev lookup table.
//!
//! The table has a prime number of entries, at least 100 per backend (and at least
//! 65,537), each naming a backend. Every backend fills entries along its own permutation
//! of the table, derived from a hash of its *name*, taking as many entries per round as
//! its weight; so shares follow weights, and a backend keeps almost all of its entries
//! when others are added or removed (Eisenbud et al., "Maglev", NSDI 2016).
//!
//! A client IP hashes to one entry. When that entry's backend is unavailable, the client
//! goes to the next entry (in table order) whose backend is available: deterministic,
//! and spread over the other backends because neighbouring entries are interleaved.

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
        let gcd = backends.iter().fold(0, |g, &(_, w)| gcd(g, w.max(1)));
        let turns: Vec<u64> = backends
            .iter()
            .map(|&(_, w)| u64::from(w.max(1) / gcd))
            .collect();
        let perms: Vec<(u64, u64)> = backends
            .iter()
            .map(|&(name, _)| {
                let offset = hash_bytes(name.as_bytes(), 0x6d61676c6576) % size as u64;
                let skip = hash_bytes(name.as_bytes(), 0x736b6970) % (size as u64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                for _ in 0..turns[i] {
                    let (offset, skip) = perms[i];
                    let mut entry = ((offset + next[i] * skip) % size as u64) as usize;
                    while table[entry] != u32::MAX {
                        next[i] += 1;
                        entry = ((offset + next[i] * skip) % size as u64) as usize;
                    }
                    table[entry] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
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

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

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
