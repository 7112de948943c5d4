//! What a training job's processes export on `--metrics-listen`: a worker
//! process (`pserver worker`) its own iterations, a job's scheduler and
//! `pserver train` the job's. Updated once per iteration (never per
//! request), read by the metrics listener ([`JobExporter`]).

use crate::job::proto::StepStats;
use crate::progress::Progress;
use pserver_node::metrics::{BoxFuture, Exporter, Family, MetricKind, MetricUnit, Scrape, Value};
use std::sync::{Arc, Mutex};

/// Where the figures come from: one worker's steps, or the whole job's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A worker process: its own iterations; ready while it has a job.
    Worker,
    /// A job's scheduler (`pserver train`): every worker's iterations and
    /// the job's objective; ready while the job runs.
    Job,
}

/// The figures at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// The job being run, if any.
    pub job: Option<String>,
    /// The latest iteration (a worker's step, or the job's clock).
    pub iteration: u64,
    /// The training objective: mean logistic loss over the rows of the
    /// latest iteration (a worker's own rows, or every worker's).
    pub objective: Option<f64>,
    /// Microseconds computing and waiting on pushes and pulls in this job.
    pub busy_us: u64,
    /// See `busy_us`.
    pub wait_us: u64,
    /// Iterations done, over every job.
    pub iterations_total: u64,
    /// Microseconds computing, over every job.
    pub busy_total_us: u64,
    /// Microseconds waiting, over every job.
    pub wait_total_us: u64,
    /// Workers that loaded their shard (job scope).
    pub workers: u64,
    /// Workers lost during the job (job scope).
    pub workers_lost: u64,
    /// The job finished (job scope).
    pub finished: bool,
}

impl Figures {
    /// Waiting's share of the job's worker time so far.
    pub fn waiting_ratio(&self) -> f64 {
        let all = self.busy_us + self.wait_us;
        if all == 0 {
            0.0
        } else {
            self.wait_us as f64 / all as f64
        }
    }
}

/// A job's figures, shared by the code that runs it and the exporter.
#[derive(Debug, Default)]
pub struct JobGauges(Mutex<Figures>);

impl JobGauges {
    /// New, empty figures behind an `Arc`.
    pub fn new() -> Arc<JobGauges> {
        Arc::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Figures) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A job starts: its own figures start from zero.
    pub fn start(&self, job: &str) {
        self.with(|f| {
            f.job = Some(job.to_string());
            f.iteration = 0;
            f.objective = None;
            f.busy_us = 0;
            f.wait_us = 0;
            f.workers = 0;
            f.workers_lost = 0;
            f.finished = false;
        });
    }

    /// The job ended here (a worker goes idle).
    pub fn end(&self) {
        self.with(|f| f.job = None);
    }

    /// One iteration of this worker.
    pub fn step(&self, s: &StepStats) {
        self.with(|f| {
            f.iteration = f.iteration.max(s.iteration);
            if s.rows > 0 {
                f.objective = Some(s.loss / s.rows as f64);
            }
            f.count(s.busy_us, s.wait_us);
        });
    }

    /// An event of a job's run (the scheduler's progress).
    pub fn progress(&self, p: &Progress) {
        self.with(|f| match p {
            Progress::Loaded { .. } | Progress::Joined { .. } => f.workers += 1,
            Progress::WorkerLost { .. } => f.workers_lost += 1,
            Progress::Iter(s) => {
                let us = |d: std::time::Duration| d.as_micros() as u64;
                f.count(us(s.busy), us(s.wait));
            }
            Progress::Objective {
                iteration,
                objective,
                ..
            } => {
                f.iteration = f.iteration.max(*iteration);
                f.objective = Some(*objective);
            }
            _ => {}
        });
    }

    /// The job is over (its scheduler returned).
    pub fn finish(&self) {
        self.with(|f| f.finished = true);
    }

    /// The figures now.
    pub fn figures(&self) -> Figures {
        self.with(|f| f.clone())
    }
}

impl Figures {
    fn count(&mut self, busy_us: u64, wait_us: u64) {
        self.iterations_total += 1;
        self.busy_us += busy_us;
        self.wait_us += wait_us;
        self.busy_total_us += busy_us;
        self.wait_total_us += wait_us;
    }
}

