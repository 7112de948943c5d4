//! Sparse logistic regression by delayed block proximal gradient (Li et al.,
//! NIPS 2014, Algorithm 3), one worker's side.
//!
//! The feature keys are cut into `b` key-range blocks; iteration `t` works on
//! block `(t - 1) mod b`. Each worker computes, on its rows, the gradient
//! `g_k` and a diagonal curvature `h_k` of the logistic loss for the block's
//! keys and pushes both; the table aggregates every worker's push for the
//! clock and runs the proximal L1/L2 step once on the sums (the `prox`
//! updater). A worker then pulls the block of iteration `t - tau`, which the
//! bounded delay guarantees is complete, and folds the change into its
//! margins. With `tau = 0` this is exact block coordinate descent.
//!
//! `h_k` is the separable upper bound `sum_i p_i (1 - p_i) x_ik^2 c_i`, with
//! `c_i` the number of row `i`'s features in the block, so a unit step never
//! overshoots however the block's features are correlated.

use crate::dataset::{Columns, Dataset};
use crate::metrics::{logistic_loss, sigmoid};
use crate::progress::{IterStats, Progress};
use pserver_node::NodeError;
use pserver_node::durable::{Disk, FileSystem};
use pserver_node::worker::{Keys, Op, Request, Worker};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// What one worker needs to know to run the algorithm.
#[derive(Clone, Debug)]
pub struct DbpgConfig {
    /// The weights table (updater `prox`, aggregating, bounded delay `tau`).
    pub table: String,
    /// Number of key-range blocks.
    pub blocks: usize,
    /// Passes over all blocks.
    pub epochs: usize,
    /// Bounded delay.
    pub tau: u64,
    /// L1 strength, for the KKT filter.
    pub l1: f32,
    /// KKT filter margin `delta` in `[0, 1)`, or `None` to send every coordinate.
    pub kkt: Option<f32>,
    /// Number of workers (the KKT filter scales local gradients by it).
    pub workers: usize,
    /// Epochs already done (a run resumed from a checkpoint): the weights
    /// are pulled at start, and iterations go on from there.
    pub start_epoch: usize,
    /// Write a checkpoint into `.0/epoch-E` every `.1` epochs (at a
    /// barrier, so it holds every worker's pushes up to that clock and none
    /// after), and point `.0/LATEST` at it.
    pub checkpoint: Option<(std::path::PathBuf, usize)>,
}

/// The file in a checkpoint directory naming the latest complete checkpoint.
pub const LATEST: &str = "LATEST";

/// One shard a worker works on: its rows, and what the worker knows of
/// the weights of the shard's keys and of each row's margin.
struct Part {
    data: Arc<Dataset>,
    cols: Columns,
    bounds: Vec<usize>,
    weights: Vec<f32>,
    margins: Vec<f64>,
    count: Vec<u32>,
    p: Vec<f64>,
}

impl Part {
    fn new(data: Arc<Dataset>, blocks: usize) -> Part {
        let n = data.rows();
        Part {
            cols: data.columns(),
            bounds: data.block_bounds(blocks),
            weights: vec![0f32; data.keys.len()],
            margins: vec![0f64; n],
            count: vec![0u32; n],
            p: vec![0f64; n],
            data,
        }
    }

    /// Sets every weight to `w` (in key order) and recomputes the margins.
    fn set_weights(&mut self, w: Vec<f32>) {
        self.margins = self.data.margins(&w);
        self.weights = w;
    }

    /// Folds pulled weights of block `j` (in the block's key order) into
    /// the margins.
    fn fold(&mut self, j: usize, fresh: &[f32]) {
        let block = self.bounds[j]..self.bounds[j + 1];
        for (k, &new) in block.zip(fresh) {
            let delta = (new - self.weights[k]) as f64;
            if delta != 0.0 {
                for e in self.cols.col_ptr[k]..self.cols.col_ptr[k + 1] {
                    self.margins[self.cols.rows[e] as usize] += delta * self.cols.vals[e] as f64;
                }
                self.weights[k] = new;
            }
        }
    }
}

