//! Training data for pserver, read as a stream.
//!
//! Readers turn LIBSVM/SVMlight text, Criteo-style TSV, or CSV described by
//! a TOML [`Schema`] into [`Example`]s of hashed sparse features for
//! logistic regression. Input may be plain, gzip or zstd (detected by magic
//! bytes); a file is never loaded whole, so it may be larger than memory.
//!
//! ```no_run
//! use pserver_data::{Format, ReadOptions, Shard, Split};
//! # fn main() -> Result<(), pserver_data::DataError> {
//! let opts = ReadOptions { shard: Shard { index: 0, count: 4 }, ..ReadOptions::default() };
//! let mut reader = pserver_data::open("train.svm.gz".as_ref(), &Format::Libsvm, &opts)?;
//! for ex in reader.by_ref() {
//!     let _ = (ex.label, ex.keys, ex.vals);
//! }
//! if let Some(e) = reader.error() {
//!     return Err(e.clone()); // bad lines are in reader.stats(); this is fatal
//! }
//! # Ok(()) }
//! ```
//!
//! [`synth`] goes the other way: it writes synthetic click data of any
//! size, with a known true model, as gzip LIBSVM files.
//!
//! Keys are `u64` below `u64::MAX`, spread uniformly over the key space,
//! since servers own ranges of a ring of raw keys; the hash is fixed forever
//! (see [`hash`]).

mod csv;
mod error;
pub mod hash;
mod reader;
pub mod schema;
mod source;
pub mod synth;
mod text;

pub use error::DataError;
pub use hash::BIAS_KEY;
pub use reader::{MAX_BAD_KEPT, Reader};
pub use schema::{Schema, load_schema};

use std::path::Path;
use std::sync::Arc;

/// One training example.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Example {
    /// 0 or 1.
    pub label: f32,
    /// Feature keys, unique and sorted ascending; all `< u64::MAX`.
    pub keys: Vec<u64>,
    /// The value of each key (hashed features: 1, or a sum where features
    /// collided or repeated).
    pub vals: Vec<f32>,
}

/// How to read a file.
#[derive(Clone, Debug)]
pub enum Format {
    /// `label idx:val ... [# comment]`, labels -1/+1 or 0/1.
    Libsvm,
    /// `label \t I1..I13 \t C1..C26`, tab-separated, empty fields allowed.
    Criteo,
    /// CSV with a header, read as the schema says.
    Csv(Arc<Schema>),
}

/// Which share of the data lines a reader keeps: line `n` (0-based among
/// data lines) iff `n % count == index`. Works on compressed input, and the
/// shards of `count` readers partition the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This reader's share, `< count`.
    pub index: usize,
    /// Number of shares, `>= 1`.
    pub count: usize,
}

impl Default for Shard {
    /// The whole file.
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// Which part of a holdout split a reader keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Split {
    /// Every line.
    #[default]
    All,
    /// Lines not held out.
    Train,
    /// Held-out lines.
    Test,
}

/// A seeded holdout: data line `n` is a test line iff the `n`-th output of
/// SplitMix64 seeded with `seed`, scaled to `[0, 1)`, is below
/// `test_fraction` (see [`hash::in_test`]). Deterministic and independent
/// of sharding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Holdout {
    /// Fraction of lines held out, in `[0, 1]`.
    pub test_fraction: f64,
    /// Seed.
    pub seed: u64,
}

/// A second seeded holdout carved out of the lines the first one keeps (a
/// validation split of the training part): of the lines the shard and
/// [`ReadOptions::split`] keep, line `n` is a validation line iff
/// [`hash::in_test`]`(n, seed ^ VALIDATION_SALT, fraction)`. The salt makes
/// its draws independent of a schema split with the same seed, so the
/// validation lines are a `fraction` of the training lines, never of the
/// test lines.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Validation {
    /// Fraction of the kept lines that are validation lines, in `[0, 1]`.
    pub fraction: f64,
    /// Seed.
    pub seed: u64,
    /// Which side to keep: `Train` (the lines not in validation), `Test`
    /// (the validation lines), or `All`.
    pub keep: Split,
}

/// Mixed into [`Validation::seed`] (see there).
pub const VALIDATION_SALT: u64 = 0x5641_4c49_4441_5445; // "VALIDATE"

/// Options of [`open`].
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Which share of the lines to keep.
    pub shard: Shard,
    /// Which part of the holdout to keep; `Train`/`Test` need a holdout.
    pub split: Split,
    /// The holdout; `None` takes the CSV schema's `[split]`, if any. Set it
    /// to split LIBSVM or Criteo files, or to override a schema's.
    pub holdout: Option<Holdout>,
    /// A validation split inside what `split` keeps; `None`: none.
    pub validation: Option<Validation>,
    /// Add the bias feature [`BIAS_KEY`] (value 1) to every example.
    pub bias: bool,
    /// Longest line (or CSV record) read; a longer one is a bad line. Keeps
    /// memory bounded on input that is not line-structured.
    pub max_line_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            shard: Shard::default(),
            split: Split::All,
            holdout: None,
            validation: None,
            bias: true,
            max_line_bytes: 16 << 20,
        }
    }
}

/// Counts of a read.
///
/// Every data line (not the CSV header, blank lines or LIBSVM comment
/// lines) is counted in `lines`, and in exactly one of the others:
/// `lines == examples + skipped + bad + elsewhere`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadStats {
    /// Data lines read (for CSV: records, which may span lines).
    pub lines: u64,
    /// Examples produced.
    pub examples: u64,
    /// Lines of this shard and split without a label (CSV: the label field
    /// is NA or empty, e.g. cancelled flights). Not malformed; just unusable.
    pub skipped: u64,
    /// Malformed lines of this shard and split (not parsed at all for other
    /// shards, so not judged there).
    pub bad: u64,
    /// Lines left to other shards or to the other part of the split.
    pub elsewhere: u64,
    /// The first [`MAX_BAD_KEPT`] bad lines.
    pub first_bad: Vec<BadLine>,
}

/// A malformed line that was skipped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadLine {
    /// The file.
    pub path: String,
    /// 1-based line number in the decompressed file (the first line of a
    /// CSV record that spans several).
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.message)
    }
}

/// Opens `path` for streaming. Fails at once if the file cannot be opened,
/// the options are inconsistent, or (CSV) the header does not fit the schema.
pub fn open(path: &Path, format: &Format, opts: &ReadOptions) -> Result<Reader, DataError> {
    Reader::open(path, format, opts)
}

/// Reads a whole file into memory (convenient for tests and small files).
pub fn read_all(
    path: &Path,
    format: &Format,
    opts: &ReadOptions,
) -> Result<(Vec<Example>, ReadStats), DataError> {
    let mut r = open(path, format, opts)?;
    let v: Vec<Example> = r.by_ref().collect();
    match r.error() {
        Some(e) => Err(e.clone()),
        None => Ok((v, r.stats().clone())),
    }
}
