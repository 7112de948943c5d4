//! Asynchronous minibatch SGD with FTRL-Proximal on the servers, one
//! worker's side: for each minibatch, pull the weights of its keys, compute
//! the logistic-loss gradient, push it; the `ftrl` updater on the servers
//! keeps the per-coordinate state. Bounded delay or eventual consistency
//! lets workers run ahead of each other.

use crate::dataset::Dataset;
use crate::metrics::{logistic_loss, sigmoid};
use crate::progress::{IterStats, Progress};
use pserver_node::NodeError;
use pserver_node::worker::{Keys, Op, Request, Worker};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What one worker needs to know.
#[derive(Clone, Debug)]
pub struct FtrlConfig {
    /// The weights table (updater `ftrl`).
    pub table: String,
    /// Passes over the data.
    pub epochs: usize,
    /// Minibatches per epoch, the same on every worker so that clocks line
    /// up (a worker with fewer rows pushes smaller batches).
    pub batches: usize,
}

/// Runs the worker's minibatches on `data` and reports each on `progress`.
pub async fn run_worker(
    w: &Worker,
    index: usize,
    data: &Dataset,
    cfg: &FtrlConfig,
    progress: &UnboundedSender<Progress>,
) -> Result<(), NodeError> {
    let n = data.rows();
    let batches = cfg.batches.max(1);
    // Column -> position in the current batch's key list, or u32::MAX.
    let mut slot = vec![u32::MAX; data.keys.len()];
    let mut clock = 0u64;
    for _epoch in 0..cfg.epochs {
        for b in 0..batches {
            let busy_start = Instant::now();
            let rows = (n * b / batches)..(n * (b + 1) / batches);
            let mut cols: Vec<u32> = Vec::new();
            for r in rows.clone() {
                for e in data.row_ptr[r]..data.row_ptr[r + 1] {
                    let c = data.cols[e];
                    if slot[c as usize] == u32::MAX {
                        slot[c as usize] = 0;
                        cols.push(c);
                    }
                }
            }
            // Local ids are in key order, so sorting them sorts the keys.
            cols.sort_unstable();
            for (i, &c) in cols.iter().enumerate() {
                slot[c as usize] = i as u32;
            }
            let keys: Vec<u64> = cols.iter().map(|&c| data.keys[c as usize]).collect();
            let mut busy = busy_start.elapsed();

            clock += 1;
            w.set_clock(clock);
            let waited = Instant::now();
            let weights = if keys.is_empty() {
                Vec::new()
            } else {
                w.send(Request {
                    table: cfg.table.clone(),
                    op: Op::Pull,
                    keys: Keys::List(keys.clone()),
                    vals: Vec::new(),
                    clock: Some(clock - 1),
                    consistency: None,
                })
                .await?
                .vals
            };
            let mut wait = waited.elapsed();

            let compute = Instant::now();
            let mut grad = vec![0f32; keys.len()];
            let mut loss = 0.0;
            for r in rows.clone() {
                let span = data.row_ptr[r]..data.row_ptr[r + 1];
                let m: f64 = span
                    .clone()
                    .map(|e| {
                        data.vals[e] as f64 * weights[slot[data.cols[e] as usize] as usize] as f64
                    })
                    .sum();
                let y = data.labels[r] as f64;
                loss += logistic_loss(m, y);
                let d = (sigmoid(m) - y) as f32;
                for e in span {
                    grad[slot[data.cols[e] as usize] as usize] += d * data.vals[e];
                }
            }
            for &c in &cols {
                slot[c as usize] = u32::MAX;
            }
            busy += compute.elapsed();

            let waited = Instant::now();
            let pushed = keys.len();
            w.push(&cfg.table, keys, grad).await?;
            wait += waited.elapsed();
            let _ = progress.send(Progress::Iter(IterStats {
                worker: index,
                iteration: clock,
                loss,
                rows: rows.len(),
                pushed,
                filtered: 0,
                busy,
                wait,
            }));
        }
    }
    Ok(())
}
