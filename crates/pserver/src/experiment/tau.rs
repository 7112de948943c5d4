//! `pserver experiment tau` is the bounded-delay experiment of Li et al.
//! (OSDI 2014, sparse logistic regression; NIPS 2014): train the same model
//! with delays `tau = 0, 1, 2, 4, ...` and compare how long each takes to
//! reach the same objective, and how much of the workers' time goes to
//! waiting. In-process, every run gets a fresh local cluster so that no
//! table or connection of an earlier run can slow a later one; with
//! `--netns`, every node is a process on an emulated host (hosts.rs).

use super::hosts::Link;
use super::netns_cluster::NetnsCluster;
use super::{BLOCKS, KKT, L1, L2, flights, one_run};
use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_apps::report::Report;
use pserver_apps::train::{RunResult, TrainConfig};
use serde::Serialize;
use std::path::PathBuf;

/// The default target is this much above the highest final objective of the
/// first round (one run per tau). Every tau then reaches it, however much
/// its smaller step (`1 / (tau + 1)`) slows it per iteration; a target
/// taken from the tau=0 run alone is not reached by any delayed run within
/// the default 10 epochs on the flights data.
const TARGET_SLACK: f64 = 1.01;

/// `pserver experiment tau` flags.
#[derive(Args, Debug)]
pub(super) struct TauArgs {
    /// Delays to compare, comma-separated (0: sequential).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4,8,16")]
    taus: Vec<u64>,
    /// Runs per delay; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Servers of each run's local cluster.
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Training objective to time each run to (default: 1.01 x the highest
    /// final objective among the first run of every tau, so every tau reaches it).
    #[arg(long, allow_hyphen_values = true)]
    target: Option<f64>,
    /// Send every key list in full (turns the key caching filter off, as
    /// `pserver train --no-key-caching` does).
    #[arg(long)]
    no_key_caching: bool,
    /// Write every run (with its curve) and the medians as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run every node as a process on an emulated host of its own (a
    /// network namespace joined by a veth pair, rate-capped, every link
    /// delayed by a relay) instead of in this process. Needs root and
    /// iproute2.
    #[arg(long)]
    netns: bool,
    /// With --netns: delay each way of every connection between hosts, in
    /// milliseconds (a round trip costs twice this more than loopback).
    #[arg(long, default_value_t = 2, requires = "netns")]
    delay_ms: u64,
    /// With --netns: each host's link rate cap, each direction, in Mbit/s.
    #[arg(long, default_value_t = 1000, requires = "netns")]
    rate_mbit: u64,
}

/// Where the runs train.
enum Runner {
    /// A fresh local cluster in this process for every run.
    Local { servers: usize },
    /// One cluster of processes on emulated hosts for all runs.
    Netns(Box<NetnsCluster>),
}

impl Runner {
    /// Trains with `cfg` and returns run `run` of its tau.
    async fn run(&mut self, cfg: &TrainConfig, run: usize) -> Result<RunRecord> {
        match self {
            Runner::Local { servers } => Ok(RunRecord::of_result(
                cfg.tau,
                run,
                one_run(cfg, *servers).await?,
            )),
            Runner::Netns(cluster) => {
                let job = format!("tau{}-run{run}", cfg.tau);
                let report = cluster.train(&job, cfg)?;
                Ok(RunRecord::of_report(cfg.tau, run, report))
            }
        }
    }
}

/// One training run, as the report keeps it.
#[derive(Clone, Debug, Serialize)]
struct RunRecord {
    tau: u64,
    /// 1-based repetition of this tau.
    run: usize,
    train_seconds: f64,
    /// Seconds until the objective first reached the target; `None`: never.
    time_to_target: Option<f64>,
    /// The iteration at which it did.
    iterations_to_target: Option<u64>,
    /// Training seconds over iterations: the rate a delay is meant to raise.
    seconds_per_iteration: Option<f64>,
    wait_fraction: f64,
    /// The part of it spent handing messages to the connections.
    send_fraction: f64,
    final_objective: Option<f64>,
    test_auc: f64,
    test_logloss: f64,
    bytes_sent: u64,
    bytes_received: u64,
    /// Bytes the KKT filter and key caching kept off the wire.
    bytes_saved: u64,
    /// (seconds, iteration, objective) after every iteration.
    curve: Vec<(f64, u64, f64)>,
}

impl RunRecord {
    /// Run `run` of `tau`, from an in-process training's result.
    fn of_result(tau: u64, run: usize, r: RunResult) -> RunRecord {
        RunRecord {
            tau,
            run,
            train_seconds: r.train_seconds,
            time_to_target: None,
            iterations_to_target: None,
            seconds_per_iteration: (!r.curve.is_empty())
                .then(|| r.train_seconds / r.curve.len() as f64),
            wait_fraction: r.wait_fraction,
            send_fraction: r.send_fraction,
            final_objective: r.curve.last().map(|c| c.2),
            test_auc: r.test.auc,
            test_logloss: r.test.logloss,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            bytes_saved: r.bytes_saved,
            curve: r.curve,
        }
    }

