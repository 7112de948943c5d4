//! The value filters between a real worker library and real servers in
//! this process: the significantly-modified filter on pull replies (bytes
//! saved, every answer within the threshold of the servers' values,
//! through a server failover), on pushes (carried, then flushed: nothing
//! lost) and random skip (the expectation kept).

use pserver_core::UpdaterSpec;
use pserver_core::membership::MembershipConfig;
use pserver_node::local::{LocalCluster, LocalConfig};
use pserver_node::manager::ManagerConfig;
use pserver_node::worker::{TableOptions, ValueFilters, Worker, WorkerConfig};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::timeout;

/// Every test finishes within this or fails.
const LIMIT: Duration = Duration::from_secs(60);

async fn cluster(servers: usize, replicas: usize) -> LocalCluster {
    LocalCluster::start(LocalConfig {
        servers,
        manager: ManagerConfig {
            membership: MembershipConfig {
                replicas,
                vnodes: 8,
                lease_ms: 1000,
            },
            ..ManagerConfig::default()
        },
        ..LocalConfig::default()
    })
    .await
    .unwrap()
}

async fn client(c: &LocalCluster, values: ValueFilters) -> Worker {
    Worker::connect(WorkerConfig {
        value_filters: values,
        ..WorkerConfig::client(c.manager_addr().to_string())
    })
    .await
    .unwrap()
}

/// Keys spread over the whole ring, sorted.
fn spread(n: u64) -> Vec<u64> {
    let step = u64::MAX / (n + 1);
    (1..=n).map(|i| i * step).collect()
}

/// A small deterministic stream of numbers in [0, 1).
fn unit(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 40) as f32 / (1u64 << 24) as f32
}

