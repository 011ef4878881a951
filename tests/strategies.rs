//! Properties of the strategies over many random backend sets (proptest).

use std::net::{IpAddr, Ipv4Addr};

use ballast::balancer::{self, ip_hash::Maglev, Balancer, Candidate};
use ballast::config::{Config, Strategy};
use proptest::prelude::*;

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    prop_oneof![
        Just(Strategy::RoundRobin),
        Just(Strategy::Weighted),
        Just(Strategy::LeastConn),
        Just(Strategy::IpHash),
    ]
}

fn candidates() -> impl proptest::strategy::Strategy<Value = Vec<(bool, u32, u64)>> {
    prop::collection::vec((any::<bool>(), 1u32..20, 0u64..50), 0..12)
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("backend-{i}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_strategy_ever_picks_an_unavailable_backend(
        strategy in strategy(),
        cands in candidates(),
        clients in prop::collection::vec(any::<u32>(), 1..20),
    ) {
        let names = names(cands.len());
        let list: Vec<(&str, u32)> = names.iter().zip(&cands).map(|(n, c)| (n.as_str(), c.1)).collect();
        let b = balancer::build(strategy, &list);
        let cands: Vec<Candidate> = cands.iter().map(|&(a, w, n)| Candidate::new(a, w, n)).collect();
        let any_available = cands.iter().any(|c| c.available);
        for client in clients {
            let picked = b.pick(&cands, IpAddr::V4(Ipv4Addr::from(client)));
            match picked {
                Some(i) => prop_assert!(cands[i].available),
                None => prop_assert!(!any_available),
            }
        }
    }

    #[test]
    fn weighted_gives_every_backend_exactly_its_share_in_any_run_of_sum_weights_picks(
        weights in prop::collection::vec(1u32..8, 1..6),
    ) {
        let b = balancer::build(Strategy::Weighted, &[]);
        let cands: Vec<Candidate> = weights.iter().map(|&w| Candidate::new(true, w, 0)).collect();
        let period: usize = weights.iter().map(|&w| w as usize).sum();
        let picks: Vec<usize> = (0..3 * period)
            .map(|_| b.pick(&cands, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap())
            .collect();
        for window in picks.windows(period) {
            for (i, &w) in weights.iter().enumerate() {
                prop_assert_eq!(window.iter().filter(|&&p| p == i).count(), w as usize);
            }
        }
    }

    #[test]
    fn least_conn_keeps_live_counts_proportional_to_weights(
        weights in prop::collection::vec(1u32..5, 1..6),
        rounds in 1usize..5,
    ) {
        let b = balancer::build(Strategy::LeastConn, &[]);
        let mut cands: Vec<Candidate> = weights.iter().map(|&w| Candidate::new(true, w, 0)).collect();
        let period: usize = weights.iter().map(|&w| w as usize).sum();
        for _ in 0..rounds * period {
            let i = b.pick(&cands, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
            cands[i].active += 1;
        }
        for (c, &w) in cands.iter().zip(&weights) {
            prop_assert_eq!(c.active, (rounds as u64) * u64::from(w));
        }
    }

    #[test]
    fn ip_hash_keeps_the_clients_of_kept_backends_when_one_is_removed(
        n in 3usize..12,
        removed in 0usize..12,
        weights in prop::collection::vec(1u32..4, 12),
    ) {
        let removed = removed % n;
        let names = names(n);
        let before: Vec<(&str, u32)> = names.iter().zip(&weights).map(|(n, &w)| (n.as_str(), w)).collect();
        let after: Vec<(&str, u32)> = before.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, b)| *b).collect();
        let t1 = Maglev::new(&before);
        let t2 = Maglev::new(&after);
        prop_assert_eq!(t1.table().len(), t2.table().len());
        // Every table entry stands for an equal share of clients.
        let mut kept = 0usize;
        let mut moved = 0usize;
        for (e1, e2) in t1.table().iter().zip(t2.table()) {
            let (b1, b2) = (*e1 as usize, *e2 as usize);
            if b1 == removed {
                continue;
            }
            kept += 1;
            if before[b1].0 != after[b2].0 {
                moved += 1;
            }
        }
        // Maglev itself reshuffles a few entries of the kept backends; allow 3% of them.
        prop_assert!(moved * 100 <= kept * 3, "{} of {} entries of kept backends moved", moved, kept);
    }

    #[test]
    fn config_parsing_never_panics_on_any_text(text in "\\PC{0,400}") {
        let _ = Config::parse(&text, "fuzz.toml");
    }

    #[test]
    fn config_parsing_never_panics_on_mangled_valid_files(
        cut in 0usize..1200,
        insert in "[\\[\\]=\"a-z0-9 .:\\n]{0,12}",
    ) {
        let valid = include_str!("config/valid/every_key.toml");
        let cut = cut.min(valid.len());
        let cut = (0..=cut).rev().find(|&i| valid.is_char_boundary(i)).unwrap_or(0);
        let text = format!("{}{}{}", &valid[..cut], insert, &valid[cut..]);
        let _ = Config::parse(&text, "fuzz.toml");
    }
}

#[test]
fn ip_hash_removal_moves_about_one_nth_of_all_clients() {
    let names = names(5);
    let before: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let t1 = Maglev::new(&before);
    let t2 = Maglev::new(&before[1..]);
    let moved = t1
        .table()
        .iter()
        .zip(t2.table())
        .filter(|(a, b)| before[**a as usize].0 != before[1 + **b as usize].0)
        .count();
    let share = moved as f64 / t1.table().len() as f64;
    assert!(
        (0.18..0.24).contains(&share),
        "moved {share:.3} of clients, about 1/5 expected"
    );
}

#[test]
fn a_balancer_over_no_backends_picks_nothing() {
    for s in [
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::LeastConn,
        Strategy::IpHash,
    ] {
        let b: Box<dyn Balancer> = balancer::build(s, &[]);
        assert_eq!(b.pick(&[], IpAddr::V4(Ipv4Addr::LOCALHOST)), None);
    }
}
