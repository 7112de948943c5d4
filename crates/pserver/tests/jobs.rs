//! Training jobs between processes: a manager, server processes, `pserver
//! worker` processes and `pserver train --manager ... --remote-workers N` as
//! the job's scheduler, all on loopback. The bundled data trains to a good
//! AUC; a worker SIGKILLed mid-run has its shard taken over and the AUC
//! stays; a worker started mid-run is given a share; two jobs on one
//! cluster do not wait on each other; bad input fails with one clear line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Procs, spawn};

/// A manager and `servers` server processes; the manager's address.
fn cluster(servers: usize) -> (Procs, String) {
    let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0", "--lease-ms", "1000"]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    for _ in 0..servers {
        procs.0.push(spawn(&["server", "--manager", &manager]));
    }
    (procs, manager)
}

/// Starts a worker process; its node id.
fn worker(procs: &mut Procs, manager: &str, extra: &[&str]) -> u32 {
    let mut args = vec!["worker", "--manager", manager];
    args.extend_from_slice(extra);
    let (child, line) = spawn(&args);
    assert!(line.starts_with("worker "), "{line}");
    let id = line.split(' ').nth(1).unwrap().parse().unwrap();
    procs.0.push((child, line));
    id
}

/// A scheduler process whose output lines arrive on a channel.
struct Scheduler {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Scheduler {
    fn start(manager: &str, args: &[&str]) -> Scheduler {
        let mut child = Command::new(BIN)
            .args(["train", "--manager", manager])
            .args(args)
            .env("RUST_LOG", "off")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pserver train");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Scheduler {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `what`, at most `limit`.
    fn wait_for(&mut self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {what:?} within {limit:?}: {:#?}", self.seen),
            }
        }
    }

