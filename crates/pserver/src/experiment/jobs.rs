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
use pserver_core::map::Group;
use pserver_node::worker::{Worker, WorkerConfig};
use std::time::{Duration, Instant};

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

/// CPU time of one process: nanoseconds on a CPU (`/proc/PID/stat`,
/// user and system, every thread's including those that have exited),
/// and nanoseconds runnable but waiting for one (the run queue: what
/// sharing the cores with other work costs; summed over the threads alive
/// when sampled, `/proc/PID/task/*/schedstat`, as no process-wide figure
/// exists).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cpu {
    run_ns: u64,
    queued_ns: u64,
}

/// Clock ticks per second of `/proc/PID/stat` (`USER_HZ`, fixed at 100
/// in the kernel's ABI on every architecture Linux exports it for).
const TICK_NS: u64 = 10_000_000;

/// Parses a `/proc/PID/stat` line: user plus system time, in ns. The
/// command name (field 2) is in parentheses and may hold spaces, so
/// fields are counted after its closing one.
fn parse_stat(line: &str) -> Option<u64> {
    let rest = &line[line.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) * TICK_NS)
}

/// Parses one `schedstat` line (`run_ns queued_ns timeslices`): the
/// queued nanoseconds.
fn parse_schedstat(line: &str) -> Option<u64> {
    let mut f = line.split_whitespace().map(str::parse::<u64>);
    f.next()?.ok()?;
    f.next()?.ok()
}

/// The CPU time of process `pid` so far; zero if it cannot be read.
fn cpu_of(pid: u32) -> Cpu {
    let run_ns = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|l| parse_stat(&l))
        .unwrap_or(0);
    let mut queued_ns = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            queued_ns += std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|l| parse_schedstat(&l))
                .unwrap_or(0);
        }
    }
    Cpu { run_ns, queued_ns }
}

/// The processes watched: each with a label and, for worker processes,
/// the node id it registered as.
struct Watched {
    procs: Vec<(String, Option<u32>, u32)>,
}

impl Watched {
    /// Every process's CPU time now.
    fn sample(&self) -> Vec<Cpu> {
        self.procs.iter().map(|(_, _, pid)| cpu_of(*pid)).collect()
    }
}

/// CPU use during one fast run's training, in cores (CPU seconds per
/// second): all processes, the fast job's worker processes, the slow
/// job's, and the fast job's workers' run-queue wait.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    all: f64,
    fast_workers: f64,
    slow_workers: f64,
    fast_queued: f64,
}

/// `Usage` between samples `a` and `b`, `seconds` apart; `fast` and
/// `slow` are the node ids of each job's workers.
fn usage(w: &Watched, a: &[Cpu], b: &[Cpu], seconds: f64, fast: &[u32], slow: &[u32]) -> Usage {
    let mut u = Usage::default();
    let s = seconds.max(1e-9) * 1e9;
    for (i, (_, id, _)) in w.procs.iter().enumerate() {
        let run = b[i].run_ns.saturating_sub(a[i].run_ns) as f64 / s;
        let queued = b[i].queued_ns.saturating_sub(a[i].queued_ns) as f64 / s;
        u.all += run;
        match id {
            Some(id) if fast.contains(id) => {
                u.fast_workers += run;
                u.fast_queued += queued;
            }
            Some(id) if slow.contains(id) => u.slow_workers += run,
            _ => {}
        }
    }
    u
}

/// One fast run: iterations per second of training, and the CPU use
/// between its first and last objective reports (training, not loading).
async fn fast_run(
    manager: &str,
    cfg: &TrainConfig,
    watched: &Watched,
    observer: &Worker,
    slow_job: Option<&str>,
) -> Result<(f64, Usage)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The first objective report: training has begun (loading is over).
    let (began_tx, began) = tokio::sync::oneshot::channel();
    let drain = tokio::spawn(async move {
        let mut began_tx = Some(began_tx);
        while let Some(ev) = rx.recv().await {
            if matches!(ev, Progress::Objective { .. }) {
                if let Some(t) = began_tx.take() {
                    let _ = t.send(());
                }
            }
        }
    });
    let pool = Pool::Remote {
        min: 2,
        max: 2,
        wait: Duration::from_secs(60),
    };
    let sched = scheduler::run(manager, cfg, pool, tx);
    tokio::pin!(sched);
    tokio::pin!(began);
    let mut start: Option<(Instant, Vec<Cpu>)> = None;
    let r = loop {
        tokio::select! {
            r = &mut sched => break r?,
            Ok(()) = &mut began, if start.is_none() => {
                start = Some((Instant::now(), watched.sample()));
            }
        }
    };
    let end = (Instant::now(), watched.sample());
    let _ = drain.await;
    // Who worked for which job: the map keeps the groups of idle workers
    // apart, but a finished job's workers are idle again, so this asks
    // the slow job (still running) and takes the fast job's as the others
    // that trained.
    let map = observer.refresh().await?;
    let slow = slow_job
        .map(|j| map.group_workers(&Group::Job(j.to_string())))
        .unwrap_or_default();
    let fast: Vec<u32> = watched
        .procs
        .iter()
        .filter_map(|(_, id, _)| *id)
        .filter(|id| !slow.contains(id))
        .collect();
    let u = match start {
        Some((at, a)) => usage(
            watched,
            &a,
            &end.1,
            end.0.duration_since(at).as_secs_f64(),
            &fast,
            &slow,
        ),
        None => Usage::default(),
    };
    Ok((cfg.steps() as f64 / r.train_seconds.max(1e-9), u))
}

