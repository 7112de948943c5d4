//! `--tune`: picks `l1` and `l2` on a seeded validation split of the
//! training data, then trains on all of it.
//!
//! The grid is walked as a warm-started path, as glmnet and liblinear's
//! `-C` search do: from strong to weak regularization (`l1` descending,
//! and within each `l1`, `l2` descending), each point starts from the
//! weights of the point before it on the path (the first point of an `l1`
//! row from the first point of the row before), so it needs fewer epochs
//! than a cold start. Each point is a job of its own (its table
//! `JOB.tune-K`), run by the same scheduler as any job, local or remote:
//! its workers fit on the tuning-train side of the split
//! ([`JobSpec::validation`](crate::job::proto::JobSpec)), the scheduler
//! scores the validation side in place of the test set (never read while
//! tuning), and the new table is filled with the previous point's weights
//! before the first step ([`RunExtra::warm`]). The point of lowest
//! validation log-loss wins (the stronger one on a tie), and a final run on
//! every training line, from zero, with `--epochs`, gives the model.

use crate::job::proto::{Algo, ValidationSplit};
use crate::job::scheduler::{self, Pool, RunExtra};
use crate::progress::Progress;
use crate::train::{RunResult, TrainConfig, TrainError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// The curvature floor of DBPG's proximal step (`UpdaterSpec::Prox::eps`).
pub const PROX_EPS: f32 = 1e-6;

/// What `--tune` searches.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneConfig {
    /// `l1` values of the grid.
    pub l1: Vec<f32>,
    /// `l2` values of the grid.
    pub l2: Vec<f32>,
    /// Share of the training lines held out to validate, in `(0, 1)`.
    pub fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Epochs of each warm-started point (the path's first point, from
    /// zero, runs the job's `--epochs`).
    pub epochs: usize,
}

impl Default for TuneConfig {
    fn default() -> Self {
        TuneConfig {
            l1: vec![4.0, 1.0, 0.0],
            l2: vec![256.0, 64.0, 16.0, 4.0, 1.0, 0.25],
            fraction: 0.2,
            seed: 1,
            epochs: 3,
        }
    }
}

/// One point of the path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathPoint {
    /// L1 strength.
    pub l1: f32,
    /// L2 strength.
    pub l2: f32,
    /// The earlier point whose weights it starts from; `None`: zero.
    pub warm_from: Option<usize>,
}

/// A point's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointReport {
    /// L1 strength.
    pub l1: f32,
    /// L2 strength.
    pub l2: f32,
    /// The point it started from (its index), or none (zero).
    pub warm_from: Option<usize>,
    /// Epochs it ran.
    pub epochs: usize,
    /// Validation log-loss.
    pub logloss: f64,
    /// Validation AUC.
    pub auc: f64,
    /// Non-zero weights.
    pub nnz: u64,
    /// Training seconds.
    pub seconds: f64,
}

/// What `--tune` reports (in `--report`'s JSON, `tune`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneReport {
    /// Share of the training lines that validated.
    pub fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Validation rows.
    pub validation_rows: u64,
    /// Rows each point was fit on.
    pub fit_rows: u64,
    /// The path, in the order it ran (the validation curve).
    pub points: Vec<PointReport>,
    /// The index of the chosen point.
    pub chosen: usize,
    /// Its `l1`.
    pub l1: f32,
    /// Its `l2`.
    pub l2: f32,
    /// Seconds of the whole path (loading included).
    pub seconds: f64,
}

/// The path and the final run.
#[derive(Clone, Debug)]
pub struct Tuned {
    /// The choice and the curve.
    pub report: TuneReport,
    /// The final run on all the training data with the chosen values.
    pub result: RunResult,
}

