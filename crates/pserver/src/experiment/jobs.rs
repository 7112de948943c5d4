//! `pserver experiment jobs`: two training jobs on one cluster of
//! processes, one of them slowed on purpose. Each job counts only its own
//! workers, so the fast one should run as fast as alone: this measures it.
//! A manager, 2 servers and 4 `pserver worker` processes; the fast job runs
//! alone, then beside a slow job (its first worker sleeps `--slow-ms` a
//! step), `--runs` times each; the table gives the fast job's iterations
//! per second, medians, and their ratio.

use super::flights;
use crate::bench::procs::Procs;
use crate::bench::stats::median;
use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_apps::job::scheduler::{self, Pool};
use pserver_apps::progress::Progress;
use pserver_apps::train::TrainConfig;
use std::time::Duration;

/// `pserver experiment jobs` flags.
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Runs of each case; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Epochs of the fast job.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// How long the slow job's first worker sleeps every step.
    #[arg(long, default_value_t = 200)]
    slow_ms: u64,
}

/// One fast run: iterations per second of training.
async fn fast_run(manager: &str, cfg: &TrainConfig) -> Result<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let pool = Pool::Remote {
        min: 2,
        max: 2,
        wait: Duration::from_secs(60),
    };
    let r = scheduler::run(manager, cfg, pool, tx).await?;
    let _ = drain.await;
    Ok(cfg.steps() as f64 / r.train_seconds.max(1e-9))
}

/// Runs the experiment.
pub async fn run(args: JobsArgs) -> Result<()> {
    if args.runs == 0 || args.epochs == 0 {
        bail!("--runs and --epochs must be at least 1");
    }
    let mut procs = Procs::new(&[]);
    let manager = procs.start_cluster(2)?;
    for _ in 0..4 {
        procs.start(&["worker", "--manager", &manager])?;
    }
    let base = flights(2, args.epochs, true)?;
    println!(
        "jobs experiment: dbpg on the bundled data, 2 servers, 2 worker processes per job, {} epochs x {} blocks, tau {}; the slow job's first worker sleeps {} ms a step",
        args.epochs, base.blocks, base.tau, args.slow_ms
    );
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let cfg = TrainConfig {
            job: Some(format!("alone-{run}")),
            ..base.clone()
        };
        alone.push(
            fast_run(&manager, &cfg)
                .await
                .context("the fast job alone")?,
        );
        // The slow job outlasts the fast one: it has ten times the epochs.
        let slow_cfg = TrainConfig {
            job: Some(format!("slow-{run}")),
            epochs: args.epochs * 10,
            slow_worker_ms: args.slow_ms,
            eval_every: None,
            ..base.clone()
        };
        let m = manager.clone();
        let (stx, mut srx) = tokio::sync::mpsc::unbounded_channel();
        let slow = tokio::spawn(async move {
            let pool = Pool::Remote {
                min: 2,
                max: 2,
                wait: Duration::from_secs(60),
            };
            scheduler::run(&m, &slow_cfg, pool, stx).await
        });
        // Once the slow job runs, the fast one starts.
        while let Some(ev) = srx.recv().await {
            if matches!(ev, Progress::Objective { .. }) {
                break;
            }
        }
        let cfg = TrainConfig {
            job: Some(format!("beside-{run}")),
            ..base.clone()
        };
        let rate = fast_run(&manager, &cfg)
            .await
            .context("the fast job beside the slow one");
        let slow_done = slow.is_finished();
        slow.abort();
        let rate = rate?;
        if slow_done {
            bail!("the slow job ended before the fast one; raise --slow-ms");
        }
        beside.push(rate);
        println!(
            "  run {}: alone {:.1} it/s, beside the slow job {:.1} it/s",
            run + 1,
            alone[run],
            rate
        );
        // The aborted scheduler's workers go idle once their link breaks.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (a, b) = (median(alone), median(beside));
    println!("| fast job | iterations/s (median of {}) |", args.runs);
    println!("|---|---:|");
    println!("| alone | {a:.1} |");
    println!("| beside a slowed job | {b:.1} |");
    println!("| ratio | {:.2} |", b / a.max(1e-9));
    Ok(())
}
