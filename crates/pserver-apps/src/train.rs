//! A whole training run against a cluster: load each worker's shard, create
//! the weights table, run the workers, score the test set along the way,
//! and collect the model and the figures of the run.

use crate::dataset::{Builder, Dataset};
use crate::dbpg;
pub use crate::job::DataFormat;
use crate::job::agent::{Agent, AgentConfig};
pub use crate::job::proto::Algo;
use crate::job::scheduler::{self, Pool};
use crate::metrics::{Metrics, sigmoid};
use crate::model::Model;
use crate::progress::Progress;
use pserver_data::{Format, ReadOptions, ReadStats, Shard, Split};
use pserver_node::NodeError;
use pserver_node::worker::{Packing, ValueFilters, Worker};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Algorithm.
    pub algo: Algo,
    /// Training data: a file, or a glob naming several (each worker
    /// expands it on its own file system, or reads its own `--data`).
    pub train: PathBuf,
    /// Test data, read by the scheduler; `None` takes the schema's
    /// held-out split of `train`.
    pub test: Option<PathBuf>,
    /// How to read both.
    pub format: DataFormat,
    /// Workers to run (in this process: [`train`]; as worker processes:
    /// the number a remote job starts with).
    pub workers: usize,
    /// The job's name (its worker group, its table, the name its scheduler
    /// claims); `None`: the algorithm and a time stamp.
    pub job: Option<String>,
    /// Slow worker 0's every step by this many ms (a test's slow worker).
    pub slow_worker_ms: u64,
    /// Bounded delay (0: sequential).
    pub tau: u64,
    /// L1 strength.
    pub l1: f32,
    /// L2 strength.
    pub l2: f32,
    /// Key-range blocks (DBPG).
    pub blocks: usize,
    /// Passes over the data.
    pub epochs: usize,
    /// Minibatch size (FTRL).
    pub batch: usize,
    /// FTRL learning-rate scale.
    pub alpha: f32,
    /// FTRL learning-rate smoothing.
    pub beta: f32,
    /// KKT filter margin (DBPG), `None` for no filter.
    pub kkt: Option<f32>,
    /// Score the test set this often during the run (besides at the end).
    pub eval_every: Option<Duration>,
    /// Send repeated key lists as hashes (the key caching filter).
    pub key_caching: bool,
    /// Pack pushed values (lossless or fixed point) and have servers pack
    /// pulled values losslessly (the compression filter); `None`: raw.
    pub compression: Option<Packing>,
    /// The value filters (significantly-modified on pull replies and on
    /// pushes, random skip on pushes); all off by default.
    pub value_filters: ValueFilters,
    /// Where to write checkpoints (DBPG): `DIR/epoch-E`, and `DIR/LATEST`
    /// naming the newest whole one.
    pub checkpoint_dir: Option<PathBuf>,
    /// Write one every this many epochs (0: never).
    pub checkpoint_every: usize,
    /// Start from the newest checkpoint in `checkpoint_dir`, if there is one
    /// (its table is restored into the cluster and training goes on from
    /// the epoch after it), instead of from zero.
    pub resume: bool,
    /// Fault injection: stop in-process worker `.0` this long into
    /// training, as if its machine died (its link closes and it stops
    /// heartbeating), to show that its shard is taken over and the run
    /// finishes.
    pub fail_worker: Option<(usize, Duration)>,
    /// How the run's workers reach the cluster: the same transport (TLS,
    /// the cluster secret) its nodes use.
    pub net: pserver_node::net::Net,
}

/// Why `what`, read with `stats`, gave no examples: every line bad (then
/// the first few say why), or simply none.
pub(crate) fn empty(what: &str, stats: &[ReadStats]) -> TrainError {
    let bad: u64 = stats.iter().map(|s| s.bad).sum();
    if bad == 0 {
        return TrainError::Empty(what.to_string());
    }
    let first: Vec<String> = stats
        .iter()
        .flat_map(|s| s.first_bad.iter())
        .take(3)
        .map(|b| b.to_string())
        .collect();
    TrainError::AllBad {
        what: what.to_string(),
        bad,
        first: first.join("; "),
    }
}

/// Most key-range blocks a run may ask for: far more than any data set's
/// use, few enough that every worker's block bounds (8 bytes a block) stay
/// small before the data can say how many features there are.
pub const MAX_BLOCKS: usize = 1 << 20;