    /// Run `run` of `tau`, from a scheduler's `--report`: its objective
    /// points (test points carry none) are the curve.
    fn of_report(tau: u64, run: usize, r: Report) -> RunRecord {
        let curve: Vec<(f64, u64, f64)> = r
            .curve
            .iter()
            .filter(|p| p.objective.is_finite())
            .map(|p| (p.seconds, p.iteration, p.objective))
            .collect();
        RunRecord {
            tau,
            run,
            train_seconds: r.seconds,
            time_to_target: None,
            iterations_to_target: None,
            seconds_per_iteration: (!curve.is_empty()).then(|| r.seconds / curve.len() as f64),
            wait_fraction: r.wait_fraction,
            send_fraction: r.send_fraction,
            final_objective: curve.last().map(|c| c.2),
            test_auc: r.test_auc,
            test_logloss: r.test_logloss,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            bytes_saved: r.bytes_saved,
            curve,
        }
    }
}

/// Medians over the runs of one tau.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    tau: u64,
    runs: usize,
    /// Runs that reached the target.
    reached: usize,
    time_to_target: Option<f64>,
    /// tau=0's median time to target over this tau's.
    speedup: Option<f64>,
    iterations_to_target: Option<f64>,
    seconds_per_iteration: Option<f64>,
    wait_fraction: Option<f64>,
    send_fraction: Option<f64>,
    train_seconds: Option<f64>,
    final_objective: Option<f64>,
    test_auc: Option<f64>,
    test_logloss: Option<f64>,
    bytes_sent: Option<f64>,
    bytes_received: Option<f64>,
    bytes_saved: Option<f64>,
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
struct TauReport {
    experiment: &'static str,
    data: String,
    algo: &'static str,
    servers: usize,
    workers: usize,
    epochs: usize,
    blocks: usize,
    l1: f32,
    l2: f32,
    kkt: f32,
    key_caching: bool,
    runs_per_tau: usize,
    cores: usize,
    /// How the nodes ran: in one process on loopback, or as processes on
    /// emulated hosts.
    network: String,
    /// With --netns: delay each way between hosts, ms.
    delay_ms: Option<u64>,
    /// With --netns: each host's link rate cap, Mbit/s.
    rate_mbit: Option<u64>,
    target: f64,
    target_rule: String,
    medians: Vec<Summary>,
    runs: Vec<RunRecord>,
}

/// The (seconds, iteration) at which `curve` (seconds, iteration,
/// objective) first reaches `target` or below; `None` if it never does.
fn reach(curve: &[(f64, u64, f64)], target: f64) -> Option<(f64, u64)> {
    curve
        .iter()
        .find(|(_, _, objective)| *objective <= target)
        .map(|(seconds, iteration, _)| (*seconds, *iteration))
}

/// The default target: `TARGET_SLACK` times the highest final objective
/// among the first run of each tau, with that objective; `None` if no first
/// run reported one.
fn default_target(records: &[RunRecord]) -> Option<(f64, f64)> {
    records
        .iter()
        .filter(|r| r.run == 1)
        .filter_map(|r| r.final_objective)
        .filter(|o| o.is_finite())
        .max_by(f64::total_cmp)
        .map(|worst| (TARGET_SLACK * worst, worst))
}

/// The median of `xs` (the mean of the middle two for an even count);
/// `None` for no values. NaNs sort last, like the values they stand for
/// (a run that produced no figure) would be worst.
fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| match (a.is_nan(), b.is_nan()) {
        (false, false) => a.total_cmp(b),
        (x, y) => x.cmp(&y),
    });
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The median time (or iterations) to target, a run that never reached it
/// counting as slower than every run that did: `None` when the middle of
/// the sorted runs is such a run, since no finite figure describes it.
fn median_reached(times: &[Option<f64>]) -> Option<f64> {
    let v: Vec<f64> = times.iter().map(|t| t.unwrap_or(f64::INFINITY)).collect();
    median(&v).filter(|m| m.is_finite())
}

