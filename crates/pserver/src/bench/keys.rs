//! The benchmark's keys: random sorted `u64` lists that never repeat a key,
//! so the number of keys a table holds is known exactly from what was pushed;
//! the one fixed list of the `small` key set; and Zipf-distributed requests
//! over a universe of keys for the `zipf` key set.

use anyhow::{Context, Result};
use pserver_core::KEY_END;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};
use std::sync::Arc;

/// splitmix64's finalizer: a bijection of `u64` that scatters nearby inputs
/// over the whole range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

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
            let z = mix(self.state);
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
    /// Shared, so the store-alone figure runs on the very same lists
    /// without copying them.
    lists: Arc<Vec<Vec<u64>>>,
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

/// Lists in a pool of requests of `n` keys.
fn lists_for(n: usize) -> usize {
    (POOL_KEYS / n.max(1)).clamp(1, POOL_LISTS)
}

impl Pool {
    /// Lists of `n` fresh keys from `stream`.
    pub fn new(stream: &mut KeyStream, n: usize) -> Pool {
        Pool::from_lists((0..lists_for(n)).map(|_| stream.sorted(n)).collect())
    }

    /// A pool of the given lists (each sorted and without repeats). Its
    /// count of stored keys is exact only if no key is in two lists.
    pub fn from_lists(lists: Vec<Vec<u64>>) -> Pool {
        Pool {
            stored: vec![false; lists.len()],
            lists: Arc::new(lists),
            newly_stored: 0,
            next: 0,
        }
    }

    /// The lists, in the order requests take them.
    pub fn lists(&self) -> Arc<Vec<Vec<u64>>> {
        Arc::clone(&self.lists)
    }

    /// The next list, in turn. `stores` says whether the request will store
    /// its keys (a push does, a pull does not).
    pub fn next_list(&mut self, stores: bool) -> Vec<u64> {
        let i = self.next;
        self.next = (self.next + 1) % self.lists.len().max(1);
        let Some(list) = self.lists.get(i) else {
            return Vec::new();
        };
        if stores && !self.stored[i] {
            self.stored[i] = true;
            self.newly_stored += list.len() as u64;
        }
        list.clone()
    }

    /// Keys first stored since the last call (the table grew by this much,
    /// since no key of a pool is anywhere else).
    pub fn take_stored(&mut self) -> u64 {
        std::mem::take(&mut self.newly_stored)
    }
}

/// The seed of the `small` key set's list.
const SMALL_SEED: u64 = 0x0073_6d61_6c6c;

/// The `small` key set: one fixed list of `n` random sorted keys, the same
/// in every run, which every request of the set sends (so the table holds
/// just these keys and stays in the cache).
pub fn small_list(n: usize) -> Vec<u64> {
    KeyStream::new(SMALL_SEED).sorted(n)
}

/// The seed of the `zipf` key set's draws.
const ZIPF_SEED: u64 = 0x7a69_7066;

/// The key of rank `rank` (0-based, below 2^32) of a Zipf universe: ranks
/// go through splitmix64, so the hot keys are spread over every server's
/// range rather than packed into the first. The one rank that would map to
/// the reserved `KEY_END` takes the image of `u64::MAX` instead, which no
/// rank below 2^32 has, so the map stays one-to-one.
pub fn universe_key(rank: u64) -> u64 {
    match mix(rank) {
        KEY_END => mix(u64::MAX),
        k => k,
    }
}

/// Keys per preload request.
pub const PRELOAD_CHUNK: u64 = 1 << 20;

/// The keys of ranks `[first, first + n)` of the universe, sorted: one
/// request of the universe's preload.
pub fn universe_chunk(first: u64, n: u64) -> Vec<u64> {
    let mut keys: Vec<u64> = (first..first.saturating_add(n)).map(universe_key).collect();
    keys.sort_unstable();
    keys
}

/// The whole universe of `universe` keys as preload requests, in rank order.
pub fn universe_chunks(universe: u64) -> impl Iterator<Item = Vec<u64>> + Send + 'static {
    (0..universe)
        .step_by(PRELOAD_CHUNK as usize)
        .map(move |first| universe_chunk(first, (universe - first).min(PRELOAD_CHUNK)))
}

/// The `zipf` key set: what requests draw from a universe of keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZipfSet {
    /// Keys in the universe (ranks `0..universe`), below 2^32.
    pub universe: u64,
    /// The exponent: rank `r` (1-based) is drawn with weight `r^-s`.
    pub s: f64,
    /// Draws per request, before repeats are merged.
    pub draws: usize,
}

