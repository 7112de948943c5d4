//! What a generated data set says about itself (`meta.json`): the fields
//! of the reference's meta, plus how exact the key count is and which
//! files hold each split.

use super::distinct::Count;
use serde::{Deserialize, Serialize};

/// The description of a generated data set, written as `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The preset's name.
    pub preset: String,
    /// The calibrated bias `b` of `p = sigmoid(b + sum w)`.
    pub bias: f64,
    /// The seed.
    pub seed: u64,
    /// Index bits (0: raw 64-bit keys).
    pub bits: u32,
    /// The training split.
    pub train: SplitMeta,
    /// The test split.
    pub test: SplitMeta,
    /// Present when indices are raw keys, as in the reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The click-through rate the bias was calibrated to.
    pub target_ctr: f64,
    /// What made the data and how its random draws differ from the reference's.
    pub generator: String,
}

/// Figures of one split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    /// Rows.
    pub rows: u64,
    /// Fraction of positive labels.
    pub ctr: f64,
    /// Values drawn per row, repeats within a row included (the
    /// reference's `len(k) / n`).
    pub nnz_mean: f64,
    /// Distinct raw keys over the split.
    pub distinct_keys: u64,
    /// Whether `distinct_keys` is exact (see `synth::distinct`).
    pub distinct_keys_exact: bool,
    /// Mean `-log p(y | x)` under the true model: the floor for any learner.
    pub bayes_logloss: f64,
    /// The log-loss of predicting the split's CTR for every row.
    pub base_rate_logloss: f64,
    /// Features per written line (after duplicates, and with `bits` the
    /// indices that share a bucket, are merged).
    pub nnz_written_mean: f64,
    /// The split's files, in row order.
    pub files: Vec<String>,
}

/// Sums over rows, added chunk by chunk in row order (so the figures do
/// not depend on the number of threads).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Stats {
    pub rows: u64,
    pub positives: u64,
    pub draws: u64,
    pub written: u64,
    /// Sum of `-log p(y | x)`.
    pub logloss: f64,
}

/// The reference's clipping of `p` before taking logs.
const CLIP: f64 = 1e-15;

impl Stats {
    /// Counts one row.
    pub fn row(&mut self, p: f64, label: bool, draws: usize, written: usize) {
        self.rows += 1;
        self.positives += u64::from(label);
        self.draws += draws as u64;
        self.written += written as u64;
        let p = p.clamp(CLIP, 1.0 - CLIP);
        self.logloss -= if label { p.ln() } else { (1.0 - p).ln() };
    }

    /// Adds another chunk's sums.
    pub fn add(&mut self, o: &Stats) {
        self.rows += o.rows;
        self.positives += o.positives;
        self.draws += o.draws;
        self.written += o.written;
        self.logloss += o.logloss;
    }

    /// The split's figures.
    pub fn meta(&self, distinct: Count, files: Vec<String>) -> SplitMeta {
        let n = self.rows.max(1) as f64;
        let ctr = self.positives as f64 / n;
        SplitMeta {
            rows: self.rows,
            ctr,
            nnz_mean: self.draws as f64 / n,
            distinct_keys: distinct.keys,
            distinct_keys_exact: distinct.exact,
            bayes_logloss: self.logloss / n,
            base_rate_logloss: base_rate_logloss(ctr),
            nnz_written_mean: self.written as f64 / n,
            files,
        }
    }
}

/// `-(c ln c + (1 - c) ln(1 - c))`, with `0 ln 0 = 0` (the reference gives
/// NaN for a split of one label).
pub fn base_rate_logloss(c: f64) -> f64 {
    let term = |x: f64| if x > 0.0 { x * x.ln() } else { 0.0 };
    -(term(c) + term(1.0 - c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_sums() {
        let mut s = Stats::default();
        s.row(0.5, true, 3, 2);
        s.row(0.5, false, 1, 1);
        let mut t = Stats::default();
        t.add(&s);
        let m = t.meta(
            Count {
                keys: 4,
                exact: true,
            },
            vec!["a".into()],
        );
        assert_eq!(
            (m.rows, m.ctr, m.nnz_mean, m.nnz_written_mean),
            (2, 0.5, 2.0, 1.5)
        );
        assert!((m.bayes_logloss - std::f64::consts::LN_2).abs() < 1e-12);
        assert!((m.base_rate_logloss - std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(base_rate_logloss(0.0), 0.0);
        assert_eq!(base_rate_logloss(1.0), 0.0);
        // A certain, right prediction costs about 1e-15, not 0 or NaN.
        let mut c = Stats::default();
        c.row(1.0, true, 1, 1);
        assert!(c.logloss > 0.0 && c.logloss < 1e-14);
    }
}
