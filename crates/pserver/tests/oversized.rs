//! Requests too big for one frame, between real processes (issue #16,
//! defect 2): a `pserver local` cluster started with `--max-frame-mib 1`,
//! so a few hundred thousand keys are over the limit, and workers in this
//! process. A worker that knows the cluster's limit splits such requests
//! and they succeed; one that does not gets an error naming the limit
//! (from the server, for its request or for the reply it would have got)
//! at once, not a hang; either way its later requests still work. And a
//! request to a server that stopped answering ends by the worker's timeout.

use pserver_core::UpdaterSpec;
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use pserver_wire::Limits;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Procs};

/// `--max-frame-mib` of the cluster under test.
const FRAME_MIB: usize = 1;

/// A one-server `pserver local` cluster with 1 MiB frames; returns it and
/// the manager's address.
fn cluster() -> (Procs, String) {
    let mib = FRAME_MIB.to_string();
    let mut child = Command::new(BIN)
        .args(["local", "--servers", "1", "--listen", "127.0.0.1:0"])
        .args(["--max-frame-mib", &mib])
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pserver local");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // It prints another line once it serves: keep reading, so it never
    // writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let p = child;
    // "local cluster: manager on 127.0.0.1:PORT, 1 servers"
    let addr = line
        .split("manager on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (Procs(vec![(p, line)]), addr)
}

/// The limits `pserver` derives from `--max-frame-mib`.
fn cluster_limits() -> Limits {
    let max_frame = FRAME_MIB << 20;
    Limits {
        max_frame,
        max_keys: max_frame / 8,
        ..Limits::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn worker(manager: &str, limits: Limits, timeout: Duration) -> Worker {
    let mut cfg = WorkerConfig::client(manager.to_string());
    cfg.limits = limits;
    cfg.timeout = timeout;
    Worker::connect(cfg).await.unwrap()
}

/// `n` keys spread over the whole key space, sorted.
fn keys(n: u64) -> Vec<u64> {
    let step = u64::MAX / (n + 1);
    (1..=n).map(|i| i * step).collect()
}

#[test]
fn requests_over_the_frame_limit_are_split_and_succeed() {
    let (_procs, manager) = cluster();
    let rt = runtime();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            let w = worker(&manager, cluster_limits(), Duration::from_secs(30)).await;
            w.create_table("a", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            w.create_table("wide", TableOptions::new(8, UpdaterSpec::Assign))
                .await
                .unwrap();
            // 300,000 keys: a 3.6 MB push frame and a 2.4 MB pull frame.
            let k = keys(300_000);
            let vals: Vec<f32> = (0..k.len()).map(|i| (i % 1000) as f32).collect();
            let out = w.push("a", k.clone(), vals.clone()).await.unwrap();
            assert_eq!(out.applied, k.len() as u64);
            assert_eq!(w.pull("a", k.clone()).await.unwrap(), vals);
            // 100,000 keys of 8 floats: the pull's frame (800 KB) fits, its
            // reply (3.2 MB) would not.
            let k = keys(100_000);
            let vals: Vec<f32> = (0..k.len() * 8).map(|i| (i % 777) as f32).collect();
            w.push("wide", k.clone(), vals.clone()).await.unwrap();
            assert_eq!(w.pull("wide", k.clone()).await.unwrap(), vals);
            // A push-pull (at the next clock), whose reply is as wide as
            // the table.
            w.advance();
            let ones = vec![1.0; k.len() * 8];
            let back = w.push_pull("wide", k.clone(), ones.clone()).await.unwrap();
            assert_eq!(back, ones);
            // Small requests go on as before.
            w.push("a", vec![7], vec![1.5]).await.unwrap();
            assert_eq!(w.pull("a", vec![7]).await.unwrap(), [1.5]);
            // Every frame fit: nothing was refused and resent.
            assert_eq!(w.traffic().retries.load(Ordering::Relaxed), 0);
        })
        .await
        .expect("every request ended within 120 s");
    });
}

#[test]
fn a_worker_with_a_larger_limit_is_told_the_clusters_at_once() {
    let (_procs, manager) = cluster();
    let rt = runtime();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            // This worker thinks frames of 256 MiB are fine.
            let w = worker(&manager, Limits::default(), Duration::from_secs(30)).await;
            w.create_table("a", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            w.create_table("wide", TableOptions::new(8, UpdaterSpec::Assign))
                .await
                .unwrap();
            let limit = (FRAME_MIB << 20).to_string();
            let clear = |what: &str, e: &str, took: Duration| {
                eprintln!("{what}: failed after {took:?}: {e}");
                assert!(
                    took < Duration::from_secs(10),
                    "{what}: {took:?} to fail: {e}"
                );
                assert!(e.contains(&limit) && e.contains("split"), "{what}: {e}");
            };
            // Its request is over the server's limit.
            let k = keys(300_000);
            let t0 = Instant::now();
            let e = w
                .push("a", k.clone(), vec![1.0; k.len()])
                .await
                .unwrap_err()
                .to_string();
            clear("push", &e, t0.elapsed());
            // Its request fits, the reply would not.
            let k = keys(100_000);
            let t0 = Instant::now();
            let e = w.pull("wide", k).await.unwrap_err().to_string();
            clear("pull", &e, t0.elapsed());
            // The same worker's small requests still work.
            w.push("a", vec![7], vec![1.5]).await.unwrap();
            assert_eq!(w.pull("a", vec![7]).await.unwrap(), [1.5]);
        })
        .await
        .expect("every request ended within 120 s");
    });
}

/// Waits (up to 10 s) until every thread of process `pid` is stopped.
/// `kill -STOP` returns before that: the kernel wakes one thread to begin
/// the stop, and until that thread runs (on a loaded machine, milliseconds
/// later) the others go on serving, so a request sent at once could be
/// answered.
fn stopped(pid: &str) {
    let t0 = Instant::now();
    loop {
        let states: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|t| {
                        let stat =
                            std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                        // The state follows the parenthesised name.
                        stat.rsplit(") ")
                            .next()
                            .unwrap_or("")
                            .chars()
                            .take(1)
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !states.is_empty() && states.iter().all(|s| s == "T" || s == "t") {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "process {pid} did not stop: thread states {states:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_request_to_a_frozen_cluster_ends_by_its_timeout() {
    let (mut procs, manager) = cluster();
    let rt = runtime();
    let pid = procs.0[0].0.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    let took = rt.block_on(async {
        let w = worker(&manager, cluster_limits(), Duration::from_secs(2)).await;
        w.create_table("a", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        w.push("a", vec![1], vec![1.0]).await.unwrap();
        // Manager and server stop answering, with their sockets open: no
        // reply comes and no map says the server is gone.
        signal("-STOP");
        stopped(&pid);
        let t0 = Instant::now();
        let ended = tokio::time::timeout(
            Duration::from_secs(20),
            w.push("a", vec![1, 2], vec![1.0, 1.0]),
        )
        .await;
        let took = t0.elapsed();
        signal("-CONT");
        let e = ended
            .unwrap_or_else(|_| panic!("the push was still waiting after {took:?}"))
            .unwrap_err();
        assert!(e.to_string().contains("within 2 s"), "{e}");
        took
    });
    assert!(took < Duration::from_secs(3), "took {took:?}");
    procs.0[0].0.kill().ok();
}
