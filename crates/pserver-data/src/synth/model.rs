//! The model of the data: keys, true weights, probabilities and labels.
//!
//! Everything but the random draws is a pure function of the seed, so it
//! scales to 1e10-value fields without tables and agrees with the
//! reference generator bit for bit: the same preset and seed give the same
//! keys and the same true weight for every key. The random draws (presence,
//! bag lengths, ranks, labels) come from ChaCha8 with one stream per row,
//! so a row is the same whatever the number of files, chunks or threads;
//! they are not numpy's stream, so the rows themselves differ from the
//! reference's while following the same distribution.

use super::preset::Preset;
use crate::hash::{GAMMA, mix64};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};

/// SplitMix64 as the reference writes it: add the golden-ratio increment,
/// then the finalizer (wrapping arithmetic, like numpy's `uint64`).
pub const fn splitmix64(x: u64) -> u64 {
    mix64(x.wrapping_add(GAMMA))
}

/// The reference's multiplier of a field's index in its salt (FNV's prime).
const FIELD_SALT_MUL: u64 = 0x0000_0100_0000_01B3;
/// Added to the seed to derive the weight seed, as in the reference.
const WEIGHT_SEED_ADD: u64 = 0xC0FFEE;

/// A bounded Zipf (power-law) distribution over ranks `1..=V`, sampled by
/// inverting its continuous CDF: one uniform draw, O(1), any `V`.
#[derive(Clone, Copy, Debug)]
pub struct Zipf {
    vocab: u64,
    shape: Shape,
}

#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `s == 1`: `x = exp(u ln(V + 1))`.
    Log { ln_v1: f64 },
    /// `x = (u ((V + 1)^a - 1) + 1)^(1 / a)` with `a = 1 - s`.
    Pow { span: f64, inv_a: f64 },
}

impl Zipf {
    /// Ranks `1..=vocab` with `P(k) ~ k^-s`; `vocab >= 1`.
    pub fn new(vocab: u64, s: f64) -> Self {
        let v1 = vocab as f64 + 1.0;
        // The reference's tolerance for "s is 1".
        let shape = if (s - 1.0).abs() < 1e-9 {
            Shape::Log { ln_v1: v1.ln() }
        } else {
            let a = 1.0 - s;
            Shape::Pow {
                span: v1.powf(a) - 1.0,
                inv_a: 1.0 / a,
            }
        };
        Zipf { vocab, shape }
    }

    /// The rank for a uniform `u` in `[0, 1)`: non-decreasing in `u`, in `1..=V`.
    pub fn rank(&self, u: f64) -> u64 {
        let x = match self.shape {
            Shape::Log { ln_v1 } => (u * ln_v1).exp(),
            Shape::Pow { span, inv_a } => (u * span + 1.0).powf(inv_a),
        };
        // `as` saturates (and maps NaN to 0), so max(1) keeps the rank in range.
        (x.floor() as u64).clamp(1, self.vocab)
    }
}

/// Which stream of rows: each has its own ChaCha8 key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The sample the bias is calibrated on (the reference's `seed + 999` rng).
    Calibration,
    /// Training rows.
    Train,
    /// Test rows (the same key space and weights as training).
    Test,
}

impl Part {
    fn tag(self) -> u64 {
        match self {
            Part::Calibration => 0,
            Part::Train => 1,
            Part::Test => 2,
        }
    }
}

/// One field's precomputed constants.
#[derive(Clone, Debug)]
struct FieldModel {
    zipf: Zipf,
    presence: f64,
    rho: f64,
    sigma: f64,
    bag: Option<Poisson<f64>>,
    salt: u64,
}

/// One value drawn for a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draw {
    /// The field's index in the preset.
    pub field: u32,
    /// The value's rank in the field, `1..=V`.
    pub rank: u64,
    /// Its 64-bit key.
    pub key: u64,
}

