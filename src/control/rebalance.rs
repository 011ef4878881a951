//! Rebalance: migrate long-lived connections away from overloaded backends.
//!
//! Every `interval`, for each listener with a `[listeners.rebalance]` table, the fair
//! share of backend *b* is `total_active * weight_b / sum(weight of available backends)`,
//! capped by its `max_conns`; a backend that is not available (draining, down, removed)
//! has a fair share of 0. A backend whose live count exceeds its fair share by more than
//! `precision` has up to `step_size` of its newest connections migrated, but never so
//! many that it would drop below its fair share — so, unlike cluster-balancer's advice,
//! it converges instead of oscillating. Migrating closes the connection cleanly (see
//! [`crate::relay`]); the client reconnects and the strategy sends it to a backend
//! below its share. No target is chosen here, so overloaded backends do not all shed to
//! the same peer at once.
//!
//! With `[cluster]`, the counts are cluster-wide (own plus the peers' latest reports) and
//! each instance sheds only its own part of a backend's cluster-wide excess, in
//! proportion to its own connections there, so that instances never overshoot together.
//! An instance waits while a peer is settling after a migration, and after its own until
//! every peer has reported since: a plan never counts a migration twice.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use std::sync::Arc;

use super::cluster::{ClusterView, SETTLE};
use crate::config::RebalanceConfig;
use crate::conn::{Conns, EndReason};
use crate::routing::ListenerRoute;
use crate::state::Phase;
use crate::Ballast;

/// The longest the loop sleeps, so that a reload that adds rebalancing is seen quickly.
const MAX_NAP: Duration = Duration::from_secs(1);

/// One backend as rebalance sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Live connections through this instance.
    pub active: u64,
    /// Live connections through the other instances of the cluster (0 without one).
    pub peers: u64,
    /// This instance holds the most of the backend's connections (ties: the instance
    /// whose name sorts first); always true without a cluster.
    pub leads: bool,
    /// The weight in force, in any unit (only ratios count).
    pub weight: u64,
    /// Up, not draining, not removed: it has a fair share.
    pub available: bool,
    pub max_conns: Option<u64>,
}

/// The fair share of every backend: `total * weight / sum(weights)` over the available
/// ones, where a backend whose share would pass its `max_conns` gets `max_conns` and the
/// rest is shared by the others (repeated until no share passes a cap); 0 for a backend
/// that is not available.
pub fn fair_shares(backends: &[Load]) -> Vec<f64> {
    let total: u64 = backends.iter().map(|b| b.active).sum();
    let mut shares = vec![0.0; backends.len()];
    let mut open: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].available)
        .collect();
    let mut left = total as f64;
    loop {
        let weights: f64 = open.iter().map(|&i| backends[i].weight as f64).sum();
        if weights == 0.0 {
            return shares;
        }
        let capped: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| {
                backends[i]
                    .max_conns
                    .is_some_and(|max| left * (backends[i].weight as f64) / weights > max as f64)
            })
            .collect();
        if capped.is_empty() {
            for &i in &open {
                shares[i] = left * (backends[i].weight as f64) / weights;
            }
            return shares;
        }
        for &i in &capped {
            let max = backends[i].max_conns.unwrap_or(0) as f64;
            shares[i] = max;
            left -= max;
        }
        open.retain(|i| !capped.contains(i));
    }
}

