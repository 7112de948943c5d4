//! Key caching (the paper's "key caching" filter): a worker that sends the
//! same key list to a server again — pulls of the same block, repeated
//! minibatches — sends only a hash of the list, and the server substitutes
//! the list it kept from an earlier request.
//!
//! This module is the I/O-free part: [`key_list_hash`], the hash both sides
//! compute, and [`KeyCache`], the server's bounded store of lists.
//!
//! The hash is not a secret and not collision-proof against an adversary;
//! that is safe because lists are kept per sender: a sender that forges a
//! collision can only make its own requests name keys it chose itself. The
//! receiver also checks the list's length, and still checks the resolved keys
//! (sorted, in range, owned) as if they had come on the wire.

use crate::map::NodeId;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Starting state of [`key_list_hash`] (the golden ratio, as in splitmix64).
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finalizer: a bijection on `u64` that mixes every input
/// bit into every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of a key list, its length included.
///
/// Workers and servers of different builds must agree on it, so it never
/// changes (a unit test pins its values). Each step is a bijection of the
/// running state for a fixed key, so two lists of the same length that differ
/// in exactly one position never collide; other collisions are as unlikely
/// as for a random 64-bit function.
pub fn key_list_hash(keys: &[u64]) -> u64 {
    let mut h = mix(SEED ^ keys.len() as u64);
    for &k in keys {
        h = mix(h ^ k);
    }
    h
}

/// Names one cached list. Ordered so that every list of one sender is a
/// contiguous range (which is what [`KeyCache::forget`] removes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    sender: NodeId,
    table: u32,
    hash: u64,
}

#[derive(Debug)]
struct Entry {
    keys: Arc<[u64]>,
    /// Position in [`KeyCache::order`]: the last insert or hit.
    stamp: u64,
}

/// A server's cache of key lists, keyed by (sender, table, hash), holding at
/// most `capacity` keys in total and evicting the least recently used list
/// first.
///
/// Every decision is deterministic: recency is a counter and both maps are
/// ordered, so no choice depends on hash-map iteration order.
#[derive(Debug)]
pub struct KeyCache {
    capacity: usize,
    /// Keys held by every entry together.
    held: usize,
    entries: BTreeMap<Slot, Entry>,
    /// Stamp -> slot, oldest first.
    order: BTreeMap<u64, Slot>,
    next_stamp: u64,
}

impl KeyCache {
    /// An empty cache that holds at most `capacity` keys (0 caches nothing).
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            capacity,
            held: 0,
            entries: BTreeMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// The most keys it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keys held now, over every list.
    pub fn held_keys(&self) -> usize {
        self.held
    }