/// Pushes a round of updates (most keys move a little, a few a lot), then
/// pulls through the filter and without it; every filtered answer must be
/// within the threshold of the unfiltered one. Returns the values sent.
async fn round(
    pusher: &Worker,
    filtered: &Worker,
    plain: &Worker,
    keys: &[u64],
    thr: f32,
    rng: &mut u64,
) {
    let deltas: Vec<f32> = keys
        .iter()
        .map(|_| {
            let u = unit(rng);
            if u < 0.05 { 1.0 } else { u * 0.002 }
        })
        .collect();
    pusher.advance();
    pusher.push("w", keys.to_vec(), deltas).await.unwrap();
    let truth = plain.pull("w", keys.to_vec()).await.unwrap();
    let got = filtered.pull("w", keys.to_vec()).await.unwrap();
    for (i, (g, t)) in got.iter().zip(&truth).enumerate() {
        assert!(
            (g - t).abs() <= thr + 1e-5,
            "key {}: got {g}, server has {t}",
            keys[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn significant_pulls_save_bytes_and_stay_within_the_threshold_through_failover() {
    timeout(LIMIT, async {
        let c = cluster(3, 1).await;
        let thr = 0.01;
        let pusher = client(&c, ValueFilters::default()).await;
        let plain = client(&c, ValueFilters::default()).await;
        let filtered = client(
            &c,
            ValueFilters {
                significant_pull: Some(thr),
                ..ValueFilters::default()
            },
        )
        .await;
        pusher
            .create_table("w", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        let keys = spread(3000);
        let mut rng = 7;
        for _ in 0..20 {
            round(&pusher, &filtered, &plain, &keys, thr, &mut rng).await;
        }
        let (ft, pt) = (filtered.traffic(), plain.traffic());
        let saved = ft.significant_saved_received.load(Ordering::Relaxed);
        let (fb, pb) = (
            ft.bytes_received.load(Ordering::Relaxed),
            pt.bytes_received.load(Ordering::Relaxed),
        );
        assert!(saved > 0);
        // Most values move less than the threshold per round: well under
        // half the bytes come back.
        assert!(fb * 2 < pb, "filtered {fb} B, plain {pb} B");
        assert_eq!(pt.significant_saved_received.load(Ordering::Relaxed), 0);

        // A server dies: its ranges pass to their replicas, which never
        // sent this worker anything on its connection to them for those
        // keys. Its answers stay within the threshold.
        let dead = c.servers[0].id();
        c.servers[0].shutdown();
        let start = std::time::Instant::now();
        loop {
            let m = plain.refresh().await.unwrap();
            if m.node(dead)
                .is_some_and(|n| n.state == pserver_core::NodeState::Dead)
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "never declared dead"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..10 {
            round(&pusher, &filtered, &plain, &keys, thr, &mut rng).await;
        }
        assert!(ft.significant_saved_received.load(Ordering::Relaxed) > saved);
        c.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_of_the_same_worker_starts_over() {
    timeout(LIMIT, async {
        let c = cluster(1, 0).await;
        let thr = 0.5;
        let pusher = client(&c, ValueFilters::default()).await;
        pusher
            .create_table("w", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        let keys = spread(100);
        pusher
            .push("w", keys.clone(), vec![1.0; 100])
            .await
            .unwrap();
        let values = ValueFilters {
            significant_pull: Some(thr),
            ..ValueFilters::default()
        };
        let a = client(&c, values).await;
        assert_eq!(a.pull("w", keys.clone()).await.unwrap(), vec![1.0; 100]);
        let after_first = a.traffic().bytes_received.load(Ordering::Relaxed);
        assert_eq!(a.pull("w", keys.clone()).await.unwrap(), vec![1.0; 100]);
        let second = a.traffic().bytes_received.load(Ordering::Relaxed) - after_first;
        // A header and a stamp, against 400 bytes of values.
        assert!(second < 150, "nothing moved, yet {second} bytes came back");
        // The worker goes; a new one (new id, new connection) gets
        // everything, never "nothing changed".
        a.shutdown();
        let b = client(&c, values).await;
        assert_eq!(b.pull("w", keys.clone()).await.unwrap(), vec![1.0; 100]);
        // A filter setting out of range is refused up front.
        assert!(
            b.set_value_filters(ValueFilters {
                significant_pull: Some(-1.0),
                ..values
            })
            .is_err()
        );
        assert!(
            b.set_value_filters(ValueFilters {
                random_skip: Some(1.0),
                ..values
            })
            .is_err()
        );
        assert_eq!(b.value_filters(), values);
        c.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn significant_pushes_are_carried_then_flushed_and_random_skip_keeps_the_sum() {
    timeout(LIMIT, async {
        let c = cluster(2, 0).await;
        let reader = client(&c, ValueFilters::default()).await;
        reader
            .create_table("g", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        reader
            .create_table("s", TableOptions::new(1, UpdaterSpec::Add))
            .await
            .unwrap();
        let keys = spread(1000);
        let w = client(
            &c,
            ValueFilters {
                significant_push: Some(0.25),
                ..ValueFilters::default()
            },
        )
        .await;
        // Ten pushes of 0.1: a key goes out every third push (0.3 > 0.25).
        for clock in 1..=10 {
            w.set_clock(clock);
            w.push("g", keys.clone(), vec![0.1; 1000]).await.unwrap();
        }
        let got = reader.pull("g", keys.clone()).await.unwrap();
        assert!(
            got.iter().all(|&v| (v - 0.9).abs() < 1e-4),
            "{:?}",
            &got[..3]
        );
        assert!(w.traffic().significant_saved_sent.load(Ordering::Relaxed) > 0);
        // What was carried (0.1 a key) goes with the flush: nothing lost.
        w.flush_residuals("g", 11).await.unwrap();
        let got = reader.pull("g", keys.clone()).await.unwrap();
        assert!(
            got.iter().all(|&v| (v - 1.0).abs() < 1e-4),
            "{:?}",
            &got[..3]
        );

        let many = spread(20_000);
        let s = client(
            &c,
            ValueFilters {
                random_skip: Some(0.5),
                ..ValueFilters::default()
            },
        )
        .await;
        s.push("s", many.clone(), vec![1.0; many.len()])
            .await
            .unwrap();
        let got = reader.pull("s", many.clone()).await.unwrap();
        let kept = got.iter().filter(|&&v| v != 0.0).count();
        assert!(got.iter().all(|&v| v == 0.0 || v == 2.0));
        let sum: f32 = got.iter().sum();
        let n = many.len() as f32;
        assert!((sum - n).abs() < 0.03 * n, "sum {sum} of {n}");
        assert!((kept as f32 - n / 2.0).abs() < 0.03 * n);
        assert!(s.traffic().skip_saved_sent.load(Ordering::Relaxed) >= 12 * (n as u64) / 3);
        c.stop().await;
    })
    .await
    .unwrap();
}
