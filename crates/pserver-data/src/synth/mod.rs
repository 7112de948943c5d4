//! Synthetic click data with a known sparse ground truth, at any scale.
//!
//! A port of the reference generator `synthetic_ctr.py` (its model of the
//! data exactly; its random stream not). Each of a preset's fields has a
//! vocabulary `V`, a Zipf exponent `s`, a presence probability and, for
//! multi-hot "bag" fields, a Poisson length:
//!
//! * a value's rank in `1..=V` is drawn from a bounded power law by
//!   inverting its CDF ([`Zipf`]);
//! * its key is `splitmix64(rank ^ splitmix64(seed ^ (f + 1) * 0x100000001B3))`;
//! * the key's true weight is 0 with probability `1 - rho`, else
//!   `N(0, sigma^2)`, both derived from `splitmix64(key ^ (0xC0FFEE + seed))`,
//!   so no table of weights exists at any size;
//! * `p = sigmoid(b + sum w)` over the row's values (repeats counted), the
//!   label is Bernoulli(`p`), and `b` is bisected on a 200,000-row sample
//!   so that the mean `p` is the preset's CTR.
//!
//! [`generate`] streams: rows are made in chunks ([`GenConfig::chunk_rows`])
//! by several threads, each chunk compressed to a gzip member and appended
//! to its file in order, so memory stays bounded at any row count. It writes
//! `train-00000.libsvm.gz`, ... and `test.libsvm.gz` (LIBSVM lines, one
//! row each, `idx:1` with indices sorted and unique), then `meta.json`
//! ([`Meta`]) last: a directory without it is incomplete. A row depends
//! only on the preset, seed, split and row number, not on the number of
//! files, chunks or threads.

mod distinct;
mod meta;
mod model;
mod ordered;
mod preset;
mod write;

pub use distinct::{BITMAP_MAX, Count, Distinct, EXACT_MAX, SKETCH_K};
pub use meta::{Meta, SplitMeta, base_rate_logloss};
pub use model::{
    CALIBRATION_ROWS, Draw, Part, Row, Synth, Zipf, bisect_bias, calibrate, sigmoid, splitmix64,
};
pub use preset::{Field, PRESETS, Preset, preset};
pub use write::write_line;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per chunk by default: big enough that a gzip member's overhead is
/// nothing, small enough that a few chunks in flight stay ~100 MB.
pub const CHUNK_ROWS: u64 = 65_536;

/// The note the reference adds to the meta of raw-key data.
const RAW_KEYS_NOTE: &str = "indices are raw 64-bit keys (not LIBSVM-tool compatible); \
                             use --bits for liblinear/sklearn/VW";

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// The model of the data.
    pub preset: Preset,
    /// Training rows (at least 1, and at least `files`).
    pub train_rows: u64,
    /// Test rows (at least 1).
    pub test_rows: u64,
    /// Training files the rows are spread over, in order.
    pub files: usize,
    /// Write `(key mod 2^bits) + 1` instead of the raw key; 0 for raw keys,
    /// at most 63.
    pub bits: u32,
    /// Seed of keys, weights and draws.
    pub seed: u64,
    /// Threads generating and compressing chunks.
    pub threads: usize,
    /// Rows per chunk (the unit of work and of gzip members).
    pub chunk_rows: u64,
    /// gzip level, 0-9.
    pub level: u32,
    /// Rows of the sample the bias is calibrated on (the reference's
    /// 200,000; fewer only to make tests quick).
    pub calibration_rows: u64,
}

impl GenConfig {
    /// `train_rows` and `test_rows` of `preset` with the defaults: 4
    /// files, raw keys, seed 1, one thread per core, gzip level 1 (the
    /// text is mostly random digits: level 6 saves a few percent at twice
    /// the time).
    pub fn new(preset: Preset, train_rows: u64, test_rows: u64) -> Self {
        GenConfig {
            preset,
            train_rows,
            test_rows,
            files: 4,
            bits: 0,
            seed: 1,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            chunk_rows: CHUNK_ROWS,
            level: 1,
            calibration_rows: CALIBRATION_ROWS,
        }
    }

    /// Refuses a configuration that cannot be generated.
    pub fn check(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::Config(m));
        if self.train_rows == 0 || self.test_rows == 0 {
            return bad(format!(
                "train and test rows must be at least 1, got {} and {}",
                self.train_rows, self.test_rows
            ));
        }
        if self.files == 0 {
            return bad("files must be at least 1".into());
        }
        if self.files as u64 > self.train_rows {
            return bad(format!(
                "{} files for {} training rows would leave files empty",
                self.files, self.train_rows
            ));
        }
        if self.bits > 63 {
            return bad(format!(
                "bits must be 0 (raw keys) or 1..=63, got {}",
                self.bits
            ));
        }
        if self.threads == 0 || self.chunk_rows == 0 || self.calibration_rows == 0 {
            return bad("threads, chunk rows and calibration rows must be at least 1".into());
        }
        if self.level > 9 {
            return bad(format!("gzip level must be 0..=9, got {}", self.level));
        }
        if self.preset.fields.is_empty() {
            return bad(format!("preset {} has no fields", self.preset.name));
        }
        Ok(())
    }

    /// The names of the files [`generate`] writes, meta.json last.
    pub fn file_names(&self) -> Vec<String> {
        (0..self.files)
            .map(train_file)
            .chain(["test.libsvm.gz".to_string(), "meta.json".to_string()])
            .collect()
    }
}

