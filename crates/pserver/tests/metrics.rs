//! `--metrics-listen` against real processes: a manager and servers
//! started as `pserver` processes, scraped over HTTP and parsed with a
//! Prometheus text parser (the `prometheus-parse` crate); `/healthz` and
//! `/readyz` through a server's start and a drain; the listener's answers
//! to bad requests and its bounds; and `pserver status --watch`'s frames.

mod common;

use common::{BIN, ok};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started `pserver` process, killed when dropped.
struct Proc {
    child: Child,
    /// The address after `metrics on`, if it printed one.
    metrics: Option<String>,
    /// The line of its role (`manager listening on ...`, `server N ...`).
    line: String,
    /// Its later lines.
    rest: std::sync::mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The last word of its role line: the address it serves on.
    fn addr(&self) -> String {
        self.line.rsplit(' ').next().unwrap().to_string()
    }

    /// A server's id, from `server N listening on ...`.
    fn id(&self) -> String {
        self.line.split(' ').nth(1).unwrap().to_string()
    }

    /// Waits for its next line of output and takes it as its role line.
    fn read_line(&mut self) {
        self.line = self
            .rest
            .recv_timeout(Duration::from_secs(60))
            .expect("another line of output");
    }
}

/// Starts `pserver ARGS`; waits for `lines` lines of output (the metrics
/// line first when asked for, then the role's), and keeps reading the
/// rest so the process never writes into a closed pipe.
fn start(args: &[&str], lines: usize) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pserver");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Nobody listens any more: keep draining.
                continue;
            }
        }
    });
    let mut metrics = None;
    let mut line = String::new();
    for _ in 0..lines {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("pserver {args:?} printed too little"));
        match l.strip_prefix("metrics on ") {
            Some(a) => metrics = Some(a.to_string()),
            None => line = l,
        }
    }
    Proc {
        child,
        metrics,
        line,
        rest: rx,
    }
}

/// Sends `request` to `addr` as it is and returns the status and body.
fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `GET path` on `addr`.
fn get(addr: &str, path: &str) -> (u16, String) {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
}

/// The scrape of `addr`, parsed.
fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("the scrape does not parse: {e}\n{body}"))
}

/// The sum of the samples named `name` whose labels include `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is {other:?}"),
        })
        .sum()
}