/// Runs the worker's iterations on `data` and reports each on `progress`.
/// Shards received on `adopt` (those of workers that died) are taken on
/// from the next iteration: their weights are pulled, their margins
/// computed, and their gradients summed with this worker's own into its one
/// push per clock.
pub async fn run_worker(
    w: &Worker,
    index: usize,
    data: Arc<Dataset>,
    cfg: &DbpgConfig,
    progress: &UnboundedSender<Progress>,
    mut adopt: UnboundedReceiver<Arc<Dataset>>,
) -> Result<(), NodeError> {
    let mut parts = vec![Part::new(data, cfg.blocks)];
    let first = (cfg.blocks * cfg.start_epoch) as u64;
    if first > 0 {
        // Resumed: start from the weights as the checkpoint left them.
        let now = w
            .send(Request {
                table: cfg.table.clone(),
                op: Op::Pull,
                keys: Keys::List(parts[0].data.keys.clone()),
                vals: Vec::new(),
                clock: Some(0),
                consistency: None,
            })
            .await?
            .vals;
        parts[0].set_weights(now);
    }
    let total = (cfg.blocks * cfg.epochs) as u64;
    let block_of = |t: u64| ((t - 1) % cfg.blocks as u64) as usize;

    for t in first + 1..=total {
        while let Ok(d) = adopt.try_recv() {
            let mut part = Part::new(d, cfg.blocks);
            // The weights as they stand (clock 0: no wait); later pulls
            // fold in the changes like this worker's own shard's.
            let now = w
                .send(Request {
                    table: cfg.table.clone(),
                    op: Op::Pull,
                    keys: Keys::List(part.data.keys.clone()),
                    vals: Vec::new(),
                    clock: Some(0),
                    consistency: None,
                })
                .await?
                .vals;
            part.set_weights(now);
            let _ = progress.send(Progress::Adopted {
                worker: index,
                rows: part.data.rows(),
            });
            parts.push(part);
        }
        let busy = Instant::now();
        let j = block_of(t);
        let mut loss = 0.0;
        let mut rows = 0;
        let mut filtered = 0;
        // Per part: sorted keys of the block with (g, h); then merged by key.
        let mut merged: Vec<(u64, f64, f64, bool)> = Vec::new();
        for part in &mut parts {
            rows += part.data.rows();
            for (r, m) in part.margins.iter().enumerate() {
                part.p[r] = sigmoid(*m);
                loss += logistic_loss(*m, part.data.labels[r] as f64);
            }
            let block = part.bounds[j]..part.bounds[j + 1];
            let gh = block_gradient(
                &part.data,
                &part.cols,
                &part.p,
                block.clone(),
                &mut part.count,
            );
            for (k, (g, h)) in block.zip(gh) {
                merged.push((part.data.keys[k], g, h, part.weights[k] == 0.0));
            }
        }
        if parts.len() > 1 {
            merged.sort_unstable_by_key(|e| e.0);
            merged.dedup_by(|next, prev| {
                let same = next.0 == prev.0;
                if same {
                    prev.1 += next.1;
                    prev.2 += next.2;
                    prev.3 &= next.3;
                }
                same
            });
        }
        let mut keys = Vec::with_capacity(merged.len());
        let mut vals = Vec::with_capacity(merged.len() * 2);
        for (key, g, h, zero) in merged {
            if let Some(delta) = cfg.kkt {
                let weight = if zero { 0.0 } else { 1.0 };
                if kkt_skip(weight, g, cfg.l1, delta, cfg.workers) {
                    filtered += 1;
                    continue;
                }
            }
            keys.push(key);
            vals.push(g as f32);
            vals.push(h as f32);
        }
        let pushed = keys.len();
        let busy = busy.elapsed();

        // Every partition gets this clock, empty slices included, so pulls
        // that wait on any range see the iteration done.
        let waited = Instant::now();
        // The push and the pull travel together: the pull's wait is on the
        // other workers' clocks, not on this push's acknowledgement.
        w.set_clock(t);
        let push = w.push(&cfg.table, keys, vals);
        // Blocks of iterations before a resume are in the weights pulled at
        // start (and nobody pushed their clocks in this cluster).
        if let Some(s) = t.checked_sub(cfg.tau).filter(|&s| s > first) {
            pull_block(w, cfg, &mut parts, block_of(s), t).await?;
        }
        push.await?;
        let wait = waited.elapsed();
        let _ = progress.send(Progress::Iter(IterStats {
            worker: index,
            iteration: t,
            loss,
            rows,
            pushed,
            filtered,
            busy,
            wait,
        }));
        if let Some((dir, every)) = &cfg.checkpoint {
            let epoch = (t / cfg.blocks as u64) as usize;
            if t.is_multiple_of(cfg.blocks as u64)
                && *every > 0
                && epoch.is_multiple_of(*every)
                && t < total
            {
                checkpoint(w, index, cfg, dir, epoch, progress).await?;
            }
        }
    }
    // No final pulls: every push is acknowledged after its clock's
    // aggregate is applied, so the table is complete once all workers return.
    Ok(())
}

