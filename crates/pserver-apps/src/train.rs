//! A whole training run against a cluster: load each worker's shard, create
//! the weights table, run the workers, score the test set along the way,
//! and collect the model and the figures of the run.

use crate::dataset::{Builder, Dataset};
use crate::dbpg::{self, DbpgConfig};
use crate::ftrl::{self, FtrlConfig};
use crate::metrics::{Metrics, sigmoid};
use crate::model::Model;
use crate::progress::Progress;
use pserver_core::{Consistency, KeyRange, UpdaterSpec};
use pserver_data::{Format, ReadOptions, ReadStats, Shard, Split};
use pserver_node::NodeError;
use pserver_node::worker::{Packing, TableOptions, Worker, WorkerConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Which learning algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// Delayed block proximal gradient, L1/L2 proximal step on the servers.
    Dbpg,
    /// Asynchronous minibatch SGD with FTRL-Proximal on the servers.
    Ftrl,
}

impl Algo {
    /// Its name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Algo::Dbpg => "dbpg",
            Algo::Ftrl => "ftrl",
        }
    }
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Algorithm.
    pub algo: Algo,
    /// Training data.
    pub train: PathBuf,
    /// Test data; `None` takes the schema's held-out split of `train`.
    pub test: Option<PathBuf>,
    /// How to read both.
    pub format: Format,
    /// Workers to run.
    pub workers: usize,
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
    /// Where to write checkpoints (DBPG): `DIR/epoch-E`, and `DIR/LATEST`
    /// naming the newest whole one.
    pub checkpoint_dir: Option<PathBuf>,
    /// Write one every this many epochs (0: never).
    pub checkpoint_every: usize,
    /// Start from the newest checkpoint in `checkpoint_dir`, if there is one
    /// (its table is restored into the cluster and training goes on from
    /// the epoch after it), instead of from zero.
    pub resume: bool,
    /// Fault injection: stop worker `.0` this long into training, as if its
    /// machine died (its computation stops and it stops heartbeating), to
    /// show that its shard is taken over and the run finishes.
    pub fail_worker: Option<(usize, Duration)>,
    /// How the run's workers reach the cluster: the same transport (TLS,
    /// the cluster secret) its nodes use.
    pub net: pserver_node::net::Net,
}

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
    /// A worker task panicked or was cancelled.
    #[error("worker {0} failed: {1}")]
    Worker(usize, String),
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// Test figures at the end.
    pub test: Metrics,
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
    /// Bytes the KKT filter kept off the wire (16 per coordinate: key, g, h).
    pub bytes_saved: u64,
    /// Fraction of worker time spent in push/pull (consistency waits included).
    pub wait_fraction: f64,
    /// Objective (training log-loss per example) per iteration: (seconds, value).
    pub curve: Vec<(f64, u64, f64)>,
    /// Test AUC during training: (seconds, auc, logloss).
    pub test_curve: Vec<(f64, f64, f64)>,
    /// The weights table's name.
    pub table: String,
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
        if self.blocks == 0 {
            return bad("--blocks must be at least 1");
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
        if self.test.is_none() && !matches!(self.format, Format::Csv(_)) {
            return bad("--test is needed unless a CSV schema defines a held-out split");
        }
        Ok(())
    }

    fn splits(&self) -> (Split, Split) {
        match self.test {
            Some(_) => (Split::All, Split::All),
            None => (Split::Train, Split::Test),
        }
    }
}

