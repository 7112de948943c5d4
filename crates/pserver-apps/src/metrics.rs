//! Scores of a binary classifier: log-loss, ROC AUC, accuracy, and the
//! numerically stable sigmoid and logistic loss the learners share.
//!
//! Every function here is pure and total: mismatched lengths use the common
//! prefix, empty input gives a documented value, and no input panics.
//! Labels are 0 or 1; for AUC and accuracy a label counts as positive when it
//! is at least 0.5, so soft labels degrade gracefully.

use serde::{Deserialize, Serialize};

/// Where log-loss clamps predictions, so a confident mistake costs about 34.5
/// nats instead of infinity (the convention of scikit-learn and Kaggle).
const CLAMP: f64 = 1e-15;

/// The logistic function `1 / (1 + e^-x)`, without overflow for any `x`.
///
/// For negative `x` the textbook form computes `e^-x`, which overflows to
/// infinity past about 709; the equivalent `e^x / (1 + e^x)` does not.
/// NaN gives NaN.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The logistic loss of margin `margin` (log-odds) against label `y` in
/// {0, 1}: `-y ln σ(m) - (1 - y) ln(1 - σ(m))`, in nats.
///
/// Computed as `ln(1 + e^-|m|) + y max(-m, 0) + (1 - y) max(m, 0)`, which
/// never overflows and keeps full relative precision for large margins,
/// where `ln σ(m)` would round to 0 or `-inf`, and where the shorter
/// `softplus(m) - y m` would cancel a tiny loss to 0. The same formula
/// serves soft labels in [0, 1].
pub fn logistic_loss(margin: f64, y: f64) -> f64 {
    loss_with_tail(margin, y, (-margin.abs()).exp())
}

/// [`sigmoid`] and [`logistic_loss`] of one margin together, bit for bit
/// the same values, from one exponential instead of two: a learner that
/// needs both for every row every iteration spends most of that loop in
/// `exp` and `ln_1p`.
pub fn sigmoid_and_loss(margin: f64, y: f64) -> (f64, f64) {
    let e = (-margin.abs()).exp();
    let p = if margin >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    (p, loss_with_tail(margin, y, e))
}

/// The logistic loss given `e = e^-|margin|` (see [`logistic_loss`]).
fn loss_with_tail(margin: f64, y: f64, e: f64) -> f64 {
    let tail = e.ln_1p();
    let (pos, neg) = (margin.max(0.0), (-margin).max(0.0));
    // Hard labels take one side alone, so an infinite margin on the right
    // side costs 0 rather than 0 * inf = NaN.
    tail + if y == 1.0 {
        neg
    } else if y == 0.0 {
        pos
    } else {
        y * neg + (1.0 - y) * pos
    }
}

/// Mean log-loss (cross-entropy, nats per example) of probabilities `p`
/// against labels `y`, each `p` clamped to `[1e-15, 1 - 1e-15]`.
///
/// Pairs beyond the shorter slice are ignored; no pairs give NaN, because
/// the mean of nothing is undefined and a 0 would read as a perfect score.
pub fn logloss(p: &[f32], y: &[f32]) -> f64 {
    let n = p.len().min(y.len());
    if n == 0 {
        return f64::NAN;
    }
    let sum: f64 = p
        .iter()
        .zip(y)
        .map(|(&p, &y)| {
            let p = f64::from(p).clamp(CLAMP, 1.0 - CLAMP);
            let y = f64::from(y);
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum();
    sum / n as f64
}

/// Area under the ROC curve of `scores` against labels `y`: the probability
/// that a random positive scores above a random negative, ties counting one
/// half (the Mann-Whitney U statistic over `positives × negatives`).
///
/// Exact, in O(n log n): sort by score, give tied scores their average rank,
/// sum the positives' ranks. Gives 0.5 when either class is absent, since no
/// pair exists to rank. Scores are ordered by [`f32::total_cmp`], so NaN
/// scores sort above every number instead of breaking the sort.
pub fn auc(scores: &[f32], y: &[f32]) -> f64 {
    let n = scores.len().min(y.len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));

    let mut positives = 0u64;
    let mut rank_sum = 0.0f64;
    let mut start = 0;
    while start < n {
        // One run of tied scores: positions start..end, 1-based ranks
        // start+1..=end, whose average every member of the run gets.
        let mut end = start + 1;
        while end < n && scores[order[end]].total_cmp(&scores[order[start]]).is_eq() {
            end += 1;
        }
        let avg_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| y[i] >= 0.5).count() as u64;
        positives += tied_positives;
        rank_sum += avg_rank * tied_positives as f64;
        start = end;
    }
    let negatives = n as u64 - positives;
    if positives == 0 || negatives == 0 {
        return 0.5;
    }
    let p = positives as f64;
    // Subtracting the smallest possible rank sum leaves U, the number of
    // (positive, negative) pairs ranked correctly, ties counting one half.
    (rank_sum - p * (p + 1.0) / 2.0) / (p * negatives as f64)
}