/// Every worker stops at a barrier after epoch `epoch` (its pushes are all
/// acknowledged, so every sum up to this clock is applied and none after);
/// worker 0 writes the checkpoint and points `LATEST` at it; a second
/// barrier lets everyone go on.
async fn checkpoint(
    w: &Worker,
    index: usize,
    cfg: &DbpgConfig,
    dir: &std::path::Path,
    epoch: usize,
    progress: &UnboundedSender<Progress>,
) -> Result<(), NodeError> {
    w.barrier(&format!("{}-ckpt-{epoch}", cfg.table)).await?;
    if index == 0 {
        let name = format!("epoch-{epoch}");
        let at = dir.join(&name);
        w.checkpoint(&at).await?;
        // LATEST changes only once the checkpoint is whole.
        Disk::new()
            .write_atomic(&dir.join(LATEST), format!("{name}\n").as_bytes())
            .map_err(|e| NodeError::BadRequest(e.to_string()))?;
        let _ = progress.send(Progress::Checkpointed { epoch, dir: at });
    }
    w.barrier(&format!("{}-ckpt-{epoch}-done", cfg.table)).await
}

/// Pulls block `j` at `clock` (the union of the parts' keys) and folds the
/// weight changes into each part's margins.
async fn pull_block(
    w: &Worker,
    cfg: &DbpgConfig,
    parts: &mut [Part],
    j: usize,
    clock: u64,
) -> Result<(), NodeError> {
    let mut keys: Vec<u64> = Vec::new();
    for part in parts.iter() {
        keys.extend_from_slice(&part.data.keys[part.bounds[j]..part.bounds[j + 1]]);
    }
    if parts.len() > 1 {
        keys.sort_unstable();
        keys.dedup();
    }
    if keys.is_empty() {
        return Ok(());
    }
    let fresh = w
        .send(Request {
            table: cfg.table.clone(),
            op: Op::Pull,
            keys: Keys::List(keys.clone()),
            vals: Vec::new(),
            clock: Some(clock),
            consistency: None,
        })
        .await?
        .vals;
    if let [only] = parts {
        only.fold(j, &fresh);
        return Ok(());
    }
    for part in parts.iter_mut() {
        let block = &part.data.keys[part.bounds[j]..part.bounds[j + 1]];
        let mine: Vec<f32> = block
            .iter()
            .map(|k| keys.binary_search(k).map_or(0.0, |i| fresh[i]))
            .collect();
        part.fold(j, &mine);
    }
    Ok(())
}

/// The gradient `g_k` and curvature bound `h_k` of the summed logistic loss
/// for each column of `block`, given each row's probability `p`. `count`
/// is scratch space of one zero per row, left zeroed.
pub fn block_gradient(
    data: &Dataset,
    cols: &Columns,
    p: &[f64],
    block: Range<usize>,
    count: &mut [u32],
) -> Vec<(f64, f64)> {
    for k in block.clone() {
        for e in cols.col_ptr[k]..cols.col_ptr[k + 1] {
            count[cols.rows[e] as usize] += 1;
        }
    }
    let out = block
        .clone()
        .map(|k| {
            let (mut g, mut h) = (0f64, 0f64);
            for e in cols.col_ptr[k]..cols.col_ptr[k + 1] {
                let r = cols.rows[e] as usize;
                let x = cols.vals[e] as f64;
                g += (p[r] - data.labels[r] as f64) * x;
                h += p[r] * (1.0 - p[r]) * x * x * count[r] as f64;
            }
            (g, h)
        })
        .collect();
    for k in block {
        for e in cols.col_ptr[k]..cols.col_ptr[k + 1] {
            count[cols.rows[e] as usize] = 0;
        }
    }
    out
}

