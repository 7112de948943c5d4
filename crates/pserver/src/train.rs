//! `pserver train` and `pserver predict`: the main job. Train sparse logistic
//! regression on a cluster (a local one unless `--manager` is given), show
//! progress, score the test set, and write the report, plot and model.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pserver_apps::job::scheduler::{self, Pool};
use pserver_apps::model::Model;
use pserver_apps::progress::Progress;
use pserver_apps::report::{Report, merge_curve};
use pserver_apps::train::{Algo, DataFormat, RunResult, TrainConfig, train};
use pserver_data::Format;
use pserver_node::local::{LocalCluster, LocalConfig};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The bundled data set, relative to the repository root.
pub(crate) const FLIGHTS_DATA: &str = "data/nycflights13/flights.csv.gz";
/// Its schema.
pub(crate) const FLIGHTS_SCHEMA: &str = "data/nycflights13/flights.toml";

/// Most workers `pserver train` runs in its own process.
const MAX_LOCAL_WORKERS: usize = 64;

/// The lease of the cluster `pserver train` starts in its own process.
const LOCAL_LEASE_MS: u64 = 10_000;

/// Input formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatName {
    /// `label idx:val ...`
    Libsvm,
    /// Criteo TSV: label, 13 integer and 26 categorical fields.
    Criteo,
    /// CSV with a TOML schema (`--schema`).
    Csv,
}

/// Algorithms.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgoName {
    /// Delayed block proximal gradient (L1/L2 proximal step on the servers).
    Dbpg,
    /// Asynchronous SGD with FTRL-Proximal on the servers.
    Ftrl,
}

