//! Long work on one table does not stop requests on another: a push of
//! millions of keys, or a checkpoint, runs on a lent table while small
//! pulls of another table are answered.
//!
//! The bound is relative, not a wall-clock threshold: the slowest small
//! pull while the big request runs must take well under the big request's
//! own duration (before tables were lent, every small pull waited for the
//! whole of it).

use pserver_core::UpdaterSpec;
use pserver_node::local::{LocalCluster, LocalConfig};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Keys of the big request: large enough to take a while in a debug build.
const BIG: u64 = 1 << 21;

/// Every test finishes within this or fails.
const LIMIT: Duration = Duration::from_secs(120);

/// Pulls one key of table `small` in a loop until `stop`; returns the
/// number of pulls and the slowest.
async fn small_pulls(w: Worker, stop: Arc<AtomicBool>) -> (usize, Duration) {
    let mut n = 0;
    let mut worst = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let got = w.pull("small", vec![7]).await.expect("small pull");
        assert_eq!(got, vec![1.0]);
        worst = worst.max(t.elapsed());
        n += 1;
    }
    (n, worst)
}

async fn cluster() -> (LocalCluster, Worker) {
    let c = LocalCluster::start(LocalConfig {
        servers: 1,
        ..LocalConfig::default()
    })
    .await
    .unwrap();
    let w = Worker::connect(WorkerConfig::client(c.manager_addr().to_string()))
        .await
        .unwrap();
    for t in ["big", "small"] {
        w.create_table(t, TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
    }
    w.push("small", vec![7], vec![1.0]).await.unwrap();
    (c, w)
}

/// Runs `big` while another client pulls table `small`, and checks the
/// bound. (Another connection: one connection's requests are taken in
/// order, so a big request holds back the later requests on its own.)
async fn check<F: std::future::Future<Output = ()>>(c: &LocalCluster, what: &str, big: F) {
    let other = Worker::connect(WorkerConfig::client(c.manager_addr().to_string()))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pulls = tokio::spawn(small_pulls(other, stop.clone()));
    let t = Instant::now();
    big.await;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (n, worst) = pulls.await.unwrap();
    eprintln!("{what}: took {took:?}; {n} small pulls meanwhile, the slowest {worst:?}");
    assert!(n >= 5, "{what}: only {n} small pulls in {took:?}");
    assert!(
        worst * 4 < took,
        "{what} held up a small pull of another table: {worst:?} of {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_push_does_not_stop_a_small_pull_of_another_table() {
    tokio::time::timeout(LIMIT, async {
        let (c, w) = cluster().await;
        let keys: Vec<u64> = (0..BIG).map(|i| i * 1_000_003).collect();
        let vals = vec![1.0f32; keys.len()];
        let push = {
            let w = w.clone();
            async move {
                w.push("big", keys, vals).await.unwrap();
            }
        };
        check(&c, "a push of 2M keys", push).await;
        let got = w.pull("big", vec![1_000_003 * 5]).await.unwrap();
        assert_eq!(got, vec![1.0]);
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_does_not_stop_a_small_pull_of_another_table() {
    tokio::time::timeout(LIMIT, async {
        let (c, w) = cluster().await;
        let keys: Vec<u64> = (0..BIG).map(|i| i * 7).collect();
        let vals = vec![1.0f32; keys.len()];
        w.set_clock(2);
        w.push("big", keys, vals).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ckpt = {
            let w = w.clone();
            let path = dir.path().to_path_buf();
            async move {
                w.checkpoint(&path).await.unwrap();
            }
        };
        check(&c, "a checkpoint of 2M keys", ckpt).await;
    })
    .await
    .expect("within the limit");
}
