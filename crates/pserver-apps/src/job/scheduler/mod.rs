//! A job's task scheduler (Algorithm 3 of the paper, between processes):
//! claims the job, gathers worker processes, splits the data among them,
//! creates the table, issues the steps, tracks every worker, hands a lost
//! worker's data on, takes in workers that join, writes checkpoints,
//! scores the test set, and collects the run's figures.
//!
//! `run_with` is the job's loop; `workers` holds how workers are
//! gathered, offered the job and lost; `table` the job's settings, table,
//! warm start and checkpoints; `inputs` what the scheduler reads itself
//! (the test and validation sets, a checkpoint's table name).

mod inputs;
mod table;
mod workers;

use inputs::{load_test, load_validation, resumed_table};

use super::link::{self, Sender};
use super::proto::{Algo, FileInfo, FromWorker, JobSpec, ToWorker, ValidationSplit};
use super::shards::{Assignment, Slot};
use super::{Unit, agent::Agent};
use crate::dataset::Dataset;
use crate::progress::{IterStats, Progress};
use crate::train::{RunResult, TrainConfig, TrainError, WorkerMemory, evaluate, load, score};
use crate::{dbpg, model::Model};
use pserver_core::{KeyRange, NodeState, Role, UpdaterSpec};
use pserver_data::Split;
use pserver_node::durable::{Disk, FileSystem};
use pserver_node::worker::{Group, TableOptions, Worker, WorkerConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, UnboundedSender};

/// Which worker processes a job runs on.
pub enum Pool {
    /// These, started in this process by the caller (`pserver train`
    /// without `--remote-workers`); `fail_worker` stops one of them.
    Local(Vec<Arc<Agent>>),
    /// Idle worker processes of the cluster: at least `min` to start,
    /// waiting up to `wait` for them; up to `max` (workers that become
    /// idle during the run join it from the next epoch).
    Remote {
        /// Workers to start with.
        min: usize,
        /// Most workers the job takes.
        max: usize,
        /// How long to wait for `min`.
        wait: Duration,
    },
}

impl Pool {
    /// The same workers again, for another run (a `--tune` path runs one
    /// job per grid point on one pool).
    pub fn again(&self) -> Pool {
        match self {
            Pool::Local(agents) => Pool::Local(agents.clone()),
            Pool::Remote { min, max, wait } => Pool::Remote {
                min: *min,
                max: *max,
                wait: *wait,
            },
        }
    }
}

/// What a run does besides the plain job: the points of a `--tune` path.
#[derive(Clone, Debug, Default)]
pub struct RunExtra {
    /// Workers fit on the tuning-train side of this split and the
    /// scheduler scores its validation side in place of the test set,
    /// which this run never reads. The side named here is ignored: each
    /// keeps its own.
    pub validation: Option<ValidationSplit>,
    /// Fill the new table with these weights before the first step, so
    /// the workers start from them (a warm start).
    pub warm: Option<Arc<Model>>,
}

/// What the scheduler knows of one worker.
struct Member {
    id: u32,
    addr: String,
    tx: Sender<ToWorker>,
    /// Steps acknowledged.
    done: u64,
    /// The first step it was given.
    from: u64,
    alive: bool,
}

/// A worker taken in during the run: it starts at `from` (an epoch's first
/// step); the others' units change there too.
struct Joining {
    from: u64,
    changed: Vec<Slot>,
}

/// What came from a worker's link.
enum Event {
    Msg(Slot, FromWorker),
    Closed(Slot, String),
}

/// How often the scheduler reads the map (to see workers die or idle ones
/// appear).
const MAP_EVERY: Duration = Duration::from_millis(250);

/// How long a worker may take to answer an offer.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs job `cfg` against the manager at `manager` on the workers of `pool`.
pub async fn run(
    manager: &str,
    cfg: &TrainConfig,
    pool: Pool,
    progress: UnboundedSender<Progress>,
) -> Result<RunResult, TrainError> {
    run_with(manager, cfg, pool, progress, &RunExtra::default()).await
}

