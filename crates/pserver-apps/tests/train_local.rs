//! Small end-to-end trainings on in-process clusters: both algorithms learn
//! a synthetic problem, bad input lines are reported, and the saved model
//! scores like the cluster did.

use pserver_apps::train::{Algo, DataFormat, TrainConfig, evaluate, train};
use pserver_node::local::{LocalCluster, LocalConfig};
use pserver_node::server::{ServerConfig, start_server};
use pserver_node::worker::{Worker, WorkerConfig};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Writes a LIBSVM file whose label follows a sparse linear model over 50
/// features, plus a few malformed lines.
fn write_data(path: &Path, rows: usize, seed: u64, bad: bool) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for i in 0..rows {
        let mut feats: Vec<u64> = (0..6).map(|_| next() % 50 + 1).collect();
        feats.sort_unstable();
        feats.dedup();
        // Features 1..=25 push towards 1, the rest towards 0.
        let score: f64 = feats
            .iter()
            .map(|&j| if j <= 25 { 1.0 } else { -1.0 })
            .sum();
        let noise = (next() % 1000) as f64 / 1000.0 - 0.5;
        let label = if score + noise > 0.0 { 1 } else { -1 };
        let line: Vec<String> = feats.iter().map(|j| format!("{j}:1")).collect();
        writeln!(f, "{label} {}", line.join(" ")).unwrap();
        if bad && i == 10 {
            writeln!(f, "+1 3:x").unwrap();
        }
    }
}

fn config(algo: Algo, train_path: &Path, test_path: &Path) -> TrainConfig {
    TrainConfig {
        algo,
        train: train_path.to_path_buf(),
        test: Some(test_path.to_path_buf()),
        format: DataFormat::Libsvm,
        workers: 2,
        job: None,
        slow_worker_ms: 0,
        tau: 1,
        l1: 0.1,
        l2: 0.1,
        blocks: 4,
        epochs: 8,
        batch: 100,
        alpha: 0.1,
        beta: 1.0,
        kkt: Some(0.1),
        eval_every: Some(Duration::from_millis(50)),
        key_caching: true,
        compression: None,
        value_filters: Default::default(),
        fail_worker: None,
        checkpoint_dir: None,
        checkpoint_every: 0,
        resume: false,
        net: Default::default(),
    }
}

