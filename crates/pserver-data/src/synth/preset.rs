//! The presets: field parameters copied exactly from the reference
//! generator (`synthetic_ctr.py`), so a data set named `criteo` means the
//! same model of the data in either tool.

/// One field (one column of the imitated data set).
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    /// Vocabulary size `V`: value ranks are drawn from `1..=V`.
    pub vocab: u64,
    /// Zipf exponent `s`: `P(rank k) ~ k^-s`.
    pub zipf: f64,
    /// Probability that a row has this field (ignored by bag fields).
    pub presence: f64,
    /// Fraction of the field's keys with a non-zero true weight.
    pub rho: f64,
    /// Standard deviation of the non-zero true weights.
    pub sigma: f64,
    /// A multi-hot field: the number of values in a row is Poisson with
    /// this mean (query words, user tags), instead of 0 or 1.
    pub bag: Option<f64>,
}

/// A named model of a data set: its fields and the click-through rate
/// the bias is calibrated to.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// `criteo`, `kdd12`, `ps` or `tiny`.
    pub name: &'static str,
    /// The fields, in key-derivation order (a field's index salts its keys).
    pub fields: Vec<Field>,
    /// Target mean of `p` over the calibration sample.
    pub ctr: f64,
}

/// The names [`preset`] knows.
pub const PRESETS: [&str; 4] = ["criteo", "kdd12", "ps", "tiny"];

/// Vocabularies of Criteo's 26 categorical fields (orders of magnitude of
/// the public Criteo Kaggle data, as in the reference).
const CRITEO_CAT_V: [u64; 26] = [
    1500, 600, 10_000_000, 2_000_000, 300, 25, 12_000, 600, 3, 90_000, 5_700, 8_000_000, 3_200, 27,
    15_000, 5_000_000, 10, 5_600, 2_200, 4, 7_000_000, 18, 15, 290_000, 105, 140_000,
];

/// KDD Cup 2012 track 2's 11 id fields: (vocabulary, Zipf exponent).
const KDD12: [(u64, f64); 11] = [
    (700_000, 1.1),
    (15_000, 1.0),
    (26_000_000, 1.05),
    (1_300_000, 1.1),
    (4_000_000, 1.05),
    (3_200_000, 1.05),
    (24_000_000, 1.02),
    (30_000, 1.0),
    (3, 0.5),
    (3, 0.5),
    (6, 0.5),
];

fn field(vocab: u64, zipf: f64, presence: f64, rho: f64, sigma: f64) -> Field {
    Field {
        vocab,
        zipf,
        presence,
        rho,
        sigma,
        bag: None,
    }
}

/// The preset called `name`, or `None`.
pub fn preset(name: &str) -> Option<Preset> {
    let (name, fields, ctr) = match name {
        // 13 bucketized integer fields + 26 categorical fields whose
        // vocabularies span 3 .. 1e7.
        "criteo" => (
            "criteo",
            (0..13)
                .map(|_| field(100, 0.9, 0.8, 0.5, 0.15))
                .chain(
                    CRITEO_CAT_V
                        .iter()
                        .map(|&v| field(v, if v > 1000 { 1.1 } else { 0.7 }, 0.9, 0.3, 0.5)),
                )
                .collect(),
            0.25,
        ),
        // Search ads: a few id fields with 1e7+ values, low CTR.
        "kdd12" => (
            "kdd12",
            KDD12
                .iter()
                .map(|&(v, s)| field(v, s, 1.0, 0.3, 0.6))
                .collect(),
            0.04,
        ),
        // The parameter-server paper's flavour: a few huge fields (1e10 ids)
        // plus multi-hot bags, ~100 keys per row.
        "ps" => (
            "ps",
            (0..4)
                .map(|_| field(10_000_000_000, 1.05, 1.0, 0.1, 0.8))
                .chain((0..20).map(|_| field(1_000_000, 1.1, 1.0, 0.3, 0.4)))
                .chain((0..2).map(|_| Field {
                    bag: Some(40.0),
                    ..field(100_000_000, 1.1, 1.0, 0.2, 0.3)
                }))
                .collect(),
            0.05,
        ),
        // Small enough for unit tests: 5 fields of 50 values, every row has all.
        "tiny" => (
            "tiny",
            (0..5).map(|_| field(50, 1.0, 1.0, 0.5, 1.0)).collect(),
            0.3,
        ),
        _ => return None,
    };
    Some(Preset { name, fields, ctr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_known_and_shaped_like_the_reference() {
        for name in PRESETS {
            assert_eq!(preset(name).unwrap().name, name);
        }
        assert!(preset("avazu").is_none());
        let c = preset("criteo").unwrap();
        assert_eq!(c.fields.len(), 39);
        assert_eq!(c.fields[2], field(100, 0.9, 0.8, 0.5, 0.15));
        // C3 (10M values, Zipf 1.1) and C9 (3 values, Zipf 0.7).
        assert_eq!(c.fields[15], field(10_000_000, 1.1, 0.9, 0.3, 0.5));
        assert_eq!(c.fields[21], field(3, 0.7, 0.9, 0.3, 0.5));
        let p = preset("ps").unwrap();
        assert_eq!(p.fields.len(), 26);
        assert_eq!(p.fields[25].bag, Some(40.0));
        assert_eq!(p.fields[25].vocab, 100_000_000);
        assert_eq!(preset("kdd12").unwrap().fields[6].vocab, 24_000_000);
        assert_eq!(preset("tiny").unwrap().ctr, 0.3);
    }
}