impl TuneConfig {
    /// Checks the grid and the split before anything starts.
    pub fn validate(&self, cfg: &TrainConfig) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        for (name, v) in [("--tune-l1", &self.l1), ("--tune-l2", &self.l2)] {
            if v.is_empty() {
                return bad(format!("{name} needs at least one value"));
            }
            if let Some(x) = v.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
                return bad(format!("{name}: {x} is not a finite value >= 0"));
            }
        }
        if !(self.fraction > 0.0 && self.fraction < 1.0) {
            return bad(format!(
                "--tune-fraction {} is not within (0, 1)",
                self.fraction
            ));
        }
        if self.epochs == 0 {
            return bad("--tune-epochs must be at least 1".into());
        }
        if cfg.algo != Algo::Dbpg {
            return bad(
                "--tune walks a warm-started path of DBPG runs; FTRL's per-coordinate state does not carry over between regularizations: use --algo dbpg".into(),
            );
        }
        if cfg.resume || cfg.checkpoint_every > 0 {
            return bad("--tune does not combine with checkpoints or --resume".into());
        }
        let points = self.path().len();
        if let Some(j) = &cfg.job {
            if !pserver_core::spec::valid_job_name(&point_job(j, points - 1)) {
                return bad(format!(
                    "--job {j:?} is too long for --tune's point jobs ({})",
                    point_job(j, points - 1)
                ));
            }
        }
        Ok(())
    }

    /// The grid as a warm-started path: `l1` descending, and within each,
    /// `l2` descending (duplicates dropped); each point starts from the
    /// one before it in its row, a row's first from the row before's first.
    pub fn path(&self) -> Vec<PathPoint> {
        let desc = |v: &[f32]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            v.dedup();
            v
        };
        let (l1s, l2s) = (desc(&self.l1), desc(&self.l2));
        let mut out = Vec::new();
        let mut row_head: Option<usize> = None;
        for &l1 in &l1s {
            for (j, &l2) in l2s.iter().enumerate() {
                let warm_from = if j == 0 {
                    row_head
                } else {
                    Some(out.len() - 1)
                };
                if j == 0 {
                    row_head = Some(out.len());
                }
                out.push(PathPoint { l1, l2, warm_from });
            }
        }
        out
    }
}

/// The job name of point `k` of job `job`'s path.
pub fn point_job(job: &str, k: usize) -> String {
    format!("{job}.tune-{k}")
}

/// The point of lowest validation log-loss: the first (the more strongly
/// regularized) on a tie; a NaN never wins.
pub fn choose(loglosses: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &l) in loglosses.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|b| l < loglosses[b]) {
            best = Some(i);
        }
    }
    best
}

/// The `(g, h)` push that takes a weight of 0 to `target` under DBPG's
/// proximal step (`d = h + eps; z = w - eta g / d; w = sign(z) max(|z| -
/// eta l1 / d, 0) / (1 + eta l2 / d)`): `d` is chosen so the L1 threshold is
/// at most a quarter of `|target|` (no cancellation), and `g` inverts the
/// step. Exact to a few ulps; a zero target pushes nothing (`[0, 0]`).
pub fn warm_push(target: f32, eta: f32, l1: f32, l2: f32, eps: f32) -> [f32; 2] {
    if target == 0.0 || !target.is_finite() {
        return [0.0, 0.0];
    }
    let (t, eta, l1, l2) = (target as f64, eta as f64, l1 as f64, l2 as f64);
    let want = (4.0 * eta * l1 / t.abs()).max(eta * l2).clamp(1.0, 1e30);
    // The server computes d in f32 from the h sent: use that d.
    let h = (want - eps as f64) as f32;
    let d = (h.max(0.0) + eps) as f64;
    let z = t.abs() * (1.0 + eta * l2 / d) + eta * l1 / d;
    let g = -t.signum() * z * d / eta;
    [g as f32, h]
}