/// `pserver train` flags.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training data (default: the bundled flights data).
    #[arg(long, env = "PSERVER_TRAIN")]
    train: Option<PathBuf>,
    /// Test data (default: the schema's held-out split of --train).
    #[arg(long, env = "PSERVER_TEST")]
    test: Option<PathBuf>,
    /// Input format (default: csv for the bundled data, else libsvm).
    #[arg(long, env = "PSERVER_FORMAT", value_enum)]
    format: Option<FormatName>,
    /// Schema of a CSV input.
    #[arg(long, env = "PSERVER_SCHEMA")]
    schema: Option<PathBuf>,
    /// Learning algorithm.
    #[arg(long, env = "PSERVER_ALGO", value_enum, default_value_t = AlgoName::Dbpg)]
    algo: AlgoName,
    /// Bounded delay in iterations (0: sequential).
    #[arg(long, env = "PSERVER_TAU", default_value_t = 1)]
    tau: u64,
    /// L1 regularization.
    #[arg(long, env = "PSERVER_L1", default_value_t = 1.0)]
    l1: f32,
    /// L2 regularization.
    #[arg(long, env = "PSERVER_L2", default_value_t = 1.0)]
    l2: f32,
    /// Key-range blocks (dbpg).
    #[arg(long, env = "PSERVER_BLOCKS", default_value_t = 16)]
    blocks: usize,
    /// Passes over the data.
    #[arg(long, env = "PSERVER_EPOCHS", default_value_t = 10)]
    epochs: usize,
    /// Minibatch rows (ftrl).
    #[arg(long, env = "PSERVER_BATCH", default_value_t = 1000)]
    batch: usize,
    /// FTRL alpha.
    #[arg(long, env = "PSERVER_ALPHA", default_value_t = 0.1)]
    alpha: f32,
    /// FTRL beta.
    #[arg(long, env = "PSERVER_BETA", default_value_t = 1.0)]
    beta: f32,
    /// KKT filter margin delta in [0, 1) (dbpg); negative turns the filter off.
    #[arg(
        long,
        env = "PSERVER_KKT",
        default_value_t = 0.1,
        allow_hyphen_values = true
    )]
    kkt: f32,
    /// Servers of the local cluster.
    #[arg(long, env = "PSERVER_SERVERS", default_value_t = 2)]
    servers: usize,
    /// Replicas per key range in the local cluster (chain replication;
    /// must be below --servers).
    #[arg(long, env = "PSERVER_REPLICAS", default_value_t = 0)]
    replicas: usize,
    /// With --replicas: forward every worker's push down the chain instead
    /// of replicating each clock's applied sum once (replication after
    /// aggregation, the default).
    #[arg(long, env = "PSERVER_REPLICATE_EVERY_PUSH")]
    replicate_every_push: bool,
    /// Workers.
    #[arg(long, env = "PSERVER_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Join this manager's cluster instead of starting a local one.
    #[arg(long, env = "PSERVER_MANAGER")]
    manager: Option<String>,
    /// Run the job on this many worker processes of the cluster
    /// (`pserver worker --manager ...`) instead of workers in this
    /// process: this command is then the job's task scheduler. Needs
    /// --manager.
    #[arg(long, env = "PSERVER_REMOTE_WORKERS")]
    remote_workers: Option<usize>,
    #[command(flatten)]
    metrics: crate::MetricsArgs,
    /// Most worker processes the job takes: idle ones that appear during
    /// the run join it from the next epoch (default: --remote-workers).
    #[arg(long, env = "PSERVER_MAX_WORKERS")]
    max_workers: Option<usize>,
    /// How long to wait for --remote-workers idle worker processes.
    #[arg(long, env = "PSERVER_WAIT_WORKERS_SECS", default_value_t = 60)]
    wait_workers_secs: u64,
    /// With --manager: wait until the cluster has this many live servers
    /// before the job starts (a cluster engine starts its processes in
    /// any order).
    #[arg(long, env = "PSERVER_WAIT_SERVERS", default_value_t = 0)]
    wait_servers: usize,
    /// How long to wait for --wait-servers.
    #[arg(long, env = "PSERVER_WAIT_SERVERS_SECS", default_value_t = 60)]
    wait_servers_secs: u64,
    /// The job's name: its worker group, its table, and what its scheduler
    /// claims at the manager (one scheduler per job). Default: the
    /// algorithm and a time stamp.
    #[arg(long, env = "PSERVER_JOB")]
    job: Option<String>,
    /// Slow the job's first worker by this many ms per step (to show that
    /// a slow job does not hold another back).
    #[arg(long, env = "PSERVER_SLOW_WORKER_MS", default_value_t = 0)]
    slow_worker_ms: u64,
    /// Write every figure and the curve as JSON.
    #[arg(long, env = "PSERVER_REPORT")]
    report: Option<PathBuf>,
    /// Write the objective and test AUC against time as SVG.
    #[arg(long, env = "PSERVER_PLOT")]
    plot: Option<PathBuf>,
    /// Save the trained weights to this directory.
    #[arg(long, env = "PSERVER_SAVE")]
    save: Option<PathBuf>,
    /// Send every key list in full (turns the key caching filter off).
    #[arg(long, env = "PSERVER_NO_KEY_CACHING")]
    no_key_caching: bool,
    /// Pack the values workers push (lossless or fixed point with random
    /// rounding); servers then pack pulled values losslessly.
    #[arg(long, env = "PSERVER_COMPRESS", value_enum, default_value = "none")]
    compress: crate::parse::Compress,
    /// The significantly-modified filter on servers' replies: servers send
    /// a pulled weight only when it moved by more than THRESHOLD since the
    /// value they last sent that worker; the worker keeps what it received
    /// and fills in the rest (each weight it uses is within THRESHOLD).
    #[arg(long, env = "PSERVER_SIGNIFICANT", value_name = "THRESHOLD", value_parser = crate::parse::threshold)]
    significant: Option<f32>,
    /// The significantly-modified filter on workers' pushes: an entry goes
    /// once the sum of its pushes since it last went passes THRESHOLD in
    /// some value; until then it is carried (for additive pushes such as
    /// DBPG's gradient and curvature).
    #[arg(long, env = "PSERVER_SIGNIFICANT_PUSH", value_name = "THRESHOLD", value_parser = crate::parse::threshold)]
    significant_push: Option<f32>,
    /// Random skip on workers' pushes: drop each entry with probability P
    /// and scale the kept ones by 1/(1-P), so the push's expectation is
    /// unchanged (seeded by worker, table and clock).
    #[arg(long, env = "PSERVER_RANDOM_SKIP", value_name = "P", value_parser = crate::parse::probability)]
    random_skip: Option<f64>,
    /// Fault injection: stop the last worker this many ms into training,
    /// as if its machine died; its shard goes to another worker and the
    /// run carries on (DBPG).
    #[arg(long, env = "PSERVER_FAIL_WORKER_AFTER_MS")]
    fail_worker_after_ms: Option<u64>,
    /// Write checkpoints here (DBPG): DIR/epoch-E, and DIR/LATEST naming
    /// the newest whole one.
    #[arg(long, env = "PSERVER_CHECKPOINT_DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every N epochs (0: never).
    #[arg(long, env = "PSERVER_CHECKPOINT_EVERY", default_value_t = 0)]
    checkpoint_every: usize,
    /// Go on from the newest checkpoint in --checkpoint-dir, if any (after a
    /// whole-cluster restart), instead of starting from zero.
    #[arg(long, env = "PSERVER_RESUME")]
    resume: bool,
    /// Pick --l1 and --l2 on a seeded validation split of the training
    /// data (a warm-started path over --tune-l1 x --tune-l2, strong to weak),
    /// print the choice and the validation curve, then train on all the
    /// training data with them (dbpg).
    #[arg(long, env = "PSERVER_TUNE")]
    tune: bool,
    /// --tune's L1 values (comma-separated; default 4,1,0).
    #[arg(
        long,
        env = "PSERVER_TUNE_L1",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    tune_l1: Option<Vec<f32>>,
    /// --tune's L2 values (comma-separated; default 256,64,16,4,1,0.25).
    #[arg(
        long,
        env = "PSERVER_TUNE_L2",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    tune_l2: Option<Vec<f32>>,
    /// Share of the training lines --tune validates on, in (0, 1).
    #[arg(
        long,
        env = "PSERVER_TUNE_FRACTION",
        default_value_t = 0.2,
        allow_hyphen_values = true
    )]
    tune_fraction: f64,
    /// Seed of --tune's validation split.
    #[arg(long, env = "PSERVER_TUNE_SEED", default_value_t = 1)]
    tune_seed: u64,
    /// Epochs of each warm-started point of --tune's path (its first point
    /// runs --epochs from zero).
    #[arg(long, env = "PSERVER_TUNE_EPOCHS", default_value_t = 3)]
    tune_epochs: usize,
    /// Score the test set every this many milliseconds while training (0: only at the end).
    #[arg(long, env = "PSERVER_EVAL_EVERY_MS", default_value_t = 200)]
    eval_every_ms: u64,
}

