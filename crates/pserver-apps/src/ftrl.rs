//! Asynchronous minibatch SGD with FTRL-Proximal on the servers, one
//! worker's side: for each minibatch, pull the weights of its keys, compute
//! the logistic-loss gradient, push it; the `ftrl` updater on the servers
//! keeps the per-coordinate state. Bounded delay or eventual consistency
//! lets workers run ahead of each other.

use crate::dataset::Dataset;
use crate::job::proto::StepStats;
use crate::metrics::{logistic_loss, sigmoid};
use pserver_node::NodeError;
use pserver_node::worker::{Keys, Op, Request, Worker};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What one worker needs to know.
#[derive(Clone, Debug)]
pub struct FtrlConfig {
    /// The weights table (updater `ftrl`).
    pub table: String,
    /// Minibatches per epoch, the same on every worker so that clocks line
    /// up (a worker with fewer rows pushes smaller batches).
    pub batches: usize,
    /// Added to every clock sent (see `JobSpec::clock_base`).
    pub clock_base: u64,
}

/// Runs epoch `epoch` (from 1) of the worker's minibatches on `data`: the
/// clocks of minibatches `(epoch - 1) * batches + 1 ..= epoch * batches`.
/// Reports each minibatch on `progress`; `slow` is added to each. `data`
/// is held by row.
pub async fn run_epoch(
    w: &Worker,
    data: &Dataset,
    cfg: &FtrlConfig,
    epoch: u64,
    slow: Duration,
    progress: &UnboundedSender<StepStats>,
) -> Result<(), NodeError> {
    let n = data.rows();
    let by_row = data.by_row();
    let batches = cfg.batches.max(1);
    // Column -> position in the current batch's key list, or u32::MAX.
    let mut slot = vec![u32::MAX; data.keys.len()];
    let mut clock = (epoch - 1) * batches as u64;
    {
        for b in 0..batches {
            let busy_start = Instant::now();
            let rows = (n * b / batches)..(n * (b + 1) / batches);
            let mut cols: Vec<u32> = Vec::new();
            for r in rows.clone() {
                for &c in &by_row.idx[by_row.range(r)] {
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
            w.set_clock(cfg.clock_base + clock);
            let waited = Instant::now();
            let weights = if keys.is_empty() {
                Vec::new()
            } else {
                w.send(Request {
                    table: cfg.table.clone(),
                    op: Op::Pull,
                    keys: Keys::List(keys.clone()),
                    vals: Vec::new(),
                    clock: Some(cfg.clock_base + clock - 1),
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
                let m: f64 = by_row
                    .line(r)
                    .map(|(c, x)| x as f64 * weights[slot[c as usize] as usize] as f64)
                    .sum();
                let y = data.labels[r] as f64;
                loss += logistic_loss(m, y);
                let d = (sigmoid(m) - y) as f32;
                for (c, x) in by_row.line(r) {
                    grad[slot[c as usize] as usize] += d * x;
                }
            }
            for &c in &cols {
                slot[c as usize] = u32::MAX;
            }
            if !slow.is_zero() {
                tokio::time::sleep(slow).await;
            }
            busy += compute.elapsed();

            let waited = Instant::now();
            let pushed = keys.len();
            w.push(&cfg.table, keys, grad).await?;
            wait += waited.elapsed();
            let _ = progress.send(StepStats {
                iteration: clock,
                loss,
                rows: rows.len(),
                pushed,
                filtered: 0,
                busy_us: busy.as_micros() as u64,
                wait_us: wait.as_micros() as u64,
                send_us: 0,
            });
        }
    }
    Ok(())
}
