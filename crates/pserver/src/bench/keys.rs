//! The benchmark's keys: random sorted `u64` lists that never repeat a key,
//! so the number of keys a table holds is known exactly from what was pushed.

use pserver_core::KEY_END;

/// A stream of distinct pseudo-random keys. splitmix64 applies a bijection
/// of `u64` to a counter stepped by an odd constant, so no key comes twice
/// in 2^64 draws; the one draw equal to the reserved `KEY_END` is skipped.
#[derive(Clone, Debug)]
pub struct KeyStream {
    state: u64,
}

impl KeyStream {
    /// A stream starting at `seed` (seeded: runs compare).
    pub fn new(seed: u64) -> KeyStream {
        KeyStream { state: seed }
    }

    /// The next key.
    fn next_key(&mut self) -> u64 {
        loop {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z != KEY_END {
                return z;
            }
        }
    }

    /// `n` keys never drawn before, sorted.
    pub fn sorted(&mut self, n: usize) -> Vec<u64> {
        let mut keys: Vec<u64> = (0..n).map(|_| self.next_key()).collect();
        keys.sort_unstable();
        keys
    }
}

/// Key lists one case cycles through, and which of them a push has stored.
#[derive(Debug)]
pub struct Pool {
    lists: Vec<Vec<u64>>,
    stored: Vec<bool>,
    /// Keys stored by pushes since the last [`Pool::take_stored`].
    newly_stored: u64,
    next: usize,
}

/// Keys held by all the lists of one pool: enough distinct lists that small
/// requests do not hit the same few keys, few enough that big ones do not
/// take gigabytes of the benchmark's own memory.
const POOL_KEYS: usize = 1 << 22;

/// Most lists in a pool.
const POOL_LISTS: usize = 64;

impl Pool {
    /// Lists of `n` fresh keys from `stream`.
    pub fn new(stream: &mut KeyStream, n: usize) -> Pool {
        let count = (POOL_KEYS / n.max(1)).clamp(1, POOL_LISTS);
        Pool {
            lists: (0..count).map(|_| stream.sorted(n)).collect(),
            stored: vec![false; count],
            newly_stored: 0,
            next: 0,
        }
    }

    /// The next list, in turn. `stores` says whether the request will store
    /// its keys (a push does, a pull does not).
    pub fn next_list(&mut self, stores: bool) -> Vec<u64> {
        let i = self.next;
        self.next = (self.next + 1) % self.lists.len();
        if stores && !self.stored[i] {
            self.stored[i] = true;
            self.newly_stored += self.lists[i].len() as u64;
        }
        self.lists[i].clone()
    }

    /// Keys first stored since the last call (the table grew by this much,
    /// since no key of a pool is anywhere else).
    pub fn take_stored(&mut self) -> u64 {
        std::mem::take(&mut self.newly_stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn streams_are_sorted_distinct_and_repeatable() {
        let mut s = KeyStream::new(9);
        let a = s.sorted(1000);
        let b = s.sorted(1000);
        assert_eq!(a, KeyStream::new(9).sorted(1000));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        let all: HashSet<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 2000);
        assert!(all.iter().all(|&k| k != KEY_END));
    }

    #[test]
    fn pools_count_what_pushes_store_once() {
        let mut s = KeyStream::new(1);
        let mut p = Pool::new(&mut s, 1 << 21);
        assert_eq!(p.lists.len(), 2);
        p.next_list(false);
        assert_eq!(p.take_stored(), 0);
        p.next_list(true); // the second list
        p.next_list(true); // the first
        p.next_list(true); // the second again: already stored
        assert_eq!(p.take_stored(), 2 << 21);
        assert_eq!(p.take_stored(), 0);
        assert_eq!(Pool::new(&mut s, 1).lists.len(), POOL_LISTS);
    }
}