/// `pserver predict` flags.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Directory written by `pserver train --save`.
    #[arg(long)]
    model: PathBuf,
    /// Data to score.
    #[arg(long)]
    data: PathBuf,
    /// Input format (default: the one the model was trained on).
    #[arg(long, value_enum)]
    format: Option<FormatName>,
    /// Schema of a CSV input (default: the one the model was trained on).
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Write probabilities here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Finds a bundled file: relative to the working directory, else in the
/// source tree this binary was built from.
pub(crate) fn bundled(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::canonicalize(&built).unwrap_or(here)
}

fn format_of(name: FormatName, schema: Option<&Path>) -> Result<Format> {
    data_format(name, schema)?.load().map_err(Into::into)
}

/// The format as a job names it (a CSV schema by its path, which every
/// worker reads).
fn data_format(name: FormatName, schema: Option<&Path>) -> Result<DataFormat> {
    Ok(match name {
        FormatName::Libsvm => DataFormat::Libsvm,
        FormatName::Criteo => DataFormat::Criteo,
        FormatName::Csv => {
            let path = schema.context("--format csv needs --schema FILE")?;
            DataFormat::Csv(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
        }
    })
}

/// Runs `pserver train`. A local cluster runs on `sec.in_process()` (a
/// fresh secret unless one is configured); `--manager` uses `sec.net`.
pub async fn run(args: TrainArgs, sec: &crate::security::Security) -> Result<()> {
    let net = match &args.manager {
        Some(_) => sec.net.clone(),
        None => sec.in_process(),
    };
    let bundled_run = args.train.is_none();
    let train_path = args.train.clone().unwrap_or_else(|| bundled(FLIGHTS_DATA));
    let schema = match (&args.schema, bundled_run) {
        (Some(s), _) => Some(s.clone()),
        (None, true) => Some(bundled(FLIGHTS_SCHEMA)),
        (None, false) => None,
    };
    let fname = args.format.unwrap_or(if schema.is_some() {
        FormatName::Csv
    } else {
        FormatName::Libsvm
    });
    let format = data_format(fname, schema.as_deref())?;
    // Checked here, so a bad schema is one clear line before anything runs.
    format.load()?;
    if args.remote_workers.is_some() && args.manager.is_none() {
        bail!("--remote-workers needs --manager: worker processes join a cluster's manager");
    }
    if args.wait_servers > 0 && args.manager.is_none() {
        bail!("--wait-servers needs --manager: a local cluster has its --servers from the start");
    }
    if args.remote_workers == Some(0) {
        bail!("--remote-workers must be at least 1");
    }
    if args.fail_worker_after_ms.is_some() && args.remote_workers.is_some() {
        bail!("--fail-worker-after-ms stops an in-process worker; kill a worker process instead");
    }
    if args.remote_workers.is_none() && args.workers > MAX_LOCAL_WORKERS {
        bail!(
            "--workers {} is more than the {MAX_LOCAL_WORKERS} workers one process runs well; run `pserver worker` processes and --remote-workers for more",
            args.workers
        );
    }
    let workers = args.remote_workers.unwrap_or(args.workers);
    let cfg = TrainConfig {
        algo: match args.algo {
            AlgoName::Dbpg => Algo::Dbpg,
            AlgoName::Ftrl => Algo::Ftrl,
        },
        train: train_path.clone(),
        test: args.test.clone(),
        format,
        workers,
        job: args.job.clone(),
        slow_worker_ms: args.slow_worker_ms,
        tau: args.tau,
        l1: args.l1,
        l2: args.l2,
        blocks: args.blocks,
        epochs: args.epochs,
        batch: args.batch,
        alpha: args.alpha,
        beta: args.beta,
        kkt: (args.kkt >= 0.0).then_some(args.kkt),
        eval_every: (args.eval_every_ms > 0).then(|| Duration::from_millis(args.eval_every_ms)),
        key_caching: !args.no_key_caching,
        compression: args.compress.packing(),
        value_filters: pserver_node::worker::ValueFilters {
            significant_pull: args.significant,
            significant_push: args.significant_push,
            random_skip: args.random_skip,
            significant_push_tests: 0,
        },
        fail_worker: args
            .fail_worker_after_ms
            .map(|ms| (args.workers.saturating_sub(1), Duration::from_millis(ms))),
        checkpoint_dir: args.checkpoint_dir.clone(),
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        net: net.clone(),
    };
    cfg.validate()?;
    let tune = args.tune.then(|| {
        let d = pserver_apps::tune::TuneConfig::default();
        pserver_apps::tune::TuneConfig {
            l1: args.tune_l1.clone().unwrap_or(d.l1),
            l2: args.tune_l2.clone().unwrap_or(d.l2),
            fraction: args.tune_fraction,
            seed: args.tune_seed,
            epochs: args.tune_epochs,
        }
    });
    if let Some(t) = &tune {
        t.validate(&cfg)?;
    } else if args.tune_l1.is_some() || args.tune_l2.is_some() {
        bail!("--tune-l1 and --tune-l2 are --tune's grid: give --tune too");
    }
    if args.servers == 0 {
        bail!("--servers must be at least 1");
    }
    if args.replicas >= args.servers {
        bail!(
            "--replicas {} needs more than {} servers (a replica is another server)",
            args.replicas,
            args.servers
        );
    }

    // Before the cluster starts, so a probe hears "starting" rather than
    // nothing.
    let metrics = args
        .metrics
        .start("starting: the job's cluster and workers are not up yet")
        .await?;
    let cluster: LocalCluster;
    let mut local = None;
    let manager = match &args.manager {
        Some(m) => m.clone(),
        None => {
            let mut lc = LocalConfig {
                servers: args.servers,
                ..LocalConfig::default()
            };
            lc.manager.listen = "127.0.0.1:0".into();
            lc.manager.net = net.clone();
            // Every node shares this process's cores with the workers'
            // loading and computing: a lease long enough that a busy
            // machine never has its own cluster declared dead. (A lost
            // in-process worker is seen by its link, not its lease.)
            lc.manager.membership.lease_ms = LOCAL_LEASE_MS;
            lc.manager.membership.replicas = args.replicas;
            lc.replicate_after_aggregation = !args.replicate_every_push;
            cluster = LocalCluster::start(lc)
                .await
                .context("starting the local cluster")?;
            local = Some(&cluster);
            cluster.manager_addr().to_string()
        }
    };
    if args.wait_servers > 0 {
        let limit = Duration::from_secs(args.wait_servers_secs);
        wait_for_servers(&manager, &net, args.wait_servers, limit).await?;
    }
    println!(
        "training {} on {} ({} workers, {}; tau {}, l1 {}, l2 {}) via manager {}",
        args.algo_name(),
        train_path.display(),
        workers,
        match (&args.manager, args.remote_workers) {
            (Some(_), Some(_)) => "worker processes of an existing cluster".to_string(),
            (Some(_), None) => "existing cluster".to_string(),
            (None, _) => format!("local cluster of {} servers", args.servers),
        },
        args.tau,
        if args.tune {
            "by --tune".to_string()
        } else {
            args.l1.to_string()
        },
        if args.tune {
            "by --tune".to_string()
        } else {
            args.l2.to_string()
        },
        manager
    );

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // The scheduler's events feed the job's figures on their way to the
    // progress bar.
    let gauges = pserver_apps::gauges::JobGauges::new();
    // The job's name when given (a default one is stamped when the job
    // starts), else the algorithm's.
    gauges.start(args.job.as_deref().unwrap_or(args.algo_name()));
    let rx = {
        let (ui_tx, ui_rx) = tokio::sync::mpsc::unbounded_channel();
        let g = gauges.clone();
        let mut rx = rx;
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                g.progress(&p);
                let _ = ui_tx.send(p);
            }
        });
        ui_rx
    };
    if let Some((_, slot)) = &metrics {
        let job: Arc<dyn pserver_node::metrics::Exporter> =
            Arc::new(pserver_apps::gauges::JobExporter {
                scope: pserver_apps::gauges::Scope::Job,
                gauges: gauges.clone(),
            });
        slot.set(match local {
            // The local cluster's nodes beside the job, each under its
            // `node` label.
            Some(c) => {
                let mut parts = vec![
                    ("job".to_string(), job),
                    ("manager".into(), c.manager.exporter()),
                ];
                for s in &c.servers {
                    parts.push((format!("server-{}", s.id()), s.exporter()));
                }
                Arc::new(pserver_node::metrics::Merged(parts))
            }
            None => job,
        });
    }
    let total = match cfg.algo {
        Algo::Dbpg => (cfg.blocks * cfg.epochs) as u64,
        Algo::Ftrl => 0,
    };
    let ui = tokio::spawn(show_progress(rx, total, cfg.workers));
    let pool = |min: usize| Pool::Remote {
        min,
        max: args.max_workers.unwrap_or(min).max(min),
        wait: Duration::from_secs(args.wait_workers_secs),
    };
    let mut tuned = None;
    let result = match (&tune, args.remote_workers) {
        (None, None) => train(&manager, &cfg, tx).await,
        (None, Some(min)) => scheduler::run(&manager, &cfg, pool(min), tx).await,
        (Some(t), remote) => {
            let r = match remote {
                None => pserver_apps::tune::train(&manager, &cfg, t, tx).await,
                Some(min) => pserver_apps::tune::run(&manager, &cfg, t, pool(min), tx).await,
            };
            r.map(|r| {
                tuned = Some(r.report);
                r.result
            })
        }
    };
    let _ = ui.await;
    gauges.finish();
    let replicated = local.map(|c| c.replicated_bytes());
    if let Some(c) = local {
        c.stop().await;
    }
    let result = result?;
    report_bad_lines(&result);
    let mut report = report_of(&args, &cfg, &result);
    if let Some(t) = tuned {
        print!("{}", tune_table(&t));
        report.l1 = t.l1;
        report.l2 = t.l2;
        report.tune = Some(t);
    }
    print!("{}", report.table());
    if let Some(bytes) = replicated.filter(|_| args.replicas > 0) {
        println!(
            "  bytes replicated  {} (servers to their replicas)",
            pserver_apps::report::format_bytes(bytes)
        );
    }
    if let Some(path) = &args.report {
        report
            .write_json(path)
            .with_context(|| format!("writing the report to {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        report
            .write_svg(path)
            .with_context(|| format!("writing the plot to {}", path.display()))?;
        println!("plot written to {}", path.display());
    }

    if let Some(path) = &args.save {
        // Zero weights predict nothing; a missing key reads as zero anyway.
        let mut model = result.model.clone().without_zeros();
        model.meta = serde_json::json!({
            "format": format!("{fname:?}").to_lowercase(),
            "schema": schema.as_ref().map(|s| absolute(s)),
            "algo": args.algo_name(),
            "trained_on": absolute(&train_path),
        });
        model
            .save(path)
            .with_context(|| format!("saving the model to {}", path.display()))?;
        println!("model saved to {}", path.display());
    }
    Ok(())
}

impl TrainArgs {
    fn algo_name(&self) -> &'static str {
        match self.algo {
            AlgoName::Dbpg => "dbpg",
            AlgoName::Ftrl => "ftrl",
        }
    }
}

