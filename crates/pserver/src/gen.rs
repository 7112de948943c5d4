//! `pserver gen`: write a synthetic click data set with a known true model
//! (`pserver_data::synth`): gzip LIBSVM files and `meta.json`, with the
//! Bayes log-loss floor any learner can reach on it.

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pserver_data::synth::{self, GenConfig, PRESETS};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `pserver gen` flags.
#[derive(Args, Debug)]
pub struct GenArgs {
    /// The model of the data: criteo, kdd12, ps or tiny.
    #[arg(long)]
    preset: String,
    /// Training rows.
    #[arg(long)]
    train_rows: u64,
    /// Test rows.
    #[arg(long)]
    test_rows: u64,
    /// Output directory (created if missing; must be empty unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Training files the rows are spread over (train-00000.libsvm.gz, ...).
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Write (key mod 2^B) + 1 instead of raw 64-bit keys (for tools that
    /// want small indices); 0 keeps raw keys.
    #[arg(long, default_value_t = 0)]
    bits: u32,
    /// Seed of keys, true weights and draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Generating threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write into a non-empty directory, replacing an earlier data set there.
    #[arg(long)]
    force: bool,
}

/// Runs `pserver gen`.
pub fn run(args: GenArgs) -> Result<()> {
    let cfg = config(&args)?;
    prepare(&args.out, args.force)?;
    let total = cfg.train_rows + cfg.test_rows;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let meta = synth::generate(&cfg, &args.out, &mut |n| bar.set_position(n))
        .with_context(|| format!("generating into {}", args.out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&meta)?);
    println!(
        "wrote {} train + {} test rows of {} to {} in {secs:.1} s: {:.0} rows/s; \
         Bayes log-loss floor {:.4} (base rate {:.4}) on train",
        meta.train.rows,
        meta.test.rows,
        meta.preset,
        args.out.display(),
        total as f64 / secs.max(1e-9),
        meta.train.bayes_logloss,
        meta.train.base_rate_logloss
    );
    Ok(())
}

/// The library's configuration, refused up front if it cannot be made.
fn config(args: &GenArgs) -> Result<GenConfig> {
    let Some(preset) = synth::preset(&args.preset) else {
        bail!(
            "--preset: unknown preset {:?} (known: {})",
            args.preset,
            PRESETS.join(", ")
        );
    };
    if args.train_rows == 0 || args.test_rows == 0 {
        bail!("--train-rows and --test-rows must be at least 1");
    }
    if args.files == 0 || args.files as u64 > args.train_rows {
        bail!(
            "--files must be in 1..={} (--train-rows), got {}",
            args.train_rows,
            args.files
        );
    }
    if args.bits > 63 {
        bail!("--bits must be 0 (raw keys) or 1..=63, got {}", args.bits);
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let mut cfg = GenConfig::new(preset, args.train_rows, args.test_rows);
    cfg.files = args.files;
    cfg.bits = args.bits;
    cfg.seed = args.seed;
    if let Some(t) = args.threads {
        cfg.threads = t;
    }
    cfg.check()?;
    Ok(cfg)
}

/// Refuses a non-empty `out` unless `force`; with it, removes an earlier
/// data set's files (and only those), so no stale training file is left
/// beside the new ones.
fn prepare(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    let entries: Vec<PathBuf> = match std::fs::read_dir(out) {
        Ok(dir) => dir
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", out.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", out.display())),
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !force {
        bail!(
            "--out {} is not empty ({} entries); pass --force to replace a data set there",
            out.display(),
            entries.len()
        );
    }
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ours = name == "meta.json"
            || name == "test.libsvm.gz"
            || (name.starts_with("train-") && name.ends_with(".libsvm.gz"));
        if ours && path.is_file() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
