//! Manager outages between real processes (issue #16, defect 1): a manager
//! with `--state`, two `pserver server` processes with one replica each, a
//! table of known values. The manager is killed with SIGKILL; the servers
//! must keep their data through an outage of any length, refuse requests
//! meanwhile with an error that says why (never hang), and give every value
//! back to a manager restarted with the same `--state`. A manager started
//! without the state rebuilds the map from what the servers report, or,
//! when it cannot, says why and starts no new cluster over them; never do
//! they drop their data.

use pserver_core::{NodeState, UpdaterSpec};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Procs, run_within, spawn};

/// The lease of these clusters: short, so a lapse and a failover take
/// well under a second.
const LEASE_MS: &str = "500";

/// Starts `pserver ARGS` with its log (`RUST_LOG=warn`) written to `log`;
/// returns it with its first line of output.
fn spawn_logged(args: &[&str], log: &Path) -> (Child, String) {
    let file = std::fs::File::create(log).unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(file)
        .spawn()
        .expect("start pserver");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    (child, line.trim().to_string())
}

/// A manager on `listen` with one replica per range and the short lease,
/// keeping its state in `state` when given.
fn manager_args<'a>(listen: &'a str, state: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec![
        "manager",
        "--listen",
        listen,
        "--replicas",
        "1",
        "--lease-ms",
        LEASE_MS,
    ];
    if let Some(s) = state {
        args.extend(["--state", s]);
    }
    args
}

/// Keys spread over the whole ring (so both servers hold some) and the
/// value pushed to each: all different, so a lost or doubled push shows.
fn known() -> (Vec<u64>, Vec<f32>) {
    let keys: Vec<u64> = (1..=64u64).map(|i| i * (u64::MAX / 65)).collect();
    let vals = (1..=64).map(|i| i as f32 * 1.5).collect();
    (keys, vals)
}

/// A client of the manager at `manager` whose requests give up after
/// `timeout`.
async fn client(manager: &str, timeout: Duration) -> Worker {
    let mut cfg = WorkerConfig::client(manager.to_string());
    cfg.timeout = timeout;
    Worker::connect(cfg).await.unwrap()
}

/// Starts a manager with `state` and two servers, and fills table "n".
fn cluster(rt: &tokio::runtime::Runtime, state: &str) -> (Procs, String) {
    let (m, line) = spawn(&manager_args("127.0.0.1:0", Some(state)));
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    for _ in 0..2 {
        procs.0.push(spawn(&["server", "--manager", &manager]));
    }
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let w = client(&manager, Duration::from_secs(10)).await;
            w.create_table("n", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let (keys, vals) = known();
            w.push("n", keys.clone(), vals.clone()).await.unwrap();
            assert_eq!(w.pull("n", keys).await.unwrap(), vals);
            w.shutdown();
        })
        .await
        .expect("the cluster is up within 30 s")
    });
    (procs, manager)
}

/// Whether every server process (all but the first, the manager) still runs.
fn servers_run(procs: &mut Procs) -> bool {
    procs.0[1..]
        .iter_mut()
        .all(|(c, _)| c.try_wait().unwrap().is_none())
}

/// SIGKILLs the manager (the first process).
fn kill_manager(procs: &mut Procs) {
    procs.0[0].0.kill().unwrap();
    procs.0[0].0.wait().unwrap();
}

/// Restarts the manager with `state` on `manager` and pulls the known keys
/// back through it: every value as pushed, both servers alive.
async fn back_with_state(procs: &mut Procs, manager: &str, state: &str) {
    let again = spawn(&manager_args(manager, Some(state)));
    assert!(again.1.ends_with(manager), "{}", again.1);
    procs.0[0] = again;
    let w = client(manager, Duration::from_secs(10)).await;
    let (keys, vals) = known();
    assert_eq!(w.pull("n", keys.clone()).await.unwrap(), vals);
    // Past the recovered nodes' grace (a lease and the silence limit):
    // nobody was declared dead, and the values are still those pushed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let map = w.refresh().await.unwrap();
    let servers: Vec<_> = map
        .nodes
        .iter()
        .filter(|n| n.role == pserver_core::Role::Server)
        .collect();
    assert_eq!(servers.len(), 2, "{:?}", map.nodes);
    assert!(
        servers.iter().all(|n| n.state == NodeState::Alive),
        "{:?}",
        map.nodes
    );
    assert_eq!(w.pull("n", keys).await.unwrap(), vals);
    w.shutdown();
}

#[test]
fn servers_keep_their_data_through_a_long_manager_outage() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("manager.state");
    let state = state.to_str().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut procs, manager) = cluster(&rt, state);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(90), async {
            // A client that was connected when the manager went away.
            let w = client(&manager, Duration::from_secs(3)).await;
            w.refresh().await.unwrap();
            kill_manager(&mut procs);
            let killed = Instant::now();
            // Past half a lease the servers are fenced: a push ends at its
            // timeout with why, and changes nothing.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let (keys, _) = known();
            let started = Instant::now();
            w.advance();
            let e = w
                .push("n", keys.clone(), vec![100.0; keys.len()])
                .await
                .expect_err("a push succeeded with the manager away")
                .to_string();
            assert!(started.elapsed() < Duration::from_secs(6), "{e}");
            assert!(e.contains("within 3 s"), "{e}");
            assert!(e.contains("lease expired"), "{e}");
            assert!(e.contains("manager has been unreachable"), "{e}");
            // Longer than the 30 s after which servers used to give up and
            // exit; nothing in them counts the outage's length any more.
            while killed.elapsed() < Duration::from_secs(32) {
                assert!(servers_run(&mut procs), "a server exited during the outage");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            assert!(servers_run(&mut procs), "a server exited during the outage");
            back_with_state(&mut procs, &manager, state).await;
            // The client connected before the outage rejoined too.
            assert_eq!(w.pull("n", keys).await.unwrap(), known().1);
        })
        .await
        .expect("the test finishes in 90 s")
    });
}

