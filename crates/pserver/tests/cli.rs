//! The command line against real processes: a manager and two servers
//! started as `pserver` processes on loopback, driven by `pserver kv` and
//! `pserver status` exactly as the README shows.

mod common;

use common::{Procs, ok, run, spawn};

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "pserver {args:?} should have failed");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "not one clear line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

/// Starts a manager and two servers; returns them and the manager's address.
fn cluster() -> (Procs, String) {
    let (m, line) = spawn(&["manager", "--listen", "127.0.0.1:0"]);
    let addr = line
        .rsplit(' ')
        .next()
        .expect("manager prints its address")
        .to_string();
    let mut procs = Procs(vec![(m, line.clone())]);
    for _ in 0..2 {
        let (s, line) = spawn(&["server", "--manager", &addr]);
        assert!(line.starts_with("server "), "{line}");
        procs.0.push((s, line));
    }
    (procs, addr)
}

#[test]
fn kv_commands_against_a_manager_and_two_server_processes() {
    let (_procs, m) = cluster();
    let m = m.as_str();
    ok(&[
        "kv",
        "--manager",
        m,
        "create-table",
        "w",
        "--dim",
        "1",
        "--updater",
        "add",
    ]);
    ok(&[
        "kv",
        "--manager",
        m,
        "create-table",
        "a",
        "--dim",
        "2",
        "--updater",
        "assign",
    ]);

    // Keys far apart land on both servers.
    let keys = "1,5,9,9223372036854775808,18446744073709551000";
    ok(&[
        "kv",
        "--manager",
        m,
        "push",
        "w",
        "--keys",
        keys,
        "--values",
        "0.5,1,2,3,4",
    ]);
    ok(&[
        "kv",
        "--manager",
        m,
        "push",
        "w",
        "--keys",
        keys,
        "--values",
        "0.5,1,2,3,4",
    ]);
    let out = ok(&["kv", "--manager", m, "pull", "w", "--keys", keys]);
    assert_eq!(
        out,
        "1 1\n5 2\n9 4\n9223372036854775808 6\n18446744073709551000 8\n"
    );

    ok(&[
        "kv",
        "--manager",
        m,
        "push",
        "a",
        "--keys",
        "9,1",
        "--values",
        "9,9.5,1,1.5",
    ]);
    ok(&[
        "kv",
        "--manager",
        m,
        "push",
        "a",
        "--keys",
        "1",
        "--values",
        "7,8",
    ]);
    let out = ok(&["kv", "--manager", m, "pull", "a", "--keys", "1,9,3"]);
    assert_eq!(out, "1 7 8\n9 9 9.5\n3 0 0\n");
    let out = ok(&["kv", "--manager", m, "pull", "a", "--range", "8..11"]);
    assert_eq!(out, "8 0 0\n9 9 9.5\n10 0 0\n");

    // Errors are one clear line and a non-zero exit.
    let e = fails(&["kv", "--manager", m, "pull", "nope", "--keys", "1"]);
    assert!(e.contains("nope"), "{e}");
    let e = fails(&[
        "kv",
        "--manager",
        m,
        "push",
        "w",
        "--keys",
        "1,2",
        "--values",
        "1",
    ]);
    assert!(e.contains("divide"), "{e}");
    let e = fails(&[
        "kv",
        "--manager",
        m,
        "push",
        "w",
        "--keys",
        "1,x",
        "--values",
        "1,2",
    ]);
    assert!(e.contains("\"x\""), "{e}");
    let e = fails(&["kv", "--manager", "127.0.0.1:1", "pull", "w", "--keys", "1"]);
    assert!(e.contains("127.0.0.1:1"), "{e}");

    // Status lists both servers, alive, with disjoint ranges covering every key.
    let json = ok(&["status", "--manager", m, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let servers: Vec<&serde_json::Value> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "server")
        .collect();
    assert_eq!(servers.len(), 2);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for s in &servers {
        assert_eq!(s["state"], "alive");
        for r in s["ranges"].as_array().unwrap() {
            ranges.push((r[0].as_u64().unwrap(), r[1].as_u64().unwrap()));
        }
    }
    ranges.sort();
    assert_eq!(ranges.first().unwrap().0, 0);
    assert_eq!(ranges.last().unwrap().1, u64::MAX);
    for w in ranges.windows(2) {
        assert_eq!(
            w[0].1, w[1].0,
            "gap or overlap between {:?} and {:?}",
            w[0], w[1]
        );
    }
    let tables: Vec<&str> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tables, ["w", "a"]);
    let text = ok(&["status", "--manager", m]);
    assert!(text.contains("epoch"), "{text}");
}

