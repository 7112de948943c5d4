//! A failed `pserver checkpoint DIR` over a good checkpoint in DIR, between
//! real processes (issue #16, defect 5): the good one must stay whole, so
//! `pserver restore DIR` into a fresh cluster gives back exactly its values.

use pserver_core::UpdaterSpec;
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::path::Path;
use std::time::Duration;

mod common;

use common::{Procs, run_within, spawn};

/// A manager and one server; returns them and the manager's address.
fn cluster() -> (Procs, String) {
    let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0"]);
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let mut procs = Procs(vec![(m, line)]);
    let (s, line) = spawn(&["server", "--manager", &addr]);
    assert!(line.starts_with("server "), "{line}");
    procs.0.push((s, line));
    (procs, addr)
}

/// Runs `pserver ARGS` (at most 60 s); returns whether it succeeded and its stderr.
fn pserver(args: &[&str]) -> (bool, String) {
    let out = run_within(args, Duration::from_secs(60));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn client(manager: &str) -> Worker {
    let mut cfg = WorkerConfig::client(manager.to_string());
    cfg.timeout = Duration::from_secs(30);
    Worker::connect(cfg).await.unwrap()
}

fn keys() -> Vec<u64> {
    let step = u64::MAX / 301;
    (1..=300).map(|i| i * step).collect()
}

/// The names (without any directory) of the manifest's files of `table`,
/// and the generation the manifest says it is (0 when it says none).
fn manifest(dir: &Path, table: u32) -> (Vec<String>, u64) {
    let json = std::fs::read(dir.join("MANIFEST.json")).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let names = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["table"].as_u64() == Some(table.into()))
        .map(|f| {
            let name = f["name"].as_str().unwrap();
            name.rsplit('/').next().unwrap().to_string()
        })
        .collect();
    (names, m["generation"].as_u64().unwrap_or(0))
}

#[test]
fn a_failed_checkpoint_keeps_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let ckpt = dir.to_str().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let keys = keys();

    // A table with known values, checkpointed.
    let (procs, manager) = cluster();
    let (first, t1) = rt.block_on(async {
        let w = client(&manager).await;
        let spec = w
            .create_table("a", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        let vals: Vec<f32> = (0..keys.len()).map(|i| i as f32 * 0.5).collect();
        w.push("a", keys.clone(), vals).await.unwrap();
        (w.pull("a", keys.clone()).await.unwrap(), spec.id)
    });
    let (ok, err) = pserver(&["checkpoint", "--manager", &manager, ckpt]);
    assert!(ok, "{err}");

    // The table changes, and a second table appears.
    let t2 = rt.block_on(async {
        let w = client(&manager).await;
        w.set_clock(2);
        w.push("a", keys.clone(), vec![100.0; keys.len()])
            .await
            .unwrap();
        let spec = w
            .create_table("b", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        w.push("b", keys.clone(), vec![1.0; keys.len()])
            .await
            .unwrap();
        spec.id
    });
    // The second checkpoint writes "a"'s files, then "b"'s, over the same
    // ranges; a directory stands where "b"'s first file would go (in DIR
    // itself, or in the subdirectory of the checkpoint's next generation,
    // whichever this build writes into), so it fails after "a"'s are
    // written.
    let (names, generation) = manifest(&dir, t1);
    assert!(!names.is_empty());
    let theirs = names[0].replacen(&format!("t{t1}-"), &format!("t{t2}-"), 1);
    for place in [dir.clone(), dir.join(format!("gen-{}", generation + 1))] {
        std::fs::create_dir_all(place.join(&theirs)).unwrap();
    }
    let (ok, err) = pserver(&["checkpoint", "--manager", &manager, ckpt]);
    assert!(!ok, "the second checkpoint succeeded despite the obstacle");
    eprintln!("the second checkpoint: {err}");
    assert!(err.contains(&theirs), "{err}");
    drop(procs);
    // Nothing of the failed attempt is left but the obstacles.
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    left.sort();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // A fresh cluster restores exactly the first checkpoint.
    let (_procs, manager) = cluster();
    let (ok, err) = pserver(&["restore", "--manager", &manager, ckpt]);
    assert!(ok, "restoring the first checkpoint failed: {err}");
    let (restored, tables) = rt.block_on(async {
        let w = client(&manager).await;
        let map = w.refresh().await.unwrap();
        let tables: Vec<String> = map.tables.iter().map(|t| t.name.clone()).collect();
        (w.pull("a", keys.clone()).await.unwrap(), tables)
    });
    assert_eq!(tables, ["a"], "only the first checkpoint's table");
    assert_eq!(restored, first);
    // The failed attempt's generation is gone, obstacle and all.
    let next = dir.join(format!("gen-{}", generation + 1));
    assert!(!next.exists(), "{} is left", next.display());

    // And the next checkpoint into DIR works.
    let (ok, err) = pserver(&["checkpoint", "--manager", &manager, ckpt]);
    assert!(ok, "{err}");
}
