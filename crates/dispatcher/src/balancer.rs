//! Balancers: which of the candidate rooms a device should try first.
//!
//! Every balancer answers an ordered list of distinct rooms, preferred first,
//! and never a room that is down. They differ in who comes first:
//!
//! - `random`: a shuffle.
//! - `round_robin`: the next room in turn, then the ones after it.
//! - `weighted_round_robin`: nginx's smooth weighted round-robin; the weight
//!   of a room is its free capacity, so an emptier room gets more devices,
//!   spread evenly in time (weights 5, 1, 1 give `a a b a c a a`).
//! - `consistent_hash`: the device's key on a ring of virtual nodes; the same
//!   device gets the same room first on every reconnect, a down room's devices
//!   go to the next room on the ring, and a room leaving moves only its own
//!   devices.
//!
//! The balancer in use is named by keeper's `dispatcher.balancer` setting
//! (falling back to the dispatcher's config) and switched at runtime; see
//! [`build`] for the factory.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use pushgrid_common::ring::hash64;
use rand::seq::SliceRandom;

/// A room a balancer may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub id: &'a str,
    /// Relative share of new devices (weighted round-robin only); at least 1.
    pub weight: u64,
    /// False for a room that must not be offered (full, draining).
    pub up: bool,
}

/// Chooses the order in which a device should try rooms.
pub trait Balancer: Send + Sync {
    fn kind(&self) -> BalancerKind;

    /// Up to `count` distinct indices into `candidates`, preferred first, of
    /// rooms that are up. `key` identifies the device (a hash of its user).
    fn order(&self, key: u64, candidates: &[Candidate<'_>], count: usize) -> Vec<usize>;
}

/// The balancers the factory builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BalancerKind {
    Random,
    RoundRobin,
    WeightedRoundRobin,
    ConsistentHash,
}

impl BalancerKind {
    pub const ALL: [BalancerKind; 4] = [
        BalancerKind::Random,
        BalancerKind::RoundRobin,
        BalancerKind::WeightedRoundRobin,
        BalancerKind::ConsistentHash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BalancerKind::Random => "random",
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::WeightedRoundRobin => "weighted_round_robin",
            BalancerKind::ConsistentHash => "consistent_hash",
        }
    }
}

impl fmt::Display for BalancerKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown balancer {0:?} (expected random, round_robin, weighted_round_robin or consistent_hash)"
)]
pub struct UnknownBalancer(pub String);

impl FromStr for BalancerKind {
    type Err = UnknownBalancer;

    fn from_str(name: &str) -> Result<BalancerKind, UnknownBalancer> {
        let normalized = name.trim().to_ascii_lowercase().replace('-', "_");
        match normalized.as_str() {
            "random" => Ok(BalancerKind::Random),
            "round_robin" | "rr" => Ok(BalancerKind::RoundRobin),
            "weighted_round_robin" | "smooth_weighted_round_robin" | "swrr" | "weighted" => {
                Ok(BalancerKind::WeightedRoundRobin)
            }
            "consistent_hash" | "hash" | "sticky" => Ok(BalancerKind::ConsistentHash),
            _ => Err(UnknownBalancer(name.to_string())),
        }
    }
}

/// Settings the factory needs.
#[derive(Debug, Clone, Copy)]
pub struct BalancerOptions {
    /// Points per room on the consistent-hash ring.
    pub virtual_nodes: usize,
}

impl Default for BalancerOptions {
    fn default() -> Self {
        BalancerOptions {
            virtual_nodes: pushgrid_common::ring::VIRTUAL_NODES,
        }
    }
}

/// The factory: a fresh balancer of `kind`.
pub fn build(kind: BalancerKind, options: BalancerOptions) -> Arc<dyn Balancer> {
    match kind {
        BalancerKind::Random => Arc::new(RandomBalancer),
        BalancerKind::RoundRobin => Arc::new(RoundRobin::default()),
        BalancerKind::WeightedRoundRobin => Arc::new(SmoothWeighted::default()),
        BalancerKind::ConsistentHash => Arc::new(ConsistentHash::new(options.virtual_nodes)),
    }
}

