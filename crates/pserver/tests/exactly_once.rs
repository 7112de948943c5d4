//! Exactly-once pushes across map changes, between real processes (issue
//! #11): `pserver experiment failover --pipelined 32` keeps 32 pushes in
//! flight per worker (push k at clock k, +1 to 64 keys spread over the
//! ring) through a SIGKILL of a server (3 servers, `--replicas 1`), a server
//! joining, a server drained, and a server drained while another joins
//! (both at one switch of the map: issue #16's lost update), each on a
//! fresh cluster. Afterwards every
//! key must equal the pushes acknowledged to it, and no push may have
//! failed: exactly-once must not depend on the application waiting for
//! each push before the next.

use serde_json::Value;
use std::time::Duration;

mod common;

/// Runs the experiment with `workers` workers and returns its JSON report;
/// kills it after 60 s.
fn experiment(workers: usize) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("exactly.json");
    let workers = workers.to_string();
    let args = [
        "experiment",
        "failover",
        "--pipelined",
        "32",
        "--workers",
        &workers,
        "--servers",
        "3",
        "--replicas",
        "1",
        "--lease-ms",
        "1000",
        "--keys",
        "64",
        "--before-ms",
        "1000",
        "--after-ms",
        "2000",
        "--events",
        "kill,join,drain,join-drain",
        "--json",
        json.to_str().unwrap(),
    ];
    let out = common::run_within(&args, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "pserver {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let body = std::fs::read_to_string(&json).expect("the JSON report");
    serde_json::from_str(&body).expect("a JSON report")
}

/// Checks every event's run: each key equals the pushes acknowledged, and
/// no push failed. The message names, per event, the figures, the errors
/// the workers got, and every key's `value - acked`.
fn check(report: &Value, workers: usize) {
    let runs = report["runs"].as_array().expect("runs");
    let mut events: Vec<&str> = runs.iter().filter_map(|r| r["event"].as_str()).collect();
    events.sort_unstable();
    assert_eq!(events, ["drain", "join", "join-drain", "kill"], "{report}");
    let mut failures = Vec::new();
    for r in runs {
        let n = |f: &str| r[f].as_u64().unwrap_or(u64::MAX);
        let event = r["event"].as_str().unwrap_or("?");
        assert!(n("acked") > 0, "{event}: no push acknowledged: {r}");
        let per_key = r["per_key"].as_array().expect("per_key");
        assert_eq!(per_key.len(), 64, "{event}");
        let deficits: Vec<i64> = per_key
            .iter()
            .map(|k| k["deficit"].as_i64().unwrap_or(i64::MAX))
            .collect();
        // Every key of every push: the acknowledged count is the same for
        // all keys, and must be what each key holds.
        let exact = per_key
            .iter()
            .all(|k| k["value"].as_f64() == k["acked"].as_f64().filter(|&a| a > 0.0));
        if !exact || n("errored") != 0 || n("lost") != 0 || n("doubled") != 0 {
            let errors: Vec<String> = r["errors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| format!("{} like {}", m["count"], m["example"]))
                        .collect()
                })
                .unwrap_or_default();
            failures.push(format!(
                "{event} ({workers} worker(s) x 32 in flight): {} pushes acked, {} errored ({} before the event); \
                 {} keys lost {} in all, {} keys doubled {} in all, {} of the errored applied anyway;\n  \
                 value - acked per key: {deficits:?}\n  errors: {errors:#?}",
                n("acked"),
                n("errored"),
                n("errored_before_event"),
                n("lost_keys"),
                n("lost"),
                n("doubled_keys"),
                n("doubled"),
                n("errored_but_applied"),
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "pipelined pushes were not applied exactly once:\n{}",
        failures.join("\n")
    );
}

#[test]
fn one_worker_with_32_pushes_in_flight_applies_each_once_through_kill_join_and_drain() {
    check(&experiment(1), 1);
}

#[test]
fn four_workers_with_32_pushes_in_flight_apply_each_once_through_kill_join_and_drain() {
    check(&experiment(4), 4);
}

/// Issue #16, item 3: 32 pushes in flight while another client creates 40
/// tables (each a map change; no failures, no replicas). Every push must
/// succeed and be applied whole: before exactly-once by construction,
/// about 1 in 300 failed with `Duplicate` although it was partly applied.
#[test]
fn pipelined_pushes_through_table_creations_all_succeed_exactly_once() {
    let (m, line) = common::spawn(&["manager", "--listen", "127.0.0.1:0"]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = common::Procs(vec![(m, line)]);
    for _ in 0..2 {
        procs
            .0
            .push(common::spawn(&["server", "--manager", &manager]));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            use pserver_core::UpdaterSpec;
            use pserver_node::worker::{Keys, Op, Request, TableOptions, Worker, WorkerConfig};
            let w = Worker::connect(WorkerConfig::new(manager.clone()))
                .await
                .unwrap();
            let admin = Worker::connect(WorkerConfig::client(manager.clone()))
                .await
                .unwrap();
            w.create_table("t", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let step = u64::MAX / 65;
            let keys: Vec<u64> = (1..=64).map(|i| i * step).collect();
            let creator = tokio::spawn(async move {
                for i in 0..40 {
                    admin
                        .create_table(&format!("x{i}"), TableOptions::new(1, UpdaterSpec::Add))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let mut inflight = tokio::task::JoinSet::new();
            let (mut clock, mut acked, mut failed) = (0u64, 0u64, Vec::new());
            while !creator.is_finished() || clock < 500 {
                while inflight.len() < 32 {
                    clock += 1;
                    let h = w.send(Request {
                        table: "t".into(),
                        op: Op::Push,
                        keys: Keys::List(keys.clone()),
                        vals: vec![1.0; keys.len()],
                        clock: Some(clock),
                        consistency: None,
                    });
                    inflight.spawn(async move { (clock, h.await) });
                }
                match inflight.join_next().await.unwrap().unwrap() {
                    (_, Ok(_)) => acked += 1,
                    (c, Err(e)) => failed.push((c, e.to_string())),
                }
            }
            while let Some(done) = inflight.join_next().await {
                match done.unwrap() {
                    (_, Ok(_)) => acked += 1,
                    (c, Err(e)) => failed.push((c, e.to_string())),
                }
            }
            creator.await.unwrap();
            assert!(
                failed.is_empty(),
                "{} pushes failed: {:?}",
                failed.len(),
                &failed[..failed.len().min(3)]
            );
            let got = w.pull("t", keys.clone()).await.unwrap();
            assert!(
                got.iter().all(|&v| v == acked as f32),
                "{acked} pushes acknowledged, values {got:?}"
            );
            eprintln!("{acked} pipelined pushes through 40 table creations: all applied once");
        })
        .await
        .expect("within 60 s");
    });
    drop(procs);
}