/// Fraction of examples classified right at threshold 0.5 (see
/// [`accuracy_at`]).
pub fn accuracy(p: &[f32], y: &[f32]) -> f64 {
    accuracy_at(p, y, 0.5)
}

/// Fraction of examples classified right when `p >= threshold` predicts the
/// positive class. NaN predictions count as wrong for positives and right
/// for negatives (NaN is never `>=` anything). No pairs give NaN.
pub fn accuracy_at(p: &[f32], y: &[f32], threshold: f32) -> f64 {
    let n = p.len().min(y.len());
    if n == 0 {
        return f64::NAN;
    }
    let right = p
        .iter()
        .zip(y)
        .filter(|&(&p, &y)| (p >= threshold) == (y >= 0.5))
        .count();
    right as f64 / n as f64
}

/// The scores of one evaluation, over `examples` (prediction, label) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean log-loss in nats per example (see [`logloss`]).
    pub logloss: f64,
    /// ROC AUC (see [`auc`]).
    pub auc: f64,
    /// Accuracy at threshold 0.5 (see [`accuracy`]).
    pub accuracy: f64,
    /// How many pairs were scored.
    pub examples: usize,
}

impl Metrics {
    /// Scores probabilities `p` against labels `y` (the common prefix when
    /// their lengths differ).
    pub fn compute(p: &[f32], y: &[f32]) -> Metrics {
        Metrics {
            logloss: logloss(p, y),
            auc: auc(p, y),
            accuracy: accuracy(p, y),
            examples: p.len().min(y.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmoid_and_loss_are_the_two_functions_bit_for_bit() {
        for m in [
            -800.0,
            -40.0,
            -3.5,
            -1e-9,
            -0.0,
            0.0,
            1e-9,
            0.7,
            12.0,
            800.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            for y in [0.0, 1.0, 0.25] {
                let (p, l) = sigmoid_and_loss(m, y);
                assert_eq!(p.to_bits(), sigmoid(m).to_bits(), "sigmoid {m}");
                assert_eq!(l.to_bits(), logistic_loss(m, y).to_bits(), "loss {m} {y}");
            }
        }
        let (p, l) = sigmoid_and_loss(f64::NAN, 1.0);
        assert!(p.is_nan() && l.is_nan());
    }
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + b.abs())
    }

    #[test]
    fn sigmoid_values_and_extremes() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert!(close(sigmoid(2.0), 0.8807970779778823));
        assert!(close(sigmoid(-2.0), 0.11920292202211755));
        assert_eq!(sigmoid(1000.0), 1.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(f64::INFINITY), 1.0);
        assert_eq!(sigmoid(f64::NEG_INFINITY), 0.0);
        // Far in the left tail the result is tiny but not rounded to zero.
        assert!(close(sigmoid(-700.0), (-700.0f64).exp()));
        assert!(sigmoid(f64::NAN).is_nan());
    }