fn up_indices(candidates: &[Candidate<'_>]) -> Vec<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, candidate)| candidate.up)
        .map(|(index, _)| index)
        .collect()
}

/// Every up room, shuffled.
#[derive(Debug, Default)]
pub struct RandomBalancer;

impl Balancer for RandomBalancer {
    fn kind(&self) -> BalancerKind {
        BalancerKind::Random
    }

    fn order(&self, _key: u64, candidates: &[Candidate<'_>], count: usize) -> Vec<usize> {
        let mut order = up_indices(candidates);
        order.shuffle(&mut rand::rng());
        order.truncate(count);
        order
    }
}

/// Each request starts one room further along the up rooms.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn kind(&self) -> BalancerKind {
        BalancerKind::RoundRobin
    }

    fn order(&self, _key: u64, candidates: &[Candidate<'_>], count: usize) -> Vec<usize> {
        let up = up_indices(candidates);
        if up.is_empty() {
            return up;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % up.len();
        (0..up.len().min(count))
            .map(|offset| up[(start + offset) % up.len()])
            .collect()
    }
}

/// Keep at most this many rooms' current weights; rooms gone from the
/// cluster are forgotten when the table grows past it.
const MAX_TRACKED_ROOMS: usize = 4096;

/// nginx's smooth weighted round-robin: every pick adds each up room's weight
/// to its current weight, picks the largest (the first on a tie) and takes the
/// total weight off the winner. The rest of the answer follows in order of
/// current weight: who would be picked next.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    current: Mutex<HashMap<String, i64>>,
}

impl Balancer for SmoothWeighted {
    fn kind(&self) -> BalancerKind {
        BalancerKind::WeightedRoundRobin
    }

    fn order(&self, _key: u64, candidates: &[Candidate<'_>], count: usize) -> Vec<usize> {
        let up = up_indices(candidates);
        if up.is_empty() || count == 0 {
            return Vec::new();
        }
        // Held only for this arithmetic, never across an await.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.len() > MAX_TRACKED_ROOMS {
            current.clear();
        }
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        let mut weights = Vec::with_capacity(up.len());
        for &index in &up {
            let candidate = &candidates[index];
            let weight = i64::try_from(candidate.weight.max(1)).unwrap_or(i64::MAX / 1024);
            total = total.saturating_add(weight);
            if !current.contains_key(candidate.id) {
                current.insert(candidate.id.to_string(), 0);
            }
            let Some(slot) = current.get_mut(candidate.id) else {
                continue;
            };
            *slot = slot.saturating_add(weight);
            weights.push((index, *slot));
            if best.is_none_or(|(_, best_weight)| *slot > best_weight) {
                best = Some((index, *slot));
            }
        }
        let Some((winner, _)) = best else {
            return Vec::new();
        };
        if let Some(slot) = current.get_mut(candidates[winner].id) {
            *slot = slot.saturating_sub(total);
        }
        drop(current);
        // The others, likeliest next first (stable: ties keep candidate order).
        weights.retain(|(index, _)| *index != winner);
        weights.sort_by_key(|(_, weight)| std::cmp::Reverse(*weight));
        std::iter::once(winner)
            .chain(weights.into_iter().map(|(index, _)| index))
            .take(count)
            .collect()
    }
}

/// Rings cached per candidate set; a dispatcher sees few distinct sets (one
/// per region and network), so this bound is only a safety net.
const MAX_CACHED_RINGS: usize = 256;

/// A ring of virtual nodes over one candidate set.
#[derive(Debug)]
struct HashRing {
    /// (point, candidate index), sorted by point.
    points: Vec<(u64, u32)>,
    rooms: usize,
}

impl HashRing {
    fn new(candidates: &[Candidate<'_>], virtual_nodes: usize) -> HashRing {
        let mut points = Vec::with_capacity(candidates.len() * virtual_nodes);
        for (index, candidate) in candidates.iter().enumerate() {
            for replica in 0..virtual_nodes {
                let point = hash64(format!("{}#{replica}", candidate.id).as_bytes());
                points.push((point, index as u32));
            }
        }
        points.sort_unstable();
        HashRing {
            points,
            rooms: candidates.len(),
        }
    }

    /// Distinct rooms clockwise from `key`, skipping rooms that are down.
    fn walk(&self, key: u64, candidates: &[Candidate<'_>], count: usize) -> Vec<usize> {
        debug_assert_eq!(self.rooms, candidates.len());
        let mut order = Vec::with_capacity(count.min(self.rooms));
        if self.points.is_empty() || count == 0 {
            return order;
        }
        let mut seen = vec![false; self.rooms];
        let start = self.points.partition_point(|(point, _)| *point < key);
        for step in 0..self.points.len() {
            let (_, index) = self.points[(start + step) % self.points.len()];
            let index = index as usize;
            if seen[index] {
                continue;
            }
            seen[index] = true;
            if candidates[index].up {
                order.push(index);
                if order.len() == count {
                    break;
                }
            }
            if seen.iter().all(|seen| *seen) {
                break;
            }
        }
        order
    }
}

/// Sticky: the device's key on a ring of virtual nodes, down rooms skipped.
#[derive(Debug)]
pub struct ConsistentHash {
    virtual_nodes: usize,
    /// Keyed by a hash of the candidate ids in order: the ring's positions
    /// depend only on the ids, so a room going down or up reuses the ring.
    rings: RwLock<HashMap<u64, Arc<HashRing>>>,
}

impl ConsistentHash {
    pub fn new(virtual_nodes: usize) -> ConsistentHash {
        ConsistentHash {
            virtual_nodes: virtual_nodes.max(1),
            rings: RwLock::new(HashMap::new()),
        }
    }

    fn ring(&self, candidates: &[Candidate<'_>]) -> Arc<HashRing> {
        let mut ids = Vec::new();
        for candidate in candidates {
            ids.extend_from_slice(candidate.id.as_bytes());
            ids.push(0);
        }
        let signature = hash64(&ids);
        if let Some(ring) = self
            .rings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&signature)
            .filter(|ring| ring.rooms == candidates.len())
        {
            return ring.clone();
        }
        let ring = Arc::new(HashRing::new(candidates, self.virtual_nodes));
        let mut rings = self
            .rings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if rings.len() >= MAX_CACHED_RINGS {
            rings.clear();
        }
        rings.insert(signature, ring.clone());
        ring
    }
}

impl Balancer for ConsistentHash {
    fn kind(&self) -> BalancerKind {
        BalancerKind::ConsistentHash
    }

    fn order(&self, key: u64, candidates: &[Candidate<'_>], count: usize) -> Vec<usize> {
        if candidates.is_empty() {
            return Vec::new();
        }
        self.ring(candidates).walk(key, candidates, count)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rooms<'a>(ids: &[&'a str]) -> Vec<Candidate<'a>> {
        ids.iter()
            .map(|id| Candidate {
                id,
                weight: 1,
                up: true,
            })
            .collect()
    }

    fn key(device: u32) -> u64 {
        hash64(format!("user-{device}").as_bytes())
    }

    #[test]
    fn smooth_weighted_round_robin_with_weights_5_1_1_gives_a_a_b_a_c_a_a() {
        let balancer = build(BalancerKind::WeightedRoundRobin, BalancerOptions::default());
        let candidates = [
            Candidate {
                id: "a",
                weight: 5,
                up: true,
            },
            Candidate {
                id: "b",
                weight: 1,
                up: true,
            },
            Candidate {
                id: "c",
                weight: 1,
                up: true,
            },
        ];
        let firsts: Vec<&str> = (0..14)
            .map(|_| candidates[balancer.order(0, &candidates, 3)[0]].id)
            .collect();
        assert_eq!(firsts.join(" "), "a a b a c a a a a b a c a a");
    }

    #[test]
    fn removing_one_of_n_rooms_moves_about_1_over_n_of_the_devices_and_no_others() {
        let ids: Vec<String> = (0..5).map(|room| format!("room-{room}")).collect();
        let all: Vec<&str> = ids.iter().map(String::as_str).collect();
        let without: Vec<&str> = all.iter().copied().filter(|id| *id != "room-2").collect();
        let balancer = ConsistentHash::new(160);
        let (full, reduced) = (rooms(&all), rooms(&without));
        let devices = 20_000;
        let mut moved = 0;
        for device in 0..devices {
            let before = full[balancer.order(key(device), &full, 1)[0]].id;
            let after = reduced[balancer.order(key(device), &reduced, 1)[0]].id;
            if before != after {
                assert_eq!(
                    before, "room-2",
                    "device {device} moved off a room that stayed"
                );
                moved += 1;
            }
        }
        // 1/5 of 20,000 is 4,000; virtual nodes keep the share within ~20%.
        assert!(
            (3_200..4_800).contains(&moved),
            "moved {moved} of {devices}"
        );
    }

    #[test]
    fn a_down_room_is_skipped_by_every_balancer() {
        for kind in BalancerKind::ALL {
            let balancer = build(kind, BalancerOptions::default());
            let mut candidates = rooms(&["a", "b", "c", "d"]);
            candidates[1].up = false;
            for device in 0..500 {
                let order = balancer.order(key(device), &candidates, 4);
                assert_eq!(order.len(), 3, "{kind}: {order:?}");
                assert!(!order.contains(&1), "{kind} offered the down room");
                let mut distinct = order.clone();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), order.len(), "{kind} repeated a room");
            }
            candidates.iter_mut().for_each(|room| room.up = false);
            assert!(balancer.order(1, &candidates, 4).is_empty(), "{kind}");
        }
    }

    #[test]
    fn consistent_hash_fails_over_to_the_next_room_on_the_ring() {
        let balancer = ConsistentHash::new(160);
        let mut candidates = rooms(&["a", "b", "c", "d", "e"]);
        for device in 0..1_000 {
            candidates.iter_mut().for_each(|room| room.up = true);
            let order = balancer.order(key(device), &candidates, 5);
            assert_eq!(order.len(), 5);
            candidates[order[0]].up = false;
            let failover = balancer.order(key(device), &candidates, 4);
            assert_eq!(failover, order[1..], "device {device}");
        }
    }

    #[test]
    fn consistent_hash_is_sticky_for_a_device() {
        let balancer = ConsistentHash::new(160);
        let candidates = rooms(&["a", "b", "c"]);
        for device in 0..1_000 {
            let first = balancer.order(key(device), &candidates, 3);
            let again = ConsistentHash::new(160).order(key(device), &candidates, 3);
            assert_eq!(first, again, "a fresh dispatcher agrees");
            assert_eq!(first, balancer.order(key(device), &candidates, 3));
        }
    }

    #[test]
    fn round_robin_is_even() {
        let balancer = build(BalancerKind::RoundRobin, BalancerOptions::default());
        let candidates = rooms(&["a", "b", "c"]);
        let mut firsts = [0usize; 3];
        for _ in 0..3_000 {
            let order = balancer.order(7, &candidates, 3);
            assert_eq!(order.len(), 3);
            firsts[order[0]] += 1;
        }
        assert_eq!(firsts, [1_000, 1_000, 1_000]);
    }

    #[test]
    fn weighted_round_robin_shares_follow_the_weights() {
        let balancer = SmoothWeighted::default();
        let candidates = [
            Candidate {
                id: "big",
                weight: 300,
                up: true,
            },
            Candidate {
                id: "small",
                weight: 100,
                up: true,
            },
        ];
        let mut firsts = [0usize; 2];
        for _ in 0..4_000 {
            firsts[balancer.order(0, &candidates, 1)[0]] += 1;
        }
        assert_eq!(firsts, [3_000, 1_000]);
    }

    #[test]
    fn names_parse_and_unknown_names_are_refused() {
        for kind in BalancerKind::ALL {
            assert_eq!(kind.as_str().parse::<BalancerKind>(), Ok(kind));
            assert_eq!(build(kind, BalancerOptions::default()).kind(), kind);
        }
        assert_eq!("round-robin".parse(), Ok(BalancerKind::RoundRobin));
        let error = "fastest".parse::<BalancerKind>().unwrap_err().to_string();
        assert!(
            error.contains("fastest") && error.contains("consistent_hash"),
            "{error}"
        );
    }
}
