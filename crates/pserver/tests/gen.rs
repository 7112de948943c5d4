//! `pserver gen` as a user runs it: the real binary writes small data sets
//! into temporary directories, which are then read back with
//! `pserver_data`, trained on with `pserver train`, and checked against
//! their `meta.json`; bad arguments are refused before anything is written.

mod common;

use common::run_within;
use pserver_data::{Example, Format, ReadOptions};
use std::path::Path;
use std::time::Duration;

/// A debug build calibrates on 200,000 rows in about 10 s (criteo); room
/// for a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(180);

fn gen_ok(args: &[&str]) -> String {
    let mut all = vec!["gen"];
    all.extend_from_slice(args);
    let out = run_within(&all, LIMIT);
    assert!(
        out.status.success(),
        "pserver {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn gen_fails(args: &[&str]) -> String {
    let mut all = vec!["gen"];
    all.extend_from_slice(args);
    let out = run_within(&all, LIMIT);
    assert!(!out.status.success(), "pserver {all:?} should have failed");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "not one clear line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn read(path: &Path) -> Vec<Example> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..2], &[0x1F, 0x8B], "{} is not gzip", path.display());
    let opts = ReadOptions {
        bias: false,
        ..ReadOptions::default()
    };
    let (rows, stats) = pserver_data::read_all(path, &Format::Libsvm, &opts).unwrap();
    assert_eq!(stats.bad, 0, "{}", path.display());
    rows
}

fn meta(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
}

#[test]
fn a_criteo_set_is_written_read_back_described_and_trained_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("criteo");
    let d = dir.to_str().unwrap();
    let stdout = gen_ok(&[
        "--preset",
        "criteo",
        "--train-rows",
        "3000",
        "--test-rows",
        "1000",
        "--out",
        d,
        "--files",
        "3",
        "--bits",
        "20",
        "--seed",
        "5",
    ]);
    assert!(stdout.contains("\"bayes_logloss\""), "{stdout}");
    assert!(stdout.trim_end().ends_with("on train"), "{stdout}");
    assert!(stdout.contains("rows/s"), "{stdout}");

    let train: Vec<Example> = (0..3)
        .flat_map(|i| read(&dir.join(format!("train-{i:05}.libsvm.gz"))))
        .collect();
    let test = read(&dir.join("test.libsvm.gz"));
    assert_eq!((train.len(), test.len()), (3000, 1000));
    // Each file holds its third of the rows.
    assert_eq!(read(&dir.join("train-00001.libsvm.gz")).len(), 1000);

    let m = meta(&dir);
    assert_eq!(m["preset"], "criteo");
    assert_eq!(m["seed"], 5);
    assert_eq!(m["bits"], 20);
    assert!(m.get("note").is_none(), "indices are not raw keys: {m}");
    for (split, rows) in [("train", &train), ("test", &test)] {
        let s = &m[split];
        assert_eq!(s["rows"].as_u64(), Some(rows.len() as u64));
        let positives = rows.iter().filter(|e| e.label == 1.0).count();
        let ctr = s["ctr"].as_f64().unwrap();
        assert!((ctr - positives as f64 / rows.len() as f64).abs() < 1e-12);
        assert!((ctr - 0.25).abs() < 0.06, "{split}: {s}");
        // 13 fields of presence 0.8 and 26 of 0.9: 33.8 values a row.
        let nnz = s["nnz_mean"].as_f64().unwrap();
        assert!((nnz - 33.8).abs() < 0.5, "{split}: {s}");
        let written: usize = rows.iter().map(|e| e.keys.len()).sum();
        let written = written as f64 / rows.len() as f64;
        assert!((written - s["nnz_written_mean"].as_f64().unwrap()).abs() < 1e-9);
        assert!(written <= nnz);
        let bayes = s["bayes_logloss"].as_f64().unwrap();
        let base = s["base_rate_logloss"].as_f64().unwrap();
        assert!(bayes > 0.2 && bayes < base, "{split}: {s}");
        let distinct = s["distinct_keys"].as_u64().unwrap();
        assert!(distinct > 1000 && distinct < nnz as u64 * rows.len() as u64);
        assert_eq!(s["distinct_keys_exact"], true);
    }
    assert_eq!(m["train"]["files"].as_array().unwrap().len(), 3);

    let out = run_within(
        &[
            "train",
            "--format",
            "libsvm",
            "--train",
            dir.join("train-00000.libsvm.gz").to_str().unwrap(),
            "--test",
            dir.join("test.libsvm.gz").to_str().unwrap(),
            "--epochs",
            "2",
        ],
        LIMIT,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("test log-loss"), "{text}");
}

#[test]
fn rows_depend_on_the_seed_only_not_on_files_or_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common = [
        "--preset",
        "tiny",
        "--train-rows",
        "2000",
        "--test-rows",
        "300",
    ];
    let mut one = common.to_vec();
    one.extend([
        "--out",
        a.to_str().unwrap(),
        "--files",
        "1",
        "--threads",
        "1",
    ]);
    let mut two = common.to_vec();
    two.extend([
        "--out",
        b.to_str().unwrap(),
        "--files",
        "2",
        "--threads",
        "2",
    ]);
    gen_ok(&one);
    gen_ok(&two);
    let joined: Vec<Example> = (0..2)
        .flat_map(|i| read(&b.join(format!("train-{i:05}.libsvm.gz"))))
        .collect();
    assert_eq!(read(&a.join("train-00000.libsvm.gz")), joined);
    assert_eq!(
        read(&a.join("test.libsvm.gz")),
        read(&b.join("test.libsvm.gz"))
    );
    let m = meta(&a);
    assert!(m["note"].as_str().unwrap().contains("raw 64-bit keys"));
    // Five fields present in every row.
    assert_eq!(m["train"]["nnz_mean"], 5.0);
}

/// Small tiny-preset arguments writing to `out`, with the flag/value
/// pairs of `extra` replacing or added to them.
fn small(out: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--preset",
        "tiny",
        "--train-rows",
        "100",
        "--test-rows",
        "10",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for pair in extra.chunks(2) {
        match v.iter().position(|a| a == pair[0]) {
            Some(i) => v[i + 1] = pair[1].to_string(),
            None => v.extend(pair.iter().map(|s| s.to_string())),
        }
    }
    v
}

#[test]
fn bad_arguments_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh");
    let f = fresh.to_str().unwrap();
    for (extra, says) in [
        (&["--preset", "avazu"][..], "unknown preset"),
        (&["--train-rows", "0"], "at least 1"),
        (&["--test-rows", "0"], "at least 1"),
        (&["--bits", "64"], "--bits"),
        (&["--files", "0"], "--files"),
        (&["--files", "101"], "--files"),
        (&["--threads", "0"], "--threads"),
    ] {
        let args = small(f, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = gen_fails(&args);
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!fresh.exists(), "{extra:?} wrote {f}");
    }

    // A non-empty directory needs --force, which replaces only a data
    // set's own files (a stale training file of a larger run included).
    let used = tmp.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("notes.txt"), "keep me").unwrap();
    std::fs::write(used.join("train-00009.libsvm.gz"), "stale").unwrap();
    let u = used.to_str().unwrap();
    let args = small(u, &["--files", "1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = gen_fails(&args);
    assert!(err.contains("--force"), "{err}");
    let mut forced = args.clone();
    forced.push("--force");
    gen_ok(&forced);
    assert!(used.join("notes.txt").exists());
    assert!(!used.join("train-00009.libsvm.gz").exists());
    assert_eq!(read(&used.join("train-00000.libsvm.gz")).len(), 100);
}
