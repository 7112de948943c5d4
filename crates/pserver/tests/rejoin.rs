//! A server process killed and started again under its id
//! (`pserver server --id N`) between real processes: a manager with
//! `--replicas 1` and three servers on loopback, clients pushing +1 to a
//! set of keys all along. The new process comes back as server N on
//! another port, takes back its ring positions and ranges, and every
//! acknowledged push is there afterwards. And `--id` is refused, with the
//! reason, for a live server's id and for an id the map has not got.

use pserver_core::{ClusterMap, NodeId, NodeState, UpdaterSpec};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Procs, ok, spawn};

/// Pushes +1 to every key at each clock until `stop`; returns how many
/// pushes were acknowledged.
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

/// A manager with one replica per range and a 500 ms lease; its address.
fn manager(procs: &mut Procs) -> String {
    let (m, line) = spawn(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        "1",
        "--lease-ms",
        "500",
    ]);
    let addr = line.rsplit(' ').next().unwrap().to_string();
    procs.0.push((m, line));
    addr
}

/// The id and address of `server N listening on ADDR`.
fn id_and_addr(line: &str) -> (NodeId, String) {
    let words: Vec<&str> = line.split(' ').collect();
    assert!(
        words.len() == 5 && words[0] == "server" && words[2..4] == ["listening", "on"],
        "unexpected first line {line:?}"
    );
    (words[1].parse().unwrap(), words[4].to_string())
}

/// Waits (at most 20 s) until the map satisfies `done`; returns that map.
async fn wait_for(w: &Worker, what: &str, done: impl Fn(&ClusterMap) -> bool) -> ClusterMap {
    let start = Instant::now();
    loop {
        let map = w.refresh().await.unwrap();
        if done(&map) {
            return (*map).clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_sigkilled_server_comes_back_under_its_id_and_loses_no_acknowledged_push() {
    let mut procs = Procs(Vec::new());
    let manager = manager(&mut procs);
    for _ in 0..3 {
        procs.0.push(spawn(&["server", "--manager", &manager]));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(90), async {
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
            let step = u64::MAX / 129;
            let keys: Vec<u64> = (1..=128).map(|i| i * step).collect();
            let stop = Arc::new(AtomicBool::new(false));
            let mut loops = Vec::new();
            for _ in 0..3 {
                let w = client().await;
                loops.push(tokio::spawn(count_pushes(w, keys.clone(), stop.clone())));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = setup.refresh().await.unwrap();
            let victim = before.partitions[before.partition_of(keys[0]).unwrap()].primary;
            let i = procs
                .0
                .iter()
                .position(|(_, l)| l.starts_with(&format!("server {victim} ")))
                .expect("the victim's process");
            let old_addr = id_and_addr(&procs.0[i].1).1;
            let child = &mut procs.0[i].0;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            wait_for(&setup, "the victim declared dead", |m| {
                m.node(victim).is_some_and(|n| n.state == NodeState::Dead)
                    && m.partitions.iter().all(|p| p.primary != victim)
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;

            // A new process under the victim's id, on a new port.
            let id = victim.to_string();
            let (back, line) = spawn(&["server", "--manager", &manager, "--id", &id]);
            let (got_id, new_addr) = id_and_addr(&line);
            assert_eq!(got_id, victim, "{line}");
            assert_ne!(new_addr, old_addr);
            procs.0.push((back, line));
            // Once the hand-off completes, the map is the one before the
            // failure: the same ranges, chains and primaries.
            let after = wait_for(&setup, "the placement from before the failure", |m| {
                m.partitions == before.partitions && !m.partitions.is_empty()
            })
            .await;
            assert!(after.epoch > before.epoch);
            let node = after.node(victim).unwrap();
            assert_eq!(node.state, NodeState::Alive);
            assert_eq!(node.addr, new_addr);
            // `pserver status --json` shows it alive there, owning ranges.
            let m = manager.clone();
            let json =
                tokio::task::spawn_blocking(move || ok(&["status", "--manager", &m, "--json"]))
                    .await
                    .unwrap();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            let shown = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["id"] == victim)
                .expect("the returned server in the status")
                .clone();
            assert_eq!(shown["state"], "alive", "{shown}");
            assert_eq!(shown["addr"], new_addr.as_str(), "{shown}");
            assert!(!shown["ranges"].as_array().unwrap().is_empty(), "{shown}");
            // Pushes go on to the returned server, then every key is read
            // (keys[0] from the returned server itself).
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            let mut acked = 0;
            for l in loops {
                acked += l.await.unwrap();
            }
            let map = setup.refresh().await.unwrap();
            assert_eq!(
                map.partitions[map.partition_of(keys[0]).unwrap()].primary,
                victim
            );
            let got = setup.pull("n", keys.clone()).await.unwrap();
            (acked, got)
        })
        .await
    });
    let (acked, got) = result.expect("the test finishes in 90 s");
    assert!(acked > 0);
    assert_eq!(got, vec![acked as f32; got.len()], "acknowledged {acked}");
}

/// Runs `pserver server --manager M ARGS` with `env`, which must fail
/// within 30 s; returns its stderr.
fn refused(manager: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(BIN)
        .args(["server", "--manager", manager])
        .args(args)
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("server {args:?} did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "server {args:?} {env:?} started");
    assert!(
        out.stdout.is_empty(),
        "server {args:?} printed a first line"
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn the_id_of_a_live_server_or_of_no_server_is_refused_with_the_reason() {
    let mut procs = Procs(Vec::new());
    let manager = manager(&mut procs);
    let (s, line) = spawn(&["server", "--manager", &manager]);
    let (live, addr) = id_and_addr(&line);
    procs.0.push((s, line));
    let id = live.to_string();

    let err = refused(&manager, &["--id", &id], &[]);
    let want =
        format!("server {live} is alive at {addr}; stop it first or wait for its lease to run out");
    assert!(err.contains(&want), "{err}");
    // The variable does the same as the flag.
    let err = refused(&manager, &[], &[("PSERVER_ID", &id)]);
    assert!(err.contains(&want), "{err}");

    let err = refused(&manager, &["--id", "99"], &[]);
    assert!(err.contains("has no node 99"), "{err}");
    assert!(err.contains("without --id"), "{err}");

    // A worker's id is no server's.
    let (w, wline) = spawn(&["worker", "--manager", &manager]);
    assert!(wline.starts_with("worker "), "{wline}");
    let worker = wline.split(' ').nth(1).unwrap().to_string();
    procs.0.push((w, wline));
    let err = refused(&manager, &["--id", &worker], &[]);
    assert!(err.contains("is a worker, not a server"), "{err}");

    // None of it changed the live server.
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["status", "--manager", &manager, "--json"])).unwrap();
    let s = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == live)
        .unwrap()
        .clone();
    assert_eq!(s["state"], "alive");
    assert_eq!(s["addr"], addr.as_str());
}
