//! Deterministic inputs shared by this crate's benchmarks.
//!
//! Every benchmark draws its keys and values from [`Rng`], a splitmix64
//! sequence with a fixed seed, so two runs (and two machines) measure the
//! same work. Keys are uniform over the ring, as applications hash raw
//! features into keys.

// Each benchmark target compiles this module on its own and uses only part
// of it.
#![allow(dead_code)]

use pserver_core::{KEY_END, Key};

/// A splitmix64 sequence: tiny, fast, and good enough for benchmark inputs.
pub struct Rng(u64);

impl Rng {
    /// A sequence starting from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[0, n)` (`n > 0`); the slight modulo bias is irrelevant
    /// for choosing benchmark inputs.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A float in `[-scale, scale)`, like a small gradient.
    pub fn value(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * scale
    }

    /// `n` distinct keys below [`KEY_END`], sorted ascending: what a worker
    /// sends.
    pub fn sorted_keys(&mut self, n: usize) -> Vec<Key> {
        let mut keys = Vec::with_capacity(n);
        while keys.len() < n {
            keys.extend((keys.len()..n).map(|_| self.below(KEY_END)));
            keys.sort_unstable();
            keys.dedup();
        }
        keys
    }

    /// `n` distinct elements of the sorted list `from` (`n <= from.len()`),
    /// still sorted: a request touching keys a table already holds.
    pub fn sorted_subset(&mut self, from: &[Key], n: usize) -> Vec<Key> {
        let mut picked: Vec<usize> = Vec::with_capacity(n);
        while picked.len() < n {
            picked.extend((picked.len()..n).map(|_| self.below(from.len() as u64) as usize));
            picked.sort_unstable();
            picked.dedup();
        }
        picked.into_iter().map(|i| from[i]).collect()
    }

    /// `n` values in `[-scale, scale)`.
    pub fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.value(scale)).collect()
    }
}
