//! Flag checks, and the load loop against an in-process cluster: what a
//! case reports must be what its frames weigh, and the table must hold the
//! keys the benchmark says it does.

use super::cases::preload;
use super::keys::{self, Pool};
use super::load::{Case, OPS, Source};
use super::*;
use clap::Parser;
use pserver_core::KeyRange;
use pserver_node::local::{LocalCluster, LocalConfig};
use pserver_node::worker::Op;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn settings(flags: &[&str]) -> Result<Settings> {
    let cli = Cli::try_parse_from(std::iter::once("bench").chain(flags.iter().copied()))?;
    Settings::from_args(&cli.args)
}

fn refused(flags: &[&str], says: &str) {
    let e = settings(flags).expect_err("refused");
    assert!(format!("{e:#}").contains(says), "{flags:?}: {e:#}");
}

#[test]
fn defaults_cover_issue_5s_table() {
    let s = settings(&[]).unwrap();
    assert_eq!(s.keys, [1, 1024, 65536, 1 << 20, 1 << 24]);
    assert_eq!(s.depths, [1, 32]);
    // 16M floats as 4,096 rows of 4,096.
    assert_eq!(s.dense * s.dense_dim, 1 << 24);
    assert_eq!(
        s.cluster,
        Some(Shape {
            servers: 2,
            workers: 2
        })
    );
    assert_eq!(s.cluster_keys, 65536);
    assert_eq!(s.memory_keys, 100_000_000);
    assert_eq!((s.preload, s.preload_from), (1 << 24, 1 << 20));
    assert_eq!(s.reps, 3);
    assert!(s.pinned);
}

#[test]
fn defaults_cover_issue_13s_key_sets() {
    let s = settings(&[]).unwrap();
    assert_eq!(s.keysets, [Keyset::Random, Keyset::Small, Keyset::Zipf]);
    assert_eq!(s.keyset_keys, 65536);
    assert_eq!(
        s.zipf,
        ZipfSet {
            universe: 10_000_000,
            s: 1.1,
            draws: 65536
        }
    );
    assert!(s.store);
    assert_eq!(s.store_duration, Duration::from_millis(500));
    let s = settings(&["--keyset", "zipf,small,zipf", "--no-store"]).unwrap();
    assert_eq!(s.keysets, [Keyset::Zipf, Keyset::Small]);
    assert!(!s.store);
}

#[test]
fn bad_flags_are_refused_up_front() {
    refused(&["--reps", "0"], "--reps");
    refused(&["--duration-ms", "0"], "--duration-ms");
    refused(&["--keys", "0"], "--keys");
    refused(&["--keys", "40000000"], "--keys");
    // 16M keys fit a frame at dim 1, not at dim 2.
    assert!(settings(&["--keys", "16777216"]).is_ok());
    refused(
        &["--keys", "16777216", "--dense", "0", "--dim", "2"],
        "fit a",
    );
    refused(&["--depth", "0"], "--depth");
    refused(&["--dim", "0"], "--dim");
    refused(&["--dense", "100000000"], "--dense");
    refused(&["--dense-dim", "0"], "--dense-dim");
    refused(&["--dense-dim", "5000"], "--dense-dim");
    refused(&["--cluster", "2"], "--cluster");
    refused(&["--cluster", "0x2"], "--cluster");
    refused(&["--cluster", "axb"], "--cluster");
    refused(&["--memory-keys", "5000000000"], "--memory-keys");
    refused(&["--keyset", "uniform"], "--keyset");
    refused(&["--keyset-keys", "0"], "--keyset-keys");
    // Only checked when a key set uses it.
    assert!(settings(&["--keyset", "random", "--keyset-keys", "0"]).is_ok());
    refused(&["--zipf-s=-1"], "--zipf-s");
    refused(&["--zipf-s", "NaN"], "--zipf-s");
    refused(&["--universe", "0"], "--universe");
    refused(&["--store-duration-ms", "0"], "--store-duration-ms");
    refused(&["--universe", "5000000000"], "--universe");
    assert!(settings(&["--cluster", "off", "--dense", "0", "--memory-keys", "0"]).is_ok());
}

#[test]
fn cluster_shapes() {
    assert_eq!(
        parse_shape("2x3").unwrap(),
        Some(Shape {
            servers: 2,
            workers: 3
        })
    );
    assert_eq!(parse_shape("OFF").unwrap(), None);
    assert!(parse_shape("17x1").is_err());
    assert!(parse_shape("x").is_err());
}

/// Bytes of a frame with `keys` keys and `vals` floats, length prefix included.
fn frame_bytes(frames: u64, keys: u64, vals: u64) -> u64 {
    frames * (HEADER_LEN as u64 + 4) + keys * 8 + vals * 4
}