/// Runs the path on `pool`'s workers (one job per point, through the job's
/// scheduler, local or remote alike), then the final run with the chosen
/// values on all the training data. Points report [`Progress::Tuned`];
/// the final run reports as any run.
pub async fn run(
    manager: &str,
    cfg: &TrainConfig,
    tune: &TuneConfig,
    pool: Pool,
    progress: UnboundedSender<Progress>,
) -> Result<Tuned, TrainError> {
    cfg.validate()?;
    tune.validate(cfg)?;
    let started = std::time::Instant::now();
    let job = cfg.job_name();
    let path = tune.path();
    let split = ValidationSplit {
        fraction: tune.fraction,
        seed: tune.seed,
        keep_validation: false,
    };
    let mut models: Vec<Option<Arc<crate::model::Model>>> = vec![None; path.len()];
    let mut points = Vec::new();
    let (mut validation_rows, mut fit_rows) = (0, 0);
    for (k, p) in path.iter().enumerate() {
        let point = TrainConfig {
            l1: p.l1,
            l2: p.l2,
            job: Some(point_job(&job, k)),
            epochs: if p.warm_from.is_some() {
                tune.epochs
            } else {
                cfg.epochs
            },
            eval_every: None,
            fail_worker: None,
            ..cfg.clone()
        };
        let extra = RunExtra {
            validation: Some(split),
            warm: p.warm_from.and_then(|i| models[i].clone()),
        };
        // A point's own events (loads, objective) stay quiet; losses show.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let up = progress.clone();
        let forward = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if matches!(ev, Progress::WorkerLost { .. } | Progress::Joined { .. }) {
                    let _ = up.send(ev);
                }
            }
        });
        let r = scheduler::run_with(manager, &point, pool.again(), tx, &extra).await;
        let _ = forward.await;
        let r = r?;
        validation_rows = r.test.examples as u64;
        fit_rows = r.train_rows as u64;
        let rep = PointReport {
            l1: p.l1,
            l2: p.l2,
            warm_from: p.warm_from,
            epochs: point.epochs,
            logloss: r.test.logloss,
            auc: r.test.auc,
            nnz: r.nnz as u64,
            seconds: r.train_seconds,
        };
        let _ = progress.send(Progress::Tuned {
            point: k,
            points: path.len(),
            l1: p.l1,
            l2: p.l2,
            epochs: point.epochs,
            warm: p.warm_from.is_some(),
            logloss: r.test.logloss,
            auc: r.test.auc,
        });
        points.push(rep);
        // Only the points some later point starts from are kept.
        if path[k + 1..].iter().any(|q| q.warm_from == Some(k)) {
            models[k] = Some(Arc::new(r.model));
        }
        for (i, m) in models.iter_mut().enumerate() {
            if i < k && !path[k + 1..].iter().any(|q| q.warm_from == Some(i)) {
                *m = None;
            }
        }
    }
    let losses: Vec<f64> = points.iter().map(|p| p.logloss).collect();
    let chosen = choose(&losses).ok_or_else(|| {
        TrainError::Config("--tune: no point of the grid gave a finite validation log-loss".into())
    })?;
    let report = TuneReport {
        fraction: tune.fraction,
        seed: tune.seed,
        validation_rows,
        fit_rows,
        chosen,
        l1: points[chosen].l1,
        l2: points[chosen].l2,
        points,
        seconds: started.elapsed().as_secs_f64(),
    };
    let last = TrainConfig {
        l1: report.l1,
        l2: report.l2,
        job: Some(job),
        ..cfg.clone()
    };
    let result = scheduler::run(manager, &last, pool, progress).await?;
    Ok(Tuned { report, result })
}