/// Runs the experiment.
pub async fn run(args: JobsArgs) -> Result<()> {
    if args.runs == 0 || args.epochs == 0 {
        bail!("--runs and --epochs must be at least 1");
    }
    let mut procs = Procs::new(&[]);
    let manager = procs.start_cluster(2)?;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let line = procs.start(&["worker", "--manager", &manager])?;
        // "worker N takes tasks on ADDR; ..."
        let id = line
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse::<u32>().ok())
            .with_context(|| format!("no node id in {line:?}"))?;
        ids.push(id);
    }
    let pids = procs.pids();
    let mut watched = Watched {
        procs: vec![("experiment".into(), None, std::process::id())],
    };
    for (i, pid) in pids.iter().enumerate() {
        let (label, id) = match i {
            0 => ("manager".to_string(), None),
            1 | 2 => (format!("server {i}"), None),
            _ => (format!("worker {}", ids[i - 3]), Some(ids[i - 3])),
        };
        watched.procs.push((label, id, *pid));
    }
    let observer = Worker::connect(WorkerConfig::new(manager.clone()))
        .await
        .context("connecting to the cluster")?;
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
            fast_run(&manager, &cfg, &watched, &observer, None)
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
        let slow_job = format!("slow-{run}");
        let rate = fast_run(&manager, &cfg, &watched, &observer, Some(&slow_job))
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
            "  run {}: alone {:.1} it/s ({:.2} cores busy), beside the slow job {:.1} it/s \
             ({:.2} cores busy, {:.2} of them the slow job's workers)",
            run + 1,
            alone[run].0,
            alone[run].1.all,
            rate.0,
            rate.1.all,
            rate.1.slow_workers,
        );
        // The aborted scheduler's workers go idle once their link breaks.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let row = |runs: &[(f64, Usage)]| {
        let m = |f: fn(&(f64, Usage)) -> f64| median(runs.iter().map(f).collect());
        [
            m(|r| r.0),
            m(|r| r.1.all),
            m(|r| r.1.fast_workers),
            m(|r| r.1.fast_queued),
            m(|r| r.1.slow_workers),
        ]
    };
    let (a, b) = (row(&alone), row(&beside));
    println!(
        "medians of {} runs; cores: CPU seconds per second of the fast job's training, \
         from /proc/PID/stat (run-queue wait: runnable, waiting for a core, from the threads' schedstat)",
        args.runs
    );
    println!(
        "| fast job | iterations/s | cores busy, all processes | its workers | its workers' run-queue wait | the slow job's workers |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, r) in [("alone", a), ("beside a slowed job", b)] {
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r[0], r[1], r[2], r[3], r[4]
        );
    }
    println!("| ratio | {:.2} | | | | |", b[0] / a[0].max(1e-9));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse_and_garbage_does_not() {
        let stat = "4242 (tokio rt) worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 9 0 1000 0 0";
        assert_eq!(parse_stat(stat), Some(300 * TICK_NS));
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(parse_schedstat("107224160 19818563 702\n"), Some(19818563));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        // Burn a little so the tick counter moves.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(cpu_of(std::process::id()).run_ns > 0);
    }

    #[test]
    fn usage_splits_cores_by_job() {
        let w = Watched {
            procs: vec![
                ("experiment".into(), None, 1),
                ("worker 5".into(), Some(5), 2),
                ("worker 6".into(), Some(6), 3),
            ],
        };
        let cpu = |run_ns, queued_ns| Cpu { run_ns, queued_ns };
        let a = [cpu(0, 0), cpu(1_000, 0), cpu(0, 0)];
        let b = [
            cpu(500_000_000, 0),
            cpu(1_000_001_000, 250_000_000),
            cpu(100_000_000, 0),
        ];
        let u = usage(&w, &a, &b, 1.0, &[5], &[6]);
        assert!((u.all - 1.6).abs() < 1e-9, "{u:?}");
        assert!((u.fast_workers - 1.0).abs() < 1e-9, "{u:?}");
        assert!((u.fast_queued - 0.25).abs() < 1e-9, "{u:?}");
        assert!((u.slow_workers - 0.1).abs() < 1e-9, "{u:?}");
    }
}