/// How many connections to migrate away from each backend this interval: from a
/// backend more than `precision` over its fair share, up to `step_size`, never below the
/// share — and never more in all than the available backends have room for below their
/// shares, since a migrated client must land somewhere else.
///
/// Shares and excess are cluster-wide (`active + peers`); what is returned is this
/// instance's part (see [`own_part`]), at most `step_size`.
pub fn plan(backends: &[Load], precision: u64, step_size: u64) -> Vec<u64> {
    let cluster: Vec<Load> = backends
        .iter()
        .map(|b| Load {
            active: b.active.saturating_add(b.peers),
            ..*b
        })
        .collect();
    let shares = fair_shares(&cluster);
    let mut room: u64 = cluster
        .iter()
        .zip(&shares)
        .filter(|(b, _)| b.available)
        .map(|(b, share)| (share.floor() as u64).saturating_sub(b.active))
        .sum();
    backends
        .iter()
        .zip(cluster.iter().zip(&shares))
        .map(|(own, (all, share))| {
            let excess = all.active as f64 - share;
            if excess <= precision as f64 {
                return 0;
            }
            // Never below the fair share: at most the whole part of the excess. Alone,
            // step_size bounds it too; in a cluster, it bounds each instance's part.
            let alone = if own.peers == 0 { step_size } else { u64::MAX };
            let n = (excess.floor() as u64).min(alone).min(room);
            room -= n;
            own_part(n, own).min(step_size)
        })
        .collect()
}

/// This instance's part of `n` migrations from backend `b`: in proportion to its own
/// connections there, rounded down, except by the instance that holds the most, which
/// rounds up. So the parts of all instances never add up to more than `n` (whatever is
/// rounded up was rounded away elsewhere), and some instance moves while `n > 0`.
pub fn own_part(n: u64, b: &Load) -> u64 {
    let total = b.active.saturating_add(b.peers);
    if b.peers == 0 || total == 0 {
        return n.min(b.active);
    }
    let exact = u128::from(n) * u128::from(b.active);
    let part = if b.leads {
        exact.div_ceil(u128::from(total))
    } else {
        exact / u128::from(total)
    };
    (part as u64).min(b.active)
}

/// Runs until `stopped` turns true.
pub async fn run(ballast: Ballast, mut stopped: watch::Receiver<bool>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let routing = ballast.routing();
        let now = Instant::now();
        let mut wake = now + MAX_NAP;
        let mut next_due = HashMap::new();
        for listener in &routing.listeners {
            let Some(config) = &listener.config.rebalance else {
                continue;
            };
            let mut at = due
                .get(&listener.config.name)
                .copied()
                .unwrap_or(now + config.interval);
            if at <= now {
                let me = routing.config.cluster.as_ref().map(|c| c.instance.as_str());
                let view = ballast.cluster_view();
                let conns = ballast.conns();
                match (me, view.as_ref()) {
                    (None, _) => rebalance(conns, listener, config, None, None, Moves::All),
                    (Some(me), Some(view)) if view.up => {
                        rebalance(conns, listener, config, Some(view), Some(me), Moves::All)
                    }
                    // Redis does not answer: own counts alone could move the clients of
                    // a cluster that is even. Only what must go goes: connections on
                    // backends that are draining or down (their share is 0 anyway).
                    (Some(_), _) => {
                        rebalance(conns, listener, config, None, None, Moves::OffUnavailable)
                    }
                }
                at = now + config.interval;
            }
            wake = wake.min(at);
            next_due.insert(listener.config.name.clone(), at);
        }
        due = next_due;
        drop(routing);
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Some connection of `listener` was asked to end (migrated, drained) and has not yet.
pub fn ending(conns: &Conns, listener: &ListenerRoute) -> bool {
    !conns
        .select(|e| e.asked().is_some() && Arc::ptr_eq(&e.listener, &listener.state))
        .is_empty()
}

/// Whether the counts can be planned on. In a cluster: no migration of this listener
/// moments ago (its clients are still reconnecting, perhaps to other instances), no
/// peer settling after one of its own, and every peer reporting since this instance's
/// last migration. Alone, the connections still ending are all there is to wait for.
fn settled(listener: &ListenerRoute, cluster: Option<&ClusterView>) -> bool {
    let last = listener.state.last_migration();
    cluster.is_none_or(|view| {
        if last.is_some_and(|at| at.elapsed() < SETTLE) {
            return false;
        }
        view.peers.iter().all(|peer| {
            let Some(theirs) = peer.listeners.get(&listener.config.name) else {
                return true;
            };
            !theirs.settling && last.is_none_or(|at| peer.written > at + SETTLE)
        })
    })
}

/// Which migrations an interval makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moves {
    All,
    /// Only away from backends that are not available (draining, down).
    OffUnavailable,
}

