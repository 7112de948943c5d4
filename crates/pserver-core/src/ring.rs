//! Consistent-hashing placement: servers on a ring over the key space.
//!
//! Rules [`place`] follows:
//! - Each live server gets `vnodes` points on the ring at positions derived
//!   deterministically from `(server id, vnode index)` by splitmix64, always
//!   `< KEY_END`. The same inputs give the same map on every node and at every
//!   restart, so nodes never need to ship the ring itself.
//! - Keys are ring positions themselves (not re-hashed), so a range request
//!   touches only the servers whose arcs overlap it.
//! - A point owns the arc that ends at it: key `k` belongs to the first point
//!   strictly greater than `k` (wrapping past the end to the first point). So
//!   when a server leaves, its arcs pass to the next point clockwise, which is
//!   its first replica: the replica already holds the data.
//! - Output partitions are sorted by `range.begin`, disjoint, non-empty and
//!   cover `KeyRange::ALL` exactly (the wrap-around arc is split into
//!   `[last_point, KEY_END)` and `[0, first_point)`); adjacent arcs with the
//!   same primary and the same replicas are merged.
//! - `replicas` of a partition: the next `k` distinct servers clockwise after
//!   the primary (fewer if there are not that many other servers).
//! - With no servers, the result is empty. Duplicate positions (collisions)
//!   go to the lower server id.

use crate::key::{KEY_END, Key, KeyRange};
use crate::map::{NodeId, Partition};

/// Places `servers` (ids of live servers, any order) on the ring with `vnodes`
/// points each and `k` replicas per range; see the module docs for the rules.
///
/// Duplicate ids in `servers` count once. `vnodes == 0` is treated as 1: a
/// live server with no point would leave the map unable to cover the key
/// space, which every caller relies on.
pub fn place(servers: &[NodeId], vnodes: u32, k: usize) -> Vec<Partition> {
    let points = points(servers, vnodes.max(1));
    let Some(&(first_pos, _)) = points.first() else {
        return Vec::new();
    };
    let replicas = replica_lists(&points, k);

    let mut out: Vec<Partition> = Vec::new();
    let mut push = |range: KeyRange, point: usize| {
        if range.is_empty() {
            return;
        }
        let primary = points[point].1;
        let chain = &replicas[point];
        if let Some(last) = out.last_mut() {
            if last.primary == primary && last.replicas == *chain && last.range.end == range.begin {
                last.range.end = range.end;
                return;
            }
        }
        out.push(Partition {
            range,
            primary,
            replicas: chain.clone(),
        });
    };
    // The first point owns the wrap-around arc; its lower half comes first in
    // key order and its upper half last.
    push(
        KeyRange {
            begin: 0,
            end: first_pos,
        },
        0,
    );
    for (j, pair) in points.windows(2).enumerate() {
        push(
            KeyRange {
                begin: pair[0].0,
                end: pair[1].0,
            },
            j + 1,
        );
    }
    if let Some(&(last_pos, _)) = points.last() {
        push(
            KeyRange {
                begin: last_pos,
                end: KEY_END,
            },
            0,
        );
    }
    out
}

/// The ring's points as `(position, owner)`, sorted by position, one per
/// position.
fn points(servers: &[NodeId], vnodes: u32) -> Vec<(Key, NodeId)> {
    let mut ids = servers.to_vec();
    ids.sort_unstable();
    ids.dedup();
    resolve(
        ids.iter()
            .flat_map(|&s| (0..vnodes).map(move |i| (position(s, i), s)))
            .collect(),
    )
}

/// Sorts raw points by position and keeps one per position. Sorting by owner
/// within a position makes the lower id win a collision whatever order the
/// caller listed the servers in.
fn resolve(mut points: Vec<(Key, NodeId)>) -> Vec<(Key, NodeId)> {
    points.sort_unstable();
    points.dedup_by_key(|p| p.0);
    points
}

/// Ring position of vnode `i` of server `s`. `(s, i)` packs injectively into
/// 64 bits and splitmix64 is a bijection, so positions only ever collide
/// through the final fold that keeps `KEY_END` itself off the ring.
fn position(s: NodeId, i: u32) -> Key {
    splitmix64((u64::from(s) << 32) | u64::from(i)) % KEY_END
}