    /// Lists held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no list is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn stamp(&mut self) -> u64 {
        let s = self.next_stamp;
        self.next_stamp += 1;
        s
    }

    /// Remembers `keys` as the list `sender` names by `key_list_hash(keys)`
    /// in `table`, evicting the least recently used lists to make room, and
    /// returns that hash. The hash is computed here, never taken from the
    /// sender, so a list is only ever found under its own hash.
    ///
    /// A list longer than the whole capacity (or an empty one) is not kept
    /// and evicts nothing; the return value is then `None`.
    pub fn insert(&mut self, sender: NodeId, table: u32, keys: &[u64]) -> Option<u64> {
        if keys.is_empty() || keys.len() > self.capacity {
            return None;
        }
        let hash = key_list_hash(keys);
        let slot = Slot {
            sender,
            table,
            hash,
        };
        if let Some(old) = self.entries.remove(&slot) {
            self.order.remove(&old.stamp);
            self.held -= old.keys.len();
        }
        let stamp = self.stamp();
        self.held += keys.len();
        self.entries.insert(
            slot,
            Entry {
                keys: keys.into(),
                stamp,
            },
        );
        self.order.insert(stamp, slot);
        while self.held > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.held -= e.keys.len();
            }
        }
        Some(hash)
    }

    /// The list `sender` cached in `table` under `hash`, if it is held and
    /// has `count` keys; a hit makes it the most recently used.
    pub fn get(&mut self, sender: NodeId, table: u32, hash: u64, count: u64) -> Option<Arc<[u64]>> {
        let slot = Slot {
            sender,
            table,
            hash,
        };
        let stamp = self.next_stamp;
        let entry = self.entries.get_mut(&slot)?;
        if entry.keys.len() as u64 != count {
            return None;
        }
        self.order.remove(&entry.stamp);
        entry.stamp = stamp;
        self.order.insert(stamp, slot);
        self.next_stamp += 1;
        Some(entry.keys.clone())
    }

    /// Drops every list of `sender` (a node that left the cluster).
    pub fn forget(&mut self, sender: NodeId) {
        let from = Slot {
            sender,
            table: 0,
            hash: 0,
        };
        let to = Slot {
            sender,
            table: u32::MAX,
            hash: u64::MAX,
        };
        let slots: Vec<Slot> = self.entries.range(from..=to).map(|(s, _)| *s).collect();
        for s in slots {
            if let Some(e) = self.entries.remove(&s) {
                self.order.remove(&e.stamp);
                self.held -= e.keys.len();
            }
        }
    }

    /// The senders with at least one list held, ascending.
    pub fn senders(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self.entries.keys().map(|s| s.sender).collect();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Pins the hash: workers and servers of different builds must agree.
    #[test]
    fn hash_is_stable() {
        // The empty list hashes to splitmix64's first output from state 0.
        assert_eq!(key_list_hash(&[]), 0xe220_a839_7b1d_cdaf);
        assert_eq!(key_list_hash(&[1, 2, 3]), 0x34ae_a908_bf28_00b6);
        assert_eq!(key_list_hash(&[u64::MAX]), 0x4650_bc0e_b331_2e23);
    }

    #[test]
    fn hash_depends_on_length_order_and_every_key() {
        let base = [10u64, 20, 30, 40];
        let h = key_list_hash(&base);
        assert_ne!(h, key_list_hash(&base[..3]));
        assert_ne!(h, key_list_hash(&[10, 20, 40, 30]));
        assert_ne!(key_list_hash(&[]), key_list_hash(&[0]));
        assert_ne!(key_list_hash(&[0]), key_list_hash(&[0, 0]));
        for i in 0..base.len() {
            let mut other = base;
            other[i] ^= 1;
            assert_ne!(h, key_list_hash(&other), "position {i}");
        }
    }

    #[test]
    fn insert_then_get() {
        let mut c = KeyCache::new(100);
        let keys = [1u64, 5, 9];
        let h = c.insert(7, 1, &keys).unwrap();
        assert_eq!(h, key_list_hash(&keys));
        assert_eq!(c.get(7, 1, h, 3).as_deref(), Some(&keys[..]));
        // Wrong count, table, sender or hash: a miss.
        assert_eq!(c.get(7, 1, h, 2), None);
        assert_eq!(c.get(7, 2, h, 3), None);
        assert_eq!(c.get(8, 1, h, 3), None);
        assert_eq!(c.get(7, 1, h ^ 1, 3), None);
        assert_eq!((c.len(), c.held_keys()), (1, 3));
        // Inserting the same list again does not double count.
        c.insert(7, 1, &keys);
        assert_eq!((c.len(), c.held_keys()), (1, 3));
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut c = KeyCache::new(6);
        let a = c.insert(1, 0, &[1, 2]).unwrap();
        let b = c.insert(1, 0, &[3, 4]).unwrap();
        let d = c.insert(2, 0, &[5, 6]).unwrap();
        // Touch `a`, so `b` is now the oldest.
        assert!(c.get(1, 0, a, 2).is_some());
        let e = c.insert(2, 0, &[7]).unwrap();
        assert_eq!(c.get(1, 0, b, 2), None);
        assert!(c.get(1, 0, a, 2).is_some());
        assert!(c.get(2, 0, d, 2).is_some());
        assert!(c.get(2, 0, e, 1).is_some());
        assert_eq!(c.held_keys(), 5);
    }

    #[test]
    fn oversized_and_empty_lists_are_not_kept() {
        let mut c = KeyCache::new(2);
        let a = c.insert(1, 0, &[1, 2]).unwrap();
        assert_eq!(c.insert(1, 0, &[1, 2, 3]), None);
        assert_eq!(c.insert(1, 0, &[]), None);
        assert!(c.get(1, 0, a, 2).is_some());
        let mut none = KeyCache::new(0);
        assert_eq!(none.insert(1, 0, &[1]), None);
        assert!(none.is_empty());
    }

    #[test]
    fn forget_drops_one_sender() {
        let mut c = KeyCache::new(100);
        let a = c.insert(1, 0, &[1]).unwrap();
        c.insert(1, u32::MAX, &[2, 3]).unwrap();
        let b = c.insert(2, 0, &[1]).unwrap();
        c.insert(3, 0, &[4]).unwrap();
        assert_eq!(c.senders(), vec![1, 2, 3]);
        c.forget(1);
        assert_eq!(c.get(1, 0, a, 1), None);
        assert!(c.get(2, 0, b, 1).is_some());
        assert_eq!((c.len(), c.held_keys()), (2, 2));
        assert_eq!(c.senders(), vec![2, 3]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(NodeId, u32, Vec<u64>),
        /// Looks up the list the model holds at this index (or a made-up one).
        Get(usize, bool),
        Forget(NodeId),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..3, 0u32..2, prop::collection::vec(0u64..4, 0..6))
                .prop_map(|(s, t, k)| Op::Insert(s, t, k)),
            3 => (0usize..8, any::<bool>()).prop_map(|(i, c)| Op::Get(i, c)),
            1 => (0u32..3).prop_map(Op::Forget),
        ]
    }

    proptest! {
        /// The cache agrees with a plain list kept in recency order.
        #[test]
        fn agrees_with_a_model(cap in 0usize..12, ops in prop::collection::vec(op(), 0..60)) {
            let mut c = KeyCache::new(cap);
            // (sender, table, hash, keys), least recently used first.
            let mut model: Vec<(NodeId, u32, u64, Vec<u64>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(s, t, keys) => {
                        let got = c.insert(s, t, &keys);
                        if keys.is_empty() || keys.len() > cap {
                            prop_assert_eq!(got, None);
                        } else {
                            let h = key_list_hash(&keys);
                            prop_assert_eq!(got, Some(h));
                            model.retain(|e| (e.0, e.1, e.2) != (s, t, h));
                            model.push((s, t, h, keys));
                            while model.iter().map(|e| e.3.len()).sum::<usize>() > cap {
                                model.remove(0);
                            }
                        }
                    }
                    Op::Get(i, right_count) => {
                        let (s, t, h, n) = match model.get(i) {
                            Some(e) => (e.0, e.1, e.2, e.3.len() as u64),
                            None => (i as u32, 0, i as u64, 1),
                        };
                        let n = if right_count { n } else { n + 1 };
                        let want = model
                            .iter()
                            .position(|e| (e.0, e.1, e.2) == (s, t, h) && e.3.len() as u64 == n);
                        let got = c.get(s, t, h, n);
                        match want {
                            Some(at) => {
                                let e = model.remove(at);
                                prop_assert_eq!(got.as_deref(), Some(&e.3[..]));
                                model.push(e);
                            }
                            None => prop_assert_eq!(got, None),
                        }
                    }
                    Op::Forget(s) => {
                        c.forget(s);
                        model.retain(|e| e.0 != s);
                    }
                }
                let held: usize = model.iter().map(|e| e.3.len()).sum();
                prop_assert_eq!(c.held_keys(), held);
                prop_assert!(held <= cap);
                prop_assert_eq!(c.len(), model.len());
            }
        }
    }
}
