//! Moving key ranges between servers without losing a write: the
//! intermediate map of a two-phase hand-off.
//!
//! When a server joins or drains, the ring gives some ranges a new primary
//! that holds none of their data. Switching straight to that map would
//! serve those ranges empty. Instead the manager publishes an intermediate
//! map ([`plan`]): every range keeps its current primary, and the servers
//! the target map puts on the range (its future primary and replicas) are
//! appended to the range's replica chain. The current primary then copies
//! the range down the chain (phase one: bulk copy with clock records), and
//! every push after that is forwarded down the same ordered chain before it
//! is acknowledged (phase two: the changes made during the copy). Once every
//! primary reports its copies done, the manager switches to the target map,
//! where the new primary already holds every acknowledged write.
//!
//! Only a change of *primary* needs this. A range whose primary stays and
//! only gains replicas switches at once: the primary fills the new replicas
//! in the background and keeps serving.

use crate::key::{KEY_END, Key, KeyRange};
use crate::map::{NodeId, Partition};

/// The intermediate partitions for moving from `current` to `target`, or
/// `None` when no range changes primary (switch to `target` directly).
///
/// `alive` says which servers are up: dead ones are dropped from
/// `current`'s chains first (the first live replica of a range becomes its
/// primary, as at a failure). A range no live server holds is taken as
/// `target` has it: there is nothing to copy.
///
/// Both lists must be sorted, disjoint partitions; the result is sorted and
/// covers the union of what they cover, with neighbours that agree merged.
pub fn plan(
    current: &[Partition],
    target: &[Partition],
    alive: impl Fn(NodeId) -> bool,
) -> Option<Vec<Partition>> {
    let mut cuts: Vec<Key> = Vec::new();
    for p in current.iter().chain(target) {
        cuts.push(p.range.begin);
        cuts.push(p.range.end);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let chain_at = |parts: &[Partition], k: Key| -> Vec<NodeId> {
        let i = parts.partition_point(|p| p.range.end <= k);
        match parts.get(i) {
            Some(p) if p.range.contains(k) => std::iter::once(p.primary)
                .chain(p.replicas.iter().copied())
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut out: Vec<Partition> = Vec::new();
    let mut moves = false;
    for w in cuts.windows(2) {
        let (begin, end) = (w[0], w[1]);
        if begin >= end || begin == KEY_END {
            continue;
        }
        let now: Vec<NodeId> = chain_at(current, begin)
            .into_iter()
            .filter(|&n| alive(n))
            .collect();
        let then = chain_at(target, begin);
        let chain = match (now.first(), then.first()) {
            (_, None) => continue,
            (None, Some(_)) => then,
            (Some(&held_by), Some(&goes_to)) => {
                moves |= held_by != goes_to;
                let mut chain = now.clone();
                chain.extend(then.iter().filter(|n| !now.contains(n)));
                chain
            }
        };
        let range = KeyRange { begin, end };
        match out.last_mut() {
            Some(last)
                if last.range.end == begin
                    && last.primary == chain[0]
                    && last.replicas[..] == chain[1..] =>
            {
                last.range.end = end;
            }
            _ => out.push(Partition {
                range,
                primary: chain[0],
                replicas: chain[1..].to_vec(),
            }),
        }
    }
    moves.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::place;
    use proptest::prelude::*;

    fn kr(begin: Key, end: Key) -> KeyRange {
        KeyRange { begin, end }
    }

    fn part(begin: Key, end: Key, primary: NodeId, replicas: &[NodeId]) -> Partition {
        Partition {
            range: kr(begin, end),
            primary,
            replicas: replicas.to_vec(),
        }
    }

    #[test]
    fn a_moving_range_keeps_its_primary_and_gains_the_target_chain() {
        let current = vec![part(0, 100, 1, &[]), part(100, KEY_END, 2, &[])];
        let target = vec![
            part(0, 50, 1, &[]),
            part(50, 100, 3, &[]),
            part(100, KEY_END, 2, &[]),
        ];
        let m = plan(&current, &target, |_| true).unwrap();
        assert_eq!(
            m,
            vec![
                part(0, 50, 1, &[]),
                part(50, 100, 1, &[3]),
                part(100, KEY_END, 2, &[]),
            ]
        );
    }

    #[test]
    fn only_new_replicas_switch_at_once() {
        let current = vec![part(0, KEY_END, 1, &[2])];
        let target = vec![part(0, KEY_END, 1, &[3])];
        assert_eq!(plan(&current, &target, |_| true), None);
        // A dead primary's range goes to its replica, as the ring does.
        let current = vec![part(0, 10, 1, &[2]), part(10, KEY_END, 2, &[1])];
        let target = vec![part(0, KEY_END, 2, &[3])];
        assert_eq!(plan(&current, &target, |n| n != 1), None);
    }

    #[test]
    fn a_range_nobody_holds_goes_as_the_target_says() {
        let current = vec![part(0, 10, 1, &[]), part(10, KEY_END, 2, &[])];
        let target = vec![part(0, KEY_END, 3, &[])];
        let m = plan(&current, &target, |n| n != 1).unwrap();
        assert_eq!(m, vec![part(0, 10, 3, &[]), part(10, KEY_END, 2, &[3])]);
    }

    #[test]
    fn neighbours_that_agree_merge() {
        let current = vec![
            part(0, 10, 1, &[]),
            part(10, 20, 1, &[]),
            part(20, KEY_END, 2, &[]),
        ];
        let target = vec![part(0, 20, 2, &[]), part(20, KEY_END, 2, &[])];
        let m = plan(&current, &target, |_| true).unwrap();
        assert_eq!(m, vec![part(0, 20, 1, &[2]), part(20, KEY_END, 2, &[])]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// For servers joining and leaving a ring: the plan covers every key,
        /// keeps each key's live current primary, and has every server the
        /// target puts on a key in that key's chain, with no server twice.
        #[test]
        fn plans_keep_primaries_and_include_the_target(
            before in prop::collection::btree_set(1u32..12, 1..6),
            after in prop::collection::btree_set(1u32..12, 1..6),
            dead in prop::collection::btree_set(1u32..12, 0..3),
            k in 0usize..3,
            probes in prop::collection::vec(any::<u64>(), 32),
        ) {
            let before: Vec<NodeId> = before.into_iter().collect();
            let after: Vec<NodeId> = after.into_iter().filter(|n| !dead.contains(n)).collect();
            prop_assume!(!after.is_empty());
            let current = place(&before, 4, k);
            let target = place(&after, 4, k);
            let alive = |n: NodeId| !dead.contains(&n);
            let Some(m) = plan(&current, &target, alive) else {
                // No primary changes: every live current primary is the target's.
                for &key in &probes {
                    let key = key.min(KEY_END - 1);
                    let c = current.iter().find(|p| p.range.contains(key)).unwrap();
                    let t = target.iter().find(|p| p.range.contains(key)).unwrap();
                    let first_live = std::iter::once(c.primary).chain(c.replicas.iter().copied()).find(|&n| alive(n));
                    prop_assert!(first_live.is_none_or(|n| n == t.primary));
                }
                return Ok(());
            };
            prop_assert_eq!(m.first().map(|p| p.range.begin), Some(0));
            prop_assert_eq!(m.last().map(|p| p.range.end), Some(KEY_END));
            for w in m.windows(2) {
                prop_assert_eq!(w[0].range.end, w[1].range.begin);
            }
            for &key in &probes {
                let key = key.min(KEY_END - 1);
                let p = m.iter().find(|p| p.range.contains(key)).unwrap();
                let c = current.iter().find(|p| p.range.contains(key)).unwrap();
                let t = target.iter().find(|p| p.range.contains(key)).unwrap();
                let chain: Vec<NodeId> = std::iter::once(p.primary).chain(p.replicas.iter().copied()).collect();
                let mut seen = chain.clone();
                seen.sort_unstable();
                seen.dedup();
                prop_assert_eq!(seen.len(), chain.len());
                if let Some(n) = std::iter::once(c.primary).chain(c.replicas.iter().copied()).find(|&n| alive(n)) {
                    prop_assert_eq!(p.primary, n);
                }
                prop_assert!(chain.contains(&t.primary));
                for r in &t.replicas {
                    prop_assert!(chain.contains(r));
                }
            }
        }
    }
}
