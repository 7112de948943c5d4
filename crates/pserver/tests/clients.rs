//! One-shot clients between real processes (issue #16, defect 8): every
//! `pserver kv push` is a new client id, and the servers' range clocks
//! kept a record of each one for ever (28 bytes per client per range in a
//! checkpoint). Clients that leave must be forgotten, so that what a
//! server keeps is bounded by the clients present, not by every client the
//! cluster ever had; and every push must still be applied exactly once.

use pserver_core::UpdaterSpec;
use pserver_node::worker::{TableOptions, ValueFilters, Worker, WorkerConfig};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;

use common::{Procs, ok, run, spawn};

/// Bytes of the checkpoint in `dir`: its range files (keys, values and
/// clock records), the manifest left out.
fn checkpoint_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path, total: &mut u64) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                walk(&e.path(), total);
            } else if e.file_name() != "MANIFEST.json" {
                *total += meta.len();
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

#[test]
fn one_shot_clients_leave_no_clock_behind() {
    // A short lease: the map says which clients left at most once a lease.
    let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0", "--lease-ms", "500"]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    let (s, line) = spawn(&["server", "--manager", &manager]);
    assert!(line.starts_with("server "), "{line}");
    procs.0.push((s, line));
    let m = manager.as_str();
    ok(&["kv", "create-table", "w", "--manager", m]);
    let push = |key: &str| {
        ok(&[
            "kv",
            "push",
            "w",
            "--keys",
            key,
            "--values",
            "1",
            "--manager",
            m,
        ])
    };
    push("1");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let ckpt = dir.to_str().unwrap();
    let checkpoint = || {
        ok(&["checkpoint", "--manager", m, ckpt]);
        checkpoint_bytes(&dir)
    };
    // Once the first client is known gone, the checkpoint holds its one
    // key and no clock record.
    std::thread::sleep(Duration::from_millis(1500));
    let before = checkpoint();

    // Many one-shot clients, four at a time, each pushing key 1 once.
    const CLIENTS: usize = 120;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..CLIENTS / 4 {
                    push("1");
                }
            });
        }
    });
    eprintln!("{CLIENTS} clients in {:?}", start.elapsed());

    // Every push applied exactly once.
    let out = ok(&["kv", "pull", "w", "--keys", "1", "--manager", m]);
    assert_eq!(out.trim(), format!("1 {}", CLIENTS + 1));

    // Within a few leases every client that left is forgotten: the
    // checkpoint is back to its size (before: 28 bytes more per client).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = checkpoint();
    while after > before + 28 * 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = checkpoint();
    }
    eprintln!("checkpoint: {before} bytes before the clients, {after} after");
    assert!(
        after <= before + 28 * 4,
        "the checkpoint grew from {before} to {after} bytes after {CLIENTS} one-shot clients"
    );
    // The manager and the server are still fine, and the key still right.
    let out = run(&["kv", "pull", "w", "--keys", "1", "--manager", m]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("1 {}", CLIENTS + 1)
    );
}

#[test]
fn a_push_that_comes_after_its_client_left_is_refused_not_applied_twice() {
    let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0", "--lease-ms", "500"]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    let (s, line) = spawn(&["server", "--manager", &manager]);
    assert!(line.starts_with("server "), "{line}");
    procs.0.push((s, line));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connect = || async {
            let mut cfg = WorkerConfig::client(manager.clone());
            cfg.timeout = Duration::from_secs(10);
            Worker::connect(cfg).await.unwrap()
        };
        let w = connect().await;
        w.create_table("w", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        w.push("w", vec![7], vec![1.0]).await.unwrap();
        let id = w.id();
        w.leave().await;
        // Another client sees the map say it left, within a few leases.
        let other = connect().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !other.refresh().await.unwrap().departed(id) {
            assert!(Instant::now() < deadline, "the map never said {id} left");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The same push again, as a late resend would come: the server no
        // longer knows it applied it, so it must refuse it.
        let late = w.push("w", vec![7], vec![1.0]).await;
        let err = late.expect_err("a push of a client that left was taken");
        assert!(err.to_string().contains("left the cluster"), "{err}");
        assert_eq!(other.pull("w", vec![7]).await.unwrap(), [1.0]);
        other.leave().await;
    });
}

/// Bytes a client receives for the same pull of 4,096 unchanged keys made
/// twice with the significantly-modified filter on replies, against a
/// server started with `server_args`: (first pull, second pull).
fn filtered_pull_bytes(server_args: &[&str]) -> (u64, u64) {
    let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0"]);
    let manager = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    let mut args = vec!["server", "--manager", &manager];
    args.extend_from_slice(server_args);
    let (s, line) = spawn(&args);
    assert!(line.starts_with("server "), "{line}");
    procs.0.push((s, line));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = WorkerConfig::client(manager.clone());
        cfg.timeout = Duration::from_secs(10);
        let w = Worker::connect(cfg).await.unwrap();
        w.create_table("f", TableOptions::new(1, UpdaterSpec::Assign))
            .await
            .unwrap();
        let keys: Vec<u64> = (0..4096).collect();
        let vals: Vec<f32> = (0..4096).map(|i| i as f32).collect();
        w.push("f", keys.clone(), vals.clone()).await.unwrap();
        w.set_value_filters(ValueFilters {
            significant_pull: Some(0.5),
            ..ValueFilters::default()
        })
        .unwrap();
        let received = || w.traffic().bytes_received.load(Ordering::Relaxed);
        let mut bytes = [0; 2];
        for b in &mut bytes {
            let before = received();
            assert_eq!(w.pull("f", keys.clone()).await.unwrap(), vals);
            *b = received() - before;
        }
        w.leave().await;
        (bytes[0], bytes[1])
    })
}

#[test]
fn the_servers_significant_entries_flag_bounds_the_filter_and_0_turns_it_off() {
    // By default the second pull of unchanged values comes back nearly
    // empty (presence bits, no values); with the filter's memory set to 0
    // the server answers every filtered pull in full.
    let (first, second) = filtered_pull_bytes(&[]);
    assert!(second * 4 < first, "filtered: {first} then {second} bytes");
    let (first_off, second_off) = filtered_pull_bytes(&["--significant-entries", "0"]);
    assert!(
        second_off * 10 >= first_off * 9,
        "filter off: {first_off} then {second_off} bytes"
    );
    assert!(first_off >= 4096 * 4, "{first_off} bytes for 4,096 values");
}