/// [`run`], with a validation split and a warm start ([`RunExtra`]): the
/// result's test figures are then the validation set's.
pub async fn run_with(
    manager: &str,
    cfg: &TrainConfig,
    pool: Pool,
    progress: UnboundedSender<Progress>,
    extra: &RunExtra,
) -> Result<RunResult, TrainError> {
    cfg.validate()?;
    let loading = Instant::now();
    let observer = Worker::connect(WorkerConfig {
        net: cfg.net.clone(),
        ..WorkerConfig::client(manager)
    })
    .await?;
    let job = match resumed_table(cfg)? {
        Some(t) if cfg.job.as_ref().is_some_and(|j| *j != t) => {
            return Err(TrainError::Config(format!(
                "--resume: the checkpoint holds job {t:?}'s table, not job {:?}'s",
                cfg.job.as_deref().unwrap_or_default()
            )));
        }
        Some(t) => t,
        None => cfg.job_name(),
    };
    observer.claim_job(&job).await?;

    // The test set is the scheduler's, read here; training data never is
    // (but for a tuning run's validation lines, which it scores instead).
    let test = match extra.validation {
        Some(v) => load_validation(cfg, v).await?,
        None => load_test(cfg).await?,
    };

    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut s = Sched {
        cfg: cfg.clone(),
        job: job.clone(),
        observer,
        members: Vec::new(),
        events_tx,
        progress: progress.clone(),
        tried: BTreeSet::new(),
        agents: Vec::new(),
        batches: 0,
        readers: Vec::new(),
        extra: extra.clone(),
    };
    // In-process workers share this process: their peak RSS is not theirs.
    let local = matches!(pool, Pool::Local(_));
    let (min, max) = match &pool {
        Pool::Local(agents) => (agents.len(), agents.len()),
        Pool::Remote { min, max, .. } => (*min, *max),
    };
    let offers = match pool {
        Pool::Local(agents) => {
            let mut offers = BTreeMap::new();
            for a in &agents {
                // An agent of this process that just ran another job (a
                // `--tune` path's previous point) frees itself a moment
                // after its last answer: a refusal is retried a while.
                let deadline = Instant::now() + OFFER_TIMEOUT;
                let (slot, files) = loop {
                    match s.offer(a.id(), a.addr()).await? {
                        Ok(taken) => break taken,
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(why) => {
                            return Err(TrainError::Config(format!("worker {}: {why}", a.id())));
                        }
                    }
                };
                offers.insert(slot, files);
            }
            s.agents = agents;
            offers
        }
        Pool::Remote { min, wait, .. } => s.gather(manager, min, wait).await?,
    };
    let named = cfg.train.display().to_string();
    let mut assignment = Assignment::new(&offers, &named)
        .map_err(|e| TrainError::Config(format!("{e}; the job names {named}")))?;

    // The table, new or resumed.
    let (first, clock_base) = s.table(&progress).await?;
    for m in &mut s.members {
        m.done = first;
        m.from = first + 1;
    }
    let spec = s.spec(first, clock_base, s.members.len());
    for slot in 0..s.members.len() {
        let units = assignment.units.get(&slot).cloned().unwrap_or_default();
        let spec = s.spec_for(&spec, slot);
        s.send(
            slot,
            ToWorker::Start {
                spec: Box::new(spec),
                units,
                from: first + 1,
            },
        )
        .await;
    }
    // Every worker loads its units (or the job fails, naming the file).
    let mut loaded = BTreeSet::new();
    let mut bad = Vec::new();
    let mut train_rows = 0;
    let mut max_rows = 0;
    // The workers' distinct keys summed: at least the data's features.
    let mut features = 0;
    let mut memory: BTreeMap<Slot, WorkerMemory> = BTreeMap::new();
    while loaded.len() < s.live() {
        match events.recv().await {
            Some(Event::Msg(
                slot,
                FromWorker::Loaded {
                    rows,
                    keys,
                    stats,
                    nnz,
                    bytes,
                },
            )) => {
                memory.insert(
                    slot,
                    WorkerMemory {
                        id: s.members[slot].id,
                        nnz,
                        bytes,
                        peak_rss: 0,
                    },
                );
                loaded.insert(slot);
                train_rows += rows;
                features += keys;
                max_rows = max_rows.max(rows);
                bad.extend(stats);
                let _ = progress.send(Progress::Loaded { worker: slot, rows });
            }
            Some(Event::Msg(_, FromWorker::Failed { what })) => {
                return Err(TrainError::Config(what));
            }
            Some(Event::Closed(slot, why)) => {
                return Err(TrainError::Worker(
                    slot,
                    format!("worker {} left while loading: {why}", s.members[slot].id),
                ));
            }
            Some(Event::Msg(..)) => {}
            None => return Err(TrainError::Config("every worker link closed".into())),
        }
    }
    if train_rows == 0 {
        return Err(crate::train::empty(&named, &bad));
    }
    if cfg.algo == Algo::Dbpg && cfg.blocks > features {
        return Err(TrainError::Config(format!(
            "--blocks {} is more than the training data has features (at most {features}): blocks are key ranges of features, so use fewer",
            cfg.blocks
        )));
    }
    s.batches = max_rows.div_ceil(cfg.batch).max(1);
    let load_seconds = loading.elapsed().as_secs_f64();

    // The steps.
    let started = Instant::now();
    let total = spec.steps;
    let window = match cfg.algo {
        Algo::Dbpg => cfg.tau + 3,
        Algo::Ftrl => 1,
    };
    let epoch_steps = match cfg.algo {
        Algo::Dbpg => cfg.blocks as u64,
        Algo::Ftrl => 1,
    };
    let checkpoint_at = |t: u64| -> Option<usize> {
        let every = cfg.checkpoint_every as u64;
        (cfg.algo == Algo::Dbpg
            && every > 0
            && cfg.checkpoint_dir.is_some()
            && t > first
            && t.is_multiple_of(epoch_steps)
            && (t / epoch_steps).is_multiple_of(every)
            && t < total)
            .then_some((t / epoch_steps) as usize)
    };
    let mut issued = first;
    let mut written: BTreeSet<u64> = BTreeSet::new();
    let mut joining: Option<Joining> = None;
    let mut partial: BTreeMap<u64, (f64, usize, usize)> = BTreeMap::new();
    let (mut curve, mut test_curve) = (Vec::new(), Vec::new());
    let (mut busy, mut wait, mut send, mut filtered) = (0u64, 0u64, 0u64, 0u64);
    let mut traffic = (0u64, 0u64, 0u64);
    let mut map_tick = tokio::time::interval(MAP_EVERY);
    let mut eval_tick = tokio::time::interval(cfg.eval_every.unwrap_or(Duration::from_secs(3600)));
    // A score that takes longer than the period (a 1M-row test set on a
    // busy machine) must not be followed at once by the next: the events
    // between get the period.
    eval_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    eval_tick.tick().await;
    let mut fail = cfg
        .fail_worker
        .filter(|(i, _)| *i < s.agents.len())
        .map(|(i, after)| (i, tokio::time::Instant::now() + after));
    loop {
        // Issue what the window allows: a step goes once every live worker
        // acknowledged the step `window` before it, and never past a
        // checkpoint not yet written.
        loop {
            let next = issued + 1;
            let slowest = s.slowest();
            let gated = checkpoint_at(issued).is_some_and(|_| !written.contains(&issued));
            if next > total || gated || slowest + window < next {
                break;
            }
            if let Some(j) = joining.as_ref().filter(|j| j.from == next) {
                for &slot in &j.changed {
                    let units = assignment.units.get(&slot).cloned().unwrap_or_default();
                    s.send(slot, ToWorker::Reassign { from: next, units }).await;
                }
                joining = None;
            }
            for slot in 0..s.members.len() {
                if s.members[slot].alive && s.members[slot].from <= next {
                    let batches = s.batches;
                    s.send(
                        slot,
                        ToWorker::Step {
                            step: next,
                            batches,
                        },
                    )
                    .await;
                }
            }
            issued = next;
        }
        if s.live() == 0 {
            return Err(TrainError::Config(
                "every worker of the job was lost; start more with `pserver worker`".into(),
            ));
        }
        if s.slowest() >= total {
            break;
        }
        if let Some(epoch) = checkpoint_at(issued).filter(|_| !written.contains(&issued)) {
            if s.slowest() >= issued {
                s.checkpoint(epoch, &progress).await?;
                written.insert(issued);
                continue;
            }
        }
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    Event::Msg(slot, msg) => match msg {
                        FromWorker::Iter(st) => {
                            busy += st.busy_us;
                            wait += st.wait_us;
                            send += st.send_us;
                            filtered += st.filtered as u64;
                            let e = partial.entry(st.iteration).or_default();
                            e.0 += st.loss;
                            e.1 += st.rows;
                            e.2 += 1;
                            let _ = progress.send(Progress::Iter(IterStats {
                                worker: slot,
                                iteration: st.iteration,
                                loss: st.loss,
                                rows: st.rows,
                                pushed: st.pushed,
                                filtered: st.filtered,
                                busy: Duration::from_micros(st.busy_us),
                                wait: Duration::from_micros(st.wait_us),
                            }));
                        }
                        FromWorker::Done(t) => {
                            let m = &mut s.members[slot];
                            m.done = m.done.max(t);
                        }
                        FromWorker::Loaded { rows, stats, nnz, bytes, .. } => {
                            if nnz > 0 {
                                let m = memory.entry(slot).or_insert(WorkerMemory {
                                    id: s.members[slot].id,
                                    ..WorkerMemory::default()
                                });
                                m.nnz = nnz;
                                m.bytes = m.bytes.max(bytes);
                            }
                            bad.extend(stats);
                            let _ = progress.send(Progress::Adopted { worker: slot, rows });
                        }
                        FromWorker::Failed { what } => {
                            s.lose(slot, what, &mut assignment, issued, &mut joining).await?;
                        }
                        FromWorker::Traffic { sent, received, saved, peak_rss } => {
                            if let Some(m) = memory.get_mut(&slot).filter(|_| !local) {
                                m.peak_rss = m.peak_rss.max(peak_rss);
                            }
                            traffic.0 += sent;
                            traffic.1 += received;
                            traffic.2 += saved;
                        }
                        FromWorker::Files { .. } | FromWorker::Refused { .. } => {}
                    },
                    Event::Closed(slot, why) => {
                        s.lose(slot, why, &mut assignment, issued, &mut joining).await?;
                    }
                }
            }
            _ = map_tick.tick() => {
                let map = s.observer.refresh().await?;
                for slot in 0..s.members.len() {
                    let dead = s.members[slot].alive
                        && map.node(s.members[slot].id).is_none_or(|n| n.state == NodeState::Dead);
                    if dead {
                        s.lose(slot, "the manager declared it dead".into(), &mut assignment, issued, &mut joining).await?;
                    }
                }
                // Idle workers join (up to the maximum) from the next epoch.
                if joining.is_none() && s.live() < max && matches!(s.agents.as_slice(), []) {
                    if let Some((slot, files)) = s.take_idle(&map).await {
                        let from = (issued / epoch_steps + 1) * epoch_steps + 1;
                        if from <= total {
                            let changed = assignment.join(slot, &files);
                            let units = assignment.units.get(&slot).cloned().unwrap_or_default();
                            let spec = s.spec_for(&s.spec(first, clock_base, min), slot);
                            s.members[slot].from = from;
                            s.members[slot].done = from - 1;
                            let spec = Box::new(spec);
                            s.send(slot, ToWorker::Start { spec, units, from }).await;
                            let changed = changed.into_iter().filter(|c| *c != slot).collect();
                            joining = Some(Joining { from, changed });
                        } else {
                            s.send(slot, ToWorker::Finish).await;
                            s.members[slot].alive = false;
                        }
                    }
                }
            }
            _ = eval_tick.tick(), if cfg.eval_every.is_some() => {
                let m = score(&s.observer, &s.cfg_table(), &test).await?;
                let seconds = started.elapsed().as_secs_f64();
                let _ = progress.send(Progress::Test { seconds, auc: m.auc, logloss: m.logloss });
                test_curve.push((seconds, m.auc, m.logloss));
            }
            _ = async {
                match fail {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((i, _)) = fail.take() {
                    s.agents[i].kill();
                }
            }
        }
        // Iterations every live worker has reported: the objective.
        let live = s.live().max(1);
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
    let train_seconds = started.elapsed().as_secs_f64();
    if !assignment.orphans.is_empty() {
        tracing::warn!(
            units = %super::describe(&assignment.orphans),
            "no live worker could read these units after their worker was lost"
        );
    }

    // Every worker says what it moved, then goes idle.
    for slot in 0..s.members.len() {
        if s.members[slot].alive {
            s.send(slot, ToWorker::Finish).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut told = 0;
    while told < s.live() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Msg(
                slot,
                FromWorker::Traffic {
                    sent,
                    received,
                    saved,
                    peak_rss,
                },
            ))) => {
                if let Some(m) = memory.get_mut(&slot).filter(|_| !local) {
                    m.peak_rss = m.peak_rss.max(peak_rss);
                }
                traffic.0 += sent;
                traffic.1 += received;
                traffic.2 += saved;
                told += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }

    let table = s.cfg_table();
    let (keys, weights) = s.observer.scan(&table, KeyRange::ALL).await?;
    let nnz = weights.iter().filter(|w| **w != 0.0).count();
    let model = Model::new(table.clone(), 1, keys, weights);
    let servers = s.observer.map().live(Role::Server).count();
    let final_metrics = evaluate(&model, &test);
    test_curve.push((train_seconds, final_metrics.auc, final_metrics.logloss));
    s.observer.shutdown();
    Ok(RunResult {
        test: final_metrics,
        servers,
        nnz,
        model,
        train_rows,
        bad,
        train_seconds,
        load_seconds,
        bytes_sent: traffic.0,
        bytes_received: traffic.1,
        // The KKT filter keeps a key and two floats per coordinate off the
        // wire; key caching and compression report their own.
        bytes_saved: filtered * 16 + traffic.2,
        wait_fraction: wait as f64 / (wait + busy).max(1) as f64,
        send_fraction: send as f64 / (wait + busy).max(1) as f64,
        curve,
        test_curve,
        table,
        memory: memory.into_values().collect(),
    })
}

