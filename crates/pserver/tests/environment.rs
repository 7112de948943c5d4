//! Roles configured from the environment, between processes on loopback:
//! `PSERVER_*` variables stand for flags (and flags win), and a cluster
//! whose processes are given only Kubeflow's `TF_CONFIG` (and `PSERVER_*`
//! variables), as a TFJob's replicas are, trains a job to the end.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::BIN;

/// A `pserver` process whose output lines (stdout and stderr) arrive on a
/// channel, so its pipes never fill; killed when dropped.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    /// Starts `pserver ARGS` with only `env` (and PATH) in its environment.
    fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pserver");
        let (tx, lines) = mpsc::channel();
        let tx2 = tx.clone();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Proc {
            name: name.to_string(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `what`, at most `limit`.
    fn wait_for(&mut self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "{}: no line with {what:?} within {limit:?}: {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit, at most `limit`: whether it
    /// succeeded, and every line it wrote.
    fn exit(&mut self, limit: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(300)) {
                    self.seen.push(l);
                }
                return (status.success(), self.seen.clone());
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {limit:?}: {:#?}",
                    self.name, self.seen
                );
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `pserver ARGS` with only `env` to completion (at most 30 s).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut p = Proc::start("pserver", args, env);
    let (ok, lines) = p.exit(Duration::from_secs(30));
    let (err, out): (Vec<_>, Vec<_>) = lines.into_iter().partition(|l| l.starts_with("stderr: "));
    (ok, out.join("\n"), err.join("\n"))
}

/// `n` loopback ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

#[test]
fn pserver_variables_stand_for_flags_and_flags_win() {
    // A manager and a server configured by variables alone.
    let mut m = Proc::start(
        "manager",
        &["manager"],
        &[("PSERVER_LISTEN", "127.0.0.1:0"), ("PSERVER_VNODES", "7")],
    );
    let line = m.wait_for("manager listening on", Duration::from_secs(20));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let mut s = Proc::start(
        "server",
        &["server"],
        &[
            ("PSERVER_MANAGER", &addr),
            ("PSERVER_LISTEN", "127.0.0.1:0"),
        ],
    );
    s.wait_for("listening on", Duration::from_secs(20));

    // A client: PSERVER_MANAGER names the cluster; the map shows the
    // server, and the manager's virtual nodes from PSERVER_VNODES.
    let (ok, out, err) = run_env(&["status", "--json"], &[("PSERVER_MANAGER", &addr)]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let servers = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "server")
        .count();
    assert_eq!(servers, 1, "{out}");
    assert_eq!(v["vnodes"], 7, "{out}");

    // The variable alone is used...
    let dead = "127.0.0.1:1";
    let (ok, _, err) = run_env(&["status"], &[("PSERVER_MANAGER", dead)]);
    assert!(!ok && err.contains(dead), "{err}");
    // ...and a flag beats it.
    let (ok, out, err) = run_env(
        &["status", "--manager", &addr],
        &[("PSERVER_MANAGER", dead)],
    );
    assert!(ok, "{err}");
    assert!(out.contains("server"), "{out}");

    // A bad value is refused up front, naming the flag it stands for.
    let (ok, _, err) = run_env(
        &["manager"],
        &[
            ("PSERVER_LISTEN", "127.0.0.1:0"),
            ("PSERVER_REPLICAS", "two"),
        ],
    );
    assert!(!ok, "{err}");
    assert!(err.contains("--replicas") && err.contains("two"), "{err}");
}

#[test]
fn help_shows_variables_but_not_where_secrets_are() {
    let (ok, out, err) = run_env(
        &["server", "--help"],
        &[
            ("PSERVER_MANAGER", "10.9.8.7:7070"),
            ("PSERVER_SECRET_FILE", "/run/secrets/the-cluster-secret"),
            ("PSERVER_TLS_KEY", "/run/secrets/node.key"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("PSERVER_MANAGER=10.9.8.7:7070"), "{out}");
    assert!(out.contains("PSERVER_SECRET_FILE"), "{out}");
    assert!(!out.contains("the-cluster-secret"), "{out}");
    assert!(!out.contains("node.key"), "{out}");
}

#[test]
fn a_bad_tf_config_is_one_clear_line() {
    let cases = [
        ("{\"cluster\": ", "TF_CONFIG is not valid"),
        (
            r#"{"cluster":{"ps":["127.0.0.1:1"]},"task":{"type":"ps","index":0}}"#,
            "no chief",
        ),
        (
            r#"{"cluster":{"chief":["127.0.0.1:1"],"ps":["127.0.0.1:2"]},"task":{"type":"ps","index":3}}"#,
            "task.index is 3",
        ),
        (
            r#"{"cluster":{"chief":["127.0.0.1:1"],"ps":["127.0.0.1:2"]},"task":{"type":"evaluator","index":0}}"#,
            "task.type is \"evaluator\"",
        ),
    ];
    for (tf, want) in cases {
        let (ok, _, err) = run_env(&["tfjob"], &[("TF_CONFIG", tf)]);
        assert!(!ok, "{tf}");
        assert!(err.contains(want), "{tf}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // Without TF_CONFIG, clap names the variable's flag.
    let (ok, _, err) = run_env(&["tfjob"], &[]);
    assert!(!ok && err.contains("--tf-config"), "{err}");
}

#[test]
fn a_tfjob_of_processes_given_only_tf_config_trains_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let ports = free_ports(5);
    let at = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let cluster = format!(
        r#"{{"chief":["{}"],"ps":["{}","{}"],"worker":["{}","{}"]}}"#,
        at(0),
        at(1),
        at(2),
        at(3),
        at(4)
    );
    let tf = |kind: &str, index: usize| {
        format!(
            r#"{{"cluster":{cluster},"task":{{"type":"{kind}","index":{index}}},"environment":"cloud"}}"#
        )
    };
    // What every replica's pod template would set.
    let secret = "a-test-cluster-secret-0123456789";
    let report_s = report.display().to_string();
    let common: Vec<(&str, &str)> = vec![
        ("PSERVER_SECRET", secret),
        ("PSERVER_LISTEN_HOST", "127.0.0.1"),
        ("PSERVER_EPOCHS", "3"),
        ("PSERVER_REPORT", &report_s),
        ("PSERVER_WAIT_WORKERS_SECS", "60"),
        ("PSERVER_WAIT_SERVERS_SECS", "60"),
        ("PSERVER_EXIT_AFTER_JOBS", "1"),
        ("PSERVER_JOB", "tfjob"),
    ];
    let start = |name: &str, kind: &str, index: usize| {
        let tf = tf(kind, index);
        let mut env = common.clone();
        env.push(("TF_CONFIG", &tf));
        Proc::start(name, &["tfjob"], &env)
    };
    // Started in an order a cluster engine might pick: workers first.
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| start(&format!("worker {i}"), "worker", i))
        .collect();
    let mut chief = start("chief", "chief", 0);
    let mut servers: Vec<Proc> = (0..2).map(|i| start(&format!("ps {i}"), "ps", i)).collect();

    let line = chief.wait_for("tfjob chief 0 of 1", Duration::from_secs(20));
    assert!(
        line.contains(&format!("manager --listen {}", at(0))),
        "{line}"
    );
    for (i, s) in servers.iter_mut().enumerate() {
        let l = s.wait_for("listening on", Duration::from_secs(30));
        assert!(l.contains(&at(1 + i)), "{l}");
    }
    chief.wait_for("--remote-workers 2", Duration::from_secs(60));
    let (ok, lines) = chief.exit(Duration::from_secs(180));
    assert!(ok, "the chief failed: {lines:#?}");
    // Each worker process served the one job, then left and exited 0.
    for w in &mut workers {
        let (ok, lines) = w.exit(Duration::from_secs(30));
        assert!(ok, "{}: {lines:#?}", w.name);
        assert!(
            lines.iter().any(|l| l.contains("leaves after 1 jobs")),
            "{lines:#?}"
        );
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        (v["servers"].as_u64(), v["workers"].as_u64()),
        (Some(2), Some(2)),
        "{v}"
    );
    let auc = v["test_auc"].as_f64().unwrap();
    assert!(auc >= 0.75, "AUC {auc}");
    // The servers serve on until the engine stops them (Drop kills them).
    for s in &mut servers {
        assert!(s.child.try_wait().unwrap().is_none(), "{} exited", s.name);
    }
}

#[test]
fn a_scheduler_waits_for_the_servers_it_is_told_of_and_says_how_many_came() {
    let mut m = Proc::start(
        "manager",
        &["manager"],
        &[("PSERVER_LISTEN", "127.0.0.1:0")],
    );
    let line = m.wait_for("manager listening on", Duration::from_secs(20));
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let started = Instant::now();
    let (ok, _, err) = run_env(
        &["train", "--wait-servers", "1", "--wait-servers-secs", "1"],
        &[("PSERVER_MANAGER", &addr)],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("0 of the 1 servers of --wait-servers are live after 1 s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // A local cluster has its servers from the start.
    let (ok, _, err) = run_env(&["train", "--wait-servers", "1"], &[]);
    assert!(
        !ok && err.contains("--wait-servers needs --manager"),
        "{err}"
    );
}
