//! `pserver bench` end to end with tiny sizes: it starts its processes,
//! measures the ceilings and every case, and writes a complete report.

mod common;

use common::BIN;
use std::process::Command;

#[test]
fn bench_runs_every_case_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--keys",
            "1,64",
            "--depth",
            "1,4",
            "--duration-ms",
            "100",
            "--reps",
            "1",
            "--json",
            json.to_str().unwrap(),
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let c = &report["ceilings"];
    assert!(c["rtt_p50_us"].as_f64().unwrap() > 0.0);
    assert!(c["stream_gb_per_s"].as_f64().unwrap() > 0.0);
    let cases = report["cases"].as_array().unwrap();
    // push, pull, push_pull at 1 key (depths 1 and 4) and at 64 keys.
    assert_eq!(cases.len(), 9);
    for case in cases {
        let keys = case["keys"].as_f64().unwrap();
        let req = case["req_per_s"].as_f64().unwrap();
        assert!(req > 0.0, "{case}");
        // Keys per second is requests per second times keys per request.
        let kps = case["keys_per_s"].as_f64().unwrap();
        assert!((kps - req * keys).abs() <= 1e-6 * kps.max(1.0), "{case}");
        assert!(case["wire_gb_per_s"].as_f64().unwrap() > 0.0, "{case}");
        let (p50, p99) = (
            case["p50_us"].as_f64().unwrap(),
            case["p99_us"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p99 >= p50, "{case}");
        assert_eq!(
            case["latency_vs_ceiling"].is_null(),
            case["depth"].as_u64() != Some(1),
            "{case}"
        );
    }
    // The same numbers are printed as a table.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ceilings: TCP request"), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("| push")).count(),
        6
    );
}