/// Loads one shard into a dataset (blocking; run it off the async threads).
fn load(
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

/// Runs training against the manager at `manager`. Events go to `progress`.
pub async fn train(
    manager: &str,
    cfg: &TrainConfig,
    progress: UnboundedSender<Progress>,
) -> Result<RunResult, TrainError> {
    cfg.validate()?;
    let loading = Instant::now();
    let (train_split, test_split) = cfg.splits();
    let test_path = cfg.test.clone().unwrap_or_else(|| cfg.train.clone());

    // Every worker reads only its shard; the test set is read beside them.
    let mut loads = Vec::new();
    for i in 0..cfg.workers {
        let (path, format) = (cfg.train.clone(), cfg.format.clone());
        let shard = Shard {
            index: i,
            count: cfg.workers,
        };
        loads.push(tokio::task::spawn_blocking(move || {
            load(&path, &format, shard, train_split)
        }));
    }
    let format = cfg.format.clone();
    let test_load = tokio::task::spawn_blocking(move || {
        load(
            &test_path,
            &format,
            Shard { index: 0, count: 1 },
            test_split,
        )
    });
    let mut shards = Vec::new();
    let mut bad = Vec::new();
    for (i, l) in loads.into_iter().enumerate() {
        let (d, stats) = l
            .await
            .map_err(|e| TrainError::Worker(i, e.to_string()))??;
        let _ = progress.send(Progress::Loaded {
            worker: i,
            rows: d.rows(),
        });
        bad.push(stats);
        shards.push(Arc::new(d));
    }
    let (test, test_stats) = test_load
        .await
        .map_err(|e| TrainError::Worker(usize::MAX, e.to_string()))??;
    bad.push(test_stats);
    let train_rows: usize = shards.iter().map(|d| d.rows()).sum();
    if train_rows == 0 {
        return Err(TrainError::Empty(cfg.train.display().to_string()));
    }
    if test.rows() == 0 {
        return Err(TrainError::Empty("the test set".into()));
    }
    let load_seconds = loading.elapsed().as_secs_f64();

    // Workers register before anyone pushes, so every clock counts them all.
    let mut workers = Vec::new();
    for _ in 0..cfg.workers {
        let mut wc = WorkerConfig::new(manager);
        wc.net = cfg.net.clone();
        wc.key_caching = cfg.key_caching;
        wc.compression = cfg.compression;
        workers.push(Worker::connect(wc).await?);
    }
    let observer = Worker::connect(WorkerConfig {
        net: cfg.net.clone(),
        ..WorkerConfig::client(manager)
    })
    .await?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut table = format!("{}-{stamp}", cfg.algo.name());
    // A resumed run continues the checkpoint's table from its epoch.
    let mut start_epoch = 0;
    if let (true, Some(dir), Algo::Dbpg) = (cfg.resume, &cfg.checkpoint_dir, cfg.algo) {
        if let Some((epoch, at)) = latest_checkpoint(dir)? {
            let restored = observer
                .restore(&at, &pserver_core::updater::Registry::new())
                .await?;
            let Some(t) = restored.first() else {
                return Err(TrainError::Config(format!(
                    "the checkpoint {} holds no table",
                    at.display()
                )));
            };
            table = t.name.clone();
            start_epoch = epoch.min(cfg.epochs);
            let _ = progress.send(Progress::Resumed { epoch, dir: at });
        }
    }
    let consistency = if cfg.tau == 0 {
        Consistency::Sequential
    } else {
        Consistency::Bounded(cfg.tau)
    };
    let opts = match cfg.algo {
        // Up to tau other blocks move on margins this worker has not seen
        // yet; a step of 1 / (tau + 1) keeps their sum within the bound
        // (the delay-dependent step of Li et al., NIPS 2014).
        Algo::Dbpg => TableOptions::new(
            1,
            UpdaterSpec::Prox {
                eta: 1.0 / (cfg.tau as f32 + 1.0),
                l1: cfg.l1,
                l2: cfg.l2,
                eps: 1e-6,
            },
        )
        .aggregate(true),
        Algo::Ftrl => TableOptions::new(
            1,
            UpdaterSpec::Ftrl {
                alpha: cfg.alpha,
                beta: cfg.beta,
                l1: cfg.l1,
                l2: cfg.l2,
            },
        ),
    }
    .consistency(consistency);
    if start_epoch == 0 {
        workers[0].create_table(&table, opts).await?;
    }
    for w in &workers {
        w.refresh().await?;
    }

    let (itx, mut irx) = tokio::sync::mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let max_rows = shards.iter().map(|d| d.rows()).max().unwrap_or(0);
    let mut tasks = Vec::new();
    // Where a lost worker's shard goes: each worker's adoption queue.
    let mut adopt_tx = Vec::new();
    for (i, (w, data)) in workers
        .iter()
        .cloned()
        .zip(shards.iter().cloned())
        .enumerate()
    {
        let tx = itx.clone();
        let table = table.clone();
        let cfg = cfg.clone();
        let (atx, arx) = tokio::sync::mpsc::unbounded_channel();
        adopt_tx.push(atx);
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let r = run_one(w, i, data, table, cfg, max_rows, start_epoch, tx, arx).await;
            let _ = done.send((i, r));
        }));
    }
    drop(done_tx);

    drop(itx);

    // Gather the workers' reports into the objective curve, and score the
    // test set now and then, until every worker is done.
    let test = Arc::new(test);
    let mut test_curve = Vec::new();
    let mut curve = Vec::new();
    let mut partial: BTreeMap<u64, (f64, usize, usize)> = BTreeMap::new();
    let (mut busy, mut wait) = (Duration::ZERO, Duration::ZERO);
    let mut filtered = 0u64;
    let mut tick = tokio::time::interval(cfg.eval_every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    let mut alive = vec![true; cfg.workers];
    let mut rows_of: Vec<usize> = shards.iter().map(|d| d.rows()).collect();
    let mut fail = cfg
        .fail_worker
        .filter(|(i, _)| *i < cfg.workers)
        .map(|(i, after)| (i, tokio::time::Instant::now() + after));
    // A worker that fails (or is made to) is shut down, so the manager
    // declares it dead and clocks stop waiting for it, and its shard goes
    // to the live worker with the fewest rows.
    let lose = |i: usize,
                why: String,
                alive: &mut Vec<bool>,
                rows_of: &mut Vec<usize>|
     -> Result<(), TrainError> {
        if !std::mem::replace(&mut alive[i], false) {
            return Ok(());
        }
        workers[i].shutdown();
        let _ = progress.send(Progress::WorkerLost {
            worker: i,
            why: why.clone(),
        });
        let Some(to) = (0..alive.len())
            .filter(|&j| alive[j])
            .min_by_key(|&j| rows_of[j])
        else {
            return Err(TrainError::Worker(i, format!("{why}; no worker is left")));
        };
        rows_of[to] += rows_of[i];
        let _ = adopt_tx[to].send(shards[i].clone());
        Ok(())
    };
    loop {
        tokio::select! {
            ev = irx.recv() => match ev {
                None => break,
                Some(Progress::Iter(st)) => {
                    busy += st.busy;
                    wait += st.wait;
                    filtered += st.filtered as u64;
                    let e = partial.entry(st.iteration).or_default();
                    e.0 += st.loss;
                    e.1 += st.rows;
                    e.2 += 1;
                    let _ = progress.send(Progress::Iter(st));
                }
                Some(other) => { let _ = progress.send(other); }
            },
            Some((i, r)) = done_rx.recv() => {
                if let Err(e) = r {
                    lose(i, e.to_string(), &mut alive, &mut rows_of)?;
                }
            }
            _ = async {
                match fail {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((i, _)) = fail.take() {
                    tasks[i].abort();
                    lose(i, "stopped by --fail-worker-after-ms (fault injection)".into(), &mut alive, &mut rows_of)?;
                }
            }
            _ = tick.tick(), if cfg.eval_every.is_some() => {
                let m = score(&observer, &table, &test).await?;
                let seconds = started.elapsed().as_secs_f64();
                let _ = progress.send(Progress::Test { seconds, auc: m.auc, logloss: m.logloss });
                test_curve.push((seconds, m.auc, m.logloss));
            }
        }
        // Iterations every live worker has reported: the objective. A lost
        // worker's last iterations complete with the others' reports.
        let live = alive.iter().filter(|a| **a).count().max(1);
        let complete: Vec<u64> = partial
            .iter()
            .take_while(|(_, e)| e.2 >= live)
            .map(|(t, _)| *t)
            .collect();
        for t in complete {
            if let Some((loss, rows, _)) = partial.remove(&t) {
                let seconds = started.elapsed().as_secs_f64();
                let objective = loss / rows.max(1) as f64;
                curve.push((seconds, t, objective));
                let _ = progress.send(Progress::Objective {
                    seconds,
                    iteration: t,
                    objective,
                });
            }
        }
    }
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(()) => {}
            // Stopped on purpose; its shard was handed on.
            Err(e) if e.is_cancelled() && !alive[i] => {}
            Err(e) => return Err(TrainError::Worker(i, e.to_string())),
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();

    let (keys, weights) = observer.scan(&table, KeyRange::ALL).await?;
    let nnz = weights.iter().filter(|w| **w != 0.0).count();
    let model = Model::new(table.clone(), 1, keys, weights);
    let final_metrics = evaluate(&model, &test);
    test_curve.push((train_seconds, final_metrics.auc, final_metrics.logloss));

    let sum = |f: fn(&pserver_node::worker::Traffic) -> &std::sync::atomic::AtomicU64| -> u64 {
        workers
            .iter()
            .map(|w| f(w.traffic()).load(Ordering::Relaxed))
            .sum()
    };
    let bytes_sent = sum(|t| &t.bytes_sent);
    let bytes_received = sum(|t| &t.bytes_received);
    let key_bytes_saved = sum(|t| &t.bytes_saved) + sum(|t| &t.bytes_saved_received);
    for w in &workers {
        w.shutdown();
    }
    observer.shutdown();
    Ok(RunResult {
        test: final_metrics,
        nnz,
        model,
        train_rows,
        bad,
        train_seconds,
        load_seconds,
        bytes_sent,
        bytes_received,
        // The KKT filter keeps a key and two floats per coordinate off the
        // wire; key caching, the key lists it replaced by hashes;
        // compression, value bytes both ways.
        bytes_saved: filtered * 16 + key_bytes_saved,
        wait_fraction: wait.as_secs_f64() / (wait + busy).as_secs_f64().max(1e-9),
        curve,
        test_curve,
        table,
    })
}

/// One worker's whole run: the start barrier, then its algorithm on its
/// shard (DBPG also takes on shards sent on `adopt`).
#[allow(clippy::too_many_arguments)]
async fn run_one(
    w: Worker,
    i: usize,
    data: Arc<Dataset>,
    table: String,
    cfg: TrainConfig,
    max_rows: usize,
    start_epoch: usize,
    tx: UnboundedSender<Progress>,
    adopt: tokio::sync::mpsc::UnboundedReceiver<Arc<Dataset>>,
) -> Result<(), NodeError> {
    w.barrier(&format!("{table}-start")).await?;
    match cfg.algo {
        Algo::Dbpg => {
            let c = DbpgConfig {
                table,
                blocks: cfg.blocks,
                epochs: cfg.epochs,
                tau: cfg.tau,
                l1: cfg.l1,
                kkt: cfg.kkt,
                workers: cfg.workers,
                start_epoch,
                checkpoint: cfg
                    .checkpoint_dir
                    .clone()
                    .filter(|_| cfg.checkpoint_every > 0)
                    .map(|d| (d, cfg.checkpoint_every)),
            };
            dbpg::run_worker(&w, i, data, &c, &tx, adopt).await
        }
        // FTRL's workers are asynchronous and independent: a lost worker's
        // shard is not taken over, the others carry on without it.
        Algo::Ftrl => {
            let c = FtrlConfig {
                table,
                epochs: cfg.epochs,
                batches: max_rows.div_ceil(cfg.batch),
            };
            ftrl::run_worker(&w, i, &data, &c, &tx).await
        }
    }
}

/// The newest whole checkpoint under `dir` (named by its `LATEST` file):
/// its epoch and directory; `None` when there is none yet.
fn latest_checkpoint(dir: &std::path::Path) -> Result<Option<(usize, PathBuf)>, TrainError> {
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
async fn score(w: &Worker, table: &str, test: &Dataset) -> Result<Metrics, TrainError> {
    let weights = w.pull(table, test.keys.clone()).await?;
    let p: Vec<f32> = test
        .margins(&weights)
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