/// A generated row (reused between rows to keep allocation out of the loop).
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Every value drawn, repeats included, field by field.
    pub draws: Vec<Draw>,
    /// The sum of the draws' true weights (repeats counted each time).
    pub margin: f64,
    /// `sigmoid(bias + margin)`.
    pub p: f64,
    /// The label, drawn with probability `p`.
    pub label: bool,
    /// The LIBSVM indices written: sorted, unique.
    pub indices: Vec<u64>,
}

/// The generator of one data set: preset, seed, bias and output indexing.
#[derive(Clone, Debug)]
pub struct Synth {
    fields: Vec<FieldModel>,
    wseed: u64,
    seed: u64,
    bias: f64,
    bits: u32,
}

impl Synth {
    /// The model of `preset` under `seed`, with `bias` and indices reduced
    /// to `bits` bits (0: raw keys). `bits <= 63`.
    pub fn new(preset: &Preset, seed: u64, bits: u32, bias: f64) -> Self {
        let fields = preset
            .fields
            .iter()
            .enumerate()
            .map(|(f, spec)| FieldModel {
                zipf: Zipf::new(spec.vocab.max(1), spec.zipf),
                presence: spec.presence,
                rho: spec.rho,
                sigma: spec.sigma,
                // Poisson refuses a mean <= 0; such a bag is always empty.
                bag: spec.bag.and_then(|m| Poisson::new(m).ok()),
                salt: field_salt(seed, f),
            })
            .collect();
        Synth {
            fields,
            wseed: seed.wrapping_add(WEIGHT_SEED_ADD),
            seed,
            bias,
            bits,
        }
    }

    /// The bias.
    pub fn bias(&self) -> f64 {
        self.bias
    }

    /// The same model with another bias.
    pub fn with_bias(mut self, bias: f64) -> Self {
        self.bias = bias;
        self
    }

    /// The number of fields.
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// Field `f`'s vocabulary size.
    pub fn vocab(&self, f: usize) -> u64 {
        self.fields[f].zipf.vocab
    }

    /// Field `f`'s salt: its keys are `splitmix64(rank ^ salt)`.
    pub fn salt(&self, f: usize) -> u64 {
        self.fields[f].salt
    }

    /// The key of value `rank` of field `f`.
    pub fn key(&self, f: usize, rank: u64) -> u64 {
        splitmix64(rank ^ self.fields[f].salt)
    }

    /// The true weight of `key` drawn in field `f`: zero with probability
    /// `1 - rho`, else `N(0, sigma^2)`, both from the key's hash
    /// (Box-Muller on its bits, exactly as the reference), so never stored.
    pub fn weight(&self, f: usize, key: u64) -> f64 {
        let fm = &self.fields[f];
        weight(key, self.wseed, fm.rho, fm.sigma)
    }

    /// The LIBSVM index of `key`: the key itself, or `(key mod 2^bits) + 1`.
    pub fn index(&self, key: u64) -> u64 {
        if self.bits == 0 {
            key
        } else {
            (key & ((1u64 << self.bits) - 1)) + 1
        }
    }

    /// The random stream of row `index` of `part`.
    pub fn rng(&self, part: Part, index: u64) -> ChaCha8Rng {
        // A 256-bit key per (seed, part) from SplitMix64's sequence; the
        // row picks one of ChaCha's 2^64 streams.
        let mut state = splitmix64(self.seed ^ splitmix64(part.tag()));
        let mut key = [0u8; 32];
        for word in key.chunks_exact_mut(8) {
            state = state.wrapping_add(GAMMA);
            word.copy_from_slice(&mix64(state).to_le_bytes());
        }
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(index);
        rng
    }

    /// Draws row `index` of `part` into `row`: values, margin, probability,
    /// label and written indices.
    pub fn fill(&self, part: Part, index: u64, row: &mut Row) {
        let mut rng = self.rng(part, index);
        row.margin = self.draw(&mut rng, &mut row.draws);
        row.p = sigmoid(self.bias + row.margin);
        row.label = rng.random::<f64>() < row.p;
        row.indices.clear();
        row.indices
            .extend(row.draws.iter().map(|d| self.index(d.key)));
        // np.unique: sorted, each index once.
        row.indices.sort_unstable();
        row.indices.dedup();
    }