    #[test]
    fn logistic_loss_matches_definition_and_is_stable() {
        for &m in &[-5.0, -1.0, -0.1, 0.0, 0.3, 2.0, 7.0] {
            for &y in &[0.0, 1.0] {
                let s = sigmoid(m);
                let naive = -(y * s.ln() + (1.0 - y) * (1.0 - s).ln());
                assert!(close(logistic_loss(m, y), naive), "m={m} y={y}");
            }
        }
        assert!(close(logistic_loss(0.0, 1.0), std::f64::consts::LN_2));
        // Large margins: the naive form gives inf or 0; this one is exact.
        assert!(close(logistic_loss(1000.0, 0.0), 1000.0));
        assert!(close(logistic_loss(-1000.0, 1.0), 1000.0));
        assert_eq!(logistic_loss(f64::INFINITY, 1.0), 0.0);
        assert_eq!(logistic_loss(f64::NEG_INFINITY, 0.0), 0.0);
        assert_eq!(logistic_loss(f64::INFINITY, 0.0), f64::INFINITY);
        assert!(close(
            logistic_loss(2.0, 0.25),
            0.25 * logistic_loss(2.0, 1.0) + 0.75 * logistic_loss(2.0, 0.0)
        ));
        // A confident right answer keeps its tiny loss instead of rounding
        // to 0: relative precision, not just absolute.
        for (m, y) in [(40.0, 1.0), (-40.0, 0.0)] {
            let tiny = (-40.0f64).exp();
            assert!((logistic_loss(m, y) - tiny).abs() <= 1e-12 * tiny);
        }
    }

    #[test]
    fn logloss_hand_computed() {
        let l = logloss(&[0.9, 0.2], &[1.0, 0.0]);
        assert!(close(
            l,
            (-f64::from(0.9f32).ln() - (1.0 - f64::from(0.2f32)).ln()) / 2.0
        ));
        assert!((l - 0.164252).abs() < 1e-6);
        assert!(close(
            logloss(&[0.5; 4], &[1.0, 0.0, 1.0, 0.0]),
            std::f64::consts::LN_2
        ));
    }

    #[test]
    fn logloss_clamps_certain_mistakes() {
        let worst = -(1e-15f64).ln();
        assert!(close(logloss(&[0.0], &[1.0]), worst));
        assert!((logloss(&[1.0], &[0.0]) - worst).abs() < 1e-3);
        assert!(logloss(&[1.0], &[1.0]) < 1e-14);
        assert!(logloss(&[0.0, 1.0], &[0.0, 1.0]).is_finite());
    }

    #[test]
    fn logloss_degenerate_inputs() {
        assert!(logloss(&[], &[]).is_nan());
        assert!(logloss(&[0.5], &[]).is_nan());
        // Mismatched lengths use the common prefix.
        assert!(close(
            logloss(&[0.5, 0.9, 0.1], &[1.0]),
            std::f64::consts::LN_2
        ));
    }