/// [`run`] over `cfg.workers` worker agents started in this process (as
/// [`crate::train::train`] does).
pub async fn train(
    manager: &str,
    cfg: &TrainConfig,
    tune: &TuneConfig,
    progress: UnboundedSender<Progress>,
) -> Result<Tuned, TrainError> {
    cfg.validate()?;
    tune.validate(cfg)?;
    let agents = crate::train::local_agents(manager, cfg).await?;
    let r = run(manager, cfg, tune, Pool::Local(agents.clone()), progress).await;
    for a in &agents {
        a.kill();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use pserver_core::updater::{Prox, Updater};

    #[test]
    fn the_path_goes_from_strong_to_weak_and_warm_starts_from_its_neighbour() {
        let t = TuneConfig {
            l1: vec![0.0, 1.0, 1.0],
            l2: vec![1.0, 16.0, 4.0],
            ..TuneConfig::default()
        };
        let p = t.path();
        let got: Vec<(f32, f32, Option<usize>)> =
            p.iter().map(|p| (p.l1, p.l2, p.warm_from)).collect();
        assert_eq!(
            got,
            vec![
                (1.0, 16.0, None),
                (1.0, 4.0, Some(0)),
                (1.0, 1.0, Some(1)),
                (0.0, 16.0, Some(0)),
                (0.0, 4.0, Some(3)),
                (0.0, 1.0, Some(4)),
            ]
        );
        // Every warm start is from an earlier point with regularization at
        // least as strong in both terms.
        for (k, q) in p.iter().enumerate() {
            if let Some(i) = q.warm_from {
                assert!(i < k && p[i].l1 >= q.l1 && p[i].l2 >= q.l2);
            }
        }
    }

    #[test]
    fn the_lowest_validation_loss_wins_the_stronger_on_a_tie_never_nan() {
        assert_eq!(choose(&[0.5, 0.4, 0.45]), Some(1));
        assert_eq!(choose(&[0.4, 0.4, 0.5]), Some(0));
        assert_eq!(choose(&[f64::NAN, 0.7, 0.6]), Some(2));
        assert_eq!(choose(&[f64::NAN]), None);
        assert_eq!(choose(&[]), None);
    }

    fn base() -> TrainConfig {
        TrainConfig {
            algo: Algo::Dbpg,
            train: "t.svm".into(),
            test: Some("u.svm".into()),
            format: crate::job::DataFormat::Libsvm,
            workers: 2,
            job: None,
            slow_worker_ms: 0,
            tau: 1,
            l1: 1.0,
            l2: 1.0,
            blocks: 4,
            epochs: 10,
            batch: 100,
            alpha: 0.1,
            beta: 1.0,
            kkt: Some(0.1),
            eval_every: None,
            key_caching: true,
            compression: None,
            value_filters: Default::default(),
            checkpoint_dir: None,
            checkpoint_every: 0,
            resume: false,
            fail_worker: None,
            net: Default::default(),
        }
    }

    #[test]
    fn flags_are_checked_up_front() {
        let cfg = base();
        let ok = TuneConfig::default();
        assert!(ok.validate(&cfg).is_ok());
        let msg = |t: TuneConfig, c: &TrainConfig| t.validate(c).unwrap_err().to_string();
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            let m = msg(
                TuneConfig {
                    l2: vec![1.0, bad],
                    ..ok.clone()
                },
                &cfg,
            );
            assert!(m.contains("--tune-l2"), "{m}");
        }
        assert!(
            msg(
                TuneConfig {
                    l1: vec![],
                    ..ok.clone()
                },
                &cfg
            )
            .contains("--tune-l1")
        );
        for f in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            let m = msg(
                TuneConfig {
                    fraction: f,
                    ..ok.clone()
                },
                &cfg,
            );
            assert!(m.contains("(0, 1)"), "{m}");
        }
        assert!(
            msg(
                TuneConfig {
                    epochs: 0,
                    ..ok.clone()
                },
                &cfg
            )
            .contains("--tune-epochs")
        );
        let ftrl = TrainConfig {
            algo: Algo::Ftrl,
            ..base()
        };
        assert!(msg(ok.clone(), &ftrl).contains("dbpg"));
        let long = TrainConfig {
            job: Some("j".repeat(125)),
            ..base()
        };
        assert!(msg(ok.clone(), &long).contains("too long"));
    }

    #[test]
    fn a_warm_push_takes_zero_to_the_target_under_the_prox_step() {
        for &(eta, l1, l2) in &[
            (1.0, 0.0, 0.0),
            (0.5, 1.0, 1.0),
            (0.5, 4.0, 256.0),
            (1.0, 100.0, 0.25),
        ] {
            let prox = Prox {
                eta,
                l1,
                l2,
                eps: PROX_EPS,
            };
            for &t in &[1.0f32, -0.37, 1e-6, -2e-9, 12.5, 0.0] {
                let gh = warm_push(t, eta, l1, l2, PROX_EPS);
                let mut w = [0.0f32];
                prox.apply(&mut w, &mut [], &gh);
                let err = (w[0] - t).abs();
                assert!(
                    err <= 1e-5 * t.abs(),
                    "eta {eta} l1 {l1} l2 {l2}: target {t}, got {}",
                    w[0]
                );
                assert!(gh.iter().all(|x| x.is_finite()));
            }
        }
    }
}