async fn run(algo: Algo) {
    let dir = tempfile::tempdir().unwrap();
    let (tr, te) = (dir.path().join("train.svm"), dir.path().join("test.svm"));
    write_data(&tr, 3000, 1, true);
    write_data(&te, 1000, 2, false);
    let cluster = LocalCluster::start(LocalConfig::default()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let cfg = config(algo, &tr, &te);
    let r = train(&cluster.manager_addr().to_string(), &cfg, tx)
        .await
        .unwrap();
    drain.await.unwrap();
    assert!(r.test.auc > 0.95, "{algo:?}: test AUC {}", r.test.auc);
    assert_eq!(r.train_rows, 3000);
    assert_eq!(r.test.examples, 1000);
    // The malformed line is reported with its line number, not dropped silently.
    let bad: Vec<_> = r.bad.iter().flat_map(|s| s.first_bad.iter()).collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].line, 12);
    assert!(!r.curve.is_empty() && !r.test_curve.is_empty());
    assert!(r.bytes_sent > 0 && r.bytes_received > 0);
    assert!(r.nnz > 0 && r.nnz <= 51);
    // The model scores the test set as the cluster's weights did.
    let dirm = dir.path().join("model");
    r.model.save(&dirm).unwrap();
    let back = pserver_apps::model::Model::load(&dirm).unwrap();
    let (test, _) = {
        let mut reader =
            pserver_data::open(&te, &pserver_data::Format::Libsvm, &Default::default()).unwrap();
        let mut b = pserver_apps::dataset::Builder::new();
        for ex in reader.by_ref() {
            b.add(ex.label, &ex.keys, &ex.vals);
        }
        (b.build(), ())
    };
    let m = evaluate(&back, &test);
    assert!((m.auc - r.test.auc).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbpg_learns_a_sparse_model() {
    tokio::time::timeout(Duration::from_secs(120), run(Algo::Dbpg))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftrl_learns_a_sparse_model() {
    tokio::time::timeout(Duration::from_secs(120), run(Algo::Ftrl))
        .await
        .unwrap();
}

/// What happens to the servers a moment into training.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Disturb {
    Nothing,
    /// The first server is stopped.
    Kill,
    /// A fourth server joins, then the first is drained.
    JoinDrain,
}

/// DBPG on three servers with one replica per range, disturbed as `what`
/// says a moment into training. Returns the test AUC.
async fn replicated_run(what: Disturb) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (tr, te) = (dir.path().join("train.svm"), dir.path().join("test.svm"));
    write_data(&tr, 3000, 1, false);
    write_data(&te, 1000, 2, false);
    let mut lc = LocalConfig {
        servers: 3,
        ..LocalConfig::default()
    };
    lc.manager.membership.replicas = 1;
    lc.manager.membership.lease_ms = 400;
    let cluster = LocalCluster::start(lc).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let mut cfg = config(Algo::Dbpg, &tr, &te);
    cfg.epochs = 30;
    cfg.eval_every = None;
    let addr = cluster.manager_addr().to_string();
    let run = tokio::spawn(async move { train(&addr, &cfg, tx).await });
    let mut joined = None;
    match what {
        Disturb::Nothing => {}
        Disturb::Kill => {
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert!(!run.is_finished(), "training ended before the kill");
            cluster.servers[0].shutdown();
        }
        Disturb::JoinDrain => {
            tokio::time::sleep(Duration::from_millis(120)).await;
            assert!(!run.is_finished(), "training ended before the join");
            let mut sc = ServerConfig::new(cluster.manager_addr().to_string());
            sc.listen = "127.0.0.1:0".into();
            joined = Some(start_server(sc).await.unwrap());
            tokio::time::sleep(Duration::from_millis(60)).await;
            let admin = Worker::connect(WorkerConfig::client(cluster.manager_addr().to_string()))
                .await
                .unwrap();
            admin.drain(cluster.servers[0].id()).await.unwrap();
        }
    }
    let r = run.await.unwrap().unwrap();
    drain.await.unwrap();
    eprintln!(
        "{what:?}: AUC {} after {:.2} s",
        r.test.auc, r.train_seconds
    );
    if let Some(j) = joined {
        j.shutdown();
    }
    r.test.auc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_goes_on_when_a_replicated_server_dies() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let calm = replicated_run(Disturb::Nothing).await;
        let hit = replicated_run(Disturb::Kill).await;
        assert!(calm > 0.95, "undisturbed AUC {calm}");
        // The issue asks for 0.005. Runs differ by about 1e-4 (timing under
        // tau 1); a lost or doubled aggregate showed as 0.002-0.004, so the
        // bound is tighter than asked, to catch that.
        assert!(
            (calm - hit).abs() <= 0.0015,
            "AUC {hit} after a server died, {calm} without"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_goes_on_through_a_join_and_a_drain() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let calm = replicated_run(Disturb::Nothing).await;
        let moved = replicated_run(Disturb::JoinDrain).await;
        assert!(
            (calm - moved).abs() <= 0.0015,
            "AUC {moved} with a server joining and one drained, {calm} without"
        );
    })
    .await
    .unwrap();
}

