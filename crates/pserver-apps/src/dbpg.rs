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
//! margins. With `tau = 0` this is exact block coordinate descent. With
//! `tau >= 1` that pull is sent right after the push it waits for, `tau`
//! iterations before it is needed, and the push is not waited for, so the
//! worker computes while its messages travel.
//!
//! `h_k` is the separable upper bound `sum_i p_i (1 - p_i) x_ik^2 c_i`, with
//! `c_i` the number of row `i`'s features in the block, so a unit step never
//! overshoots however the block's features are correlated.

use crate::cpu::heavy;
use crate::dataset::Dataset;
use crate::job::proto::StepStats;
use crate::metrics::sigmoid_and_loss;
use pserver_node::NodeError;
use pserver_node::worker::{Handle, Keys, Op, Outcome, Request, Worker};
use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// What one worker needs to know to run the algorithm.
#[derive(Clone, Debug)]
pub struct DbpgConfig {
    /// The weights table (updater `prox`, aggregating, bounded delay `tau`).
    pub table: String,
    /// Number of key-range blocks.
    pub blocks: usize,
    /// Bounded delay.
    pub tau: u64,
    /// L1 strength, for the KKT filter.
    pub l1: f32,
    /// KKT filter margin `delta` in `[0, 1)`, or `None` to send every coordinate.
    pub kkt: Option<f32>,
    /// Number of workers (the KKT filter scales local gradients by it).
    pub workers: usize,
    /// Iterations already in the weights when this run started (a resumed
    /// run): their blocks are never pulled by clock.
    pub first: u64,
    /// The run's last iteration.
    pub total: u64,
    /// Added to every clock sent (see `JobSpec::clock_base`).
    pub clock_base: u64,
}

/// The file in a checkpoint directory naming the latest complete checkpoint.
pub const LATEST: &str = "LATEST";

/// One shard a worker works on: its rows (held by column, the one layout
/// the algorithm needs), and what the worker knows of the weights of the
/// shard's keys and of each row's margin.
struct Part {
    data: Dataset,
    bounds: Vec<usize>,
    weights: Vec<f32>,
    margins: Vec<f64>,
    count: Vec<u32>,
    p: Vec<f64>,
}

impl Part {
    fn new(data: Dataset, blocks: usize) -> Part {
        let data = data.into_columns();
        let n = data.rows();
        Part {
            bounds: data.block_bounds(blocks),
            weights: vec![0f32; data.keys.len()],
            margins: vec![0f64; n],
            count: vec![0u32; n],
            p: vec![0f64; n],
            data,
        }
    }

    fn bytes(&self) -> usize {
        self.data.bytes()
            + self.bounds.capacity() * 8
            + self.weights.capacity() * 4
            + self.margins.capacity() * 8
            + self.count.capacity() * 4
            + self.p.capacity() * 8
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
                for (r, x) in self.data.entries.line(k) {
                    self.margins[r as usize] += delta * x as f64;
                }
                self.weights[k] = new;
            }
        }
    }
}

/// A pull of one block in flight: the parts it was asked for (parts are
/// only ever appended to, or replaced all at once, which drops these).
struct Pending {
    block: usize,
    /// The iteration whose update it brings.
    iteration: u64,
    parts: usize,
    keys: Vec<u64>,
    pull: Handle<Outcome>,
}

/// One worker's side of the algorithm, one iteration at a time, with its
/// messages in flight between iterations: the push of iteration `t` is not
/// waited for, and the pull of its block goes right after it (see
/// [`pull_sent_at`]), though iteration `t + tau + 1` is the first to need
/// it, so it travels while this worker computes `tau` more blocks. With
/// `tau = 0` nothing can overlap: each iteration waits for the one before.
pub struct DbpgWorker {
    cfg: DbpgConfig,
    parts: Vec<Part>,
    pulls: VecDeque<Pending>,
}

impl DbpgWorker {
    /// A worker with no data yet.
    pub fn new(cfg: DbpgConfig) -> DbpgWorker {
        DbpgWorker {
            cfg,
            parts: Vec::new(),
            pulls: VecDeque::new(),
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.data.rows()).sum()
    }