/// One interval of one listener. `cluster`: the peers' latest reports, when Redis
/// answers; `me`: this instance's name among them.
fn rebalance(
    conns: &Conns,
    listener: &ListenerRoute,
    config: &RebalanceConfig,
    cluster: Option<&ClusterView>,
    me: Option<&str>,
    moves: Moves,
) {
    // While migrated connections are still ending, their clients have not reconnected:
    // the counts would understate the total and the plan would overshoot. Wait.
    if ending(conns, listener) || !settled(listener, cluster) {
        return;
    }
    let instance = me.unwrap_or_default();
    // A backend's max_conns holds on each instance.
    let instances = 1 + cluster.map_or(0, |c| c.peers.len() as u64);
    let loads: Vec<Load> = listener
        .backends
        .iter()
        .map(|b| {
            let active = b.state.active();
            let (peers, leads) = match cluster {
                None => (0, true),
                Some(view) => view.holders(&listener.config.name, &b.config.name).fold(
                    (0u64, true),
                    |(sum, leads), (peer, n)| {
                        let ahead = n > active || (n == active && peer < instance);
                        (sum.saturating_add(n), leads && !ahead)
                    },
                ),
            };
            Load {
                active,
                peers,
                leads,
                // The weight in force (set at run time or not), in WEIGHT_SCALE units.
                weight: b.weight_scaled(),
                available: b.phase() == Phase::Up && b.weight_scaled() > 0,
                max_conns: b.max_conns().map(|m| m.saturating_mul(instances)),
            }
        })
        .collect();
    let planned = plan(&loads, config.precision, config.step_size);
    for ((backend, load), n) in listener.backends.iter().zip(&loads).zip(planned) {
        if n == 0 || (moves == Moves::OffUnavailable && load.available) {
            continue;
        }
        let migrated = conns.close_backend(&backend.state, n as usize, true, EndReason::Migrated);
        listener.state.set_last_migration(std::time::Instant::now());
        backend.state.metrics().migrations.inc_by(migrated as u64);
        info!(
            listener = %listener.config.name, backend = %backend.config.name, migrated,
            active = backend.state.active(), "rebalance: migrating connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(active: u64, weight: u64) -> Load {
        Load {
            active,
            peers: 0,
            leads: true,
            weight,
            available: true,
            max_conns: None,
        }
    }

    #[test]
    fn an_overloaded_backend_sheds_at_most_step_size_and_never_below_its_share() {
        // 12 on a, 0 on b: fair share 6 each.
        assert_eq!(plan(&[load(12, 1), load(0, 1)], 1, 2), vec![2, 0]);
        assert_eq!(plan(&[load(12, 1), load(0, 1)], 1, 100), vec![6, 0]);
        // Within precision: nothing moves.
        assert_eq!(plan(&[load(7, 1), load(5, 1)], 1, 5), vec![0, 0]);
    }

    #[test]
    fn shares_follow_weights_and_draining_backends_have_none() {
        // 30 over weights 2:1 -> fair 20 / 10.
        assert_eq!(plan(&[load(10, 2), load(20, 1)], 0, 100), vec![0, 10]);
        let draining = Load {
            peers: 0,
            leads: true,
            active: 4,
            weight: 1,
            available: false,
            max_conns: None,
        };
        assert_eq!(plan(&[load(0, 1), draining], 0, 3), vec![0, 3]);
    }

    #[test]
    fn a_capped_backend_hands_its_share_on_and_nothing_moves_without_room() {
        let capped = Load {
            peers: 0,
            leads: true,
            active: 5,
            weight: 1,
            available: true,
            max_conns: Some(5),
        };
        // Shares: 5 (capped) and 15: balanced as it is.
        assert_eq!(fair_shares(&[capped, load(15, 1)]), vec![5.0, 15.0]);
        assert_eq!(plan(&[capped, load(15, 1)], 3, 1), vec![0, 0]);
        // No available backend: nowhere to go, nothing moves.
        let down = Load {
            peers: 0,
            leads: true,
            active: 9,
            weight: 1,
            available: false,
            max_conns: None,
        };
        assert_eq!(plan(&[down, down], 0, 5), vec![0, 0]);
        // A draining backend's 6 fit into b's room below its share (10 each of 20).
        let draining = Load {
            peers: 0,
            leads: true,
            active: 6,
            weight: 1,
            available: false,
            max_conns: None,
        };
        assert_eq!(
            plan(&[load(10, 1), load(4, 1), draining], 0, 10),
            vec![0, 0, 6]
        );
        // The only available backend is full: the draining one's connections stay.
        let full = Load {
            peers: 0,
            leads: true,
            active: 2,
            weight: 1,
            available: true,
            max_conns: Some(2),
        };
        let draining = Load {
            peers: 0,
            leads: true,
            active: 10,
            weight: 1,
            available: false,
            max_conns: None,
        };
        assert_eq!(plan(&[full, draining], 0, 10), vec![0, 0]);
    }

    fn peer_load(active: u64, peers: u64, leads: bool) -> Load {
        Load {
            peers,
            leads,
            ..load(active, 1)
        }
    }

    #[test]
    fn in_a_cluster_each_instance_sheds_its_own_part_of_the_cluster_wide_excess() {
        // 90 on a cluster-wide, 30 through each of three instances: 60 must move, 20 each.
        let me = |leads| [peer_load(30, 60, leads), load(0, 1), load(0, 1)];
        assert_eq!(plan(&me(true), 2, 100), vec![20, 0, 0]);
        assert_eq!(plan(&me(false), 2, 100), vec![20, 0, 0]);
        // step_size bounds each instance's part.
        assert_eq!(plan(&me(false), 2, 5), vec![5, 0, 0]);
        // Even cluster-wide while uneven here: nothing moves.
        let even = [
            peer_load(20, 0, true),
            peer_load(0, 20, false),
            peer_load(0, 20, false),
        ];
        assert_eq!(plan(&even, 0, 100), vec![0, 0, 0]);
    }

    #[test]
    fn parts_round_down_but_the_leader_s_rounds_up_so_they_never_pass_the_whole_and_someone_moves()
    {
        // 2 to move over three instances holding 1 each: 2/3 each.
        assert_eq!(own_part(2, &peer_load(1, 2, false)), 0);
        assert_eq!(own_part(2, &peer_load(1, 2, true)), 1);
        // Whatever the split, the parts add up to at most n, and to more than 0.
        for n in 1..=12u64 {
            for split in [[5u64, 4, 3], [1, 1, 10], [7, 0, 5], [4, 4, 4]] {
                let total: u64 = split.iter().sum();
                let leader = (0..3)
                    .max_by_key(|&i| (split[i], std::cmp::Reverse(i)))
                    .unwrap();
                let parts: u64 = (0..3)
                    .map(|i| {
                        own_part(
                            n.min(total),
                            &peer_load(split[i], total - split[i], i == leader),
                        )
                    })
                    .sum();
                assert!(
                    parts <= n.min(total) && parts > 0,
                    "{n} over {split:?}: {parts}"
                );
            }
        }
    }

    #[test]
    fn cluster_balancers_oscillating_case_converges() {
        // [7, 0] with precision 1 and step 5 oscillates forever in cluster-balancer.
        let mut active = [7u64, 0];
        for _ in 0..10 {
            let moves = plan(&[load(active[0], 1), load(active[1], 1)], 1, 5);
            for (i, n) in moves.iter().enumerate() {
                active[i] -= n;
                // The migrated clients reconnect to the least loaded backend.
                for _ in 0..*n {
                    let target = if active[0] <= active[1] { 0 } else { 1 };
                    active[target] += 1;
                }
            }
        }
        assert!(active[0].abs_diff(active[1]) <= 1, "{active:?}");
    }
}