/// The KKT filter's decision: a coordinate whose weight is zero stays zero
/// under the L1 proximal step when the whole gradient lies inside
/// `[-l1, l1]`. A worker sees about `1 / workers` of the gradient, so it
/// scales its share up and keeps a margin `delta` for the estimate's error.
pub fn kkt_skip(weight: f32, g: f64, l1: f32, delta: f32, workers: usize) -> bool {
    weight == 0.0 && (g * workers as f64).abs() <= l1 as f64 * (1.0 - delta as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Builder;
    use pserver_core::UpdaterSpec;
    use pserver_core::updater::Registry;

    /// A small data set with correlated features and a known structure.
    fn data() -> Dataset {
        let mut b = Builder::new();
        let mut x = 12345u64;
        for i in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = (x >> 33) % 6;
            let c = (x >> 40) % 4 + 10;
            let keys = [a * (u64::MAX / 7) + 1, c * (u64::MAX / 17) + 3];
            let mut k = keys.to_vec();
            k.sort_unstable();
            let label = if (a + c + i % 3).is_multiple_of(2) {
                1.0
            } else {
                0.0
            };
            b.add(label, &k, &[1.0, 0.5]);
        }
        b.build()
    }

    fn objective(d: &Dataset, w: &[f32]) -> f64 {
        d.margins(w)
            .iter()
            .zip(&d.labels)
            .map(|(m, y)| logistic_loss(*m, *y as f64))
            .sum()
    }

    #[test]
    fn gradient_matches_finite_differences_and_h_bounds_the_curvature() {
        let d = data();
        let cols = d.columns();
        let w: Vec<f32> = (0..d.keys.len()).map(|i| 0.1 * i as f32 - 0.3).collect();
        let p: Vec<f64> = d.margins(&w).into_iter().map(sigmoid).collect();
        let mut count = vec![0; d.rows()];
        let all = 0..d.keys.len();
        let gh = block_gradient(&d, &cols, &p, all.clone(), &mut count);
        assert!(count.iter().all(|&c| c == 0));
        for k in all {
            let step = 1e-3f32;
            let mut plus = w.clone();
            plus[k] += step;
            let mut minus = w.clone();
            minus[k] -= step;
            let fd = (objective(&d, &plus) - objective(&d, &minus)) / (2.0 * step as f64);
            let (g, h) = gh[k];
            assert!(
                (fd - g).abs() < 1e-3 * (1.0 + g.abs()),
                "key {k}: {fd} vs {g}"
            );
            // Second derivative by finite differences: h bounds it from above.
            let second = (objective(&d, &plus) - 2.0 * objective(&d, &w) + objective(&d, &minus))
                / (step as f64 * step as f64);
            assert!(h >= second * 0.99, "key {k}: h {h} below {second}");
        }
    }

    #[test]
    fn block_steps_with_the_prox_updater_never_increase_the_objective() {
        let d = data();
        let cols = d.columns();
        let (l1, l2) = (0.5f32, 0.1f32);
        let prox = Registry::new()
            .build(&UpdaterSpec::Prox {
                eta: 1.0,
                l1,
                l2,
                eps: 1e-6,
            })
            .unwrap();
        let reg = |w: &[f32]| -> f64 {
            w.iter()
                .map(|x| l1 as f64 * x.abs() as f64 + 0.5 * l2 as f64 * (*x as f64).powi(2))
                .sum()
        };
        let mut w = vec![0f32; d.keys.len()];
        let bounds = d.block_bounds(3);
        let mut count = vec![0; d.rows()];
        let mut last = objective(&d, &w) + reg(&w);
        for t in 0..30 {
            let j = t % 3;
            let p: Vec<f64> = d.margins(&w).into_iter().map(sigmoid).collect();
            let block = bounds[j]..bounds[j + 1];
            let gh = block_gradient(&d, &cols, &p, block.clone(), &mut count);
            for (k, (g, h)) in block.zip(gh) {
                prox.apply(&mut w[k..k + 1], &mut [], &[g as f32, h as f32]);
            }
            let now = objective(&d, &w) + reg(&w);
            assert!(now <= last + 1e-6, "iteration {t}: {last} -> {now}");
            last = now;
        }
        assert!(last < 200.0 * std::f64::consts::LN_2, "no progress: {last}");
    }

    #[test]
    fn kkt_filter_keeps_back_only_zero_weights_inside_the_l1_ball() {
        // Zero weight, small gradient: skipped.
        assert!(kkt_skip(0.0, 0.1, 1.0, 0.1, 2));
        // Scaled by the number of workers it is outside: sent.
        assert!(!kkt_skip(0.0, 0.5, 1.0, 0.1, 2));
        // Within delta of the boundary: sent.
        assert!(!kkt_skip(0.0, 0.46, 1.0, 0.1, 2));
        // A non-zero weight is always sent.
        assert!(!kkt_skip(0.3, 0.0, 1.0, 0.1, 2));
        // Without L1 nothing is skipped but an exact zero gradient.
        assert!(!kkt_skip(0.0, 1e-9, 0.0, 0.0, 1));
    }
}