/// The name of training file `i`.
fn train_file(i: usize) -> String {
    format!("train-{i:05}.libsvm.gz")
}

/// Why generation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SynthError {
    /// The configuration cannot be generated.
    #[error("{0}")]
    Config(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What the OS said.
        #[source]
        source: Arc<io::Error>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SynthError + '_ {
    move |e| SynthError::Io {
        path: path.display().to_string(),
        source: Arc::new(e),
    }
}

/// One unit of work: rows of a part, written to one file.
struct Job {
    part: Part,
    /// Index into the list of output files (training files, then test).
    file: usize,
    rows: Range<u64>,
}

/// The jobs in output order: each training file's chunks, then the test file's.
fn jobs(cfg: &GenConfig) -> Vec<Job> {
    let n = cfg.train_rows;
    let files = cfg.files as u64;
    let mut spans: Vec<(Part, usize, Range<u64>)> = (0..files)
        .map(|i| (Part::Train, i as usize, i * n / files..(i + 1) * n / files))
        .collect();
    spans.push((Part::Test, cfg.files, 0..cfg.test_rows));
    let mut out = Vec::new();
    for (part, file, rows) in spans {
        let mut start = rows.start;
        while start < rows.end {
            let end = rows.end.min(start.saturating_add(cfg.chunk_rows));
            out.push(Job {
                part,
                file,
                rows: start..end,
            });
            start = end;
        }
    }
    out
}

/// Writes the data set `cfg` describes into `dir` (created if missing;
/// files of the same names are replaced, others left alone) and returns
/// its meta. `progress` hears the rows written so far after each chunk.
pub fn generate(
    cfg: &GenConfig,
    dir: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Meta, SynthError> {
    cfg.check()?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let bias = calibrate(&cfg.preset, cfg.seed, cfg.calibration_rows, cfg.threads);
    let synth = Synth::new(&cfg.preset, cfg.seed, cfg.bits, bias);
    let names = cfg.file_names();
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let (train_distinct, test_distinct) = (Distinct::new(&synth), Distinct::new(&synth));
    let jobs = jobs(cfg);

    let mut stats = [meta::Stats::default(); 2];
    let mut open: Option<(usize, BufWriter<File>)> = None;
    let mut written = 0u64;
    ordered::ordered(
        &jobs,
        cfg.threads,
        2 * cfg.threads,
        |job| {
            let distinct = match job.part {
                Part::Test => &test_distinct,
                _ => &train_distinct,
            };
            write::chunk(&synth, job.part, job.rows.clone(), cfg.level, distinct)
        },
        |i, chunk| {
            let job = &jobs[i];
            let path = &paths[job.file];
            let chunk = chunk.map_err(io_err(path))?;
            if open.as_ref().is_none_or(|(f, _)| *f != job.file) {
                if let Some((f, w)) = open.take() {
                    finish(w, &paths[f])?;
                }
                let file = File::create(path).map_err(io_err(path))?;
                open = Some((job.file, BufWriter::with_capacity(1 << 20, file)));
            }
            if let Some((_, w)) = open.as_mut() {
                w.write_all(&chunk.gz).map_err(io_err(path))?;
            }
            stats[usize::from(job.part == Part::Test)].add(&chunk.stats);
            written += chunk.stats.rows;
            progress(written);
            Ok(())
        },
    )?;
    if let Some((f, w)) = open.take() {
        finish(w, &paths[f])?;
    }

    let meta = Meta {
        preset: cfg.preset.name.to_string(),
        bias,
        seed: cfg.seed,
        bits: cfg.bits,
        train: stats[0].meta(train_distinct.count(), names[..cfg.files].to_vec()),
        test: stats[1].meta(test_distinct.count(), vec![names[cfg.files].clone()]),
        note: (cfg.bits == 0).then(|| RAW_KEYS_NOTE.to_string()),
        target_ctr: cfg.preset.ctr,
        generator: "pserver gen: the model of synthetic_ctr.py; random draws from ChaCha8, \
                    one stream per row, not numpy's"
            .to_string(),
    };
    write_meta(&meta, &paths[cfg.files + 1])?;
    Ok(meta)
}

/// Flushes a finished data file.
fn finish(w: BufWriter<File>, path: &Path) -> Result<(), SynthError> {
    let file = w.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))
}