#[test]
fn a_manager_without_the_state_rebuilds_the_map_from_the_servers_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("manager.state");
    let state = state.to_str().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut procs, manager) = cluster(&rt, state);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(80), async {
            kill_manager(&mut procs);
            tokio::time::sleep(Duration::from_secs(3)).await;

            // Back without its state, and with settings that do not match
            // the cluster's: it cannot take the servers' map over.
            let log = dir.path().join("mismatched.log");
            let mut args = manager_args(&manager, None);
            args[4] = "2"; // --replicas
            let mismatched = spawn_logged(&args, &log);
            assert!(mismatched.1.ends_with(&manager), "{}", mismatched.1);
            procs.0[0] = mismatched;
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(
                servers_run(&mut procs),
                "a server exited when a manager without state came up"
            );
            // It says what happened and what to do.
            let said = std::fs::read_to_string(&log).unwrap();
            assert!(
                said.contains("refused a node of another manager's cluster"),
                "{said}"
            );
            assert!(said.contains("cannot take over"), "{said}");
            assert!(said.contains("--state FILE"), "{said}");
            // And it starts no new cluster over the waiting one.
            let out = run_within(&["server", "--manager", &manager], Duration::from_secs(20));
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("will not start a new cluster over a running one"),
                "{err}"
            );
            assert!(servers_run(&mut procs));
            kill_manager(&mut procs);

            // Back without its state, settings matching: it rebuilds the
            // map from what the servers report, and every value is there.
            let log = dir.path().join("rebuilt.log");
            let rebuilt = spawn_logged(&manager_args(&manager, None), &log);
            assert!(rebuilt.1.ends_with(&manager), "{}", rebuilt.1);
            procs.0[0] = rebuilt;
            // A client that asks at once does not stop the rebuild.
            let w = client(&manager, Duration::from_secs(10)).await;
            let asked = Instant::now();
            loop {
                let said = std::fs::read_to_string(&log).unwrap();
                if said.contains("rebuilt the cluster's map") {
                    break;
                }
                assert!(asked.elapsed() < Duration::from_secs(10), "{said}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (keys, vals) = known();
            assert_eq!(w.pull("n", keys.clone()).await.unwrap(), vals);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let map = w.refresh().await.unwrap();
            let alive = map
                .nodes
                .iter()
                .filter(|n| n.role == pserver_core::Role::Server && n.state == NodeState::Alive)
                .count();
            assert_eq!(alive, 2, "{:?}", map.nodes);
            assert!(servers_run(&mut procs));
            // The cluster goes on: pushes add to what was kept, new tables work.
            w.advance();
            w.push("n", keys.clone(), vals.clone()).await.unwrap();
            let doubled: Vec<f32> = vals.iter().map(|v| v * 2.0).collect();
            assert_eq!(w.pull("n", keys.clone()).await.unwrap(), doubled);
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
            w.shutdown();
        })
        .await
        .expect("the test finishes in 80 s")
    });
}

#[test]
fn a_server_that_died_during_the_outage_holds_up_a_rebuild_and_fails_over_with_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("manager.state");
    let state = state.to_str().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut procs, manager) = cluster(&rt, state);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            kill_manager(&mut procs);
            // One server dies while the manager is away.
            procs.0[2].0.kill().unwrap();
            procs.0[2].0.wait().unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // A manager without the state cannot rebuild the map: a server
            // of it does not report. It says which it waits for, and the
            // survivor waits with its data.
            let log = dir.path().join("waiting.log");
            let waiting = spawn_logged(&manager_args(&manager, None), &log);
            assert!(waiting.1.ends_with(&manager), "{}", waiting.1);
            procs.0[0] = waiting;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let said = std::fs::read_to_string(&log).unwrap();
            let dead = procs.0[2].1.split(' ').nth(1).unwrap().to_string();
            assert!(
                said.contains(&format!("waits for server {dead} at")),
                "{said}"
            );
            assert!(procs.0[1].0.try_wait().unwrap().is_none());
            kill_manager(&mut procs);
            // With the state, the manager fails the dead server over.
            let again = spawn(&manager_args(&manager, Some(state)));
            assert!(again.1.ends_with(&manager), "{}", again.1);
            procs.0[0] = again;
            // The survivor rejoins within the grace; the dead one is
            // declared dead after it, and its ranges go to its replica,
            // which holds every value.
            let w = client(&manager, Duration::from_secs(10)).await;
            let (keys, vals) = known();
            assert_eq!(w.pull("n", keys.clone()).await.unwrap(), vals);
            let map = w.refresh().await.unwrap();
            let states: Vec<_> = map
                .nodes
                .iter()
                .filter(|n| n.role == pserver_core::Role::Server)
                .map(|n| n.state)
                .collect();
            assert_eq!(
                states,
                [NodeState::Alive, NodeState::Dead],
                "{:?}",
                map.nodes
            );
            w.advance();
            w.push("n", keys.clone(), vals.clone()).await.unwrap();
            let doubled: Vec<f32> = vals.iter().map(|v| v * 2.0).collect();
            assert_eq!(w.pull("n", keys).await.unwrap(), doubled);
            w.shutdown();
        })
        .await
        .expect("the test finishes in 60 s")
    });
}