    /// Draws one row's values into `draws` and returns their summed weight.
    fn draw(&self, rng: &mut ChaCha8Rng, draws: &mut Vec<Draw>) -> f64 {
        draws.clear();
        let mut margin = 0.0;
        for (f, fm) in self.fields.iter().enumerate() {
            let n = match &fm.bag {
                Some(poisson) => poisson.sample(rng) as u64,
                None => u64::from(rng.random::<f64>() < fm.presence),
            };
            for _ in 0..n {
                let rank = fm.zipf.rank(rng.random::<f64>());
                let key = splitmix64(rank ^ fm.salt);
                margin += weight(key, self.wseed, fm.rho, fm.sigma);
                draws.push(Draw {
                    field: f as u32,
                    rank,
                    key,
                });
            }
        }
        margin
    }

    /// The margins (summed true weights) of rows `rows` of `part`.
    pub fn margins(&self, part: Part, rows: std::ops::Range<u64>) -> Vec<f64> {
        let mut draws = Vec::new();
        rows.map(|i| self.draw(&mut self.rng(part, i), &mut draws))
            .collect()
    }
}

/// Field `f`'s salt under `seed`: `splitmix64(seed ^ (f + 1) * FNV_PRIME)`
/// (`*` before `^`, as in numpy).
fn field_salt(seed: u64, f: usize) -> u64 {
    splitmix64(seed ^ (f as u64 + 1).wrapping_mul(FIELD_SALT_MUL))
}

/// The reference's weight derivation from the hash `h` of `key ^ wseed`:
/// the top 24 bits decide whether the key is informative, the low 24 and
/// the 16 above them feed Box-Muller.
fn weight(key: u64, wseed: u64, rho: f64, sigma: f64) -> f64 {
    const TWO24: f64 = (1u64 << 24) as f64;
    let h = splitmix64(key ^ wseed);
    let u1 = (h >> 40) as f64 / TWO24;
    if u1 >= rho {
        return 0.0;
    }
    let u2 = ((h & 0xFF_FFFF) as f64 + 0.5) / TWO24;
    let u3 = (((h >> 24) & 0xFFFF) as f64 + 0.5) / 65536.0;
    let g = (-2.0 * u2.ln()).sqrt() * (2.0 * std::f64::consts::PI * u3).cos();
    sigma * g
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Rows of the calibration sample, as in the reference.
pub const CALIBRATION_ROWS: u64 = 200_000;

/// The bias `b` with `mean(sigmoid(b + m)) = ctr` over `margins`: 60 steps
/// of bisection on `[-20, 20]`, returning the last midpoint (as the
/// reference does).
pub fn bisect_bias(margins: &[f64], ctr: f64) -> f64 {
    let (mut lo, mut hi) = (-20.0f64, 20.0f64);
    let mut b = 0.0;
    for _ in 0..60 {
        b = (lo + hi) / 2.0;
        let mean = margins.iter().map(|m| sigmoid(b + m)).sum::<f64>() / margins.len() as f64;
        if mean > ctr {
            hi = b;
        } else {
            lo = b;
        }
    }
    b
}

/// The bias calibrated for `preset` under `seed` on `rows` calibration
/// rows, drawn by `threads` threads.
pub fn calibrate(preset: &Preset, seed: u64, rows: u64, threads: usize) -> f64 {
    let synth = Synth::new(preset, seed, 0, 0.0);
    let threads = threads.clamp(1, 64) as u64;
    let per = rows.div_ceil(threads);
    let margins: Vec<f64> = std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                let synth = &synth;
                let range = (t * per).min(rows)..((t + 1) * per).min(rows);
                s.spawn(move || synth.margins(Part::Calibration, range))
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("a calibration thread panicked"))
            .collect()
    });
    bisect_bias(&margins, preset.ctr)
}

