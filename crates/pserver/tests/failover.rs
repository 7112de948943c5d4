//! Failover between real processes: a manager with `--replicas 1` and three
//! `pserver server` processes on loopback; clients push +1 to a set of keys
//! in a loop while the server owning the first key is killed with SIGKILL.
//! Afterwards every key holds exactly the number of acknowledged pushes.

use pserver_core::UpdaterSpec;
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Procs, spawn};

async fn count_pushes(w: Worker, keys: Vec<u64>, stop: Arc<AtomicBool>) -> u64 {
    let mut acked = 0;
    while !stop.load(Ordering::Relaxed) {
        w.advance();
        if w.push("n", keys.clone(), vec![1.0; keys.len()])
            .await
            .is_ok()
        {
            acked += 1;
        }
    }
    acked
}

#[test]
fn sigkill_of_a_server_loses_no_acknowledged_push() {
    let (m, line) = spawn(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        "1",
        "--lease-ms",
        "500",
    ]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    for _ in 0..3 {
        procs.0.push(spawn(&["server", "--manager", &manager]));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let client = || async {
                let mut cfg = WorkerConfig::client(manager.clone());
                cfg.timeout = Duration::from_secs(30);
                Worker::connect(cfg).await.unwrap()
            };
            let setup = client().await;
            setup
                .create_table("n", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let step = u64::MAX / 65;
            let keys: Vec<u64> = (1..=64).map(|i| i * step).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let mut loops = Vec::new();
            for _ in 0..3 {
                let w = client().await;
                loops.push(tokio::spawn(count_pushes(w, keys.clone(), stop.clone())));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let map = setup.refresh().await.unwrap();
            let victim = map.partitions[map.partition_of(keys[0]).unwrap()].primary;
            let (child, _) = procs
                .0
                .iter_mut()
                .find(|(_, l)| l.starts_with(&format!("server {victim} ")))
                .expect("the victim's process");
            let killed_at = Instant::now();
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // Until the manager declares it dead, then a while longer.
            while setup
                .refresh()
                .await
                .unwrap()
                .partitions
                .iter()
                .any(|p| p.primary == victim)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let declared = killed_at.elapsed();
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            let mut acked = 0;
            for l in loops {
                acked += l.await.unwrap();
            }
            let got = setup.pull("n", keys.clone()).await.unwrap();
            (acked, got, declared)
        })
        .await
    });
    let (acked, got, declared) = result.expect("the test finishes in 60 s");
    assert!(acked > 0);
    assert!(
        declared < Duration::from_secs(5),
        "declared dead after {declared:?}"
    );
    assert_eq!(got, vec![acked as f32; got.len()], "acknowledged {acked}");
}