/// Most workers one job may have.
pub const MAX_WORKERS: usize = 1024;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading data failed.
    #[error(transparent)]
    Data(#[from] pserver_data::DataError),
    /// The cluster refused or failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The configuration cannot work.
    #[error("invalid training config: {0}")]
    Config(String),
    /// There is nothing to train on.
    #[error("{0} holds no usable examples")]
    Empty(String),
    /// There is nothing to train on: every line was malformed.
    #[error("{what} holds no usable examples: {bad} malformed lines, the first: {first}")]
    AllBad {
        /// The data.
        what: String,
        /// Malformed lines.
        bad: u64,
        /// The first few, with file, line and reason.
        first: String,
    },
    /// A worker task panicked or was cancelled.
    #[error("worker {0} failed: {1}")]
    Worker(usize, String),
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// Test figures at the end.
    pub test: Metrics,
    /// Live servers of the cluster when training ended.
    pub servers: usize,
    /// Non-zero weights.
    pub nnz: usize,
    /// The trained weights.
    pub model: Model,
    /// Training rows over all workers.
    pub train_rows: usize,
    /// Lines refused by the readers, with the first few.
    pub bad: Vec<ReadStats>,
    /// Wall time of the training phase (after loading).
    pub train_seconds: f64,
    /// Wall time of loading.
    pub load_seconds: f64,
    /// Bytes the workers sent and received.
    pub bytes_sent: u64,
    /// Bytes the workers received.
    pub bytes_received: u64,
    /// Bytes the filters kept off the wire (KKT: 16 per coordinate, key,
    /// g and h; key caching and compression as the workers counted).
    pub bytes_saved: u64,
    /// Fraction of worker time spent in push/pull (consistency waits included).
    pub wait_fraction: f64,
    /// The part of it spent handing messages to the connections (see
    /// [`StepStats::send_us`](crate::job::proto::StepStats::send_us)).
    pub send_fraction: f64,
    /// Objective (training log-loss per example) per iteration: (seconds, value).
    pub curve: Vec<(f64, u64, f64)>,
    /// Test AUC during training: (seconds, auc, logloss).
    pub test_curve: Vec<(f64, f64, f64)>,
    /// The weights table's name.
    pub table: String,
    /// What each worker held, in the order they were taken in.
    pub memory: Vec<WorkerMemory>,
}

/// What one worker held for its shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerMemory {
    /// Its node id.
    pub id: u32,
    /// Entries (non-zeros) of its shard, as last loaded.
    pub nnz: u64,
    /// Bytes it allocated for them and the algorithm's state over them
    /// (the most it held after a load).
    pub bytes: u64,
    /// Its process's peak resident set size in bytes (`VmHWM`); 0 for
    /// workers started in the scheduler's process, or where unknown.
    pub peak_rss: u64,
}

impl TrainConfig {
    /// Checks the numbers before anything starts.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Config(m.to_string()));
        if self.workers == 0 {
            return bad("--workers must be at least 1");
        }
        if self.epochs == 0 {
            return bad("--epochs must be at least 1");
        }
        if self.blocks == 0 || self.blocks > MAX_BLOCKS {
            return bad(&format!("--blocks must be in 1..={MAX_BLOCKS}"));
        }
        if self.workers > MAX_WORKERS {
            return bad(&format!(
                "--workers must be at most {MAX_WORKERS}: each is a connection set and a shard in memory (for more, run `pserver worker` processes and --remote-workers)"
            ));
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1");
        }
        if !(self.l1.is_finite() && self.l1 >= 0.0 && self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("--l1 and --l2 must be finite and >= 0");
        }
        if !(self.alpha.is_finite()
            && self.alpha > 0.0
            && self.beta.is_finite()
            && self.beta >= 0.0)
        {
            return bad("--alpha must be > 0 and --beta >= 0");
        }
        if let Err(e) = self.value_filters.validate() {
            return bad(&format!(
                "{e} (--significant, --significant-push, --random-skip)"
            ));
        }
        if let Some(d) = self.kkt {
            if !(0.0..1.0).contains(&d) {
                return bad("the KKT margin must be in [0, 1)");
            }
        }
        if (self.checkpoint_every > 0 || self.resume) && self.checkpoint_dir.is_none() {
            return bad("--checkpoint-every and --resume need --checkpoint-dir");
        }
        if (self.checkpoint_every > 0 || self.resume) && self.algo != Algo::Dbpg {
            return bad("checkpoints during training are for --algo dbpg");
        }
        if self.test.is_none() && !matches!(self.format, DataFormat::Csv(_)) {
            return bad("--test is needed unless a CSV schema defines a held-out split");
        }
        if let Some(j) = &self.job {
            if !pserver_core::spec::valid_job_name(j) {
                return bad("--job must be 1-128 letters, digits, '_', '-' or '.'");
            }
        }
        Ok(())
    }

    /// The job's name.
    pub fn job_name(&self) -> String {
        self.job.clone().unwrap_or_else(|| {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            format!("{}-{stamp}", self.algo.name())
        })
    }

    /// Steps of the whole run: DBPG iterations, or FTRL epochs.
    pub fn steps(&self) -> u64 {
        match self.algo {
            Algo::Dbpg => (self.blocks * self.epochs) as u64,
            Algo::Ftrl => self.epochs as u64,
        }
    }
}