#[test]
fn local_runs_the_demo_job_and_exits() {
    let out = ok(&[
        "local",
        "--listen",
        "127.0.0.1:0",
        "--servers",
        "2",
        "--workers",
        "2",
        "--iterations",
        "20",
        "--exit",
    ]);
    assert!(
        out.contains("local cluster: manager on 127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains(": ok"), "{out}");
}

/// Writes a LIBSVM file whose label follows a sparse linear model.
fn libsvm(path: &std::path::Path, rows: usize, seed: u64, bad_line_after: Option<usize>) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    for i in 0..rows {
        let mut feats: Vec<u64> = (0..5).map(|_| next() % 40 + 1).collect();
        feats.sort_unstable();
        feats.dedup();
        let score: i64 = feats.iter().map(|&j| if j <= 20 { 1 } else { -1 }).sum();
        let label = if score > 0 || (score == 0 && next() % 2 == 0) {
            "+1"
        } else {
            "-1"
        };
        let feats: Vec<String> = feats.iter().map(|j| format!("{j}:1")).collect();
        writeln!(f, "{label} {}", feats.join(" ")).unwrap();
        if bad_line_after == Some(i) {
            writeln!(f, "+1 7:oops").unwrap();
        }
    }
}

#[test]
fn train_and_predict_on_libsvm_files_it_has_never_seen() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    libsvm(dir.path().join("a.svm").as_path(), 2000, 7, Some(4));
    libsvm(dir.path().join("b.svm").as_path(), 500, 8, None);
    let out = run(&[
        "train",
        "--train",
        &p("a.svm"),
        "--test",
        &p("b.svm"),
        "--format",
        "libsvm",
        "--epochs",
        "5",
        "--blocks",
        "4",
        "--report",
        &p("r.json"),
        "--plot",
        &p("c.svg"),
        "--save",
        &p("model"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("test AUC"), "{stdout}");
    // The malformed line is reported with its file and line number.
    assert!(stderr.contains("a.svm:6:"), "{stderr}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("r.json")).unwrap()).unwrap();
    for key in [
        "test_auc",
        "test_logloss",
        "nnz",
        "seconds",
        "examples_per_sec",
        "bytes_sent",
        "bytes_saved",
        "curve",
    ] {
        assert!(!report[key].is_null(), "report lacks {key}: {report}");
    }
    assert!(report["test_auc"].as_f64().unwrap() > 0.9, "{report}");
    assert_eq!(report["bad_lines"], 1);
    assert!(!report["curve"].as_array().unwrap().is_empty());
    let svg = std::fs::read_to_string(p("c.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));

    let pred = ok(&["predict", "--model", &p("model"), "--data", &p("b.svm")]);
    let probs: Vec<f64> = pred.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(probs.len(), 500);
    assert!(probs.iter().all(|q| (0.0..=1.0).contains(q)));

    let e = fails(&[
        "train",
        "--train",
        &p("missing.svm"),
        "--test",
        &p("b.svm"),
        "--format",
        "libsvm",
    ]);
    assert!(e.contains("missing.svm"), "{e}");
    let e = fails(&["predict", "--model", &p("nope"), "--data", &p("b.svm")]);
    assert!(e.contains("nope"), "{e}");
}

/// Issue #16 (7): sizes that cannot work are refused in one line, quickly,
/// before anything allocates for them (they used to abort on a 32 GB
/// allocation, take minutes, or end with "no live server holds keys").
#[test]
fn train_refuses_sizes_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    libsvm(dir.path().join("a.svm").as_path(), 3000, 7, None);
    libsvm(dir.path().join("b.svm").as_path(), 300, 8, None);
    let small = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--train",
            &p("a.svm"),
            "--test",
            &p("b.svm"),
            "--format",
            "libsvm",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let started = std::time::Instant::now();
    let e = fails(&["train", "--blocks", "4000000000"]);
    assert!(e.contains("--blocks must be in 1..="), "{e}");
    let args = small(&["--blocks", "1000000"]);
    let e = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        e.contains("more than the training data has features"),
        "{e}"
    );
    let e = fails(&["train", "--workers", "500"]);
    assert!(e.contains("--remote-workers"), "{e}");
    let e = fails(&["train", "--remote-workers", "2"]);
    assert!(e.contains("needs --manager"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}

/// Issue #16 (9): messages. A file of nothing but bad lines says why; an
/// OS error is said once; `--manager` after `kv pull` (as SECURITY.md and
/// the README write it) is understood.
#[test]
fn messages_say_why_once_and_kv_takes_manager_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.svm");
    std::fs::write(&bad, "+1 x:y\n-1 3:z\n").unwrap();
    let good = dir.path().join("good.svm");
    libsvm(&good, 200, 3, None);
    let (b, g) = (bad.to_str().unwrap(), good.to_str().unwrap());
    let e = fails(&["train", "--train", b, "--test", g, "--format", "libsvm"]);
    assert!(
        e.contains("2 malformed lines") && e.contains("bad.svm:1:") && e.contains("bad.svm:2:"),
        "{e}"
    );
    let e = fails(&[
        "train",
        "--train",
        g,
        "--test",
        "/nonexistent/t.svm",
        "--format",
        "libsvm",
    ]);
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    let e = fails(&["kv", "pull", "w", "--keys", "1", "--manager", "127.0.0.1:1"]);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    assert_eq!(e.matches("Connection refused").count(), 1, "{e}");
    // The other errors that carry an OS's (or a parser's) words say them
    // once too: a missing secret file, a damaged model.
    let e = fails(&[
        "--secret-file",
        "/nonexistent/secret",
        "kv",
        "pull",
        "w",
        "--keys",
        "1",
    ]);
    assert!(e.contains("/nonexistent/secret"), "{e}");
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("model.json"), "").unwrap();
    let m = model.to_str().unwrap();
    let e = fails(&["predict", "--model", m, "--data", g, "--format", "libsvm"]);
    assert!(e.contains("model.json"), "{e}");
    assert_eq!(e.matches("EOF while parsing").count(), 1, "{e}");
}

/// Issue #16 (9): a command that fails at once says one line, and nothing
/// after it: its in-process nodes and workers stopping are no news (they
/// warned of their listeners stopping, of links closing, of not going
/// idle). With the log at its default level, as a user runs it.
#[test]
fn a_failed_command_says_one_line_and_no_warning_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.svm");
    libsvm(&data, 50, 5, None);
    let d = data.to_str().unwrap();
    // Too many blocks: refused once the data is loaded, while the job's
    // workers and the local cluster run.
    let args = [
        "train", "--train", d, "--test", d, "--format", "libsvm", "--blocks", "100000",
    ];
    for i in 0..10 {
        let out = common::run_logged(&args, std::time::Duration::from_secs(60));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains("--blocks"),
            "run {i}: {err}"
        );
    }
}
