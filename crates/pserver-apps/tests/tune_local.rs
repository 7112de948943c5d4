//! `--tune` on an in-process cluster: the chosen point is the grid's lowest
//! validation log-loss, the test set plays no part in the choice, and on
//! data where the defaults overfit the tuned model is at least as good.

use pserver_apps::train::{Algo, DataFormat, TrainConfig, train};
use pserver_apps::tune::{self, TuneConfig};
use pserver_node::local::{LocalCluster, LocalConfig};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Text-like LIBSVM rows on which `l1 = l2 = 1` is far too strong: words
/// of a large vocabulary (each row 25 of 4000, of which only the first 40
/// carry signal) with small values (0.1, as a normalized term frequency
/// might be), so the true weights are large (10). `invert` flips every
/// label (a test file that must not change the choice).
fn write_data(path: &Path, rows: usize, seed: u64, invert: bool) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for _ in 0..rows {
        let mut feats: Vec<u64> = (0..25).map(|_| next() % 4000 + 1).collect();
        // Two signal words per row.
        feats.push(next() % 40 + 1);
        feats.push(next() % 40 + 1);
        feats.sort_unstable();
        feats.dedup();
        let score: f64 = feats
            .iter()
            .filter(|&&j| j <= 40)
            .map(|&j| if j <= 20 { 1.0 } else { -1.0 })
            .sum();
        let u = (next() % 10_000) as f64 / 10_000.0;
        let mut y = u < 1.0 / (1.0 + (-score).exp());
        if invert {
            y = !y;
        }
        let line: Vec<String> = feats.iter().map(|j| format!("{j}:0.1")).collect();
        writeln!(f, "{} {}", if y { "+1" } else { "-1" }, line.join(" ")).unwrap();
    }
}

fn config(train_path: &Path, test_path: &Path, job: &str) -> TrainConfig {
    TrainConfig {
        algo: Algo::Dbpg,
        train: train_path.to_path_buf(),
        test: Some(test_path.to_path_buf()),
        format: DataFormat::Libsvm,
        workers: 2,
        job: Some(job.into()),
        slow_worker_ms: 0,
        // Sequential, so two runs on the same data agree exactly.
        tau: 0,
        l1: 1.0,
        l2: 1.0,
        blocks: 4,
        epochs: 10,
        batch: 100,
        alpha: 0.1,
        beta: 1.0,
        kkt: Some(0.1),
        eval_every: None,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tune_picks_the_lowest_validation_loss_without_the_test_set_and_beats_poor_defaults() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let dir = tempfile::tempdir().unwrap();
        let (tr, te, inv) = (
            dir.path().join("train.svm"),
            dir.path().join("test.svm"),
            dir.path().join("inverted.svm"),
        );
        write_data(&tr, 1500, 1, false);
        write_data(&te, 1500, 2, false);
        write_data(&inv, 1500, 2, true);
        let cluster = LocalCluster::start(LocalConfig::default()).await.unwrap();
        let m = cluster.manager_addr().to_string();
        let drain = || {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            tx
        };
        let grid = TuneConfig {
            l1: vec![1.0, 0.0],
            l2: vec![4.0, 1.0, 0.1, 0.01],
            fraction: 0.25,
            seed: 3,
            epochs: 3,
        };

        let tuned = tune::train(&m, &config(&tr, &te, "tuned"), &grid, drain())
            .await
            .unwrap();
        let t = &tuned.report;
        assert_eq!(t.points.len(), 8);
        // A warm-started path from strong to weak: fewer epochs per point.
        assert_eq!(t.points[0].warm_from, None);
        assert_eq!(t.points[0].epochs, 10);
        assert!(
            t.points[1..]
                .iter()
                .all(|p| p.warm_from.is_some() && p.epochs == 3)
        );
        // The choice is the lowest validation log-loss of the grid.
        let best = t
            .points
            .iter()
            .map(|p| p.logloss)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(t.points[t.chosen].logloss, best, "{t:#?}");
        assert_eq!((t.l1, t.l2), (t.points[t.chosen].l1, t.points[t.chosen].l2));
        // Validation rows are a quarter of the training rows, fit on the rest.
        let share = t.validation_rows as f64 / (t.validation_rows + t.fit_rows) as f64;
        assert!((0.18..0.32).contains(&share), "{share}");
        // The final run is on all the training data.
        assert_eq!(tuned.result.train_rows, 1500);

        // The test set plays no part: inverted test labels, same choice and
        // the same validation curve.
        let again = tune::train(&m, &config(&tr, &inv, "inverted"), &grid, drain())
            .await
            .unwrap();
        assert_eq!(again.report.chosen, t.chosen);
        for (a, b) in again.report.points.iter().zip(&t.points) {
            assert!((a.logloss - b.logloss).abs() < 1e-9, "{a:?} vs {b:?}");
        }
        assert!(again.result.test.logloss > tuned.result.test.logloss);

        // The defaults (l1 = l2 = 1) over-regularize here; the tuned model
        // is at least as good on the test set, with weaker terms.
        let defaults = train(&m, &config(&tr, &te, "defaults"), drain())
            .await
            .unwrap();
        assert!(
            tuned.result.test.logloss <= defaults.test.logloss,
            "tuned {} (l1 {} l2 {}) vs defaults {}; {t:#?}",
            tuned.result.test.logloss,
            t.l1,
            t.l2,
            defaults.test.logloss
        );
        assert!(t.l1 < 1.0 || t.l2 < 1.0, "{t:#?}");
        eprintln!(
            "defaults {:.5}, tuned {:.5} (l1 {} l2 {})",
            defaults.test.logloss, tuned.result.test.logloss, t.l1, t.l2
        );
        cluster.stop().await;
    })
    .await
    .expect("the test finishes within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tune_flags_fail_before_anything_runs() {
    let cfg = config(Path::new("/nonexistent"), Path::new("/nonexistent"), "x");
    let bad = TuneConfig {
        fraction: 1.0,
        ..TuneConfig::default()
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    // No manager listens there: the flags are refused first.
    let e = tune::train("127.0.0.1:1", &cfg, &bad, tx)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("(0, 1)"), "{e}");
}
