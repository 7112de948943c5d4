//! The figures of a training run: the short table `pserver train` prints,
//! and the JSON file `--report` writes (every figure of the table plus the
//! convergence curve), and the SVG `--plot` writes.
//!
//! Floats that may be undefined (a NaN log-loss of an empty test set) are
//! written as JSON `null` and read back as NaN, so every report that can be
//! written can be read.

pub use crate::plot::CurvePoint;
use crate::plot::finite_or_null;
use pserver_node::durable::{Disk, DurableError, FileSystem};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Why a report could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The operating system refused.
    #[error("{}: cannot {op}: {os}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        os: io::Error,
    },
    /// A file could not be written durably.
    #[error(transparent)]
    Write(#[from] DurableError),
    /// The file is not a report.
    #[error("{}: invalid report: {os}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        os: serde_json::Error,
    },
}

/// Everything measured in one training run, and the settings it ran with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Algorithm (`dbpg` or `ftrl`).
    pub algo: String,
    /// Training data file.
    pub train_path: String,
    /// Test data file; `None` when the test set is a held-out split of the
    /// training file.
    #[serde(default)]
    pub test_path: Option<String>,
    /// Server nodes.
    pub servers: usize,
    /// Worker nodes.
    pub workers: usize,
    /// Bounded delay (0: sequential; `u64::MAX`: eventual).
    pub tau: u64,
    /// L1 regularization strength.
    pub l1: f32,
    /// L2 regularization strength.
    pub l2: f32,
    /// Key-range blocks (DBPG).
    pub blocks: usize,
    /// Passes over the training data.
    pub epochs: usize,
    /// Training examples over all workers.
    pub train_examples: u64,
    /// Test examples scored.
    pub test_examples: u64,
    /// Input lines refused by the readers.
    pub bad_lines: u64,
    /// Test log-loss (nats per example) at the end.
    #[serde(with = "finite_or_null")]
    pub test_logloss: f64,
    /// Test ROC AUC at the end.
    #[serde(with = "finite_or_null")]
    pub test_auc: f64,
    /// Test accuracy at threshold 0.5, as a fraction.
    #[serde(with = "finite_or_null")]
    pub test_accuracy: f64,
    /// Non-zero weights of the trained model.
    pub nnz: u64,
    /// Wall time of training (loading excluded), in seconds.
    #[serde(with = "finite_or_null")]
    pub seconds: f64,
    /// Wall time of loading the data, in seconds.
    #[serde(default, with = "finite_or_null")]
    pub load_seconds: f64,
    /// Training examples processed per second of training
    /// (`train_examples * epochs / seconds`).
    #[serde(with = "finite_or_null")]
    pub examples_per_sec: f64,
    /// Bytes the workers sent.
    pub bytes_sent: u64,
    /// Bytes the workers received.
    pub bytes_received: u64,
    /// Bytes the filters kept off the wire.
    pub bytes_saved: u64,
    /// Fraction of worker time spent waiting in push and pull (consistency
    /// waits included), in [0, 1].
    #[serde(with = "finite_or_null")]
    pub wait_fraction: f64,
    /// The part of `wait_fraction` spent handing messages to the
    /// connections (slicing, encoding, queueing): sending, not idling.
    #[serde(default, with = "finite_or_null")]
    pub send_fraction: f64,
    /// Objective and test scores against time, in time order.
    pub curve: Vec<CurvePoint>,
    /// `--tune`: the choice and the validation curve (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<crate::tune::TuneReport>,
    /// Each worker process's peak resident set size in bytes (`VmHWM`),
    /// in the order they were taken in; empty when the workers ran in the
    /// scheduler's process.
    #[serde(default)]
    pub peak_rss_per_worker: Vec<u64>,
    /// Bytes the workers held their shards in (with the algorithm's state
    /// over them) per non-zero, after loading.
    #[serde(default, with = "finite_or_null")]
    pub shard_bytes_per_nnz: f64,
}

