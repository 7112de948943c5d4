//! Exactly-once pushes across map changes, between real processes (issue
//! #11): `pserver experiment failover --pipelined 32` keeps 32 pushes in
//! flight per worker (push k at clock k, +1 to 64 keys spread over the
//! ring) through a SIGKILL of a server (3 servers, `--replicas 1`), a server
//! joining, and a server drained, each on a fresh cluster. Afterwards every
//! key must equal the pushes acknowledged to it, and no push may have
//! failed: exactly-once must not depend on the application waiting for
//! each push before the next.

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::BIN;

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
        "kill,join,drain",
        "--json",
        json.to_str().unwrap(),
    ];
    let mut child = Command::new(BIN)
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
            let _ = child.wait();
            panic!("pserver {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
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
    assert_eq!(events, ["drain", "join", "kill"], "{report}");
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