/// How many times faster than the baseline (`base / t`); `None` if either
/// is missing or `t` is not positive.
fn speedup(base: Option<f64>, t: Option<f64>) -> Option<f64> {
    match (base, t) {
        (Some(b), Some(t)) if t > 0.0 => Some(b / t),
        _ => None,
    }
}

/// The taus in the order given, each once.
fn distinct(taus: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for t in taus {
        if !out.contains(t) {
            out.push(*t);
        }
    }
    out
}

/// Medians of every tau's runs; `records` must have `time_to_target` set.
fn summarize(taus: &[u64], records: &[RunRecord]) -> Vec<Summary> {
    let mut out: Vec<Summary> = taus
        .iter()
        .map(|&tau| {
            let rs: Vec<&RunRecord> = records.iter().filter(|r| r.tau == tau).collect();
            let med =
                |f: fn(&RunRecord) -> f64| median(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let times: Vec<Option<f64>> = rs.iter().map(|r| r.time_to_target).collect();
            Summary {
                tau,
                runs: rs.len(),
                reached: times.iter().filter(|t| t.is_some()).count(),
                time_to_target: median_reached(&times),
                speedup: None,
                iterations_to_target: median_reached(
                    &rs.iter()
                        .map(|r| r.iterations_to_target.map(|i| i as f64))
                        .collect::<Vec<_>>(),
                ),
                seconds_per_iteration: med(|r| r.seconds_per_iteration.unwrap_or(f64::NAN)),
                wait_fraction: med(|r| r.wait_fraction),
                send_fraction: med(|r| r.send_fraction),
                train_seconds: med(|r| r.train_seconds),
                final_objective: med(|r| r.final_objective.unwrap_or(f64::NAN)),
                test_auc: med(|r| r.test_auc),
                test_logloss: med(|r| r.test_logloss),
                bytes_sent: med(|r| r.bytes_sent as f64),
                bytes_received: med(|r| r.bytes_received as f64),
                bytes_saved: med(|r| r.bytes_saved as f64),
            }
        })
        .collect();
    let base = out
        .iter()
        .find(|s| s.tau == 0)
        .and_then(|s| s.time_to_target);
    for s in &mut out {
        s.speedup = speedup(base, s.time_to_target);
    }
    out
}

/// Runs `pserver experiment tau`.
pub(super) async fn run(args: TauArgs) -> Result<()> {
    let taus = distinct(&args.taus);
    if taus.is_empty() {
        bail!("--taus needs at least one delay");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.servers == 0 {
        bail!("--servers must be at least 1");
    }
    if let Some(t) = args.target {
        if !(t.is_finite() && t > 0.0) {
            bail!("--target must be a finite objective above 0, got {t}");
        }
    }

    // The report is written after every run; a path that cannot take it
    // should fail now, not after minutes of training.
    if let Some(dir) = args.json.as_ref().and_then(|p| p.parent()) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            bail!("--json: directory {} does not exist", dir.display());
        }
    }

    let base = flights(args.workers, args.epochs, !args.no_key_caching)?;
    let data = base.train.clone();
    let cfg = |tau: u64| TrainConfig {
        tau,
        ..base.clone()
    };
    cfg(0).validate()?;

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let link = Link {
        delay_ms: args.delay_ms,
        rate_mbit: args.rate_mbit,
    };
    let network = if args.netns {
        format!(
            "processes on {} emulated hosts (network namespaces), links of {} Mbit/s, \
             {} ms each way between hosts",
            1 + args.servers + args.workers,
            link.rate_mbit,
            link.delay_ms
        )
    } else {
        "one process, loopback".to_string()
    };
    let mut runner = if args.netns {
        Runner::Netns(Box::new(NetnsCluster::start(
            args.servers,
            args.workers,
            link,
        )?))
    } else {
        Runner::Local {
            servers: args.servers,
        }
    };
    println!(
        "bounded-delay experiment: dbpg on {}, {} servers, {} workers, {} epochs x {} blocks, \
         KKT filter {}, key caching {}, taus {:?}, {} runs each, {} cores; {network}",
        data.display(),
        args.servers,
        args.workers,
        args.epochs,
        BLOCKS,
        KKT,
        if args.no_key_caching { "off" } else { "on" },
        taus,
        args.runs,
        cores
    );

    // Rounds over all taus rather than all runs of one tau in a row: a shared
    // machine's load drifts, and interleaving spreads the drift over every tau.
    let total = taus.len() * args.runs;
    let mut records = Vec::with_capacity(total);
    for run in 1..=args.runs {
        for &tau in &taus {
            let rec = runner
                .run(&cfg(tau), run)
                .await
                .with_context(|| format!("tau {tau}, run {run}"))?;
            eprintln!(
                "[{:>3}/{total}] tau {tau:>2} run {run}/{}: {:.2} s, objective {}, waiting {:.1} % \
                 ({:.1} sending), test AUC {:.4}, {:.1} MB sent, {:.1} MB received",
                records.len() + 1,
                args.runs,
                rec.train_seconds,
                rec.final_objective
                    .map_or("-".to_string(), |o| format!("{o:.5}")),
                100.0 * rec.wait_fraction,
                100.0 * rec.send_fraction,
                rec.test_auc,
                rec.bytes_sent as f64 / 1e6,
                rec.bytes_received as f64 / 1e6,
            );
            records.push(rec);
        }
    }

    let (target, rule) = match args.target {
        Some(t) => (t, "given by --target".to_string()),
        None => {
            let (target, worst) = default_target(&records).context(
                "no run reported an objective, so there is no default target; give --target",
            )?;
            (
                target,
                format!(
                    "{TARGET_SLACK} x the highest final objective of the first run of each tau ({worst:.5})"
                ),
            )
        }
    };
    for r in &mut records {
        let reached = reach(&r.curve, target);
        r.time_to_target = reached.map(|x| x.0);
        r.iterations_to_target = reached.map(|x| x.1);
    }
    let medians = summarize(&taus, &records);

    println!(
        "target objective {target:.5}: {rule}; medians over {} runs",
        args.runs
    );
    print!("{}", table(&medians));
    let unreached: Vec<String> = medians
        .iter()
        .filter(|s| s.reached < s.runs)
        .map(|s| format!("tau {}: {}/{}", s.tau, s.reached, s.runs))
        .collect();
    if !unreached.is_empty() {
        println!(
            "not every run reached the target (runs that did): {}",
            unreached.join(", ")
        );
    }

    if let Some(path) = &args.json {
        let report = TauReport {
            experiment: "tau",
            data: data.display().to_string(),
            algo: "dbpg",
            servers: args.servers,
            workers: args.workers,
            epochs: args.epochs,
            blocks: BLOCKS,
            l1: L1,
            l2: L2,
            kkt: KKT,
            key_caching: !args.no_key_caching,
            runs_per_tau: args.runs,
            cores,
            network,
            delay_ms: args.netns.then_some(args.delay_ms),
            rate_mbit: args.netns.then_some(args.rate_mbit),
            target,
            target_rule: rule,
            medians,
            runs: records,
        };
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the report to {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

/// The medians as a Markdown table. The last two columns split time to
/// target into its two factors: how many iterations the delay costs, and
/// how fast iterations go (what overlap is meant to improve).
fn table(medians: &[Summary]) -> String {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    let mut s = String::from(
        "| tau | time to target (s) | speedup vs tau=0 | waiting % | of it sending % | final objective | test AUC | test log-loss | iterations to target | ms / iteration |\n\
         |----:|-------------------:|-----------------:|----------:|----------------:|----------------:|---------:|--------------:|---------------------:|---------------:|\n",
    );
    for m in medians {
        let time = match m.time_to_target {
            Some(t) if m.reached == m.runs => format!("{t:.3}"),
            Some(t) => format!("{t:.3} ({}/{} reached)", m.reached, m.runs),
            None => format!("not reached ({}/{})", m.reached, m.runs),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.tau,
            time,
            opt(m.speedup, &|x| format!("{x:.2}x")),
            opt(m.wait_fraction, &|x| format!("{:.1}", 100.0 * x)),
            opt(m.send_fraction, &|x| format!("{:.1}", 100.0 * x)),
            opt(m.final_objective, &|x| format!("{x:.5}")),
            opt(m.test_auc, &|x| format!("{x:.4}")),
            opt(m.test_logloss, &|x| format!("{x:.4}")),
            opt(m.iterations_to_target, &|x| format!("{x:.0}")),
            opt(m.seconds_per_iteration, &|x| format!("{:.2}", 1e3 * x)),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_target_is_the_first_point_at_or_below_it() {
        let curve = [(0.1, 1, 0.7), (0.2, 2, 0.5), (0.3, 3, 0.55), (0.4, 4, 0.4)];
        assert_eq!(reach(&curve, 0.5), Some((0.2, 2)));
        // Not the later point that dips below after a rise.
        assert_eq!(reach(&curve, 0.45), Some((0.4, 4)));
        assert_eq!(reach(&curve, 0.8), Some((0.1, 1)));
        assert_eq!(reach(&curve, 0.3), None);
        assert_eq!(reach(&[], 1.0), None);
        // A NaN objective never counts as reaching the target.
        assert_eq!(reach(&[(0.1, 1, f64::NAN)], 1.0), None);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
        // NaN sorts last, as the worst value.
        assert_eq!(median(&[f64::NAN, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn median_time_counts_unreached_runs_as_slowest() {
        assert_eq!(median_reached(&[Some(2.0), None, Some(1.0)]), Some(2.0));
        assert_eq!(median_reached(&[None, None, Some(1.0)]), None);
        assert_eq!(median_reached(&[Some(1.0), None]), None);
        assert_eq!(median_reached(&[]), None);
    }

    #[test]
    fn speedup_is_the_ratio_of_times() {
        assert_eq!(speedup(Some(2.0), Some(1.0)), Some(2.0));
        assert_eq!(speedup(Some(1.0), Some(2.0)), Some(0.5));
        assert_eq!(speedup(None, Some(1.0)), None);
        assert_eq!(speedup(Some(1.0), None), None);
        assert_eq!(speedup(Some(1.0), Some(0.0)), None);
    }

    #[test]
    fn summaries_take_medians_per_tau_and_compare_with_tau_zero() {
        let rec = |tau, run, t: Option<f64>, wait| RunRecord {
            tau,
            run,
            train_seconds: 1.0,
            time_to_target: t,
            iterations_to_target: t.map(|t| (10.0 * t) as u64),
            seconds_per_iteration: Some(0.01),
            wait_fraction: wait,
            send_fraction: wait / 2.0,
            final_objective: Some(0.4 + tau as f64 / 100.0 + run as f64 / 1000.0),
            test_auc: 0.8,
            test_logloss: 0.42,
            bytes_sent: 10,
            bytes_received: 20,
            bytes_saved: 0,
            curve: Vec::new(),
        };
        let records = [
            rec(0, 1, Some(2.0), 0.5),
            rec(4, 1, Some(1.0), 0.1),
            rec(0, 2, Some(4.0), 0.3),
            rec(4, 2, None, 0.2),
            rec(0, 3, Some(3.0), 0.4),
            rec(4, 3, Some(1.5), 0.3),
        ];
        let s = summarize(&[0, 4], &records);
        assert_eq!((s[0].tau, s[0].runs, s[0].reached), (0, 3, 3));
        assert_eq!(s[0].time_to_target, Some(3.0));
        assert_eq!(s[0].speedup, Some(1.0));
        assert_eq!(s[0].wait_fraction, Some(0.4));
        assert_eq!((s[1].tau, s[1].reached), (4, 2));
        assert_eq!(s[1].time_to_target, Some(1.5));
        assert_eq!(s[1].speedup, Some(2.0));
        assert_eq!(s[1].wait_fraction, Some(0.2));
        assert_eq!(s[1].iterations_to_target, Some(15.0));
        assert_eq!(s[1].bytes_received, Some(20.0));
        // The default target: 1.01 x the worst final objective of run 1.
        let (target, worst) = default_target(&records).unwrap();
        assert!((worst - 0.441).abs() < 1e-12, "{worst}");
        assert!((target - 1.01 * 0.441).abs() < 1e-12, "{target}");
        assert_eq!(default_target(&[]), None);
    }

    #[test]
    fn distinct_keeps_the_first_of_each_tau_in_order() {
        assert_eq!(distinct(&[4, 0, 4, 1, 0]), vec![4, 0, 1]);
    }
}