/// Waits until `f` holds, at most `limit`.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A manager and `servers` servers, each with a metrics listener.
fn cluster(servers: usize, extra: &[&str]) -> (Proc, Vec<Proc>) {
    let mut args = vec![
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let m = start(&args, 2);
    let addr = m.addr();
    let s = (0..servers)
        .map(|_| {
            start(
                &[
                    "server",
                    "--manager",
                    &addr,
                    "--metrics-listen",
                    "127.0.0.1:0",
                ],
                2,
            )
        })
        .collect();
    (m, s)
}

#[test]
fn server_counters_move_by_exactly_the_pushes_made() {
    let (m, servers) = cluster(2, &[]);
    let ma = m.addr();
    ok(&[
        "kv",
        "create-table",
        "w",
        "--dim",
        "1",
        "--updater",
        "add",
        "--manager",
        &ma,
    ]);
    let scrapes = || -> Vec<prometheus_parse::Scrape> {
        servers
            .iter()
            .map(|s| scrape(s.metrics.as_deref().unwrap()))
            .collect()
    };
    let total = |ss: &[prometheus_parse::Scrape], name: &str, labels: &[(&str, &str)]| -> f64 {
        ss.iter().map(|s| value(s, name, labels)).sum()
    };
    let push = [("table", "w"), ("op", "push")];
    let before = scrapes();
    // N pushes of K keys; a push of a key list goes to every partition
    // (empty slices too), so each is one request per partition.
    let (n, k) = (5u64, 7u64);
    let keys: Vec<String> = (0..k).map(|i| (i * 1_000_003).to_string()).collect();
    let vals: Vec<String> = (0..k).map(|_| "1".to_string()).collect();
    for _ in 0..n {
        ok(&[
            "kv",
            "push",
            "w",
            "--keys",
            &keys.join(","),
            "--values",
            &vals.join(","),
            "--manager",
            &ma,
        ]);
    }
    let after = scrapes();
    let ms = scrape(m.metrics.as_deref().unwrap());
    let parts = value(&ms, "pserver_manager_partitions", &[]);
    assert!(parts >= 2.0, "{parts}");
    let delta = |name: &str, labels: &[(&str, &str)]| {
        total(&after, name, labels) - total(&before, name, labels)
    };
    assert_eq!(
        delta("pserver_server_requests_total", &push),
        n as f64 * parts
    );
    assert_eq!(
        delta("pserver_server_request_keys_total", &push),
        (n * k) as f64
    );
    // Each request: a 4-byte length prefix, the 80-byte header, 8 bytes
    // per key and 4 per value.
    assert_eq!(
        delta("pserver_server_request_bytes_total", &push),
        n as f64 * parts * 84.0 + (n * k * 12) as f64
    );
    // Every one answered, and timed once.
    assert_eq!(
        delta(
            "pserver_server_request_duration_seconds_count",
            &[("op", "push")]
        ),
        n as f64 * parts
    );
    // Nothing was pulled; the keys are stored once each.
    assert_eq!(
        delta("pserver_server_requests_total", &[("op", "pull")]),
        0.0
    );
    assert_eq!(
        total(&after, "pserver_server_stored_keys", &[("table", "w")]),
        k as f64
    );
    // A frame that is not one is refused (and its connection closed),
    // counted by its code.
    let mut bad = TcpStream::connect(servers[0].addr()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    bad.write_all(&100u32.to_le_bytes()).unwrap();
    bad.write_all(&[0xab; 100]).unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    let malformed = [("code", "malformed")];
    let refused = scrape(servers[0].metrics.as_deref().unwrap());
    assert_eq!(
        value(&refused, "pserver_server_errors_total", &malformed)
            - value(&before[0], "pserver_server_errors_total", &malformed),
        1.0
    );
    // The manager's side: the map, its nodes and their leases.
    assert_eq!(
        value(
            &ms,
            "pserver_manager_nodes",
            &[("role", "server"), ("state", "alive")]
        ),
        2.0
    );
    assert_eq!(value(&ms, "pserver_manager_tables", &[]), 1.0);
    for s in &servers {
        let age = value(
            &ms,
            "pserver_manager_lease_age_seconds",
            &[("node", &s.id())],
        );
        assert!((0.0..2.0).contains(&age), "{age}");
    }
    assert!(value(&ms, "pserver_manager_map_epoch", &[]) >= 2.0);
}

/// A port nothing listens on (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn readiness_follows_a_server_from_before_its_map_through_a_drain() {
    let port = free_port();
    let manager = format!("127.0.0.1:{port}");
    // The server starts first and waits for its manager.
    let mut s1 = start(
        &[
            "server",
            "--manager",
            &manager,
            "--wait-manager-secs",
            "60",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        1,
    );
    let m1 = s1.metrics.clone().unwrap();
    assert_eq!(get(&m1, "/healthz"), (200, "ok\n".into()));
    let (status, why) = get(&m1, "/readyz");
    assert_eq!(status, 503);
    assert!(why.contains("not registered with the manager"), "{why}");
    assert_eq!(why.trim().lines().count(), 1, "{why}");
    // A long lease, so a server stopped for a second is not declared dead.
    let m = start(
        &[
            "manager",
            "--listen",
            &manager,
            "--lease-ms",
            "20000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    assert_eq!(get(m.metrics.as_deref().unwrap(), "/readyz").0, 200);
    eventually("the server ready", Duration::from_secs(30), || {
        get(&m1, "/readyz").0 == 200
    });
    s1.read_line();
    assert!(s1.line.starts_with("server "), "{}", s1.line);
    let s2 = start(
        &[
            "server",
            "--manager",
            &manager,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    let m2 = s2.metrics.clone().unwrap();
    ok(&[
        "kv",
        "create-table",
        "w",
        "--dim",
        "1",
        "--updater",
        "add",
        "--manager",
        &manager,
    ]);
    ok(&[
        "kv",
        "push",
        "w",
        "--keys",
        "1,2,3",
        "--values",
        "1,1,1",
        "--manager",
        &manager,
    ]);
    eventually("both servers ready", Duration::from_secs(30), || {
        get(&m1, "/readyz").0 == 200 && get(&m2, "/readyz").0 == 200
    });
    // Drain server 1 while server 2, which must take its ranges, is
    // stopped: the hand-off cannot finish, so server 1 stays draining.
    let pid2 = s2.child.id().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid2])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let mut drain = Command::new(BIN)
        .args(["drain", &s1.id(), "--manager", &manager])
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut said = String::new();
    eventually("server 1 draining", Duration::from_secs(10), || {
        let (status, why) = get(&m1, "/readyz");
        said = why;
        status == 503 && said.contains("draining")
    });
    assert_eq!(get(&m1, "/healthz").0, 200, "alive while draining");
    signal("-CONT");
    let start_wait = Instant::now();
    while drain.try_wait().unwrap().is_none() {
        assert!(
            start_wait.elapsed() < Duration::from_secs(60),
            "the drain did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(drain.wait().unwrap().success());
    assert_eq!(get(&m2, "/readyz").0, 200);
}

#[test]
fn the_listener_refuses_bad_requests_and_keeps_its_bounds() {
    let m = start(
        &[
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    let a = m.metrics.clone().unwrap();
    let (status, body) = raw(&a, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405, "{body}");
    assert_eq!(raw(&a, b"HEAD /readyz HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(get(&a, "/").0, 404);
    assert_eq!(get(&a, "/metrics/extra").0, 404);
    // A TLS hello, and bytes that are no request line.
    assert_eq!(
        raw(&a, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").0,
        400
    );
    assert_eq!(raw(&a, b"GET\r\n\r\n").0, 400);
    assert_eq!(raw(&a, b"GET /metrics HTTP/2.0\r\n\r\n").0, 400);
    // A head over 8 KiB.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9 << 10)
    );
    assert_eq!(raw(&a, big.as_bytes()).0, 431);
    // A silent connection is closed unanswered within the 5 s timeout.
    let mut silent = TcpStream::connect(&a).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(silent.read(&mut buf).unwrap(), 0);
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // 64 connections at once; the 65th is refused at once, not queued.
    let held: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(&a).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut extra = TcpStream::connect(&a).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("busy"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(held);
    eventually("the listener free again", Duration::from_secs(10), || {
        get(&a, "/metrics").0 == 200
    });
    // Still whole after all of it.
    assert!(value(&scrape(&a), "pserver_manager_map_epoch", &[]) >= 0.0);
}

#[test]
fn a_worker_process_is_not_ready_until_it_has_a_job() {
    let (m, _servers) = cluster(1, &[]);
    let w = start(
        &[
            "worker",
            "--manager",
            &m.addr(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        2,
    );
    let a = w.metrics.clone().unwrap();
    assert_eq!(get(&a, "/healthz").0, 200);
    let (status, why) = get(&a, "/readyz");
    assert_eq!(status, 503);
    assert!(why.contains("idle"), "{why}");
    let s = scrape(&a);
    assert_eq!(value(&s, "pserver_job_iterations_total", &[]), 0.0);
    let ms = scrape(m.metrics.as_deref().unwrap());
    assert_eq!(value(&ms, "pserver_manager_workers_idle", &[]), 1.0);
}

#[test]
fn status_watch_prints_frames_with_rates_and_replication() {
    let (m, _servers) = cluster(2, &["--replicas", "1"]);
    let ma = m.addr();
    ok(&[
        "kv",
        "create-table",
        "w",
        "--dim",
        "1",
        "--updater",
        "add",
        "--manager",
        &ma,
    ]);
    ok(&[
        "kv",
        "push",
        "w",
        "--keys",
        "1,2,3",
        "--values",
        "1,1,1",
        "--manager",
        &ma,
    ]);
    let out = ok(&[
        "status",
        "--watch",
        "--frames",
        "3",
        "--interval-ms",
        "200",
        "--manager",
        &ma,
    ]);
    let frames: Vec<&str> = out.split("--- frame ").skip(1).collect();
    assert_eq!(frames.len(), 3, "{out}");
    assert!(frames[0].contains("rates from the next frame"), "{out}");
    assert!(frames[2].contains("rates over"), "{out}");
    // The table's row: five rates, numbers from the second frame on.
    let row = frames[2]
        .lines()
        .find(|l| l.starts_with("w "))
        .unwrap_or_else(|| panic!("no row for w: {out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols.len(), 6, "{row}");
    for c in &cols[1..] {
        assert!(c.parse::<f64>().is_ok(), "{row}");
    }
    // Two servers each replicating to the other: both links shown.
    assert!(frames[2].contains("replication (queued"), "{out}");
    assert_eq!(
        frames[2].lines().filter(|l| l.contains(" -> ")).count(),
        2,
        "{out}"
    );
    // Every server's row shows the keys it stores (3 keys, each on a
    // primary and a replica).
    let stored: u64 = frames[2]
        .lines()
        .filter(|l| l.contains(" server "))
        .map(|l| l.split_whitespace().nth(6).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(stored, 6, "{out}");
    assert!(frames[2].contains("jobs: none"), "{out}");
    // Flags that make no sense are refused in one line.
    let e = common::run(&["status", "--frames", "2", "--manager", &ma]);
    assert!(!e.status.success());
}