    /// Entries (non-zeros) held.
    pub fn nnz(&self) -> usize {
        self.parts.iter().map(|p| p.data.nnz()).sum()
    }

    /// Bytes allocated for the parts: their data and what this worker
    /// keeps per row and key (weights, margins, probabilities, counts).
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(Part::bytes).sum()
    }

    fn block_of(&self, t: u64) -> usize {
        ((t - 1) % self.cfg.blocks as u64) as usize
    }

    /// A part on `data`, starting from the weights as they stand (clock 0:
    /// no wait), unless the table is known to be empty.
    async fn part(&self, w: &Worker, data: Dataset, fresh: bool) -> Result<Part, NodeError> {
        let mut part = heavy(|| Part::new(data, self.cfg.blocks));
        if !fresh && !part.data.keys.is_empty() {
            let now = w
                .send(Request {
                    table: self.cfg.table.clone(),
                    op: Op::Pull,
                    keys: Keys::List(part.data.keys.clone()),
                    vals: Vec::new(),
                    clock: Some(0),
                    consistency: None,
                })
                .await?
                .vals;
            heavy(|| part.set_weights(now));
        }
        Ok(part)
    }

    /// Replaces every part by one on `data` (pulls in flight are dropped:
    /// the part starts from the weights as they stand). `fresh`: the
    /// table is new and empty, nothing to pull.
    pub async fn set_data(
        &mut self,
        w: &Worker,
        data: Dataset,
        fresh: bool,
    ) -> Result<(), NodeError> {
        let part = self.part(w, data, fresh).await?;
        self.pulls.clear();
        self.parts = vec![part];
        Ok(())
    }

    /// Adds a part (a lost worker's shard), from the weights as they stand;
    /// its gradients are summed with this worker's own into one push.
    pub async fn add_data(&mut self, w: &Worker, data: Dataset) -> Result<(), NodeError> {
        let part = self.part(w, data, false).await?;
        self.parts.push(part);
        Ok(())
    }

    /// Runs iteration `t`: folds in the pulls it needs, computes the
    /// block's gradient, sends the push (returned, not waited for) and the
    /// pull a later iteration needs. `slow` is added to the computation (a
    /// slowed worker in tests).
    pub async fn iterate(
        &mut self,
        w: &Worker,
        t: u64,
        slow: Duration,
    ) -> Result<(StepStats, Handle<Outcome>), NodeError> {
        let cfg = self.cfg.clone();
        // Iteration t needs every block update up to t - 1 - tau.
        // Folding a reply into the margins is computation: it counts as
        // busy, and only the time the replies take to come as waiting.
        let waited = Instant::now();
        let mut folding = Duration::ZERO;
        while let Some(p) = self
            .pulls
            .front()
            .filter(|p| p.iteration + cfg.tau < t)
            .is_some()
            .then(|| self.pulls.pop_front())
            .flatten()
        {
            let fresh = p.pull.await?.vals;
            let f = Instant::now();
            heavy(|| self.fold(p.block, p.parts, &p.keys, &fresh));
            folding += f.elapsed();
        }
        let mut wait = waited.elapsed().saturating_sub(folding);

        let busy = Instant::now();
        let j = self.block_of(t);
        let parts = &mut self.parts;
        let (loss, rows, filtered, keys, vals) = heavy(|| gradients(parts, j, &cfg));
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
        let pushed = keys.len();
        let busy = busy.elapsed() + folding;

        // Every partition gets this clock, empty slices included, so pulls
        // that wait on any range see the iteration done.
        let sent = Instant::now();
        w.set_clock(cfg.clock_base + t);
        let push = w.push(&cfg.table, keys, vals);
        // The pull of this block, at clock t + tau (answered once every
        // worker of the job pushed t), goes now, behind the push on each
        // connection, though iteration t + tau + 1 is the first to need
        // it. Blocks before a resume are in the weights pulled at start.
        if let Some(s) = pull_sent_at(t, cfg.tau, cfg.blocks as u64, cfg.first, cfg.total) {
            self.send_pull(w, s);
        }
        let send = sent.elapsed();
        wait += send;
        let stats = StepStats {
            iteration: t,
            loss,
            rows,
            pushed,
            filtered,
            busy_us: busy.as_micros() as u64,
            wait_us: wait.as_micros() as u64,
            send_us: send.as_micros() as u64,
        };
        Ok((stats, push))
    }

    /// Sends the pull of the block of iteration `s` (the union of the
    /// parts' keys of it) at clock `s + tau`.
    fn send_pull(&mut self, w: &Worker, s: u64) {
        let j = self.block_of(s);
        let mut keys: Vec<u64> = Vec::new();
        for part in &self.parts {
            keys.extend_from_slice(&part.data.keys[part.bounds[j]..part.bounds[j + 1]]);
        }
        if self.parts.len() > 1 {
            keys.sort_unstable();
            keys.dedup();
        }
        if keys.is_empty() {
            return;
        }
        let pull = w.send(Request {
            table: self.cfg.table.clone(),
            op: Op::Pull,
            keys: Keys::List(keys.clone()),
            vals: Vec::new(),
            clock: Some(self.cfg.clock_base + s + self.cfg.tau),
            consistency: None,
        });
        self.pulls.push_back(Pending {
            block: j,
            iteration: s,
            parts: self.parts.len(),
            keys,
            pull,
        });
    }

    /// Folds pulled weights of block `j` (for `keys`) into the first
    /// `parts` parts' margins.
    fn fold(&mut self, j: usize, parts: usize, keys: &[u64], fresh: &[f32]) {
        let n = parts.min(self.parts.len());
        if let [only] = &mut self.parts[..n] {
            only.fold(j, fresh);
            return;
        }
        for part in &mut self.parts[..n] {
            let block = &part.data.keys[part.bounds[j]..part.bounds[j + 1]];
            let current = &part.weights[part.bounds[j]..part.bounds[j + 1]];
            // Every key of these parts' block was asked for.
            let mine: Vec<f32> = block
                .iter()
                .zip(current)
                .map(|(k, w)| keys.binary_search(k).map_or(*w, |i| fresh[i]))
                .collect();
            part.fold(j, &mine);
        }
    }
}

