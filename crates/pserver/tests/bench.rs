//! `pserver bench` end to end with tiny sizes: every section of the report
//! is there, and every figure follows from the counts it was computed from
//! (and those counts from what the frames must weigh).

mod common;

use common::BIN;
use pserver_wire::header::HEADER_LEN;
use serde_json::Value;
use std::process::Command;

/// Bytes of `frames` frames carrying `keys` keys and `vals` floats in all,
/// length prefixes included.
fn frame_bytes(frames: u64, keys: u64, vals: u64) -> u64 {
    frames * (HEADER_LEN as u64 + 4) + keys * 8 + vals * 4
}

fn f(v: &Value, name: &str) -> f64 {
    v[name]
        .as_f64()
        .unwrap_or_else(|| panic!("{name} missing in {v}"))
}

fn u(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} missing in {v}"))
}

/// The lower median, as the benchmark takes it.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[(xs.len() - 1) / 2]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// Checks one case: its medians come from its runs, its counts from its
/// request size, its bytes from what its frames weigh.
fn check_case(c: &Value, reps: usize, dense: bool, stream_gb: Option<f64>, rtt: f64) {
    check_case_dim(c, reps, dense, stream_gb, rtt, 1)
}

/// [`check_case`] for a table of `dim` floats per key.
fn check_case_dim(c: &Value, reps: usize, dense: bool, stream_gb: Option<f64>, rtt: f64, dim: u64) {
    check_case_full(c, reps, dense, stream_gb, rtt, dim, false)
}

/// [`check_case`] for a case whose requests carry `keys` keys each or, when
/// `merged` (Zipf draws), at most that many (repeats go once).
fn check_case_full(
    c: &Value,
    reps: usize,
    dense: bool,
    stream_gb: Option<f64>,
    rtt: f64,
    dim: u64,
    merged: bool,
) {
    let runs = c["runs"].as_array().unwrap();
    assert_eq!(runs.len(), reps, "{c}");
    let keys_each = u(c, "keys");
    let med = |g: &dyn Fn(&Value) -> f64| median(runs.iter().map(g).collect());
    for r in runs {
        let (requests, keys, frames) = (u(r, "requests"), u(r, "keys"), u(r, "frames"));
        assert!(requests > 0 && f(r, "seconds") > 0.0, "{c}");
        if merged {
            assert!(keys >= requests && keys <= requests * keys_each, "{c}");
        } else {
            assert_eq!(keys, requests * keys_each, "{c}");
        }
        assert!(frames >= requests, "{c}");
        // A push sends dim floats per key, a pull gets dim back; a dense
        // request carries no key list.
        let list = if dense { 0 } else { keys };
        let (out, back) = match c["op"].as_str().unwrap() {
            "push" => (keys * dim, 0),
            "pull" => (0, keys * dim),
            "push_pull" => (keys * dim, keys * dim),
            op => panic!("op {op}"),
        };
        assert_eq!(u(r, "bytes_sent"), frame_bytes(frames, list, out), "{c}");
        let replies = frame_bytes(frames, 0, back);
        let got = u(r, "bytes_received");
        assert!(got >= replies && got <= replies + 16 * frames, "{c}");
        assert_eq!(u(r, "payload_bytes"), (out + back) * 4, "{c}");
    }
    let rate = |name: &'static str| med(&|r: &Value| f(r, name) / f(r, "seconds"));
    assert!(close(f(c, "req_per_s"), rate("requests")), "{c}");
    assert!(close(f(c, "keys_per_s"), rate("keys")), "{c}");
    if !merged {
        assert!(
            close(f(c, "keys_per_s"), f(c, "req_per_s") * keys_each as f64),
            "{c}"
        );
    }
    let wire =
        med(&|r: &Value| (f(r, "bytes_sent") + f(r, "bytes_received")) / f(r, "seconds") / 1e9);
    assert!(close(f(c, "wire_gb_per_s"), wire), "{c}");
    assert!(
        close(f(c, "payload_gb_per_s"), rate("payload_bytes") / 1e9),
        "{c}"
    );
    let (p50, p99, p999) = (f(c, "p50_us"), f(c, "p99_us"), f(c, "p999_us"));
    assert!(p50 > 0.0 && p99 >= p50 && p999 >= p99, "{c}");
    if u(c, "depth") == 1 {
        assert!(close(f(c, "latency_vs_ceiling"), p50 / rtt), "{c}");
    } else {
        assert!(c["latency_vs_ceiling"].is_null(), "{c}");
    }
    match stream_gb {
        Some(s) => {
            assert!(
                close(f(c, "wire_vs_stream"), f(c, "wire_gb_per_s") / s),
                "{c}"
            );
            if dense {
                assert!(
                    close(f(c, "vs_stream"), f(c, "payload_gb_per_s") / s),
                    "{c}"
                );
            } else {
                assert!(c["vs_stream"].is_null(), "{c}");
            }
        }
        None => assert!(c["wire_vs_stream"].is_null(), "{c}"),
    }
}