#[cfg(test)]
mod tests {
    use super::super::preset::preset;
    use super::*;

    // Reference values below were computed with synthetic_ctr.py's own
    // functions under numpy 2.4 (splitmix64, the field salt, weights,
    // zipf_ranks with fixed uniforms).

    #[test]
    fn splitmix64_matches_the_reference() {
        assert_eq!(splitmix64(0), 0xe220a8397b1dcdaf);
        assert_eq!(splitmix64(1), 0x910a2dec89025cc1);
        assert_eq!(splitmix64(u64::MAX), 0xe4d971771b652c20);
        assert_eq!(splitmix64(1234567890123456789), 0x9904eee77e231db2);
    }

    #[test]
    fn salts_keys_and_weights_match_the_reference() {
        let tiny = preset("tiny").unwrap();
        let s = Synth::new(&tiny, 1, 0, 0.0);
        assert_eq!(s.salt(0), 0xe1264dd89c09c327);
        assert_eq!(s.salt(1), 0x69a4211433c827e3);
        assert_eq!(s.salt(2), 0xa80649887c34bc40);
        let keys: Vec<u64> = [1, 2, 3, 50].iter().map(|&r| s.key(0, r)).collect();
        assert_eq!(
            keys,
            [
                0xeaaf1f9c8a510732,
                0x4521f70cafe6f4e7,
                0xe141dbf002164da4,
                0x91a7eea6aa8aa8f2
            ]
        );
        let want = [
            -1.3331999852088523,
            0.0,
            -0.528047895138486,
            -1.2623801035883657,
        ];
        for (k, w) in keys.iter().zip(want) {
            let got = s.weight(0, *k);
            assert!((got - w).abs() < 1e-12, "{k:x}: {got} vs {w}");
        }
    }

    #[test]
    fn zipf_ranks_match_the_reference_and_stay_in_range() {
        let us = [0.0, 0.1, 0.5, 0.9, 0.999999];
        for (v, s, want) in [
            (50, 1.0, [1, 1, 7, 34, 50]),
            (100, 0.9, [1, 1, 13, 69, 100]),
            (10_000_000, 1.1, [1, 2, 166, 342798, 9999599]),
            (10_000_000_000, 1.05, [1, 4, 4305, 199389241, 9999567555]),
        ] {
            let z = Zipf::new(v, s);
            let got: Vec<u64> = us.iter().map(|&u| z.rank(u)).collect();
            assert_eq!(got, want, "V={v} s={s}");
        }
        for (v, s) in [
            (1, 0.7),
            (3, 0.5),
            (50, 1.0),
            (100, 0.9),
            (10_000_000_000, 1.05),
        ] {
            let z = Zipf::new(v, s);
            let mut last = 0;
            for i in 0..10_000 {
                let r = z.rank(i as f64 / 10_000.0);
                assert!((1..=v).contains(&r) && r >= last, "V={v} s={s} u={i}: {r}");
                last = r;
            }
            let top = z.rank(1.0 - f64::EPSILON);
            assert!(top <= v && top >= last);
        }
    }

