//! Sanity check of the bundled flights features: reads the train and test
//! splits, trains logistic regression in-process (SGD with AdaGrad step
//! sizes and a little L2), and prints test AUC and log-loss.
//!
//! ```text
//! cargo run --release -p pserver-data --example flights_auc [-- SCHEMA [DATA [EPOCHS]]]
//! ```

use pserver_data::{Example, Format, ReadOptions, Split};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/nycflights13");
    let mut args = std::env::args().skip(1);
    let schema = args
        .next()
        .map_or_else(|| root.join("flights.toml"), PathBuf::from);
    let data = args
        .next()
        .map_or_else(|| root.join("flights.csv.gz"), PathBuf::from);
    let epochs: usize = args.next().map_or(Ok(3), |s| s.parse())?;

    // writeln! rather than println!, so a closed pipe (`| head`) is an error, not a panic.
    let mut out = std::io::stdout().lock();
    let t = Instant::now();
    let schema = Arc::new(pserver_data::load_schema(&schema)?);
    writeln!(
        out,
        "schema loaded (side tables included) in {:.3} s",
        t.elapsed().as_secs_f64()
    )?;
    let format = Format::Csv(schema);
    let read = |split| {
        let t = Instant::now();
        let opts = ReadOptions {
            split,
            ..ReadOptions::default()
        };
        let r = pserver_data::read_all(&data, &format, &opts);
        (r, t.elapsed().as_secs_f64())
    };
    let (train, secs) = read(Split::Train);
    let (train, stats) = train?;
    writeln!(
        out,
        "train: {} examples in {secs:.3} s (lines {}, no label {}, bad {}, elsewhere {})",
        stats.examples, stats.lines, stats.skipped, stats.bad, stats.elsewhere
    )?;
    let (test, secs) = read(Split::Test);
    let (test, tstats) = test?;
    writeln!(out, "test: {} examples in {secs:.3} s", tstats.examples)?;
    let nnz: usize = train.iter().map(|e| e.keys.len()).sum();
    writeln!(
        out,
        "features per example: {:.1}",
        nnz as f64 / train.len().max(1) as f64
    )?;

    let t = Instant::now();
    let w = train_lr(&train, epochs);
    writeln!(
        out,
        "trained {epochs} epochs in {:.2} s, {} weights",
        t.elapsed().as_secs_f64(),
        w.len()
    )?;
    let (auc, ll) = evaluate(&w, &test);
    writeln!(out, "test AUC {auc:.4}  log-loss {ll:.4}")?;
    let (auc, ll) = evaluate(&w, &train);
    writeln!(out, "train AUC {auc:.4}  log-loss {ll:.4}")?;
    Ok(())
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn margin(w: &HashMap<u64, f64>, e: &Example) -> f64 {
    e.keys
        .iter()
        .zip(&e.vals)
        .map(|(k, &v)| w.get(k).copied().unwrap_or(0.0) * v as f64)
        .sum()
}

fn train_lr(data: &[Example], epochs: usize) -> HashMap<u64, f64> {
    // Dense slots for speed; the map is built once.
    let mut slot: HashMap<u64, usize> = HashMap::new();
    for e in data {
        for &k in &e.keys {
            let n = slot.len();
            slot.entry(k).or_insert(n);
        }
    }
    let rows: Vec<Vec<(usize, f64)>> = data
        .iter()
        .map(|e| {
            e.keys
                .iter()
                .zip(&e.vals)
                .map(|(k, &v)| (slot[k], v as f64))
                .collect()
        })
        .collect();
    let mut w = vec![0.0f64; slot.len()];
    let mut g2 = vec![1e-6f64; slot.len()];
    let (lr, l2) = (0.05, 1e-6);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..epochs {
        for i in (1..order.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        for &r in &order {
            let m: f64 = rows[r].iter().map(|&(s, v)| w[s] * v).sum();
            let g = sigmoid(m) - data[r].label as f64;
            for &(s, v) in &rows[r] {
                let gi = g * v + l2 * w[s];
                g2[s] += gi * gi;
                w[s] -= lr * gi / g2[s].sqrt();
            }
        }
    }
    slot.into_iter().map(|(k, s)| (k, w[s])).collect()
}

fn evaluate(w: &HashMap<u64, f64>, data: &[Example]) -> (f64, f64) {
    let mut scored: Vec<(f64, bool)> = data.iter().map(|e| (margin(w, e), e.label > 0.5)).collect();
    let ll = scored
        .iter()
        .map(|&(m, y)| {
            let p = sigmoid(m).clamp(1e-12, 1.0 - 1e-12);
            if y { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum::<f64>()
        / scored.len().max(1) as f64;
    // AUC by ranks, ties averaged.
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut pos) = (0.0, 0.0);
    let mut i = 0;
    while i < scored.len() {
        let mut j = i;
        while j < scored.len() && scored[j].0 == scored[i].0 {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0;
        for s in &scored[i..j] {
            if s.1 {
                rank_sum += avg;
                pos += 1.0;
            }
        }
        i = j;
    }
    let neg = scored.len() as f64 - pos;
    let auc = (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg).max(1.0);
    (auc, ll)
}