/// Checks the store alone beside a case: `reps` repetitions of its own, its
/// medians from them, and the case's ratio to it.
fn check_store(c: &Value, reps: usize, merged: bool) {
    let st = &c["store"];
    assert!(st.is_object(), "no store alone: {c}");
    assert!(u(st, "threads") >= 1, "{c}");
    let runs = st["runs"].as_array().unwrap();
    assert_eq!(runs.len(), reps, "{c}");
    let keys_each = u(c, "keys");
    for r in runs {
        let (requests, keys) = (u(r, "requests"), u(r, "keys"));
        assert!(requests > 0 && f(r, "seconds") > 0.0, "{c}");
        if merged {
            assert!(keys >= requests && keys <= requests * keys_each, "{c}");
        } else {
            assert_eq!(keys, requests * keys_each, "{c}");
        }
    }
    let rate = |name: &str| median(runs.iter().map(|r| f(r, name) / f(r, "seconds")).collect());
    assert!(close(f(st, "req_per_s"), rate("requests")), "{c}");
    assert!(close(f(st, "keys_per_s"), rate("keys")), "{c}");
    assert!(
        close(f(c, "vs_store"), f(c, "keys_per_s") / f(st, "keys_per_s")),
        "{c}"
    );
}

#[test]
fn bench_writes_every_section_with_consistent_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let reps = 3;
    let out = Command::new(BIN)
        .args([
            "bench",
            "--keys",
            "1,64",
            "--depth",
            "1,4",
            "--duration-ms",
            "30",
            "--reps",
            &reps.to_string(),
            "--preload",
            "5000",
            "--preload-from",
            "64",
            "--dense",
            "4096",
            "--dense-dim",
            "2",
            "--cluster",
            "2x2",
            "--cluster-keys",
            "256",
            "--memory-keys",
            "10000",
            "--keyset-keys",
            "64",
            "--universe",
            "5000",
            "--store-duration-ms",
            "20",
            "--json",
            json.to_str().unwrap(),
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    let machine = &report["machine"];
    assert!(u(machine, "cores") >= 1);
    assert!(machine.get("cpu_model").is_some());
    assert_eq!(u(&report, "reps"), reps as u64);
    assert_eq!(u(&report, "store_duration_ms"), 20);

    let ceilings = &report["ceilings"];
    let rtt = f(ceilings, "rtt_p50_us");
    let stream = f(ceilings, "stream_gb_per_s");
    assert!(rtt > 0.0 && f(ceilings, "rtt_p99_us") >= rtt && stream > 0.0);

    // Memory: AdaGrad of dim 1 is an 8-byte key and two floats.
    let m = &report["memory"];
    assert_eq!(u(m, "keys"), 10_000);
    assert_eq!(f(m, "raw_bytes_per_key"), 16.0);
    assert!(close(
        f(m, "store_vs_raw"),
        f(m, "store_bytes_per_key") / 16.0
    ));

    // Sparse: 1 key at depths 1 and 4, then 64 keys, each op; the table
    // grows by what pushes stored, and by the preload before 64-key cases.
    let sparse = report["sparse"].as_array().unwrap();
    assert_eq!(sparse.len(), 9);
    for c in sparse {
        check_case(c, reps, false, Some(stream), rtt);
        check_store(c, reps, false);
    }
    assert_eq!(u(&sparse[0], "table_keys"), 0);
    assert_eq!(u(&report["preload"], "keys"), 5000);
    let big: Vec<&Value> = sparse.iter().filter(|c| u(c, "keys") == 64).collect();
    let before = u(big[0], "table_keys");
    assert!(before > 5000, "{}", big[0]);
    // The 1-key pushes stored at most 64 lists of one key before it.
    assert!(before <= 5000 + 64, "{}", big[0]);

    // The key sets: one fixed list on a table of its keys; Zipf draws from
    // a preloaded universe, each request's repeats merged. Each case has
    // the store alone beside it.
    let sets = report["keysets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    let (small, zipf) = (&sets[0], &sets[1]);
    assert_eq!(small["keyset"], "small");
    assert_eq!((u(small, "draws"), u(small, "lists")), (64, 1));
    assert_eq!(f(small, "distinct_keys_mean"), 64.0);
    assert!(small["preload"].is_null() && small["universe"].is_null());
    let small_cases = small["cases"].as_array().unwrap();
    assert_eq!(small_cases.len(), 3);
    for c in small_cases {
        check_case(c, reps, false, Some(stream), rtt);
        check_store(c, reps, false);
    }
    let small_keys: Vec<u64> = small_cases.iter().map(|c| u(c, "table_keys")).collect();
    assert_eq!(small_keys, [0, 64, 64]);
    assert_eq!(zipf["keyset"], "zipf");
    assert_eq!((u(zipf, "draws"), u(zipf, "universe")), (64, 5000));
    assert_eq!(f(zipf, "zipf_s"), 1.1);
    assert_eq!(u(&zipf["preload"], "keys"), 5000);
    let distinct = f(zipf, "distinct_keys_mean");
    assert!((1.0..64.0).contains(&distinct), "{zipf}");
    let zipf_cases = zipf["cases"].as_array().unwrap();
    assert_eq!(zipf_cases.len(), 3);
    for c in zipf_cases {
        check_case_full(c, reps, false, Some(stream), rtt, 1, true);
        check_store(c, reps, true);
        assert_eq!(u(c, "table_keys"), 5000);
        assert_eq!(u(&c["store"], "table_keys"), 5000);
    }

    let dense = &report["dense"];
    assert_eq!(u(dense, "keys"), 4096);
    assert_eq!(u(dense, "dim"), 2);
    let dense_cases = dense["cases"].as_array().unwrap();
    assert_eq!(dense_cases.len(), 3);
    for c in dense_cases {
        check_case_dim(c, reps, true, Some(stream), rtt, 2);
        assert!(c["store"].is_null(), "{c}");
    }
    assert_eq!(u(&dense_cases[1], "table_keys"), 4096);

    let cluster = &report["cluster"];
    assert_eq!((u(cluster, "servers"), u(cluster, "workers")), (2, 2));
    let cluster_cases = cluster["cases"].as_array().unwrap();
    assert_eq!(cluster_cases.len(), 3);
    for c in cluster_cases {
        assert_eq!(u(c, "workers"), 2);
        check_case(c, reps, false, Some(stream), rtt);
        assert!(c["store"].is_null(), "{c}");
    }

    // Pinned: every process of the pinned run on CPU 0; missing only where
    // taskset cannot pin, and then with the reason.
    let can_pin = Command::new("taskset")
        .args(["-c", "0", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert_eq!(
        report["pinned"].is_object(),
        can_pin,
        "{}",
        report["pinned_skipped"]
    );
    match report["pinned"].as_object() {
        Some(_) => {
            let p = &report["pinned"];
            let cpus = p["cpus_allowed"].as_array().unwrap();
            assert_eq!(cpus.len(), 4, "{p}");
            assert!(cpus.iter().all(|c| c == "0"), "{p}");
            let prtt = f(p, "rtt_p50_us");
            let cases = p["cases"].as_array().unwrap();
            assert_eq!(cases.len(), 3);
            for c in cases {
                check_case(c, reps, false, None, prtt);
            }
        }
        None => assert!(report["pinned_skipped"].is_string(), "{report}"),
    }
    assert!(f(&report, "total_seconds") > 0.0);

    // The same cases are printed as one table.
    assert!(stdout.contains("ceilings: TCP request"), "{stdout}");
    assert!(stdout.contains("bytes/key by the store"), "{stdout}");
    let rows = stdout.lines().filter(|l| l.starts_with("| ")).count();
    let pinned_rows = if report["pinned"].is_null() { 0 } else { 3 };
    // Header + 9 sparse + 6 of the key sets + 3 dense + 3 cluster + pinned.
    assert_eq!(rows, 1 + 9 + 6 + 3 + 3 + pinned_rows, "{stdout}");
    assert!(stdout.contains("| 1x1 small |"), "{stdout}");
    assert!(stdout.contains("| 1x1 zipf s=1.1 of 5,000 ("), "{stdout}");
}

#[test]
fn bad_flags_fail_at_once_with_a_clear_message() {
    for (flags, says) in [
        (&["--keys", "0"][..], "--keys"),
        (&["--cluster", "2"][..], "--cluster"),
        (&["--reps", "0"][..], "--reps"),
        (&["--dense", "1000000000"][..], "--dense"),
        (&["--zipf-s=20"][..], "--zipf-s"),
        (&["--universe", "0"][..], "--universe"),
    ] {
        let out = Command::new(BIN).arg("bench").args(flags).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flags:?}: {err}");
        assert!(out.stdout.is_empty(), "{flags:?}");
    }
}
