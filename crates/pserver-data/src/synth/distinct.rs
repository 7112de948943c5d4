//! Counting a split's distinct keys in bounded memory, exactly where it can.
//!
//! A key is `splitmix64(rank ^ salt_f)` and SplitMix64 is a bijection, so
//! within a field distinct ranks are distinct keys, and the count is the
//! sum over fields of the distinct ranks seen, provided no two fields can
//! share a key. That needs `rank_a ^ rank_b == salt_a ^ salt_b`, impossible
//! when the salts differ above the ranks' bit length; [`Distinct::count`]
//! checks every pair (a clash has odds of about 2^-30 per pair of
//! 1e10-value fields) and calls the count an estimate if one could.
//!
//! Fields of up to [`BITMAP_MAX`] values keep a bitmap of the ranks seen
//! (criteo's 39 fields take 4.4 MB in all), set with relaxed atomic ORs
//! from every thread. Larger fields (`ps`'s 1e10-value ones) keep an exact
//! hash set of their keys up to [`EXACT_MAX`] keys, then switch to a
//! k-minimum-values sketch ([`SKETCH_K`] smallest keys; relative error
//! about `1 / sqrt(k)`, 0.4 %), and the count says it is an estimate.

use super::model::Synth;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest vocabulary counted with a bitmap (32 MiB).
pub const BITMAP_MAX: u64 = 1 << 28;
/// Most keys a large field counts exactly (a 2M-key set, about 36 MB).
pub const EXACT_MAX: usize = 1 << 21;
/// Keys kept by the sketch of a field past [`EXACT_MAX`].
pub const SKETCH_K: usize = 1 << 16;

/// The distinct keys of one split, shared by the threads generating it.
pub struct Distinct {
    fields: Vec<FieldCount>,
    /// Whether two fields may share a key (then counts are an upper bound).
    may_clash: bool,
}

enum FieldCount {
    Bits(Vec<AtomicU64>),
    Large(Mutex<Large>),
}

enum Large {
    Exact(HashSet<u64>),
    Sketch(Kmv),
}

/// A count and whether it is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count {
    /// Distinct keys.
    pub keys: u64,
    /// False when a sketch estimated some field, or two fields could share keys.
    pub exact: bool,
}

impl Distinct {
    /// An empty count for the fields of `synth`.
    pub fn new(synth: &Synth) -> Self {
        let vocabs: Vec<u64> = (0..synth.field_count()).map(|f| synth.vocab(f)).collect();
        let fields = vocabs
            .iter()
            .map(|&v| {
                if v <= BITMAP_MAX {
                    let words = (v as usize).div_ceil(64);
                    FieldCount::Bits((0..words).map(|_| AtomicU64::new(0)).collect())
                } else {
                    FieldCount::Large(Mutex::new(Large::Exact(HashSet::new())))
                }
            })
            .collect();
        let salts: Vec<u64> = (0..vocabs.len()).map(|f| synth.salt(f)).collect();
        Distinct {
            fields,
            may_clash: may_clash(&salts, &vocabs),
        }
    }

    /// A per-thread buffer for one chunk's keys of large fields (they go
    /// in under one lock per chunk, not one per key).
    pub fn tally(&self) -> Tally<'_> {
        Tally {
            distinct: self,
            large: self.fields.iter().map(|_| Vec::new()).collect(),
        }
    }

    /// The count so far.
    pub fn count(&self) -> Count {
        let mut count = Count {
            keys: 0,
            exact: !self.may_clash,
        };
        for f in &self.fields {
            match f {
                FieldCount::Bits(words) => {
                    count.keys += words
                        .iter()
                        .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                        .sum::<u64>();
                }
                FieldCount::Large(m) => match &*m.lock().expect("a generator thread panicked") {
                    Large::Exact(set) => count.keys += set.len() as u64,
                    Large::Sketch(kmv) => {
                        count.keys += kmv.estimate();
                        count.exact = false;
                    }
                },
            }
        }
        count
    }
}

/// Whether two fields' keys may coincide: `rank_a ^ rank_b < 2^L` (L the
/// bit length of the larger vocabulary), so a clash needs the salts to
/// agree on every bit from `L` up.
fn may_clash(salts: &[u64], vocabs: &[u64]) -> bool {
    (0..salts.len()).any(|a| {
        (a + 1..salts.len()).any(|b| {
            let bits = 64 - vocabs[a].max(vocabs[b]).leading_zeros();
            bits >= 64 || (salts[a] ^ salts[b]) >> bits == 0
        })
    })
}

/// One thread's contribution to a [`Distinct`] over a chunk.
pub struct Tally<'a> {
    distinct: &'a Distinct,
    large: Vec<Vec<u64>>,
}

impl Tally<'_> {
    /// Notes value `rank` (key `key`) of field `f`.
    pub fn record(&mut self, f: usize, rank: u64, key: u64) {
        match &self.distinct.fields[f] {
            FieldCount::Bits(words) => {
                let i = rank.saturating_sub(1);
                let (word, bit) = (&words[(i / 64) as usize], 1u64 << (i % 64));
                // Frequent ranks are set already: a load keeps their cache
                // lines shared between threads instead of bouncing.
                if word.load(Ordering::Relaxed) & bit == 0 {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
            }
            FieldCount::Large(_) => self.large[f].push(key),
        }
    }
}