    #[test]
    fn weights_are_deterministic_sparse_and_scaled() {
        let criteo = preset("criteo").unwrap();
        let a = Synth::new(&criteo, 7, 0, 0.0);
        let b = Synth::new(&criteo, 7, 0, 0.0);
        for (f, want_rho, want_sigma) in [(0usize, 0.5, 0.15), (20, 0.3, 0.5)] {
            let n = 200_000u64;
            let ws: Vec<f64> = (1..=n).map(|r| a.weight(f, a.key(f, r))).collect();
            for r in [1u64, 99, 12345] {
                assert_eq!(a.weight(f, a.key(f, r)), b.weight(f, b.key(f, r)));
            }
            let nz: Vec<f64> = ws.iter().copied().filter(|w| *w != 0.0).collect();
            let rho = nz.len() as f64 / n as f64;
            assert!((rho - want_rho).abs() < 0.01, "field {f}: rho {rho}");
            let mean = nz.iter().sum::<f64>() / nz.len() as f64;
            let sd = (nz.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / nz.len() as f64).sqrt();
            assert!(mean.abs() < 0.01, "field {f}: mean {mean}");
            assert!((sd / want_sigma - 1.0).abs() < 0.02, "field {f}: sd {sd}");
        }
        // Another seed gives other weights.
        let c = Synth::new(&criteo, 8, 0, 0.0);
        let differ = (1..1000u64)
            .filter(|&r| a.weight(20, a.key(20, r)) != c.weight(20, c.key(20, r)))
            .count();
        assert!(differ > 300);
    }

    #[test]
    fn the_calibrated_bias_hits_the_ctr_on_tiny() {
        let tiny = preset("tiny").unwrap();
        let bias = calibrate(&tiny, 3, CALIBRATION_ROWS, 2);
        let s = Synth::new(&tiny, 3, 0, bias);
        // Fresh rows, not the calibration sample: both the mean p and the
        // label rate land within 0.01 of the target.
        let mut row = Row::default();
        let n = 40_000u64;
        let (mut p, mut pos) = (0.0, 0u64);
        for i in 0..n {
            s.fill(Part::Train, i, &mut row);
            p += row.p;
            pos += u64::from(row.label);
        }
        let (p, ctr) = (p / n as f64, pos as f64 / n as f64);
        assert!((p - 0.3).abs() < 0.01, "mean p {p}");
        assert!((ctr - 0.3).abs() < 0.01, "ctr {ctr}");
    }

    #[test]
    fn bisection_inverts_the_mean() {
        let m = [-1.0, 0.0, 2.5];
        let b = bisect_bias(&m, 0.4);
        let mean = m.iter().map(|x| sigmoid(b + x)).sum::<f64>() / 3.0;
        assert!((mean - 0.4).abs() < 1e-12);
    }

    #[test]
    fn rows_are_sorted_unique_reproducible_and_follow_the_preset() {
        let ps = preset("ps").unwrap();
        let s = Synth::new(&ps, 1, 0, -3.0);
        let (mut row, mut again) = (Row::default(), Row::default());
        let mut draws = 0;
        for i in 0..300 {
            s.fill(Part::Train, i, &mut row);
            assert!(row.indices.windows(2).all(|w| w[0] < w[1]), "row {i}");
            assert!(row.indices.len() <= row.draws.len());
            s.fill(Part::Train, i, &mut again);
            assert_eq!(row.indices, again.indices);
            assert_eq!(row.label, again.label);
            draws += row.draws.len();
            for d in &row.draws {
                assert_eq!(d.key, s.key(d.field as usize, d.rank));
            }
        }
        // 24 single fields and two Poisson(40) bags: about 104 draws a row.
        let mean = draws as f64 / 300.0;
        assert!((mean - 104.0).abs() < 3.0, "{mean}");
        // Train and test rows come from different streams.
        s.fill(Part::Test, 0, &mut again);
        s.fill(Part::Train, 0, &mut row);
        assert_ne!(row.draws, again.draws);
    }

    #[test]
    fn bits_reduce_indices_like_the_reference() {
        let tiny = preset("tiny").unwrap();
        let s = Synth::new(&tiny, 1, 20, 0.0);
        assert_eq!(s.index(0), 1);
        assert_eq!(s.index((1 << 20) - 1), 1 << 20);
        assert_eq!(s.index(1 << 20), 1);
        let s63 = Synth::new(&tiny, 1, 63, 0.0);
        assert_eq!(s63.index(u64::MAX), 1 << 63);
        assert_eq!(Synth::new(&tiny, 1, 0, 0.0).index(u64::MAX), u64::MAX);
    }
}