    /// Waits for the process to end, at most `limit`: its exit status and
    /// every line it wrote.
    fn finish(mut self, limit: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader threads end with the pipes.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
                    self.seen.push(l);
                }
                return (status.success(), std::mem::take(&mut self.seen));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the scheduler did not finish within {limit:?}: {:#?}",
                    self.seen
                );
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test AUC in a `--report` file.
fn auc(report: &std::path::Path) -> f64 {
    let text = std::fs::read_to_string(report).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["test_auc"].as_f64().unwrap()
}

fn kill(procs: &mut Procs, id: u32) {
    let (child, _) = procs
        .0
        .iter_mut()
        .find(|(_, l)| l.starts_with(&format!("worker {id} ")))
        .expect("the worker's process");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn three_worker_processes_train_the_bundled_data_and_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (mut procs, manager) = cluster(2);
    let ids: Vec<u32> = (0..3).map(|_| worker(&mut procs, &manager, &[])).collect();

    // Undisturbed.
    let calm = dir.path().join("calm.json");
    let s = Scheduler::start(
        &manager,
        &[
            "--remote-workers",
            "3",
            "--job",
            "calm",
            "--epochs",
            "6",
            "--report",
            calm.to_str().unwrap(),
        ],
    );
    let (ok, lines) = s.finish(Duration::from_secs(120));
    assert!(ok, "{lines:#?}");
    let calm_auc = auc(&calm);
    assert!(calm_auc >= 0.80, "AUC {calm_auc}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&calm).unwrap()).unwrap();
    assert_eq!(
        (v["servers"].as_u64(), v["workers"].as_u64()),
        (Some(2), Some(3))
    );
    // The same worker processes, idle again, take the next job; one is
    // SIGKILLed once every worker has loaded its shard.
    let hurt = dir.path().join("hurt.json");
    let mut s = Scheduler::start(
        &manager,
        &[
            "--remote-workers",
            "3",
            "--job",
            "hurt",
            "--epochs",
            "6",
            "--report",
            hurt.to_str().unwrap(),
        ],
    );
    s.wait_for("loaded", Duration::from_secs(60));
    s.wait_for("loaded", Duration::from_secs(60));
    s.wait_for("loaded", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.running(), "the job ended before the kill: {:#?}", s.seen);
    kill(&mut procs, ids[2]);
    let (ok, lines) = s.finish(Duration::from_secs(120));
    assert!(ok, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("lost")),
        "the loss was not reported: {lines:#?}"
    );
    let hurt_auc = auc(&hurt);
    assert!(
        (hurt_auc - calm_auc).abs() <= 0.005,
        "AUC {hurt_auc} after the kill, {calm_auc} without"
    );
}

#[test]
fn a_worker_process_started_mid_run_is_given_a_share() {
    let (mut procs, manager) = cluster(2);
    for _ in 0..2 {
        worker(&mut procs, &manager, &[]);
    }
    let mut s = Scheduler::start(
        &manager,
        &[
            "--remote-workers",
            "2",
            "--max-workers",
            "3",
            "--job",
            "grows",
            "--epochs",
            "8",
        ],
    );
    s.wait_for("loaded", Duration::from_secs(60));
    s.wait_for("loaded", Duration::from_secs(60));
    let late = worker(&mut procs, &manager, &[]);
    let joined = s.wait_for("joined", Duration::from_secs(60));
    assert!(joined.contains(&format!("node {late}")), "{joined}");
    let holds = s.wait_for("worker 2 now holds", Duration::from_secs(60));
    let rows: usize = holds
        .split("holds ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap();
    assert!(rows > 10_000, "{holds}");
    // The map shows what it works on.
    let status = common::ok(&["status", "--manager", &manager, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let node = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == late)
        .unwrap();
    if s.running() {
        assert_eq!(node["job"], "grows", "{node}");
        assert!(node["task"].as_str().unwrap().contains("flights"), "{node}");
    }
    let (ok, lines) = s.finish(Duration::from_secs(120));
    assert!(ok, "{lines:#?}");
}

#[test]
fn two_jobs_on_one_cluster_do_not_wait_on_each_other() {
    let (mut procs, manager) = cluster(2);
    for _ in 0..4 {
        worker(&mut procs, &manager, &[]);
    }
    // The slow job: every step of its first worker takes 3 s or more, so
    // it makes at most 20 iterations a minute whatever the machine's load.
    let mut slow = Scheduler::start(
        &manager,
        &[
            "--remote-workers",
            "2",
            "--job",
            "slow",
            "--slow-worker-ms",
            "3000",
        ],
    );
    slow.wait_for("loaded", Duration::from_secs(60));
    slow.wait_for("loaded", Duration::from_secs(60));
    // The fast job runs its 64 iterations to the end while the slow one is
    // still far behind: had they shared their clocks, the fast one could
    // not run more than tau iterations ahead of the slow one.
    let fast = Scheduler::start(
        &manager,
        &["--remote-workers", "2", "--job", "fast", "--epochs", "4"],
    );
    let (ok, lines) = fast.finish(Duration::from_secs(120));
    assert!(ok, "{lines:#?}");
    assert!(
        slow.running(),
        "the slow job finished first: {:#?}",
        slow.seen
    );
    // The slow job's progress lines say where it stands.
    while let Ok(l) = slow.lines.try_recv() {
        slow.seen.push(l);
    }
    let at: Vec<u64> = slow
        .seen
        .iter()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "iteration")?;
            w.next()?.parse().ok()
        })
        .collect();
    assert!(
        at.iter().all(|&i| i < 40),
        "the slow job kept up: {:#?}",
        slow.seen
    );
}

#[test]
fn a_worker_that_cannot_read_its_shard_fails_the_job_in_one_line() {
    let (mut procs, manager) = cluster(1);
    worker(&mut procs, &manager, &[]);
    worker(
        &mut procs,
        &manager,
        &["--data", "/nonexistent/part-0.csv.gz"],
    );
    let s = Scheduler::start(&manager, &["--remote-workers", "2", "--job", "broken"]);
    let (ok, lines) = s.finish(Duration::from_secs(60));
    assert!(!ok, "{lines:#?}");
    let err: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("stderr: error"))
        .collect();
    assert_eq!(err.len(), 1, "{lines:#?}");
    assert!(
        err[0].contains("/nonexistent/part-0.csv.gz") && err[0].contains("No such file"),
        "{}",
        err[0]
    );
}

#[test]
fn a_job_has_one_scheduler_and_waits_for_workers_with_a_clear_message() {
    let (mut procs, manager) = cluster(1);
    worker(&mut procs, &manager, &[]);
    // Two workers asked for, one there: a clear message once the wait ends.
    let mut first = Scheduler::start(
        &manager,
        &[
            "--remote-workers",
            "2",
            "--job",
            "solo",
            "--wait-workers-secs",
            "3",
        ],
    );
    // While it waits, the job's name is its.
    std::thread::sleep(Duration::from_millis(800));
    let second = Scheduler::start(&manager, &["--remote-workers", "1", "--job", "solo"]);
    let (ok, lines) = second.finish(Duration::from_secs(30));
    assert!(!ok, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("already run by node")),
        "{lines:#?}"
    );
    assert!(first.running());
    let (ok, lines) = first.finish(Duration::from_secs(30));
    assert!(!ok, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("waiting for 2 worker processes") && l.contains("pserver worker")),
        "{lines:#?}"
    );
}