/// The scrape of `f`.
pub fn scrape(scope: Scope, f: &Figures) -> Scrape {
    let mut s = Scrape::default();
    let job = f.job.clone().unwrap_or_default();
    let labelled = |name, help, unit, kind, v: Value| {
        let mut fam = Family::new(name, help, unit, kind);
        fam.push(vec![("job", job.clone())], v);
        fam
    };
    s.add(labelled(
        "job_iteration",
        "The latest iteration (a worker's own step, or the job's clock at the scheduler).",
        MetricUnit::None,
        MetricKind::Gauge,
        Value::Int(f.iteration),
    ));
    if let Some(o) = f.objective {
        s.add(labelled(
            "job_objective",
            "Training objective: mean logistic loss over the rows of the latest iteration.",
            MetricUnit::None,
            MetricKind::Gauge,
            Value::Float(o),
        ));
    }
    s.add(labelled(
        "job_waiting",
        "Share of worker time in this job spent waiting on pushes and pulls (the rest computing).",
        MetricUnit::Ratio,
        MetricKind::Gauge,
        Value::Float(f.waiting_ratio()),
    ));
    let plain = |name, help, unit, kind, v| Family::new(name, help, unit, kind).with(v);
    s.add(plain(
        "job_iterations",
        "Worker iterations done, over every job.",
        MetricUnit::None,
        MetricKind::Counter,
        Value::Int(f.iterations_total),
    ));
    s.add(plain(
        "job_busy",
        "Seconds workers spent computing, over every job.",
        MetricUnit::Seconds,
        MetricKind::Counter,
        Value::Float(f.busy_total_us as f64 / 1e6),
    ));
    s.add(plain(
        "job_wait",
        "Seconds workers spent waiting on pushes and pulls, over every job.",
        MetricUnit::Seconds,
        MetricKind::Counter,
        Value::Float(f.wait_total_us as f64 / 1e6),
    ));
    if scope == Scope::Job {
        s.add(plain(
            "job_workers",
            "Workers that loaded their shard of the job (joiners included).",
            MetricUnit::None,
            MetricKind::Gauge,
            Value::Int(f.workers),
        ));
        s.add(plain(
            "job_workers_lost",
            "Workers the job lost (their shards went to others).",
            MetricUnit::None,
            MetricKind::Counter,
            Value::Int(f.workers_lost),
        ));
    }
    s
}

/// Whether the process is ready: a worker while it has a job, a scheduler
/// while its job runs.
pub fn ready(scope: Scope, f: &Figures) -> Result<(), String> {
    match scope {
        Scope::Worker if f.job.is_none() => {
            Err("idle: no job yet (waiting for a scheduler to offer one)".into())
        }
        Scope::Job if f.finished => Err("the job has finished".into()),
        Scope::Job if f.workers == 0 => Err("starting: no worker has loaded its data yet".into()),
        _ => Ok(()),
    }
}

/// The metrics listener's view of a job's figures.
pub struct JobExporter {
    /// Whose figures.
    pub scope: Scope,
    /// The figures.
    pub gauges: Arc<JobGauges>,
}

impl Exporter for JobExporter {
    fn scrape(&self) -> BoxFuture<'_, Scrape> {
        Box::pin(async move { scrape(self.scope, &self.gauges.figures()) })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { ready(self.scope, &self.gauges.figures()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::IterStats;
    use std::time::Duration;

    #[test]
    fn a_job_counts_its_iterations_and_waiting_share() {
        let g = JobGauges::new();
        assert!(ready(Scope::Job, &g.figures()).is_err());
        g.start("j");
        g.progress(&Progress::Loaded {
            worker: 0,
            rows: 10,
        });
        for i in 1..=3 {
            g.progress(&Progress::Iter(IterStats {
                worker: 0,
                iteration: i,
                loss: 1.0,
                rows: 10,
                pushed: 0,
                filtered: 0,
                busy: Duration::from_millis(3),
                wait: Duration::from_millis(1),
            }));
        }
        g.progress(&Progress::Objective {
            seconds: 1.0,
            iteration: 3,
            objective: 0.5,
        });
        let f = g.figures();
        assert_eq!(f.iterations_total, 3);
        assert_eq!(f.iteration, 3);
        assert_eq!(f.objective, Some(0.5));
        assert!((f.waiting_ratio() - 0.25).abs() < 1e-12);
        assert_eq!(ready(Scope::Job, &f), Ok(()));
        g.finish();
        assert!(ready(Scope::Job, &g.figures()).is_err());
        let text = scrape(Scope::Job, &g.figures()).render();
        assert!(
            text.contains("pserver_job_waiting_ratio{job=\"j\"} 0.25"),
            "{text}"
        );
        assert!(text.contains("pserver_job_iterations_total 3"), "{text}");
    }

    #[test]
    fn a_worker_is_ready_while_it_has_a_job() {
        let g = JobGauges::new();
        assert!(ready(Scope::Worker, &g.figures()).is_err());
        g.start("j");
        g.step(&StepStats {
            iteration: 2,
            loss: 3.0,
            rows: 4,
            pushed: 0,
            filtered: 0,
            busy_us: 10,
            wait_us: 30,
            send_us: 0,
        });
        let f = g.figures();
        assert_eq!(ready(Scope::Worker, &f), Ok(()));
        assert_eq!(f.objective, Some(0.75));
        assert!((f.waiting_ratio() - 0.75).abs() < 1e-12);
        g.end();
        assert!(ready(Scope::Worker, &g.figures()).is_err());
    }
}