/// The scheduler's state between steps.
struct Sched {
    cfg: TrainConfig,
    job: String,
    observer: Worker,
    members: Vec<Member>,
    events_tx: mpsc::UnboundedSender<Event>,
    progress: UnboundedSender<Progress>,
    /// Workers already offered this job (each once).
    tried: BTreeSet<u32>,
    /// Workers started by the caller in this process.
    agents: Vec<Arc<Agent>>,
    /// FTRL's minibatches per epoch, once known.
    batches: usize,
    /// The tasks reading the workers' links: they hold the links' read
    /// halves, so they end with the scheduler (a dropped or aborted
    /// scheduler closes its links, and its workers go idle).
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// A tuning run's validation split and warm start.
    extra: RunExtra,
}

impl Drop for Sched {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

impl Sched {
    pub(super) fn cfg_table(&self) -> String {
        self.job.clone()
    }

    pub(super) fn live(&self) -> usize {
        self.members.iter().filter(|m| m.alive).count()
    }

    /// The lowest step every live worker has acknowledged.
    pub(super) fn slowest(&self) -> u64 {
        self.members
            .iter()
            .filter(|m| m.alive)
            .map(|m| m.done)
            .min()
            .unwrap_or(0)
    }

    /// Sends `msg` to `slot`; a failure shows up as the link closing.
    pub(super) async fn send(&mut self, slot: Slot, msg: ToWorker) {
        let m = &mut self.members[slot];
        if !m.alive {
            return;
        }
        if let Err(e) = m.tx.send(&msg).await {
            let _ = self.events_tx.send(Event::Closed(slot, e.to_string()));
        }
    }
}