async fn cluster(servers: usize) -> (LocalCluster, Worker) {
    let c = LocalCluster::start(LocalConfig {
        servers,
        ..LocalConfig::default()
    })
    .await
    .unwrap();
    let w = connect(&c.manager_addr().to_string(), &Default::default())
        .await
        .unwrap();
    wait_for_servers(&w, servers).await.unwrap();
    (c, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_figures_are_what_the_frames_weigh() {
    let (_c, w) = cluster(2).await;
    let table = create_table(&w, "t", 1).await.unwrap();
    let mut pool = Pool::new(&mut KeyStream::new(3), 64);
    let ms = Duration::from_millis(50);
    for (op, depth) in [(Op::Push, 4), (Op::Pull, 1), (Op::PushPull, 2)] {
        let case = Case {
            table: &table,
            op,
            dim: 1,
            depth,
        };
        let r = load::run(&w, &case, &mut Source::Lists(&mut pool), ms)
            .await
            .unwrap();
        assert!(r.requests > 0 && r.seconds > 0.0, "{r:?}");
        assert_eq!(r.keys, 64 * r.requests);
        assert_eq!(r.latencies_us.len() as u64, r.requests);
        // Two servers: a push goes to every partition (empty slices advance
        // clocks there), a pull only where it has keys.
        assert!(r.frames >= r.requests, "{op:?} {r:?}");
        let (sent_vals, got_vals) = match op {
            Op::Push => (r.keys, 0),
            Op::Pull => (0, r.keys),
            Op::PushPull => (r.keys, r.keys),
        };
        assert_eq!(
            r.bytes_sent,
            frame_bytes(r.frames, r.keys, sent_vals),
            "{op:?}"
        );
        assert_eq!(r.payload_bytes, (sent_vals + got_vals) * 4, "{op:?}");
        // Replies carry a header each, the values, and a short
        // acknowledgement for pushes.
        let replies = frame_bytes(r.frames, 0, got_vals);
        assert!(r.bytes_received >= replies, "{op:?} {r:?}");
        assert!(r.bytes_received <= replies + 16 * r.frames, "{op:?} {r:?}");
    }
    // The table holds exactly the keys the pool says pushes stored.
    let stored = pool.take_stored();
    assert!(stored >= 64);
    let (keys, _) = w.scan(&table, KeyRange::ALL).await.unwrap();
    assert_eq!(keys.len() as u64, stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_figures_carry_no_key_list() {
    let (_c, w) = cluster(1).await;
    let table = create_table(&w, "d", 2).await.unwrap();
    let range = KeyRange {
        begin: 100,
        end: 1100,
    };
    for op in OPS {
        let case = Case {
            table: &table,
            op,
            dim: 2,
            depth: 1,
        };
        let r = load::run(
            &w,
            &case,
            &mut Source::Range(range),
            Duration::from_millis(30),
        )
        .await
        .unwrap();
        assert_eq!(r.keys, 1000 * r.requests);
        let pushed = if op == Op::Pull { 0 } else { 2 * r.keys };
        assert_eq!(r.bytes_sent, frame_bytes(r.frames, 0, pushed), "{op:?}");
    }
    let (keys, vals) = w.scan(&table, KeyRange::ALL).await.unwrap();
    assert_eq!(keys, (100..1100).collect::<Vec<u64>>());
    assert!(vals.iter().all(|&v| v == 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preload_stores_every_key_once() {
    let (_c, w) = cluster(2).await;
    let table = create_table(&w, "p", 1).await.unwrap();
    let mut stream = KeyStream::new(5);
    preload(&w, &table, 1, 3000, &mut stream).await.unwrap();
    let (keys, _) = w.scan(&table, KeyRange::ALL).await.unwrap();
    assert_eq!(keys.len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_set_tables_hold_what_the_report_says() {
    let (c, w) = cluster(2).await;
    let addr = c.manager_addr().to_string();
    let s = settings(&[
        "--manager",
        &addr,
        "--keyset",
        "small,zipf",
        "--keyset-keys",
        "64",
        "--universe",
        "3000",
        "--duration-ms",
        "20",
        "--reps",
        "2",
    ])
    .unwrap();
    let ceilings = Ceilings {
        rtt_p50_us: 50.0,
        rtt_p99_us: 90.0,
        stream_gb_per_s: Some(1.0),
    };
    let mut procs = Procs::new(&[]);
    let sets = cases::keyset_cases(&s, &ceilings, &mut procs)
        .await
        .unwrap();
    assert_eq!(sets.len(), 2);
    let (small, zipf) = (&sets[0], &sets[1]);
    assert_eq!(
        (small.keyset.as_str(), zipf.keyset.as_str()),
        ("small", "zipf")
    );
    // Small: one list, stored by the first push; the store alone agrees.
    assert_eq!((small.lists, small.distinct_keys_mean), (1, 64.0));
    let table_keys: Vec<_> = small.cases.iter().map(|c| c.table_keys).collect();
    assert_eq!(table_keys, [Some(0), Some(64), Some(64)]);
    // Zipf: the universe, preloaded, and nothing else.
    assert_eq!(zipf.universe, Some(3000));
    assert_eq!(zipf.preload.as_ref().map(|p| p.keys), Some(3000));
    assert!(zipf.distinct_keys_mean > 1.0 && zipf.distinct_keys_mean < 64.0);
    for c in &zipf.cases {
        assert_eq!(c.table_keys, Some(3000));
        let st = c.store.as_ref().expect("the store alone");
        assert_eq!(st.table_keys, 3000);
        assert_eq!(st.runs.len(), 2);
        assert!(c.vs_store.is_some_and(|r| r > 0.0), "{c:?}");
        for r in &c.runs {
            // Requests carry the lists' distinct keys, not the draws.
            assert!(r.keys < 64 * r.requests, "{r:?}");
        }
    }
    assert_eq!(small.cases[1].store.as_ref().unwrap().table_keys, 64);
    let pid = std::process::id();
    let (keys, _) = w
        .scan(&format!("bench-small-{pid}"), KeyRange::ALL)
        .await
        .unwrap();
    assert_eq!(keys, keys::small_list(64));
    let (keys, _) = w
        .scan(&format!("bench-zipf-{pid}"), KeyRange::ALL)
        .await
        .unwrap();
    assert_eq!(keys, keys::universe_chunk(0, 3000));
}