impl ZipfSet {
    /// The lists a pool of this set's requests cycles through (as many as
    /// a pool of `draws` random keys has): each `draws` ranks drawn from
    /// the Zipf distribution, mapped to keys, sorted, and with repeats
    /// merged, as the wire wants a request's keys. The same for a seed.
    pub fn lists(&self) -> Result<Vec<Vec<u64>>> {
        let zipf = Zipf::new(self.universe as f64, self.s)
            .with_context(|| format!("Zipf over {} keys with s = {}", self.universe, self.s))?;
        let mut rng = ChaCha8Rng::seed_from_u64(ZIPF_SEED);
        let top = self.universe.max(1);
        Ok((0..lists_for(self.draws))
            .map(|_| {
                let mut keys: Vec<u64> = (0..self.draws)
                    .map(|_| {
                        // Draws are ranks 1..=universe as floats; clamp
                        // so float rounding cannot leave the universe.
                        let rank = (zipf.sample(&mut rng) as u64).clamp(1, top);
                        universe_key(rank - 1)
                    })
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                keys
            })
            .collect())
    }
}

/// The mean length of `lists` (0 for none).
pub fn mean_len(lists: &[Vec<u64>]) -> f64 {
    if lists.is_empty() {
        return 0.0;
    }
    lists.iter().map(Vec::len).sum::<usize>() as f64 / lists.len() as f64
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

    #[test]
    fn mix_keeps_the_streams_keys() {
        // The first key of seed 0 is splitmix64's published first output:
        // the refactoring into `mix` kept the stream (and so every figure
        // measured before) unchanged.
        assert_eq!(KeyStream::new(0).next_key(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn the_small_set_is_one_fixed_list() {
        let a = small_list(4096);
        assert_eq!(a.len(), 4096);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, small_list(4096));
        let mut p = Pool::from_lists(vec![a.clone()]);
        for _ in 0..3 {
            assert_eq!(p.next_list(true), a);
        }
        // Stored once, however often it is pushed.
        assert_eq!(p.take_stored(), 4096);
    }

    #[test]
    fn universe_keys_are_distinct_and_never_key_end() {
        let chunk = universe_chunk(0, 10_000);
        assert_eq!(chunk.len(), 10_000);
        assert!(chunk.windows(2).all(|w| w[0] < w[1]));
        assert!(chunk.iter().all(|&k| k != KEY_END));
        // The rank whose image is KEY_END (far above 2^32, so never a
        // rank) maps to a key no rank below 2^32 has.
        let end_rank = unmix(KEY_END);
        assert_eq!(mix(end_rank), KEY_END);
        assert!(end_rank > u64::from(u32::MAX));
        assert_eq!(universe_key(end_rank), mix(u64::MAX));
        assert_ne!(universe_key(end_rank), KEY_END);
    }

    /// The inverse of `mix`: each xor-shift and odd multiplication undone.
    fn unmix(mut z: u64) -> u64 {
        let unshift = |z: u64, s: u32| {
            let mut x = z;
            for _ in 0..64 / s {
                x = z ^ (x >> s);
            }
            x
        };
        let inverse = |a: u64| {
            // Newton's iteration for the inverse of an odd number mod 2^64.
            let mut x = a;
            for _ in 0..6 {
                x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
            }
            x
        };
        z = unshift(z, 31);
        z = z.wrapping_mul(inverse(0x94D0_49BB_1331_11EB));
        z = unshift(z, 27);
        z = z.wrapping_mul(inverse(0xBF58_476D_1CE4_E5B9));
        unshift(z, 30)
    }

    #[test]
    fn zipf_lists_are_sorted_distinct_in_the_universe_and_repeatable() {
        let set = ZipfSet {
            universe: 100_000,
            s: 1.1,
            draws: 65_536,
        };
        let lists = set.lists().unwrap();
        assert_eq!(lists.len(), POOL_LISTS);
        assert_eq!(lists, set.lists().unwrap());
        let universe: HashSet<u64> = universe_chunk(0, set.universe).into_iter().collect();
        for l in &lists {
            assert!(l.windows(2).all(|w| w[0] < w[1]));
            assert!(l.iter().all(|k| universe.contains(k)));
            // Hot keys repeat: fewer distinct keys than draws.
            assert!(l.len() < set.draws && l.len() > 1000, "{}", l.len());
        }
        // The hottest key (rank 0) is in every request.
        assert!(
            lists
                .iter()
                .all(|l| l.binary_search(&universe_key(0)).is_ok())
        );
        let mean = mean_len(&lists);
        assert!(mean > 1000.0 && mean < set.draws as f64, "{mean}");
        assert_eq!(mean_len(&[]), 0.0);
        // A universe of one key: every request is that key.
        let one = ZipfSet {
            universe: 1,
            s: 1.1,
            draws: 10,
        };
        assert!(one.lists().unwrap().iter().all(|l| l == &[universe_key(0)]));
    }

    #[test]
    fn zipf_refuses_a_bad_exponent_without_panicking() {
        let set = ZipfSet {
            universe: 10,
            s: -1.0,
            draws: 10,
        };
        assert!(set.lists().is_err());
    }
}