/// Iteration `j`'s computation over `parts`: the summed loss, rows, the
/// coordinates the KKT filter kept back, and the push (keys, g and h).
#[allow(clippy::type_complexity)]
fn gradients(
    parts: &mut [Part],
    j: usize,
    cfg: &DbpgConfig,
) -> (f64, usize, usize, Vec<u64>, Vec<f32>) {
    let mut loss = 0.0;
    let mut rows = 0;
    let mut filtered = 0;
    // Per part: sorted keys of the block with (g, h); then merged by key.
    let mut merged: Vec<(u64, f64, f64, bool)> = Vec::new();
    for part in parts.iter_mut() {
        rows += part.data.rows();
        for (r, m) in part.margins.iter().enumerate() {
            let (p, l) = sigmoid_and_loss(*m, part.data.labels[r] as f64);
            part.p[r] = p;
            loss += l;
        }
        let block = part.bounds[j]..part.bounds[j + 1];
        let gh = block_gradient(&part.data, &part.p, block.clone(), &mut part.count);
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
    (loss, rows, filtered, keys, vals)
}

/// The gradient `g_k` and curvature bound `h_k` of the summed logistic loss
/// for each column of `block`, given each row's probability `p`. `count`
/// is scratch space of one zero per row, left zeroed.
///
/// # Panics
///
/// When `data` is held by row.
pub fn block_gradient(
    data: &Dataset,
    p: &[f64],
    block: Range<usize>,
    count: &mut [u32],
) -> Vec<(f64, f64)> {
    let cols = data.by_column();
    let rows = &cols.idx;
    for k in block.clone() {
        for &r in &rows[cols.range(k)] {
            count[r as usize] += 1;
        }
    }
    let out = block
        .clone()
        .map(|k| {
            let (mut g, mut h) = (0f64, 0f64);
            for (r, x) in cols.line(k) {
                let r = r as usize;
                let x = x as f64;
                g += (p[r] - data.labels[r] as f64) * x;
                h += p[r] * (1.0 - p[r]) * x * x * count[r] as f64;
            }
            (g, h)
        })
        .collect();
    for k in block {
        for &r in &rows[cols.range(k)] {
            count[r as usize] = 0;
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

/// The iteration whose block's pull iteration `t` sends, if any. The pull
/// of the block of iteration `s` goes at clock `s + tau`, which the
/// servers answer once every worker of the job pushed `s`, and iteration
/// `s + tau + 1` is the first that needs it. It is sent as early as its
/// answer cannot differ from a later one: right after this worker's push
/// of `s` (`t = s`), since that block is next updated at `s + blocks`; for
/// `tau > blocks`, `tau - blocks` iterations later, so it still sees every
/// update a reply at the last moment could. That leaves
/// `min(tau, blocks) + 1` iterations for it to travel while this worker
/// computes. None before iteration 1, for iterations already in the
/// weights of a resumed run (`<= first`), and for blocks no later
/// iteration of the run reads (`s + tau >= total`).
fn pull_sent_at(t: u64, tau: u64, blocks: u64, first: u64, total: u64) -> Option<u64> {
    let s = t.checked_sub(tau.saturating_sub(blocks))?;
    (s >= 1 && s > first && s.checked_add(tau)? < total).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{logistic_loss, sigmoid};

    #[test]
    fn pulls_go_right_after_the_push_they_wait_for() {
        // tau 0: each iteration pulls its own block after its push.
        assert_eq!(pull_sent_at(1, 0, 16, 0, 10), Some(1));
        assert_eq!(pull_sent_at(9, 0, 16, 0, 10), Some(9));
        assert_eq!(pull_sent_at(10, 0, 16, 0, 10), None);
        // tau 1 and 4 (< 16 blocks): the block just pushed, needed at
        // t + tau + 1; none past what the run reads.
        assert_eq!(pull_sent_at(1, 1, 16, 0, 10), Some(1));
        assert_eq!(pull_sent_at(8, 1, 16, 0, 10), Some(8));
        assert_eq!(pull_sent_at(9, 1, 16, 0, 10), None);
        assert_eq!(pull_sent_at(1, 4, 16, 0, 100), Some(1));
        assert_eq!(pull_sent_at(95, 4, 16, 0, 100), Some(95));
        assert_eq!(pull_sent_at(96, 4, 16, 0, 100), None);
        assert_eq!(pull_sent_at(0, 4, 16, 0, 100), None);
        // tau 20 > 16 blocks: 4 iterations later, so the reply holds the
        // block's next update too when it is due; no wrap below zero.
        for t in 0..5 {
            assert_eq!(pull_sent_at(t, 20, 16, 0, 100), None, "t {t}");
        }
        assert_eq!(pull_sent_at(5, 20, 16, 0, 100), Some(1));
        assert_eq!(pull_sent_at(u64::MAX - 1, 16, 16, 0, u64::MAX), None);
        // A resumed run never pulls blocks already in its start weights.
        assert_eq!(pull_sent_at(5, 2, 16, 5, 100), None);
        assert_eq!(pull_sent_at(6, 2, 16, 5, 100), Some(6));
    }
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
        let cols = d.clone().into_columns();
        let w: Vec<f32> = (0..d.keys.len()).map(|i| 0.1 * i as f32 - 0.3).collect();
        let p: Vec<f64> = d.margins(&w).into_iter().map(sigmoid).collect();
        let mut count = vec![0; d.rows()];
        let all = 0..d.keys.len();
        let gh = block_gradient(&cols, &p, all.clone(), &mut count);
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
        let cols = d.clone().into_columns();
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
            let gh = block_gradient(&cols, &p, block.clone(), &mut count);
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