#[test]
fn a_scheduler_killed_mid_job_is_resumed_and_the_workers_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let report = dir.path().join("r.json");
    let (mut procs, manager) = cluster(2);
    for _ in 0..2 {
        worker(&mut procs, &manager, &[]);
    }
    let args = |resume: bool| {
        let mut a = vec![
            "--remote-workers".to_string(),
            "2".into(),
            "--job".into(),
            "again".into(),
            "--epochs".into(),
            "6".into(),
            "--checkpoint-dir".into(),
            ckpt.display().to_string(),
            "--checkpoint-every".into(),
            "1".into(),
            "--report".into(),
            report.display().to_string(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let first_args = args(false);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let mut first = Scheduler::start(&manager, &first_args);
    first.wait_for("checkpoint after epoch 2", Duration::from_secs(120));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // The same job again: the worker processes, idle once their scheduler
    // went, take it from the checkpoint's epoch on.
    let again_args = args(true);
    let again_args: Vec<&str> = again_args.iter().map(String::as_str).collect();
    let again = Scheduler::start(&manager, &again_args);
    let (ok, lines) = again.finish(Duration::from_secs(120));
    assert!(ok, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("resuming after epoch")),
        "{lines:#?}"
    );
    assert!(auc(&report) >= 0.80, "{lines:#?}");
}

#[test]
fn a_frozen_worker_is_dropped_by_its_lease_and_exits_when_it_wakes() {
    let (mut procs, manager) = cluster(2);
    let ids: Vec<u32> = (0..3).map(|_| worker(&mut procs, &manager, &[])).collect();
    let mut s = Scheduler::start(
        &manager,
        &["--remote-workers", "3", "--job", "frozen", "--epochs", "6"],
    );
    for _ in 0..3 {
        s.wait_for("loaded", Duration::from_secs(60));
    }
    let pid = |id: u32, procs: &Procs| {
        procs
            .0
            .iter()
            .find(|(_, l)| l.starts_with(&format!("worker {id} ")))
            .unwrap()
            .0
            .id()
            .to_string()
    };
    let frozen = pid(ids[1], &procs);
    let sig = |s: &str| {
        assert!(
            Command::new("kill")
                .args([s, &frozen])
                .status()
                .unwrap()
                .success()
        );
    };
    sig("-STOP");
    // Its link stays open: the manager's lease (1 s) tells the scheduler.
    let lost = s.wait_for("lost", Duration::from_secs(60));
    assert!(lost.contains("declared it dead"), "{lost}");
    let (ok, lines) = s.finish(Duration::from_secs(120));
    assert!(ok, "{lines:#?}");
    sig("-CONT");
    // Woken, it hears it no longer counts and stops.
    let (child, _) = procs
        .0
        .iter_mut()
        .find(|(_, l)| l.starts_with(&format!("worker {} ", ids[1])))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        assert!(Instant::now() < deadline, "the woken worker did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tune_picks_regularization_on_worker_processes() {
    // --tune's validation runs are jobs of their own on the same worker
    // processes: every point is reported, the choice is one of them, and
    // the final model is trained with it.
    let dir = tempfile::tempdir().unwrap();
    let (mut procs, manager) = cluster(2);
    for _ in 0..2 {
        worker(&mut procs, &manager, &[]);
    }
    let report = dir.path().join("tuned.json");
    let s = Scheduler::start(
        &manager,
        &[
            "--remote-workers",
            "2",
            "--job",
            "tuned",
            "--tune",
            "--tune-l1",
            "1,0",
            "--tune-l2",
            "16,1",
            "--tune-epochs",
            "2",
            "--epochs",
            "3",
            "--eval-every-ms",
            "0",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let (ok, lines) = s.finish(Duration::from_secs(240));
    assert!(ok, "{lines:#?}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let tune = &v["tune"];
    let points = tune["points"].as_array().expect("the tuning path");
    assert_eq!(points.len(), 4, "{tune}");
    let chosen = &points[tune["chosen"].as_u64().unwrap() as usize];
    assert_eq!(
        (chosen["l1"].as_f64(), chosen["l2"].as_f64()),
        (v["l1"].as_f64(), v["l2"].as_f64())
    );
    assert!(v["test_auc"].as_f64().unwrap() >= 0.80, "{v}");
    assert_eq!(v["workers"].as_u64(), Some(2));
}