/// Writes `meta.json` through a temporary file and a rename, so a reader
/// sees the whole file or none.
fn write_meta(meta: &Meta, path: &Path) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(meta).map_err(|e| SynthError::Io {
        path: path.display().to_string(),
        source: Arc::new(io::Error::other(e)),
    })?;
    text.push('\n');
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(train: u64, test: u64) -> GenConfig {
        GenConfig {
            threads: 2,
            chunk_rows: 700,
            calibration_rows: 30_000,
            ..GenConfig::new(preset("tiny").unwrap(), train, test)
        }
    }

    fn lines(path: &Path) -> Vec<String> {
        let mut text = String::new();
        io::Read::read_to_string(
            &mut flate2::read::MultiGzDecoder::new(File::open(path).unwrap()),
            &mut text,
        )
        .unwrap();
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = tiny(10, 10);
        assert!(ok.check().is_ok());
        for bad in [
            GenConfig {
                train_rows: 0,
                ..ok.clone()
            },
            GenConfig {
                test_rows: 0,
                ..ok.clone()
            },
            GenConfig {
                files: 0,
                ..ok.clone()
            },
            GenConfig {
                files: 11,
                ..ok.clone()
            },
            GenConfig {
                bits: 64,
                ..ok.clone()
            },
            GenConfig {
                level: 10,
                ..ok.clone()
            },
        ] {
            assert!(matches!(bad.check(), Err(SynthError::Config(_))), "{bad:?}");
        }
    }

    #[test]
    fn jobs_cover_every_row_once_in_file_order() {
        let cfg = GenConfig {
            files: 3,
            ..tiny(5000, 1500)
        };
        let jobs = jobs(&cfg);
        let mut next = [0u64; 2];
        let mut last_file = 0;
        for j in &jobs {
            let p = usize::from(j.part == Part::Test);
            assert_eq!(j.rows.start, next[p]);
            assert!(j.rows.end - j.rows.start <= 700);
            assert!(j.file >= last_file);
            next[p] = j.rows.end;
            last_file = j.file;
        }
        assert_eq!(next, [5000, 1500]);
    }

    #[test]
    fn a_small_data_set_is_written_whole_and_described() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GenConfig {
            files: 3,
            ..tiny(5000, 2000)
        };
        let mut seen = Vec::new();
        let meta = generate(&cfg, dir.path(), &mut |n| seen.push(n)).unwrap();
        assert_eq!(seen.last(), Some(&7000));
        let rows: usize = (0..3)
            .map(|i| lines(&dir.path().join(train_file(i))).len())
            .sum();
        assert_eq!(rows, 5000);
        assert_eq!(lines(&dir.path().join("test.libsvm.gz")).len(), 2000);
        let on_disk = std::fs::read_to_string(dir.path().join("meta.json")).unwrap();
        assert_eq!(on_disk, serde_json::to_string_pretty(&meta).unwrap() + "\n");
        for s in [&meta.train, &meta.test] {
            assert!((s.ctr - 0.3).abs() < 0.03, "{s:?}");
            assert_eq!(s.nnz_mean, 5.0);
            assert!(s.nnz_written_mean <= 5.0 && s.nnz_written_mean > 3.0);
            assert!(s.distinct_keys <= 250 && s.distinct_keys > 150, "{s:?}");
            assert!(s.distinct_keys_exact);
            assert!(s.bayes_logloss < s.base_rate_logloss, "{s:?}");
        }
        assert_eq!(meta.train.files.len(), 3);
        assert!(meta.note.is_some());
    }

    #[test]
    fn rows_do_not_depend_on_files_chunks_or_threads() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = GenConfig {
            files: 1,
            threads: 1,
            chunk_rows: 1000,
            bits: 12,
            ..tiny(3000, 10)
        };
        let three = GenConfig {
            files: 3,
            threads: 2,
            chunk_rows: 333,
            ..one.clone()
        };
        let ma = generate(&one, a.path(), &mut |_| {}).unwrap();
        let mb = generate(&three, b.path(), &mut |_| {}).unwrap();
        let all_b: Vec<String> = (0..3)
            .flat_map(|i| lines(&b.path().join(train_file(i))))
            .collect();
        assert_eq!(lines(&a.path().join(train_file(0))), all_b);
        // The same rows; only the order of the chunk sums differs.
        assert!((ma.train.bayes_logloss - mb.train.bayes_logloss).abs() < 1e-12);
        assert_eq!(ma.train.distinct_keys, mb.train.distinct_keys);
        assert!(ma.note.is_none());
        for line in &all_b {
            for tok in line.split(' ').skip(1) {
                let idx: u64 = tok.strip_suffix(":1").unwrap().parse().unwrap();
                assert!((1..=4096).contains(&idx), "{line}");
            }
        }
    }
}
