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

/// Floats of the dense push sent right behind a big one: far more than a
/// loopback connection buffers (a few MiB each way), so its write can end
/// only once the server has read most of it.
const BEHIND: u64 = 8 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_is_read_on_while_its_big_push_is_applied() {
    use futures_util::StreamExt;
    use pserver_wire::header::FLAG_DENSE;
    use pserver_wire::{Frame, FrameCodec, Header, Kind, Limits};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{Encoder, FramedRead};

    tokio::time::timeout(LIMIT, async {
        let (c, w) = cluster().await;
        let wide = w
            .create_table("wide", TableOptions::new(1, UpdaterSpec::Assign))
            .await
            .unwrap();
        let big = w.table("big").await.unwrap();
        let map = w.refresh().await.unwrap();
        let frame = |table: u32, clock: u64| {
            let mut h = Header::new(Kind::Push);
            h.sender = w.id();
            h.table = table;
            h.epoch = map.epoch;
            h.clock = clock;
            h.range = map.partitions[0].range;
            Frame::new(h)
        };
        // A push of 2M keys, lent to a blocking thread for a while...
        let mut first = frame(big.id, 1);
        first.keys = (0..BIG).map(|i| i * 1_000_003).collect();
        first.vals = vec![1.0f32; BIG as usize].into();
        first.header.request_id = 1;
        // ...and right behind it on the same connection, 32 MiB of a dense push.
        let mut second = frame(wide.id, 1);
        second.header.flags = FLAG_DENSE;
        second.header.range = pserver_core::KeyRange::new(0, BEHIND).unwrap();
        second.vals = vec![2.0f32; BEHIND as usize].into();
        second.header.request_id = 2;
        let mut codec = FrameCodec::new(Limits::default());
        let mut bytes = bytes::BytesMut::new();
        codec.encode(&first, &mut bytes).unwrap();
        codec.encode(&second, &mut bytes).unwrap();

        let addr = c.servers[0].addr().to_string();
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let replies = tokio::spawn(async move {
            let mut rd = FramedRead::new(rd, FrameCodec::new(Limits::default()));
            let mut got = Vec::new();
            while got.len() < 2 {
                let f = rd.next().await.expect("a reply").expect("a good frame");
                got.push((Instant::now(), f));
            }
            got
        });
        wr.write_all(&bytes).await.unwrap();
        let written = Instant::now();
        let got = replies.await.unwrap();
        for (_, f) in &got {
            assert_eq!(f.header.kind, Kind::Reply, "{:?}", f.control_msg());
        }
        let (first_answered, f) = &got[0];
        assert_eq!(f.header.request_id, 1, "requests are answered in order");
        eprintln!(
            "written {:?} before the first push was answered",
            first_answered.saturating_duration_since(written)
        );
        // Without reading ahead, the dense push's bytes would wait in the
        // socket until the big push was answered.
        assert!(
            written < *first_answered,
            "the second push was written only {:?} after the first was answered",
            written - *first_answered
        );
        assert_eq!(w.pull("big", vec![1_000_003 * 9]).await.unwrap(), vec![1.0]);
        assert_eq!(
            w.pull("wide", vec![0, BEHIND - 1]).await.unwrap(),
            vec![2.0, 2.0]
        );
    })
    .await
    .expect("within the limit");
}