/// DBPG with three workers; `fail` stops the last one a moment in.
/// Returns the test AUC and whether its shard was taken over.
async fn three_workers(fail: bool) -> (f64, bool) {
    let dir = tempfile::tempdir().unwrap();
    let (tr, te) = (dir.path().join("train.svm"), dir.path().join("test.svm"));
    write_data(&tr, 3000, 1, false);
    write_data(&te, 1000, 2, false);
    let mut lc = LocalConfig::default();
    lc.manager.membership.lease_ms = 400;
    let cluster = LocalCluster::start(lc).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let events = tokio::spawn(async move {
        let (mut lost, mut adopted) = (false, false);
        while let Some(ev) = rx.recv().await {
            match ev {
                pserver_apps::progress::Progress::WorkerLost { worker, .. } => lost = worker == 2,
                pserver_apps::progress::Progress::Adopted { rows, .. } => adopted = rows > 0,
                _ => {}
            }
        }
        lost && adopted
    });
    let mut cfg = config(Algo::Dbpg, &tr, &te);
    cfg.workers = 3;
    cfg.epochs = 60;
    cfg.eval_every = None;
    if fail {
        cfg.fail_worker = Some((2, Duration::from_millis(25)));
    }
    let r = train(&cluster.manager_addr().to_string(), &cfg, tx)
        .await
        .unwrap();
    let took_over = events.await.unwrap();
    eprintln!(
        "fail {fail}: AUC {} after {:.2} s",
        r.test.auc, r.train_seconds
    );
    (r.test.auc, took_over)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_workers_shard_is_taken_over_and_quality_holds() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let (calm, none) = three_workers(false).await;
        assert!(!none);
        let (hit, took_over) = three_workers(true).await;
        assert!(took_over, "no worker took over the lost shard");
        assert!(calm > 0.95, "undisturbed AUC {calm}");
        assert!(
            (calm - hit).abs() <= 0.005,
            "AUC {hit} after a worker died, {calm} without"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_dbpg_matches_delayed_dbpg() {
    // tau 0 is exact block coordinate descent: every pull must see the
    // whole sum of the clock it waits for. A pull answered before its
    // range's sum was applied once made it learn nothing (AUC 0.5).
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let (tr, te) = (dir.path().join("train.svm"), dir.path().join("test.svm"));
        write_data(&tr, 3000, 1, false);
        write_data(&te, 1000, 2, false);
        let cluster = LocalCluster::start(LocalConfig::default()).await.unwrap();
        let mut aucs = Vec::new();
        // tau 4 > 2 also starts with iterations that pull nothing (once a
        // wrap below zero there panicked every worker).
        for tau in [0, 1, 4] {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
            let mut cfg = config(Algo::Dbpg, &tr, &te);
            cfg.tau = tau;
            cfg.eval_every = None;
            let r = train(&cluster.manager_addr().to_string(), &cfg, tx)
                .await
                .unwrap();
            drain.await.unwrap();
            aucs.push(r.test.auc);
        }
        assert!(aucs[0] > 0.95, "tau 0: AUC {}", aucs[0]);
        assert!((aucs[0] - aucs[1]).abs() < 0.01, "{aucs:?}");
        assert!((aucs[0] - aucs[2]).abs() < 0.01, "{aucs:?}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_resumes_from_a_checkpoint_after_a_whole_cluster_restart() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let (tr, te) = (dir.path().join("train.svm"), dir.path().join("test.svm"));
        write_data(&tr, 3000, 1, false);
        write_data(&te, 1000, 2, false);
        let ckpt = dir.path().join("ckpt");
        let run = |cfg: TrainConfig| async move {
            let cluster = LocalCluster::start(LocalConfig::default()).await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let events = tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(ev) = rx.recv().await {
                    match ev {
                        pserver_apps::progress::Progress::Checkpointed { epoch, .. } => {
                            seen.push(format!("checkpoint {epoch}"))
                        }
                        pserver_apps::progress::Progress::Resumed { epoch, .. } => {
                            seen.push(format!("resumed {epoch}"))
                        }
                        _ => {}
                    }
                }
                seen
            });
            let r = train(&cluster.manager_addr().to_string(), &cfg, tx)
                .await
                .unwrap();
            cluster.shutdown();
            (r, events.await.unwrap())
        };
        let base = TrainConfig {
            eval_every: None,
            tau: 0,
            ..config(Algo::Dbpg, &tr, &te)
        };
        // Straight through, 8 epochs.
        let (whole, _) = run(TrainConfig {
            epochs: 8,
            ..base.clone()
        })
        .await;
        // 5 epochs with a checkpoint every 2; the cluster then goes away.
        let (_, first) = run(TrainConfig {
            epochs: 5,
            checkpoint_dir: Some(ckpt.clone()),
            checkpoint_every: 2,
            ..base.clone()
        })
        .await;
        assert_eq!(first, vec!["checkpoint 2", "checkpoint 4"]);
        // A new cluster resumes after epoch 4 and finishes the 8.
        let (resumed, second) = run(TrainConfig {
            epochs: 8,
            checkpoint_dir: Some(ckpt.clone()),
            resume: true,
            ..base.clone()
        })
        .await;
        assert_eq!(second, vec!["resumed 4"]);
        assert!(
            (whole.test.auc - resumed.test.auc).abs() < 0.002,
            "straight {} vs resumed {}",
            whole.test.auc,
            resumed.test.auc
        );
        assert!(
            (whole.test.logloss - resumed.test.logloss).abs() < 0.002,
            "straight {} vs resumed {}",
            whole.test.logloss,
            resumed.test.logloss
        );
    })
    .await
    .unwrap();
}
