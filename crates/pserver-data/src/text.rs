//! Line parsers for the two schema-less formats: LIBSVM/SVMlight and
//! Criteo-style TSV. Each fills a feature buffer and returns the label, or
//! says in words what is wrong with the line.

use crate::hash::{KeyHasher, libsvm_key};

/// Whether a LIBSVM line carries data (blank and `#`-comment lines do not,
/// and are not numbered for sharding).
pub(crate) fn libsvm_is_data(line: &str) -> bool {
    let t = line.trim_start();
    !t.is_empty() && !t.starts_with('#')
}

/// Parses `label idx:val idx:val ... [# comment]`. Labels -1/+1 or 0/1 in
/// any float spelling; a `qid:` token (SVMlight ranking) is ignored.
pub(crate) fn parse_libsvm(line: &str, feats: &mut Vec<(u64, f32)>) -> Result<f32, String> {
    let body = line.split_once('#').map_or(line, |(b, _)| b);
    let mut toks = body.split_ascii_whitespace();
    let Some(lab) = toks.next() else {
        return Err("no label".into());
    };
    let label = match lab.parse::<f64>() {
        Ok(1.0) => 1.0,
        Ok(0.0 | -1.0) => 0.0,
        _ => return Err(format!("label `{lab}` is not -1, 0 or 1")),
    };
    for (i, tok) in toks.enumerate() {
        let Some((idx, val)) = tok.split_once(':') else {
            return Err(format!("feature {} `{tok}` is not idx:value", i + 1));
        };
        if idx == "qid" {
            continue;
        }
        let Ok(idx) = idx.parse::<u64>() else {
            return Err(format!(
                "feature {}: index `{idx}` is not an integer >= 0",
                i + 1
            ));
        };
        let val = match val.parse::<f32>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                return Err(format!(
                    "feature {}: value `{val}` is not a finite number",
                    i + 1
                ));
            }
        };
        feats.push((libsvm_key(idx), val));
    }
    Ok(label)
}

/// Integer columns in a Criteo line.
pub(crate) const CRITEO_INTS: usize = 13;
/// Categorical columns in a Criteo line.
pub(crate) const CRITEO_CATS: usize = 26;

/// Per-column hash prefixes for Criteo (`I1`..`I13`, `C1`..`C26`), computed
/// once per reader.
pub(crate) struct Criteo {
    prefixes: Vec<KeyHasher>,
    tok: String,
}

impl Criteo {
    pub(crate) fn new() -> Self {
        let prefixes = (1..=CRITEO_INTS)
            .map(|i| format!("I{i}"))
            .chain((1..=CRITEO_CATS).map(|i| format!("C{i}")))
            .map(|n| KeyHasher::new(2).part(n.as_bytes()))
            .collect();
        Criteo {
            prefixes,
            tok: String::new(),
        }
    }

    /// Parses `label \t I1..I13 \t C1..C26`; empty fields give no feature.
    pub(crate) fn parse(&mut self, line: &str, feats: &mut Vec<(u64, f32)>) -> Result<f32, String> {
        let want = 1 + CRITEO_INTS + CRITEO_CATS;
        let n = line.split('\t').count();
        if n != want {
            return Err(format!("expected {want} tab-separated fields, found {n}"));
        }
        let mut cols = line.split('\t');
        let label = match cols.next().map(str::trim) {
            Some("1") => 1.0,
            Some("0") => 0.0,
            Some(other) => return Err(format!("label `{other}` is not 0 or 1")),
            None => return Err("no label".into()),
        };
        for (i, col) in cols.enumerate() {
            if col.is_empty() {
                continue;
            }
            let key = if i < CRITEO_INTS {
                let Ok(v) = col.trim().parse::<i64>() else {
                    return Err(format!("I{}: `{col}` is not an integer", i + 1));
                };
                self.tok.clear();
                push_int(&mut self.tok, criteo_bucket(v));
                self.prefixes[i].part(self.tok.as_bytes()).finish()
            } else {
                self.prefixes[i].part(col.as_bytes()).finish()
            };
            feats.push((key, 1.0));
        }
        Ok(label)
    }
}

/// The usual Criteo bucketing: small values kept, larger ones on a
/// log-squared scale so counts spanning decades share a few dozen buckets.
pub(crate) fn criteo_bucket(v: i64) -> i64 {
    if v <= 2 {
        v
    } else {
        let l = (v as f64).ln();
        (l * l).floor() as i64
    }
}

/// Appends the decimal form of `v` (what `write!` would give, minus the
/// `fmt::Write` error that cannot happen on a `String`).
pub(crate) fn push_int(s: &mut String, v: i64) {
    use std::fmt::Write;
    let _ = write!(s, "{v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libsvm_labels() {
        let mut f = Vec::new();
        for (l, want) in [
            ("+1", 1.0),
            ("1", 1.0),
            ("1.0", 1.0),
            ("-1", 0.0),
            ("-1.0", 0.0),
            ("0", 0.0),
        ] {
            assert_eq!(parse_libsvm(l, &mut f), Ok(want), "{l}");
        }
        assert!(parse_libsvm("2 1:1", &mut f).is_err());
        assert!(parse_libsvm("x 1:1", &mut f).is_err());
        assert!(parse_libsvm("   # only", &mut f).is_err());
    }

    #[test]
    fn libsvm_features_and_comments() {
        let mut f = Vec::new();
        assert_eq!(parse_libsvm("1 qid:3 4:0.5 7:2 # c 9:9", &mut f), Ok(1.0));
        assert_eq!(f, vec![(libsvm_key(4), 0.5), (libsvm_key(7), 2.0)]);
        for bad in [
            "1 4", "1 a:1", "1 -3:1", "1 3:x", "1 3:inf", "1 3:NaN", "1 3:1e40",
        ] {
            assert!(parse_libsvm(bad, &mut f).is_err(), "{bad}");
        }
    }

    #[test]
    fn criteo_buckets() {
        assert_eq!(criteo_bucket(-2), -2);
        assert_eq!(criteo_bucket(2), 2);
        assert_eq!(criteo_bucket(3), 1);
        assert_eq!(criteo_bucket(100), 21);
        assert_eq!(criteo_bucket(i64::MAX), 1906);
    }
}