fn absolute(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Draws a progress bar on a terminal; prints a line now and then otherwise.
async fn show_progress(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Progress>,
    total: u64,
    workers: usize,
) {
    let tty = std::io::stderr().is_terminal();
    let bar = if total > 0 {
        ProgressBar::new(total)
    } else {
        ProgressBar::new_spinner()
    };
    if !tty {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} it {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut loaded = 0;
    let mut last_print = std::time::Instant::now();
    let (mut objective, mut auc) = (f64::NAN, f64::NAN);
    while let Some(ev) = rx.recv().await {
        match ev {
            Progress::Loaded { worker, rows } => {
                loaded += 1;
                println!("  worker {worker} loaded {rows} rows ({loaded}/{workers})");
            }
            Progress::Objective {
                iteration,
                objective: o,
                ..
            } => {
                objective = o;
                bar.set_position(iteration);
                bar.set_message(format!("objective {objective:.4}  test AUC {auc:.4}"));
            }
            Progress::Test {
                seconds, auc: a, ..
            } => {
                auc = a;
                bar.set_message(format!("objective {objective:.4}  test AUC {auc:.4}"));
                if !tty && last_print.elapsed() > Duration::from_secs(2) {
                    last_print = std::time::Instant::now();
                    println!(
                        "  {seconds:6.1} s  iteration {}  objective {objective:.4}  test AUC {auc:.4}",
                        bar.position()
                    );
                }
            }
            Progress::Iter(_) => {}
            Progress::WorkerLost { worker, why } => {
                bar.suspend(|| println!("  worker {worker} lost: {why}"));
            }
            Progress::Adopted { worker, rows } => {
                bar.suspend(|| println!("  worker {worker} now holds {rows} rows"));
            }
            Progress::Joined { worker, node } => {
                bar.suspend(|| {
                    println!("  worker {worker} (node {node}) joined; it takes a share from the next epoch")
                });
            }
            Progress::Checkpointed { epoch, dir } => {
                bar.suspend(|| println!("  checkpoint after epoch {epoch}: {}", dir.display()));
            }
            Progress::Tuned {
                point,
                points,
                l1,
                l2,
                epochs,
                warm,
                logloss,
                auc,
            } => {
                bar.suspend(|| {
                    println!(
                        "  tune {}/{points}: l1 {l1} l2 {l2} ({epochs} epochs{})  validation log-loss {logloss:.5}  AUC {auc:.4}",
                        point + 1,
                        if warm { ", warm" } else { ", from zero" }
                    )
                });
            }
            Progress::Resumed { epoch, dir } => {
                println!("  resuming after epoch {epoch} from {}", dir.display());
            }
        }
    }
    bar.finish_and_clear();
}

/// `--tune`'s choice and validation curve.
fn tune_table(t: &pserver_apps::tune::TuneReport) -> String {
    let mut out = format!(
        "tune: {} points on a validation split of {:.0} % of the training lines (seed {}; {} rows fit, {} validate) in {:.1} s\n",
        t.points.len(),
        t.fraction * 100.0,
        t.seed,
        t.fit_rows,
        t.validation_rows,
        t.seconds
    );
    out.push_str("      l1        l2  epochs  start    val log-loss  val AUC   non-zero\n");
    for (i, p) in t.points.iter().enumerate() {
        out.push_str(&format!(
            "{:>8} {:>9} {:>7}  {:<5}  {:>13.5}  {:>7.4}  {:>9}{}\n",
            p.l1,
            p.l2,
            p.epochs,
            p.warm_from
                .map_or("zero".to_string(), |w| format!("#{}", w + 1)),
            p.logloss,
            p.auc,
            p.nnz,
            if i == t.chosen { "  <- chosen" } else { "" }
        ));
    }
    out.push_str(&format!(
        "chosen: --l1 {} --l2 {}; trained on all the training data:\n",
        t.l1, t.l2
    ));
    out
}

fn report_bad_lines(r: &RunResult) {
    let bad: u64 = r.bad.iter().map(|s| s.bad).sum();
    if bad == 0 {
        return;
    }
    eprintln!("warning: {bad} malformed input lines were skipped; the first:");
    for b in r.bad.iter().flat_map(|s| s.first_bad.iter()).take(10) {
        eprintln!("  {}:{}: {}", b.path, b.line, b.message);
    }
}

/// Every figure of the run, with the settings it ran with.
fn report_of(args: &TrainArgs, cfg: &TrainConfig, r: &RunResult) -> Report {
    Report {
        algo: args.algo_name().to_string(),
        train_path: cfg.train.display().to_string(),
        test_path: cfg.test.as_ref().map(|p| p.display().to_string()),
        servers: r.servers,
        workers: cfg.workers,
        tau: cfg.tau,
        l1: cfg.l1,
        l2: cfg.l2,
        blocks: cfg.blocks,
        epochs: cfg.epochs,
        train_examples: r.train_rows as u64,
        test_examples: r.test.examples as u64,
        bad_lines: r.bad.iter().map(|s| s.bad).sum(),
        test_logloss: r.test.logloss,
        test_auc: r.test.auc,
        test_accuracy: r.test.accuracy,
        nnz: r.nnz as u64,
        seconds: r.train_seconds,
        load_seconds: r.load_seconds,
        examples_per_sec: (r.train_rows * cfg.epochs) as f64 / r.train_seconds.max(1e-9),
        bytes_sent: r.bytes_sent,
        bytes_received: r.bytes_received,
        bytes_saved: r.bytes_saved,
        wait_fraction: r.wait_fraction,
        send_fraction: r.send_fraction,
        curve: merge_curve(&r.curve, &r.test_curve),
        tune: None,
        peak_rss_per_worker: r
            .memory
            .iter()
            .map(|m| m.peak_rss)
            .filter(|&p| p > 0)
            .collect(),
        shard_bytes_per_nnz: r.memory.iter().map(|m| m.bytes).sum::<u64>() as f64
            / r.memory.iter().map(|m| m.nnz).sum::<u64>().max(1) as f64,
    }
}

/// Runs `pserver predict`.
pub async fn predict(args: PredictArgs) -> Result<()> {
    let model = Model::load(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let meta_format = model
        .meta
        .get("format")
        .and_then(|v| v.as_str())
        .unwrap_or("libsvm");
    let fname = match args.format {
        Some(f) => f,
        None => match meta_format {
            "csv" => FormatName::Csv,
            "criteo" => FormatName::Criteo,
            _ => FormatName::Libsvm,
        },
    };
    let schema = args.schema.clone().or_else(|| {
        model
            .meta
            .get("schema")
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
    });
    let format = format_of(fname, schema.as_deref())?;
    let opts = pserver_data::ReadOptions::default();
    let mut reader = pserver_data::open(&args.data, &format, &opts)?;
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let written = (|| -> std::io::Result<()> {
        for ex in reader.by_ref() {
            writeln!(out, "{:.6}", model.predict(&ex.keys, &ex.vals))?;
        }
        out.flush()
    })();
    match written {
        // The reader of our output (`head`, say) has had enough: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        other => other.context("writing predictions")?,
    }
    if let Some(e) = reader.error() {
        bail!("{e}");
    }
    let stats = reader.stats();
    if stats.bad > 0 {
        eprintln!(
            "warning: {} malformed lines skipped (no prediction written)",
            stats.bad
        );
        for b in &stats.first_bad {
            eprintln!("  {}:{}: {}", b.path, b.line, b.message);
        }
    }
    Ok(())
}

/// Waits until the manager at `manager` answers and has `n` live servers,
/// at most `limit`; the error says how many came.
async fn wait_for_servers(
    manager: &str,
    net: &pserver_node::net::Net,
    n: usize,
    limit: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    // The manager may not be up yet either.
    let w = loop {
        match crate::client(manager, net).await {
            Ok(w) => break w,
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!("waiting {} s for servers", limit.as_secs())));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let result = loop {
        let map = w.refresh().await.context("reading the map")?;
        let live = map
            .nodes
            .iter()
            .filter(|x| {
                x.role == pserver_core::Role::Server && x.state == pserver_core::NodeState::Alive
            })
            .count();
        if live >= n {
            break Ok(());
        }
        if start.elapsed() > limit {
            break Err(anyhow::anyhow!(
                "{live} of the {n} servers of --wait-servers are live after {} s \
                 (--wait-servers-secs)",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    w.leave().await;
    result
}