impl Report {
    /// The short human-readable table: a heading line with the settings,
    /// then one aligned `name  value` row per figure, each with its unit.
    pub fn table(&self) -> String {
        let tau = if self.tau == u64::MAX {
            "inf".to_string()
        } else {
            self.tau.to_string()
        };
        let mut rows: Vec<(&str, String)> = vec![
            ("test log-loss", fixed(self.test_logloss, 4, "")),
            ("test AUC", fixed(self.test_auc, 4, "")),
            ("accuracy", fixed(self.test_accuracy * 100.0, 2, " %")),
            ("non-zero weights", thousands(self.nnz)),
            (
                "examples",
                format!(
                    "{} train, {} test",
                    thousands(self.train_examples),
                    thousands(self.test_examples)
                ),
            ),
            (
                "examples/s",
                format!("{} ex/s", format_count(self.examples_per_sec)),
            ),
            ("seconds", fixed(self.seconds, 2, " s")),
            ("bytes sent", format_bytes(self.bytes_sent)),
            ("bytes received", format_bytes(self.bytes_received)),
            (
                "bytes saved",
                format!("{} by filters", format_bytes(self.bytes_saved)),
            ),
            (
                "waiting",
                fixed(self.wait_fraction * 100.0, 1, " % of worker time"),
            ),
        ];
        // Memory per worker process, when the workers were processes.
        if let (Some(min), Some(max)) = (
            self.peak_rss_per_worker.iter().min(),
            self.peak_rss_per_worker.iter().max(),
        ) {
            rows.push((
                "peak RSS",
                format!(
                    "{} max per worker ({} min, {} workers)",
                    format_bytes(*max),
                    format_bytes(*min),
                    self.peak_rss_per_worker.len()
                ),
            ));
            rows.push((
                "shard memory",
                fixed(self.shard_bytes_per_nnz, 2, " B per non-zero"),
            ));
        }
        // Refused lines matter only when there are some.
        if self.bad_lines > 0 {
            rows.push(("bad lines", thousands(self.bad_lines)));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = format!(
            "{} on {}: {} servers, {} workers, tau {}, l1 {}, l2 {}, {} blocks, {} epochs\n",
            self.algo,
            self.train_path,
            self.servers,
            self.workers,
            tau,
            self.l1,
            self.l2,
            self.blocks,
            self.epochs
        );
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        out
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail; the fallback
        // only keeps this function total.
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }

    /// Writes the JSON report to `path` atomically (a temporary file in the
    /// same directory, synced, then renamed), so a reader never sees half a
    /// report.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let text = serde_json::to_vec_pretty(self).map_err(|source| ReportError::Json {
            path: path.to_path_buf(),
            os: source,
        })?;
        Disk::new().write_atomic_with(path, &mut |w| {
            w.write_all(&text)?;
            w.write_all(b"\n")
        })?;
        Ok(())
    }

    /// Reads a report written by [`Report::write_json`].
    pub fn read_json(path: &Path) -> Result<Report, ReportError> {
        let text = std::fs::read(path).map_err(|source| ReportError::Io {
            path: path.to_path_buf(),
            op: "read",
            os: source,
        })?;
        serde_json::from_slice(&text).map_err(|source| ReportError::Json {
            path: path.to_path_buf(),
            os: source,
        })
    }

    /// The convergence curve as SVG (see [`crate::plot::svg`]), titled with
    /// the algorithm and the training file.
    pub fn svg(&self) -> String {
        crate::plot::svg(
            &self.curve,
            &format!("{} on {}", self.algo, self.train_path),
        )
    }

    /// Writes [`Report::svg`] to `path` atomically.
    pub fn write_svg(&self, path: &Path) -> Result<(), ReportError> {
        let text = self.svg();
        Ok(Disk::new().write_atomic(path, text.as_bytes())?)
    }
}

/// Builds the curve from the objective, one `(seconds, iteration,
/// objective)` per iteration, and the test scores, one `(seconds, auc,
/// logloss)` per evaluation. Both are put in time order; a test score at
/// the same instant as an objective point joins it, any other becomes a
/// point of its own with a NaN objective and the last iteration reached by
/// then.
pub fn merge_curve(objective: &[(f64, u64, f64)], test: &[(f64, f64, f64)]) -> Vec<CurvePoint> {
    let mut obj = objective.to_vec();
    obj.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut tst = test.to_vec();
    tst.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut out = Vec::with_capacity(obj.len() + tst.len());
    let (mut i, mut j) = (0, 0);
    let mut iteration = 0;
    while i < obj.len() || j < tst.len() {
        let next_obj = obj.get(i);
        let next_test = tst.get(j);
        let point = match (next_obj, next_test) {
            (Some(&(s, it, o)), Some(&(ts, auc, ll))) if s.total_cmp(&ts).is_eq() => {
                i += 1;
                j += 1;
                iteration = it;
                CurvePoint {
                    seconds: s,
                    objective: o,
                    test_auc: Some(auc),
                    test_logloss: Some(ll),
                    iteration: it,
                }
            }
            (Some(&(s, it, o)), t) if t.is_none_or(|t| s.total_cmp(&t.0).is_lt()) => {
                i += 1;
                iteration = it;
                CurvePoint {
                    seconds: s,
                    objective: o,
                    test_auc: None,
                    test_logloss: None,
                    iteration: it,
                }
            }
            (_, Some(&(ts, auc, ll))) => {
                j += 1;
                CurvePoint {
                    seconds: ts,
                    objective: f64::NAN,
                    test_auc: Some(auc),
                    test_logloss: Some(ll),
                    iteration,
                }
            }
            // Both exhausted: the loop condition rules this out.
            (_, None) => break,
        };
        out.push(point);
    }
    out
}