/// The splitmix64 output function (Steele, Lea, Flood 2014): fixed, fast and
/// well mixed, so consecutive vnode indexes land far apart.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// For every point, the first `min(k, owners - 1)` distinct servers
/// clockwise after it, excluding its own server.
///
/// Walks the ring backwards so each list derives from its clockwise
/// neighbour's in O(k): the distinct servers after point `j` are point
/// `j + 1`'s server followed by point `j + 1`'s own list, minus `j`'s server.
/// A naive scan per point would cost O(points x servers) when `k` is large.
fn replica_lists(points: &[(Key, NodeId)], k: usize) -> Vec<Vec<NodeId>> {
    let n = points.len();
    let mut owners: Vec<NodeId> = points.iter().map(|p| p.1).collect();
    owners.sort_unstable();
    owners.dedup();
    let want = k.min(owners.len().saturating_sub(1));
    let mut lists = vec![Vec::new(); n];
    if n == 0 || want == 0 {
        return lists;
    }

    // Seed the recurrence at the last point with one direct scan; clockwise
    // after the last point comes the first.
    let last = n - 1;
    let mut seed = Vec::with_capacity(want);
    for &(_, s) in points {
        if seed.len() == want {
            break;
        }
        if s != points[last].1 && !seed.contains(&s) {
            seed.push(s);
        }
    }
    lists[last] = seed;

    for j in (0..last).rev() {
        let me = points[j].1;
        let next = points[j + 1].1;
        let chain: Vec<NodeId> = std::iter::once(next)
            .chain(lists[j + 1].iter().copied())
            .filter(|&s| s != me)
            .take(want)
            .collect();
        lists[j] = chain;
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Owner and chain of `key`, found by binary search over the partitions.
    fn lookup(parts: &[Partition], key: Key) -> Option<&Partition> {
        let i = parts.partition_point(|p| p.range.end <= key);
        parts.get(i).filter(|p| p.range.contains(key))
    }

    /// Checks every structural promise of `place` that does not need a second
    /// placement to compare against.
    fn check_shape(servers: &[NodeId], k: usize, parts: &[Partition]) {
        let mut distinct = servers.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.is_empty() {
            assert!(parts.is_empty());
            return;
        }
        // Sorted, disjoint, non-empty, covering ALL with no gap.
        assert_eq!(parts.first().map(|p| p.range.begin), Some(0));
        assert_eq!(parts.last().map(|p| p.range.end), Some(KEY_END));
        for p in parts {
            assert!(!p.range.is_empty(), "empty partition {}", p.range);
        }
        for w in parts.windows(2) {
            assert_eq!(w[0].range.end, w[1].range.begin, "gap or overlap");
            assert!(
                !(w[0].primary == w[1].primary && w[0].replicas == w[1].replicas),
                "unmerged neighbours at {}",
                w[1].range.begin
            );
        }
        let want = k.min(distinct.len() - 1);
        for (i, p) in parts.iter().enumerate() {
            assert!(distinct.binary_search(&p.primary).is_ok());
            assert_eq!(p.replicas.len(), want);
            assert!(!p.replicas.contains(&p.primary));
            let mut r = p.replicas.clone();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), p.replicas.len(), "repeated replica");
            // The next distinct servers clockwise are the primaries of the
            // following partitions, wrapping, in order of appearance.
            let mut expect = Vec::new();
            for q in parts.iter().cycle().skip(i + 1).take(parts.len()) {
                if expect.len() == want {
                    break;
                }
                if q.primary != p.primary && !expect.contains(&q.primary) {
                    expect.push(q.primary);
                }
            }
            assert_eq!(p.replicas, expect, "chain of {}", p.range);
        }
    }

    /// Fraction of the key space each server is primary for.
    fn shares(parts: &[Partition], servers: &[NodeId]) -> Vec<f64> {
        servers
            .iter()
            .map(|&s| {
                let owned: u64 = parts
                    .iter()
                    .filter(|p| p.primary == s)
                    .map(|p| p.range.len())
                    .sum();
                owned as f64 / KEY_END as f64
            })
            .collect()
    }

    /// Checks that removing `gone` moved only its keys, each to its old first
    /// replica. Both placements are piecewise constant between the union of
    /// their boundaries, so probing each boundary checks every key.
    fn check_removal(before: &[Partition], after: &[Partition], gone: NodeId) {
        let mut probes: Vec<Key> = before.iter().chain(after).map(|p| p.range.begin).collect();
        probes.sort_unstable();
        probes.dedup();
        for key in probes {
            let old = lookup(before, key).expect("before covers every key");
            let new = lookup(after, key).expect("after covers every key");
            if old.primary == gone {
                assert_eq!(Some(&new.primary), old.replicas.first(), "key {key}");
            } else {
                assert_eq!(new.primary, old.primary, "key {key} moved");
            }
        }
    }

    #[test]
    fn ring_empty_server_set_places_nothing() {
        assert!(place(&[], 16, 2).is_empty());
        assert!(place(&[], 0, 0).is_empty());
    }

    #[test]
    fn ring_single_server_owns_everything() {
        for vnodes in [0, 1, 7, 64] {
            let parts = place(&[9], vnodes, 3);
            assert_eq!(
                parts,
                vec![Partition {
                    range: KeyRange::ALL,
                    primary: 9,
                    replicas: vec![],
                }]
            );
        }
    }

    #[test]
    fn ring_zero_vnodes_acts_as_one() {
        assert_eq!(place(&[1, 2, 3], 0, 1), place(&[1, 2, 3], 1, 1));
        check_shape(&[1, 2, 3], 1, &place(&[1, 2, 3], 0, 1));
    }

    #[test]
    fn ring_ignores_order_and_duplicates() {
        let a = place(&[3, 1, 2], 8, 2);
        assert_eq!(a, place(&[1, 2, 3], 8, 2));
        assert_eq!(a, place(&[2, 3, 3, 1, 2], 8, 2));
        check_shape(&[1, 2, 3], 2, &a);
    }

    #[test]
    fn ring_is_deterministic() {
        let servers = [5, 11, 42, 7];
        assert_eq!(place(&servers, 32, 1), place(&servers, 32, 1));
    }

    #[test]
    fn ring_wrap_arc_belongs_to_first_point() {
        let parts = place(&[1, 2, 3, 4], 4, 1);
        let first = parts.first().expect("non-empty");
        let last = parts.last().expect("non-empty");
        // Both halves of the wrap-around arc end at the first point.
        assert_eq!(first.primary, last.primary);
        assert_eq!(first.replicas, last.replicas);
    }

    #[test]
    fn ring_key_belongs_to_first_point_strictly_above() {
        let servers = [1, 2, 3];
        let parts = place(&servers, 5, 0);
        let pts = points(&servers, 5);
        for (pos, owner) in &pts {
            // The point's own key already belongs to the next point.
            let next = pts.iter().find(|p| p.0 > *pos).or(pts.first()).map(|p| p.1);
            assert_eq!(lookup(&parts, *pos).map(|p| p.primary), next);
            if *pos > 0 {
                assert_eq!(lookup(&parts, pos - 1).map(|p| p.primary), Some(*owner));
            }
        }
        assert_eq!(
            lookup(&parts, KEY_END - 1).map(|p| p.primary),
            pts.first().map(|p| p.1)
        );
    }

    #[test]
    fn ring_positions_stay_below_key_end() {
        for s in 0..64 {
            for i in 0..64 {
                assert!(position(s, i) < KEY_END);
            }
        }
        assert!(position(u32::MAX, u32::MAX) < KEY_END);
    }

    #[test]
    fn ring_collision_goes_to_lower_id() {
        // Forced by hand: real positions collide about never.
        assert_eq!(
            resolve(vec![(10, 7), (10, 3), (5, 9), (10, 5)]),
            vec![(5, 9), (10, 3)]
        );
    }

    #[test]
    fn ring_replica_count_caps_at_other_servers() {
        let parts = place(&[1, 2, 3], 16, usize::MAX);
        check_shape(&[1, 2, 3], usize::MAX, &parts);
        assert!(parts.iter().all(|p| p.replicas.len() == 2));
        let parts = place(&[1, 2, 3], 16, 0);
        assert!(parts.iter().all(|p| p.replicas.is_empty()));
    }

    #[test]
    fn ring_removing_a_server_moves_only_its_arcs() {
        let before = place(&[1, 2, 3, 4, 5], 16, 2);
        let after = place(&[1, 2, 4, 5], 16, 2);
        check_removal(&before, &after, 3);
    }

    #[test]
    fn ring_balance_four_servers_64_vnodes() {
        let servers = [1, 2, 3, 4];
        let parts = place(&servers, 64, 1);
        for share in shares(&parts, &servers) {
            assert!((0.10..=0.45).contains(&share), "share {share}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn ring_prop_shape(
            servers in prop::collection::vec(0u32..64, 0..10),
            vnodes in 0u32..24,
            k in 0usize..6,
        ) {
            check_shape(&servers, k, &place(&servers, vnodes, k));
        }

        #[test]
        fn ring_prop_removal_moves_only_removed_arcs(
            servers in prop::collection::btree_set(any::<u32>(), 2..8),
            vnodes in 1u32..24,
            k in 1usize..4,
            pick in any::<prop::sample::Index>(),
        ) {
            let servers: Vec<NodeId> = servers.into_iter().collect();
            let gone = servers[pick.index(servers.len())];
            let rest: Vec<NodeId> = servers.iter().copied().filter(|&s| s != gone).collect();
            let before = place(&servers, vnodes, k);
            let after = place(&rest, vnodes, k);
            check_shape(&rest, k, &after);
            check_removal(&before, &after, gone);
        }

        #[test]
        fn ring_prop_balance(servers in prop::collection::btree_set(any::<u32>(), 4..=4)) {
            // Each share is ~25% with a standard deviation near 3%, so
            // [10%, 45%] is about five deviations wide on either side.
            let servers: Vec<NodeId> = servers.into_iter().collect();
            let parts = place(&servers, 64, 0);
            for share in shares(&parts, &servers) {
                prop_assert!((0.10..=0.45).contains(&share), "share {}", share);
            }
        }
    }
}