    #[test]
    fn auc_hand_computed() {
        // The scikit-learn documentation example.
        assert!(close(
            auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]),
            0.75
        ));
        assert_eq!(auc(&[0.1, 0.2, 0.3], &[0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auc(&[0.3, 0.2, 0.1], &[0.0, 1.0, 1.0]), 0.0);
    }

    #[test]
    fn auc_averages_ties() {
        assert_eq!(auc(&[0.5, 0.5], &[0.0, 1.0]), 0.5);
        assert_eq!(auc(&[0.7; 6], &[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 0.5);
        // Positives {0.5, 0.9}, negatives {0.1, 0.5}: 1 + 0.5 + 1 + 1 of 4.
        assert!(close(
            auc(&[0.1, 0.5, 0.5, 0.9], &[0.0, 1.0, 0.0, 1.0]),
            0.875
        ));
    }

    #[test]
    fn auc_degenerate_inputs() {
        assert_eq!(auc(&[], &[]), 0.5);
        assert_eq!(auc(&[0.1, 0.9], &[1.0, 1.0]), 0.5);
        assert_eq!(auc(&[0.1, 0.9], &[0.0, 0.0]), 0.5);
        assert_eq!(auc(&[0.9, 0.1, 0.5], &[1.0, 0.0]), 1.0);
        // NaN scores neither panic nor produce NaN.
        let a = auc(&[f32::NAN, 0.2, f32::NAN, 0.1], &[1.0, 0.0, 0.0, 1.0]);
        assert!((0.0..=1.0).contains(&a));
    }

    #[test]
    fn accuracy_hand_computed() {
        assert_eq!(accuracy(&[0.9, 0.4, 0.6, 0.1], &[1.0, 1.0, 0.0, 0.0]), 0.5);
        // The threshold itself predicts positive.
        assert_eq!(accuracy(&[0.5], &[1.0]), 1.0);
        assert_eq!(accuracy_at(&[0.3, 0.7], &[1.0, 1.0], 0.2), 1.0);
        assert!(accuracy(&[], &[]).is_nan());
        assert_eq!(accuracy(&[f32::NAN, f32::NAN], &[1.0, 0.0]), 0.5);
    }

    #[test]
    fn metrics_compute_collects_all() {
        let p = [0.1, 0.4, 0.35, 0.8];
        let y = [0.0, 0.0, 1.0, 1.0];
        let m = Metrics::compute(&p, &y);
        assert_eq!(m.examples, 4);
        assert_eq!(m.auc, auc(&p, &y));
        assert_eq!(m.logloss, logloss(&p, &y));
        assert_eq!(m.accuracy, 0.75);
    }

    /// The definition: over every (positive, negative) pair, 1 if the
    /// positive scores higher, 1/2 on a tie.
    fn auc_by_pairs(s: &[f32], y: &[f32]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, &yi) in y.iter().enumerate() {
            for (j, &yj) in y.iter().enumerate() {
                if yi >= 0.5 && yj < 0.5 {
                    pairs += 1.0;
                    if s[i] > s[j] {
                        wins += 1.0;
                    } else if s[i] == s[j] {
                        wins += 0.5;
                    }
                }
            }
        }
        if pairs == 0.0 { 0.5 } else { wins / pairs }
    }

    /// Scores from a small set of integers, so ties are common, with labels.
    fn scored() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        prop::collection::vec((0u8..8, any::<bool>()), 0..40).prop_map(|v| {
            v.into_iter()
                .map(|(s, y)| (f32::from(s), if y { 1.0 } else { 0.0 }))
                .unzip()
        })
    }

    proptest! {
        #[test]
        fn auc_equals_pair_count((s, y) in scored()) {
            prop_assert!(close(auc(&s, &y), auc_by_pairs(&s, &y)));
        }

        #[test]
        fn auc_equals_pair_count_on_real_scores(
            v in prop::collection::vec((-1.0f32..1.0, any::<bool>()), 0..40)
        ) {
            let (s, y): (Vec<f32>, Vec<f32>) =
                v.into_iter().map(|(s, y)| (s, f32::from(u8::from(y)))).unzip();
            prop_assert!(close(auc(&s, &y), auc_by_pairs(&s, &y)));
        }

        #[test]
        fn auc_invariant_under_monotone_transforms((s, y) in scored()) {
            // Each map is strictly increasing and exact on these small
            // integers, so it keeps every tie and every order.
            let base = auc(&s, &y);
            let maps: [fn(f32) -> f32; 4] = [
                |x| 3.0 * x - 11.0,
                |x| x * x * x,
                f32::exp,
                |x| 1.0 / (1.0 + (-x).exp()),
            ];
            for f in maps {
                let t: Vec<f32> = s.iter().map(|&x| f(x)).collect();
                prop_assert!(close(auc(&t, &y), base));
            }
            // A decreasing map mirrors it.
            let neg: Vec<f32> = s.iter().map(|&x| -x).collect();
            prop_assert!(close(auc(&neg, &y), 1.0 - base));
        }

        #[test]
        fn metrics_never_panic(
            p in prop::collection::vec(any::<f32>(), 0..20),
            y in prop::collection::vec(any::<f32>(), 0..20),
        ) {
            let m = Metrics::compute(&p, &y);
            prop_assert_eq!(m.examples, p.len().min(y.len()));
            prop_assert!((0.0..=1.0).contains(&m.auc));
        }

        #[test]
        fn logistic_loss_agrees_with_logloss(m in -8.0f64..8.0, y in any::<bool>()) {
            let y = f64::from(u8::from(y));
            let via_p = logloss(&[sigmoid(m) as f32], &[y as f32]);
            // Only the f32 rounding of p separates the two; it costs about
            // 6e-8 / (1 - p) nats, under 2e-4 while |m| <= 8.
            prop_assert!((logistic_loss(m, y) - via_p).abs() < 1e-3);
        }
    }
}