/// A byte count in decimal units with three significant digits:
/// `512 B`, `1.23 kB`, `45.6 MB`, `789 GB`.
pub fn format_bytes(bytes: u64) -> String {
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    scaled(
        bytes as f64,
        &["B", "kB", "MB", "GB", "TB", "PB", "EB"],
        " ",
    )
}

/// A rate or count with an SI suffix and three significant digits:
/// `512`, `45.6K`, `1.20M`, `3.00G`; `n/a` when not finite.
pub fn format_count(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    if v.abs() < 1000.0 {
        return three_digits(v);
    }
    scaled(v, &["", "K", "M", "G", "T", "P", "E"], "")
}

/// `v` divided by the largest power of 1000 that leaves at least 1, with
/// that power's unit. Deciding after rounding keeps 999,999 from printing
/// as "1000K" instead of "1.00M".
fn scaled(v: f64, units: &[&str], sep: &str) -> String {
    let mut x = v;
    for (i, unit) in units.iter().enumerate() {
        let text = three_digits(x);
        let last = i + 1 == units.len();
        if last
            || text
                .trim_start_matches('-')
                .parse::<f64>()
                .is_ok_and(|t| t < 1000.0)
        {
            return format!("{text}{sep}{unit}");
        }
        x /= 1000.0;
    }
    three_digits(v)
}

/// Three significant digits for magnitudes under 1000 (more digits only
/// above that).
fn three_digits(v: f64) -> String {
    let a = v.abs();
    if a < 10.0 {
        format!("{v:.2}")
    } else if a < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// `v` with `decimals` decimals and `unit`, or `n/a` when not finite.
fn fixed(v: f64, decimals: usize, unit: &str) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}{unit}")
    } else {
        "n/a".to_string()
    }
}