/// Loads one shard into a dataset (blocking; run it off the async threads).
pub(crate) fn load(
    path: &std::path::Path,
    format: &Format,
    shard: Shard,
    split: Split,
) -> Result<(Dataset, ReadStats), TrainError> {
    let opts = ReadOptions {
        shard,
        split,
        ..ReadOptions::default()
    };
    let mut reader = pserver_data::open(path, format, &opts)?;
    let mut b = Builder::new();
    for ex in reader.by_ref() {
        b.add(ex.label, &ex.keys, &ex.vals);
    }
    if let Some(e) = reader.error() {
        return Err(TrainError::Data(e.clone()));
    }
    Ok((b.build(), reader.stats().clone()))
}

/// Runs training against the manager at `manager` with `cfg.workers`
/// worker processes' worth of workers started in this process (each a
/// [`Agent`] on loopback, driven by the job's scheduler over its link like
/// a remote one). Events go to `progress`.
pub async fn train(
    manager: &str,
    cfg: &TrainConfig,
    progress: UnboundedSender<Progress>,
) -> Result<RunResult, TrainError> {
    cfg.validate()?;
    let agents = local_agents(manager, cfg).await?;
    let r = scheduler::run(manager, cfg, Pool::Local(agents.clone()), progress).await;
    for a in &agents {
        a.kill();
    }
    r
}

/// `cfg.workers` worker agents on loopback, in this process.
pub(crate) async fn local_agents(
    manager: &str,
    cfg: &TrainConfig,
) -> Result<Vec<Arc<Agent>>, TrainError> {
    let mut agents = Vec::new();
    for _ in 0..cfg.workers {
        let a = Agent::start(AgentConfig {
            manager: manager.to_string(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            data: Vec::new(),
            net: cfg.net.clone(),
            exit_after_jobs: None,
        })
        .await
        .map_err(|e| TrainError::Config(e.to_string()))?;
        agents.push(Arc::new(a));
    }
    Ok(agents)
}

/// The newest whole checkpoint under `dir` (named by its `LATEST` file):
/// its epoch and directory; `None` when there is none yet.
pub(crate) fn latest_checkpoint(
    dir: &std::path::Path,
) -> Result<Option<(usize, PathBuf)>, TrainError> {
    let latest = dir.join(dbpg::LATEST);
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TrainError::Config(format!(
                "reading {}: {e}",
                latest.display()
            )));
        }
    };
    let epoch = name
        .strip_prefix("epoch-")
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| {
            TrainError::Config(format!(
                "{} names {name:?}, not an epoch-N checkpoint",
                latest.display()
            ))
        })?;
    Ok(Some((epoch, dir.join(name))))
}

/// Pulls the weights of the test set's keys and scores it.
pub(crate) async fn score(w: &Worker, table: &str, test: &Dataset) -> Result<Metrics, TrainError> {
    let weights = w.pull(table, test.keys.clone()).await?;
    let p: Vec<f32> = crate::cpu::heavy(|| test.margins(&weights))
        .into_iter()
        .map(|m| sigmoid(m) as f32)
        .collect();
    Ok(Metrics::compute(&p, &test.labels))
}

/// Scores `test` with a model.
pub fn evaluate(model: &Model, test: &Dataset) -> Metrics {
    let weights: Vec<f32> = test
        .keys
        .iter()
        .map(|k| model.weight(*k).map_or(0.0, |w| w[0]))
        .collect();
    let p: Vec<f32> = test
        .margins(&weights)
        .into_iter()
        .map(|m| sigmoid(m) as f32)
        .collect();
    Metrics::compute(&p, &test.labels)
}
