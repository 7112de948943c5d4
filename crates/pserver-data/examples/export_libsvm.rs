//! Exports the train and test splits of a data file read with a format (and,
//! for CSV, a schema) as two LIBSVM files, so other tools (liblinear, ...)
//! can be run on exactly the examples pserver sees.
//!
//! ```text
//! cargo run --release -p pserver-data --example export_libsvm -- SCHEMA.toml DATA.csv[.gz] OUTDIR
//! ```
//!
//! Writes `OUTDIR/train.svm` and `OUTDIR/test.svm`: labels `+1`/`-1`, the
//! `u64` feature keys renumbered `1..=n` by a dictionary built over both
//! splits (in ascending key order; keys only seen in test get indices too,
//! which is harmless), features sorted by index. No bias feature is written:
//! a learner adds its own (liblinear `-B 1`, pserver always). The train and
//! test splits are the schema's seeded `[split]`, the same ones `pserver
//! train` uses when given no `--test`.

use pserver_data::{Example, Format, ReadOptions, Split};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        return Err("usage: export_libsvm SCHEMA.toml DATA OUTDIR".into());
    }
    let format = Format::Csv(Arc::new(pserver_data::load_schema(Path::new(&args[0]))?));
    let data = PathBuf::from(&args[1]);
    let out = PathBuf::from(&args[2]);
    std::fs::create_dir_all(&out)?;

    let read = |split| -> Result<Vec<Example>, Box<dyn std::error::Error>> {
        let t = Instant::now();
        let opts = ReadOptions {
            split,
            bias: false,
            ..ReadOptions::default()
        };
        let (v, stats) = pserver_data::read_all(&data, &format, &opts)?;
        eprintln!(
            "{split:?}: {} examples in {:.2} s (lines {}, no label {}, bad {}, elsewhere {})",
            stats.examples,
            t.elapsed().as_secs_f64(),
            stats.lines,
            stats.skipped,
            stats.bad,
            stats.elsewhere
        );
        Ok(v)
    };
    let train = read(Split::Train)?;
    let test = read(Split::Test)?;

    // Dictionary over both splits, in ascending key order (deterministic).
    let mut dict: BTreeMap<u64, u32> = BTreeMap::new();
    for e in train.iter().chain(&test) {
        for &k in &e.keys {
            dict.insert(k, 0);
        }
    }
    for (i, v) in dict.values_mut().enumerate() {
        *v = u32::try_from(i + 1)?;
    }
    eprintln!("{} distinct features", dict.len());

    for (name, rows) in [("train.svm", &train), ("test.svm", &test)] {
        let path = out.join(name);
        let mut w = BufWriter::new(File::create(&path)?);
        let mut feats: Vec<(u32, f32)> = Vec::new();
        let mut nnz = 0usize;
        for e in rows.iter() {
            feats.clear();
            feats.extend(e.keys.iter().zip(&e.vals).map(|(k, &v)| (dict[k], v)));
            feats.sort_unstable_by_key(|&(i, _)| i);
            nnz += feats.len();
            w.write_all(if e.label > 0.5 { b"+1" } else { b"-1" })?;
            for &(i, v) in &feats {
                write!(w, " {i}:{v}")?;
            }
            w.write_all(b"\n")?;
        }
        w.flush()?;
        eprintln!(
            "wrote {} ({} rows, {:.1} features per row)",
            path.display(),
            rows.len(),
            nnz as f64 / rows.len().max(1) as f64
        );
    }
    Ok(())
}