/// An integer with thousands separators: `18,600`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            algo: "dbpg".into(),
            train_path: "flights.train".into(),
            test_path: Some("flights.test".into()),
            servers: 4,
            workers: 2,
            tau: 2,
            l1: 0.5,
            l2: 0.1,
            blocks: 8,
            epochs: 10,
            train_examples: 262_144,
            test_examples: 65_536,
            bad_lines: 3,
            test_logloss: 0.42791,
            test_auc: 0.81104,
            test_accuracy: 0.80123,
            nnz: 18_600,
            seconds: 4.0213,
            load_seconds: 0.75,
            examples_per_sec: 45_612.0,
            bytes_sent: 1_234_567,
            bytes_received: 45_600_000,
            bytes_saved: 789_000,
            wait_fraction: 0.123,
            send_fraction: 0.05,
            tune: None,
            curve: merge_curve(
                &[(0.5, 1, 0.69), (1.0, 2, 0.5), (2.0, 3, 0.45)],
                &[(1.0, 0.78, 0.48), (1.5, 0.79, 0.47)],
            ),
            peak_rss_per_worker: vec![1_210_000_000, 1_180_000_000],
            shard_bytes_per_nnz: 4.567,
        }
    }

    #[test]
    fn json_has_the_required_keys() {
        let r = sample();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        for key in [
            "algo",
            "train_path",
            "test_path",
            "servers",
            "workers",
            "tau",
            "l1",
            "l2",
            "blocks",
            "epochs",
            "train_examples",
            "test_examples",
            "bad_lines",
            "test_logloss",
            "test_auc",
            "test_accuracy",
            "nnz",
            "seconds",
            "examples_per_sec",
            "bytes_sent",
            "bytes_received",
            "bytes_saved",
            "wait_fraction",
            "send_fraction",
            "curve",
            "peak_rss_per_worker",
            "shard_bytes_per_nnz",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["test_auc"], 0.81104);
        assert_eq!(v["nnz"], 18_600);
        assert_eq!(v["l1"], 0.5);
        let curve = v["curve"].as_array().unwrap();
        assert_eq!(curve.len(), 4);
        for key in ["seconds", "objective", "test_auc", "iteration"] {
            assert!(curve[0].get(key).is_some(), "curve point lacks {key}");
        }
    }

    #[test]
    fn write_and_read_json() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run.json");
        let mut r = sample();
        r.write_json(&path).unwrap();
        // Compared as JSON: the curve's test-only point has a NaN
        // objective, and NaN is not equal to itself.
        assert_eq!(Report::read_json(&path).unwrap().to_json(), r.to_json());
        // Undefined figures survive as null and come back as NaN.
        r.test_logloss = f64::NAN;
        r.seconds = f64::INFINITY;
        r.write_json(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"test_logloss\": null"), "{text}");
        let back = Report::read_json(&path).unwrap();
        assert!(back.test_logloss.is_nan() && back.seconds.is_nan());
        assert!(back.curve[2].objective.is_nan());
        // Only the report is left in the directory: no temporary file.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_json_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("no/such/dir/run.json");
        let e = sample().write_json(&path).unwrap_err();
        assert!(matches!(e, ReportError::Write(_)));
        assert!(e.to_string().contains("run.json"));
        let bad = tmp.path().join("bad.json");
        std::fs::write(&bad, "{}").unwrap();
        assert!(matches!(
            Report::read_json(&bad),
            Err(ReportError::Json { .. })
        ));
    }

    #[test]
    fn table_contains_each_figure() {
        let t = sample().table();
        for figure in [
            "dbpg on flights.train",
            "4 servers",
            "2 workers",
            "tau 2",
            "0.4279",
            "0.8110",
            "80.12 %",
            "18,600",
            "262,144 train, 65,536 test",
            "45.6K ex/s",
            "4.02 s",
            "1.23 MB",
            "45.6 MB",
            "789 kB by filters",
            "12.3 % of worker time",
            "1.21 GB max per worker (1.18 GB min, 2 workers)",
            "4.57 B per non-zero",
            "bad lines",
        ] {
            assert!(t.contains(figure), "{figure:?} not in\n{t}");
        }
        // Two aligned columns: every value starts in the same column.
        let cols: Vec<usize> = t
            .lines()
            .skip(1)
            .map(|l| {
                l.find("  ").unwrap()
                    + 2
                    + l[l.find("  ").unwrap() + 2..]
                        .find(|c: char| c != ' ')
                        .unwrap()
            })
            .collect();
        assert!(cols.windows(2).all(|w| w[0] == w[1]), "{t}");
    }

    #[test]
    fn table_of_undefined_figures() {
        let r = Report {
            test_logloss: f64::NAN,
            test_auc: f64::NAN,
            tau: u64::MAX,
            ..Report::default()
        };
        let t = r.table();
        assert!(t.contains("n/a") && t.contains("tau inf"));
        assert!(!t.contains("NaN") && !t.contains("bad lines"));
        assert!(!t.contains("peak RSS") && !t.contains("shard memory"));
    }

    #[test]
    fn merge_curve_interleaves_by_time() {
        let c = sample().curve;
        let summary: Vec<(f64, bool, Option<f64>, u64)> = c
            .iter()
            .map(|p| (p.seconds, p.objective.is_finite(), p.test_auc, p.iteration))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0.5, true, None, 1),
                (1.0, true, Some(0.78), 2),
                (1.5, false, Some(0.79), 2),
                (2.0, true, None, 3),
            ]
        );
        assert_eq!(c[1].test_logloss, Some(0.48));
        assert!(merge_curve(&[], &[]).is_empty());
        let only_test = merge_curve(&[], &[(1.0, 0.5, 0.7), (0.0, 0.4, 0.8)]);
        assert_eq!(only_test.len(), 2);
        assert_eq!(only_test[0].seconds, 0.0);
        assert_eq!(only_test[0].iteration, 0);
    }

    #[test]
    fn svg_of_a_report() {
        let r = sample();
        let doc = r.svg();
        assert!(doc.starts_with("<?xml") && doc.contains("dbpg on flights.train"));
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("curve.svg");
        r.write_svg(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), doc);
    }

    #[test]
    fn human_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(1000), "1.00 kB");
        assert_eq!(format_bytes(1_234_567), "1.23 MB");
        assert_eq!(format_bytes(999_999), "1.00 MB");
        assert_eq!(format_bytes(u64::MAX), "18.4 EB");
        assert_eq!(format_count(512.3), "512");
        assert_eq!(format_count(45_612.0), "45.6K");
        assert_eq!(format_count(1_199_999.0), "1.20M");
        assert_eq!(format_count(f64::NAN), "n/a");
        assert_eq!(format_count(1e30), "1000000000000E");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
    }
}