/// Runs `pserver experiment failover ARGS` and returns its output; at most 60 s.
fn experiment(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["experiment", "failover"])
        .args(args)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pserver");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("experiment failover {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn the_failover_experiment_measures_recovery_after_sigkill_and_sigstop() {
    for signal in ["kill", "stop"] {
        let out = experiment(&[
            "--runs",
            "1",
            "--lease-ms",
            "600",
            "--keys",
            "16",
            "--signal",
            signal,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{signal}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let median = stdout
            .lines()
            .find(|l| l.starts_with("median:"))
            .expect("a median line");
        assert!(median.ends_with("keys wrong in all runs: 0"), "{median}");
        // "declared dead after N ms": a frozen server within its lease.
        let detected: f64 = median
            .split("declared dead after ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("a detection time");
        assert!(
            detected <= 600.0,
            "{signal}: declared dead after {detected} ms"
        );
    }
    let out = experiment(&["--replicas", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("--replicas"),
        "{err}"
    );
}

#[test]
fn a_server_joins_and_another_is_drained_while_clients_push() {
    let (m, line) = spawn(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        "1",
        "--lease-ms",
        "1000",
    ]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    for _ in 0..2 {
        procs.0.push(spawn(&["server", "--manager", &manager]));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (acked, got) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let client = || async {
                Worker::connect(WorkerConfig::client(manager.clone()))
                    .await
                    .unwrap()
            };
            let setup = client().await;
            setup
                .create_table("n", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let step = u64::MAX / 129;
            let keys: Vec<u64> = (1..=128).map(|i| i * step).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let mut loops = Vec::new();
            for _ in 0..3 {
                let w = client().await;
                loops.push(tokio::spawn(count_pushes(w, keys.clone(), stop.clone())));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // A new server process joins and takes over ranges.
            let (joiner, line) = spawn(&["server", "--manager", &manager]);
            let id: u32 = line.split(' ').nth(1).unwrap().parse().unwrap();
            procs.0.push((joiner, line));
            let start = Instant::now();
            while !setup
                .refresh()
                .await
                .unwrap()
                .partitions
                .iter()
                .any(|p| p.primary == id)
            {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "the new server took nothing"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // The first server is drained with the command line, which waits
            // until it has left; then its process exits by itself.
            let first: u32 = procs.0[1].1.split(' ').nth(1).unwrap().parse().unwrap();
            let out = Command::new(BIN)
                .args(["drain", "--manager", &manager, &first.to_string()])
                .env("RUST_LOG", "off")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "drain failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let start = Instant::now();
            while procs.0[1].0.try_wait().unwrap().is_none() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the drained server did not exit"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            stop.store(true, Ordering::Relaxed);
            let mut acked = 0;
            for l in loops {
                acked += l.await.unwrap();
            }
            (acked, setup.pull("n", keys.clone()).await.unwrap())
        })
        .await
        .expect("the test finishes in 60 s")
    });
    assert!(acked > 0);
    assert_eq!(got, vec![acked as f32; got.len()], "acknowledged {acked}");
}

#[test]
fn a_sigkilled_manager_restarts_from_its_state_file_and_servers_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("manager.state");
    let state = state.to_str().unwrap();
    let (m, line) = spawn(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        "1",
        "--state",
        state,
    ]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    for _ in 0..2 {
        procs.0.push(spawn(&["server", "--manager", &manager]));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let client = || async {
                Worker::connect(WorkerConfig::client(manager.clone()))
                    .await
                    .unwrap()
            };
            let w = client().await;
            w.create_table("n", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let keys: Vec<u64> = (1..=64u64).map(|i| i * (u64::MAX / 65)).collect();
            w.push("n", keys.clone(), vec![3.0; keys.len()])
                .await
                .unwrap();
            let before = w.refresh().await.unwrap();
            drop(w);

            // SIGKILL the manager, then start it again on the same address.
            procs.0[0].0.kill().unwrap();
            procs.0[0].0.wait().unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let again = spawn(&[
                "manager",
                "--listen",
                &manager,
                "--replicas",
                "1",
                "--state",
                state,
            ]);
            assert!(again.1.ends_with(&manager), "{}", again.1);
            procs.0[0] = again;

            // The servers rejoin under their ids: same ranges, same data.
            let w = client().await;
            let map = w.refresh().await.unwrap();
            assert_eq!(map.partitions, before.partitions);
            assert!(map.epoch >= before.epoch);
            assert_eq!(
                w.pull("n", keys.clone()).await.unwrap(),
                vec![3.0; keys.len()]
            );
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let map = w.refresh().await.unwrap();
            let alive = map
                .nodes
                .iter()
                .filter(|n| n.state == pserver_core::NodeState::Alive)
                .count();
            assert_eq!(alive, 2, "{:?}", map.nodes);
            w.create_table("m", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            w.push("m", keys.clone(), vec![1.0; keys.len()])
                .await
                .unwrap();
            assert_eq!(
                w.pull("m", keys.clone()).await.unwrap(),
                vec![1.0; keys.len()]
            );
        })
        .await
        .expect("the test finishes in 60 s")
    });
}

#[test]
fn a_checkpoint_taken_on_three_servers_restores_on_two() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    let keys: Vec<u64> = (1..=200u64).map(|i| i * (u64::MAX / 201)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let start = |servers: usize, extra: &[&str]| {
        let mut args = vec!["manager", "--listen", "127.0.0.1:0", "--replicas", "1"];
        args.extend_from_slice(extra);
        let (m, line) = spawn(&args);
        let manager = line.rsplit(' ').next().unwrap().to_string();
        let mut procs = Procs(vec![(m, line)]);
        for _ in 0..servers {
            procs.0.push(spawn(&["server", "--manager", &manager]));
        }
        (procs, manager)
    };
    // Three servers: fill a table, checkpoint it with the command line.
    let (procs, manager) = start(3, &[]);
    let before = rt.block_on(async {
        let w = Worker::connect(WorkerConfig::client(manager.clone()))
            .await
            .unwrap();
        w.create_table("n", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        let vals: Vec<f32> = (0..keys.len()).map(|i| i as f32 * 0.25).collect();
        w.push("n", keys.clone(), vals).await.unwrap();
        w.pull("n", keys.clone()).await.unwrap()
    });
    let out = Command::new(BIN)
        .args(["checkpoint", "--manager", &manager, ckpt])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(procs);
    // A new cluster of two restores it at start.
    let (_procs, manager) = start(2, &["--restore", ckpt]);
    // The manager loads it once the first server is up; the second takes
    // its ranges by hand-off, while or after the load runs.
    rt.block_on(async {
        let w = Worker::connect(WorkerConfig::client(manager.clone()))
            .await
            .unwrap();
        let t0 = Instant::now();
        let mut last = Vec::new();
        loop {
            if let Ok(v) = w.pull("n", keys.clone()).await {
                if v == before {
                    break;
                }
                last = v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "not restored: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Both servers hold ranges.
        let map = w.refresh().await.unwrap();
        let mut primaries: Vec<_> = map.partitions.iter().map(|p| p.primary).collect();
        primaries.sort_unstable();
        primaries.dedup();
        assert_eq!(primaries.len(), 2);
    });
    // Restoring again into the now populated table is refused, naming it,
    // and changes nothing (issue #16: it used to merge silently).
    let out = Command::new(BIN)
        .args(["restore", "--manager", &manager, ckpt])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a restore into a populated table succeeded"
    );
    assert!(err.contains("\"n\" already holds 200 keys"), "{err}");
    // A damaged checkpoint stops the manager before it starts.
    let manifest = std::path::Path::new(ckpt).join("MANIFEST.json");
    std::fs::write(&manifest, b"{ not json").unwrap();
    let out = Command::new(BIN)
        .args(["manager", "--listen", "127.0.0.1:0", "--restore", ckpt])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("MANIFEST.json"),
        "{err}"
    );
}
