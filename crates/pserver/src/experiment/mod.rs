//! `pserver experiment`: the papers' experiments, re-run on this machine.
//!
//! - `tau` (tau.rs): the bounded-delay experiment, in-process or on
//!   emulated hosts (hosts.rs: network namespaces, veth pairs, relays).
//! - `filters` (filters.rs): bytes on the wire with each filter.
//! - `failover` (failover.rs, pipelined.rs): a server killed under load.
//! - `jobs` (jobs.rs): two jobs on one cluster, one slowed.

mod failover;
mod filters;
mod hosts;
mod jobs;
mod netns_cluster;
mod pipelined;
mod tau;

use crate::train::{FLIGHTS_DATA, FLIGHTS_SCHEMA, bundled};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use filters::FiltersArgs;
use pserver_apps::train::DataFormat;
use pserver_apps::train::{Algo, RunResult, TrainConfig, train};
use pserver_node::local::{LocalCluster, LocalConfig};
use std::time::Duration;
use tau::TauArgs;

/// Key-range blocks (`pserver train --blocks`). These constants are `pserver
/// train`'s defaults, so that the experiment measures the job people run.
const BLOCKS: usize = 16;
/// L1 strength (`pserver train --l1`).
const L1: f32 = 1.0;
/// L2 strength (`pserver train --l2`).
const L2: f32 = 1.0;
/// KKT filter margin (`pserver train --kkt`).
const KKT: f32 = 0.1;

/// `pserver experiment` flags.
#[derive(Args, Debug)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    cmd: ExperimentCmd,
}

/// The experiments.
#[derive(Subcommand, Debug)]
enum ExperimentCmd {
    /// Bounded delay: time to reach a target objective and share of worker
    /// time spent waiting, for each delay tau (DBPG on the bundled flights data).
    Tau(TauArgs),
    /// Bytes sent by workers and servers with no filter, key caching,
    /// compression, the KKT filter, and all (DBPG on the bundled flights data).
    Filters(FiltersArgs),
    /// Kill (or freeze) a server under load: time until it is declared
    /// dead and until its range takes pushes again; no acknowledged push lost.
    Failover(failover::FailoverArgs),
    /// Two jobs on one cluster of processes, one slowed on purpose: the
    /// fast job's iterations per second, alone and beside it.
    Jobs(jobs::JobsArgs),
}

/// The run `pserver train` makes on the bundled data, at tau 0, without
/// scoring during training (it would steal the cores the workers are timed
/// on; the final score is taken after the clock stops).
pub(crate) fn flights(workers: usize, epochs: usize, key_caching: bool) -> Result<TrainConfig> {
    let data = bundled(FLIGHTS_DATA);
    let schema_path = bundled(FLIGHTS_SCHEMA);
    if !data.exists() {
        bail!(
            "the bundled data {} is not here; run from the repository root",
            data.display()
        );
    }
    // Checked here so a broken schema is one clear line before anything runs.
    pserver_data::load_schema(&schema_path)
        .with_context(|| format!("loading the schema {}", schema_path.display()))?;
    Ok(TrainConfig {
        algo: Algo::Dbpg,
        train: data,
        test: None,
        format: DataFormat::Csv(schema_path),
        job: None,
        slow_worker_ms: 0,
        workers,
        tau: 0,
        l1: L1,
        l2: L2,
        blocks: BLOCKS,
        epochs,
        // Unused by DBPG; `pserver train`'s defaults keep validation happy.
        batch: 1000,
        alpha: 0.1,
        beta: 1.0,
        kkt: Some(KKT),
        eval_every: None,
        key_caching,
        compression: None,
        value_filters: Default::default(),
        fail_worker: None,
        checkpoint_dir: None,
        checkpoint_every: 0,
        resume: false,
        net: Default::default(),
    })
}

/// Runs `pserver experiment ...`.
pub async fn run(args: ExperimentArgs) -> Result<()> {
    match args.cmd {
        ExperimentCmd::Tau(a) => tau::run(a).await,
        ExperimentCmd::Filters(a) => filters::run(a).await,
        ExperimentCmd::Failover(a) => failover::run(a).await,
        ExperimentCmd::Jobs(a) => jobs::run(a).await,
    }
}

/// One run on a fresh local cluster, stopped afterwards.
async fn one_run(cfg: &TrainConfig, servers: usize) -> Result<RunResult> {
    let mut lc = LocalConfig {
        servers,
        ..LocalConfig::default()
    };
    lc.manager.listen = "127.0.0.1:0".into();
    let cluster = LocalCluster::start(lc)
        .await
        .context("starting the local cluster")?;
    // Nobody reads the progress events: a closed channel makes sends no-ops.
    let (tx, _) = tokio::sync::mpsc::unbounded_channel();
    let result = train(&cluster.manager_addr().to_string(), cfg, tx).await;
    cluster.shutdown();
    // Let the nodes' tasks see the cancellation before the next run starts,
    // so they do not compete with it for the cores.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(result?)
}