impl Drop for Tally<'_> {
    /// Hands the buffered keys of large fields to the shared count.
    fn drop(&mut self) {
        for (f, keys) in self.large.iter_mut().enumerate() {
            if keys.is_empty() {
                continue;
            }
            let FieldCount::Large(m) = &self.distinct.fields[f] else {
                continue;
            };
            // A poisoned lock means a thread panicked; the run fails anyway.
            let Ok(mut large) = m.lock() else { return };
            if let Large::Exact(set) = &mut *large {
                set.extend(keys.iter().copied());
                if set.len() > EXACT_MAX {
                    let mut kmv = Kmv::new(SKETCH_K);
                    set.drain().for_each(|k| kmv.insert(k));
                    *large = Large::Sketch(kmv);
                }
            } else if let Large::Sketch(kmv) = &mut *large {
                keys.iter().for_each(|&k| kmv.insert(k));
            }
            keys.clear();
        }
    }
}

/// A k-minimum-values sketch of uniformly spread 64-bit values (keys are
/// SplitMix64 outputs): keeps the `k` smallest distinct values; with the
/// `k`-th smallest at fraction `x` of the range, about `(k - 1) / x`
/// distinct values were seen.
struct Kmv {
    k: usize,
    /// Candidates: the `k` smallest so far plus unsorted newcomers below `cut`.
    vals: Vec<u64>,
    /// Values at or above this cannot be among the `k` smallest.
    cut: u64,
}

impl Kmv {
    fn new(k: usize) -> Self {
        Kmv {
            k,
            vals: Vec::with_capacity(2 * k),
            cut: u64::MAX,
        }
    }

    fn insert(&mut self, v: u64) {
        if v < self.cut || self.vals.len() < self.k {
            self.vals.push(v);
            if self.vals.len() >= 2 * self.k {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        self.vals.sort_unstable();
        self.vals.dedup();
        self.vals.truncate(self.k);
        if self.vals.len() == self.k {
            self.cut = self.vals[self.k - 1];
        }
    }

    fn estimate(&self) -> u64 {
        let mut vals = self.vals.clone();
        vals.sort_unstable();
        vals.dedup();
        if vals.len() < self.k {
            // Fewer distinct values than k were ever seen: all are here.
            return vals.len() as u64;
        }
        let x = (vals[self.k - 1] as f64 + 1.0) / 2f64.powi(64);
        ((self.k - 1) as f64 / x).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::splitmix64;
    use super::super::preset::preset;
    use super::*;

    #[test]
    fn bitmaps_count_ranks_exactly_across_tallies() {
        let tiny = preset("tiny").unwrap();
        let s = Synth::new(&tiny, 1, 0, 0.0);
        let d = Distinct::new(&s);
        std::thread::scope(|sc| {
            for t in 0..2u64 {
                let d = &d;
                let s = &s;
                sc.spawn(move || {
                    let mut tally = d.tally();
                    for r in 1..=30 {
                        tally.record(0, r + 10 * t, s.key(0, r + 10 * t));
                    }
                    tally.record(4, 50, s.key(4, 50));
                });
            }
        });
        // Field 0: ranks 1..=40; field 4: rank 50.
        assert_eq!(
            d.count(),
            Count {
                keys: 41,
                exact: true
            }
        );
    }

    #[test]
    fn large_fields_are_exact_then_sketched_within_a_percent() {
        let ps = preset("ps").unwrap();
        let s = Synth::new(&ps, 1, 0, 0.0);
        let d = Distinct::new(&s);
        {
            let mut t = d.tally();
            for r in 1..=1000u64 {
                t.record(0, r, s.key(0, r));
                t.record(0, r, s.key(0, r));
            }
        }
        assert_eq!(
            d.count(),
            Count {
                keys: 1000,
                exact: true
            }
        );
        let n = 3 * EXACT_MAX as u64;
        for chunk in (1..=n).collect::<Vec<_>>().chunks(1 << 16) {
            let mut t = d.tally();
            for &r in chunk {
                t.record(0, r, s.key(0, r));
            }
        }
        let c = d.count();
        assert!(!c.exact);
        let err = c.keys as f64 / n as f64 - 1.0;
        assert!(err.abs() < 0.01, "estimate {} of {n}", c.keys);
    }

    #[test]
    fn the_sketch_is_exact_below_k() {
        let mut kmv = Kmv::new(8);
        for v in [5u64, 5, 9, 1] {
            kmv.insert(splitmix64(v));
        }
        assert_eq!(kmv.estimate(), 3);
    }

    #[test]
    fn clashing_salts_are_detected() {
        // Salts that agree above bit 6 can clash for 100-value fields.
        assert!(may_clash(&[0xAB00, 0xAB05], &[100, 100]));
        assert!(!may_clash(&[0xAB00, 0xAB80], &[100, 100]));
        assert!(!may_clash(&[1 << 40, 0], &[10_000_000_000, 5]));
        // The presets' real salts do not clash (for these seeds).
        for name in ["criteo", "kdd12", "ps", "tiny"] {
            let p = preset(name).unwrap();
            for seed in 0..20 {
                let s = Synth::new(&p, seed, 0, 0.0);
                assert!(Distinct::new(&s).count().exact, "{name} {seed}");
            }
        }
    }
}
