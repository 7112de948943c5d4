//! Real network faults between processes. One `pserver server` runs in a
//! Linux network namespace of its own, joined to the host by a veth pair
//! (host side 10.213.7.1, namespace side 10.213.7.2, one /30 made here and
//! deleted at the end, pass or fail); the manager and two more servers
//! listen on the host side. Clients in this process push +1 to keys spread
//! over the ring, many pushes in flight per client, each at its own clock.
//!
//! - `a_server_cut_off_past_its_lease_...`: the link is cut (the namespace
//!   end set down, a blackhole route on the host) for three leases under
//!   load, then healed. The cut-off server must be declared dead, its
//!   ranges served by their replicas, nothing it does after that
//!   acknowledged, nothing it answers for ranges it lost, and it must exit
//!   once it hears it is dead.
//! - `pushes_through_slow_lossy_links_...`: every client connection to a
//!   server, and the namespaced server's link to the manager, pass through
//!   `pserver relay` (delay, jitter, retransmission-like stalls, resets).
//!
//! Both end by pulling every key and comparing it with the acknowledged
//! pushes: exactly equal (a push that failed may or may not have been
//! applied, and is allowed for). Traffic goes only to loopback and to the
//! two addresses of the veth pair. Needs root and iproute2: without them
//! the tests say so and pass, unless `CI` is set, where they fail.

use pserver_core::{NodeState, UpdaterSpec};
use pserver_node::auth::{Secret, authenticated};
use pserver_node::conn::Peer;
use pserver_node::net::{BoxStream, IoFuture, Listener, Net, Transport};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use pserver_wire::{Control, Frame, Header, Kind, Limits};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::BIN;

/// The /30 of the veth pair.
const HOST_IP: &str = "10.213.7.1";
const NS_IP: &str = "10.213.7.2";

/// Both tests use the same /30: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `ip ARGS`; an error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`' stdout, or empty.
fn ip_out(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A namespace and the veth pair into it; deleted on drop.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    cut: bool,
}

impl Netns {
    /// Makes them, after removing what a killed earlier run left behind.
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        remove_leftovers();
        let ns = Netns {
            name: format!("psrv-test-{pid}"),
            host_if: format!("psv{pid}h"),
            ns_if: format!("psv{pid}n"),
            cut: false,
        };
        ip(&["netns", "add", &ns.name])?;
        let n = &ns.name;
        let (h, i) = (ns.host_if.as_str(), ns.ns_if.as_str());
        ip(&[
            "link", "add", h, "type", "veth", "peer", "name", i, "netns", n,
        ])?;
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", h])?;
        ip(&["link", "set", h, "up"])?;
        ip(&["-n", n, "addr", "add", &format!("{NS_IP}/30"), "dev", i])?;
        ip(&["-n", n, "link", "set", i, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Cuts the link. The host first routes the namespace's address into a
    /// blackhole (so nothing for it can leave by another interface), then
    /// the namespace end goes down (the namespace has no other route).
    fn cut(&mut self) -> Result<(), String> {
        ip(&["route", "add", "blackhole", &format!("{NS_IP}/32")])?;
        self.cut = true;
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "down"])
    }

    /// Heals it, in the reverse order.
    fn heal(&mut self) -> Result<(), String> {
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"])?;
        ip(&["route", "del", "blackhole", &format!("{NS_IP}/32")])?;
        self.cut = false;
        Ok(())
    }

    /// `ip netns exec NS` before a command.
    fn exec(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.cut {
            let _ = ip(&["route", "del", "blackhole", &format!("{NS_IP}/32")]);
        }
        // Deleting one end deletes both; the namespace goes once its
        // processes have (the test kills them before this runs).
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Removes namespaces and veths named by this test for processes that no
/// longer run, and a blackhole route of ours left by one.
fn remove_leftovers() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    for line in ip_out(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(pid) = name.strip_prefix("psrv-test-") {
            if !alive(pid) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    for line in ip_out(&["-o", "link", "show"]).lines() {
        let Some(name) = line.split(':').nth(1).map(str::trim) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or("");
        if let Some(pid) = name.strip_prefix("psv").and_then(|r| r.strip_suffix('h')) {
            if !alive(pid) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
    if ip_out(&["route", "show", "type", "blackhole"]).contains(NS_IP) {
        let _ = ip(&["route", "del", "blackhole", &format!("{NS_IP}/32")]);
    }
}

/// The namespace, or `None` where it cannot be made (not root, no `ip`):
/// then the test prints why and returns, or fails under `CI`.
fn netns_or_skip(test: &str) -> Option<Netns> {
    match Netns::create() {
        Ok(ns) => Some(ns),
        Err(e) => {
            let msg = format!("{test}: cannot run without network namespaces ({e})");
            if std::env::var_os("CI").is_some() {
                panic!("{msg}; CI runs as root with iproute2, so this must work");
            }
            eprintln!("{msg}; skipped");
            None
        }
    }
}

/// A started process, its stdout lines collected; killed on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
}

impl Proc {
    /// Starts `program ARGS` (stderr into `log`, at `RUST_LOG=info`) and
    /// waits up to 10 s for its first line.
    fn start(program: &str, args: &[String], log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).expect("create the log file");
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start the process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let p = Proc { child, lines, log };
        let start = Instant::now();
        while p.lines.lock().unwrap().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{program} {args:?} printed nothing in 10 s: {}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    fn first(&self) -> String {
        self.lines.lock().unwrap()[0].clone()
    }

    /// The address at the end of the first line.
    fn addr(&self) -> String {
        self.first().rsplit(' ').next().unwrap().to_string()
    }

    /// The node id of a server (`server ID listening on ADDR`).
    fn server_id(&self) -> u32 {
        self.first().split(' ').nth(1).unwrap().parse().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to 5 s for the exit.
    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the reader thread take the last line.
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pserver ARGS` with the cluster secret.
fn pserver(secret: &Path, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.push("--secret-file".into());
    v.push(secret.display().to_string());
    v
}

/// Writes a fresh cluster secret into `dir`.
fn write_secret(dir: &Path) -> PathBuf {
    let path = dir.join("secret");
    std::fs::write(&path, Secret::random_text().unwrap()).unwrap();
    path
}

/// TCP that dials some addresses at others: clients in this process reach
/// servers through relays while the map names the servers themselves.
struct Redirect(Arc<Mutex<HashMap<String, String>>>);

impl Transport for Redirect {
    fn connect(&self, addr: &str) -> IoFuture<'static, BoxStream> {
        let to = self
            .0
            .lock()
            .unwrap()
            .get(addr)
            .cloned()
            .unwrap_or_else(|| addr.to_string());
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(&to).await?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> IoFuture<'static, (Box<dyn Listener>, SocketAddr)> {
        let net = Net::tcp();
        let addr = addr.to_string();
        Box::pin(async move { net.bind(&addr).await })
    }
}

/// Keys spread over the ring.
fn ring_keys(n: u64) -> Vec<u64> {
    let step = u64::MAX / (n + 1);
    (1..=n).map(|i| i * step).collect()
}

/// What one client's pushes came to, per key index.
#[derive(Default)]
struct Tally {
    acked: Vec<u64>,
    failed: Vec<u64>,
    pushes_acked: u64,
    pushes_failed: u64,
    errors: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        if self.acked.is_empty() {
            self.acked = vec![0; other.acked.len()];
            self.failed = vec![0; other.failed.len()];
        }
        for i in 0..other.acked.len() {
            self.acked[i] += other.acked[i];
            self.failed[i] += other.failed[i];
        }
        self.pushes_acked += other.pushes_acked;
        self.pushes_failed += other.pushes_failed;
        for e in other.errors {
            if self.errors.len() < 8 {
                self.errors.push(e);
            }
        }
    }
}

/// Most pushes one client makes, whatever the time.
const MAX_PUSHES: u64 = 50_000;
/// Keys per push: a window of the key set, so keys get different counts.
const WINDOW: usize = 12;

/// Pushes +1 to a moving window of `keys`, `depth` pushes in flight, each
/// at the next clock, until `stop`; counts acknowledgements per key.
async fn pipelined_pushes(
    w: Worker,
    keys: Arc<Vec<u64>>,
    depth: usize,
    offset: usize,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
) -> Tally {
    let n = keys.len();
    let mut t = Tally {
        acked: vec![0; n],
        failed: vec![0; n],
        ..Tally::default()
    };
    let mut inflight = tokio::task::JoinSet::new();
    let mut made = 0u64;
    loop {
        while !stop.load(Ordering::Relaxed) && inflight.len() < depth && made < MAX_PUSHES {
            let first = (offset + made as usize * 5) % n;
            let mut idx: Vec<usize> = (0..WINDOW).map(|j| (first + j) % n).collect();
            idx.sort_unstable();
            let ks: Vec<u64> = idx.iter().map(|&i| keys[i]).collect();
            w.advance();
            let h = w.push("n", ks, vec![1.0; WINDOW]);
            inflight.spawn(async move { (idx, h.await) });
            made += 1;
        }
        let Some(done) = inflight.join_next().await else {
            break;
        };
        let (idx, result) = done.expect("a push task");
        match result {
            Ok(_) => {
                t.pushes_acked += 1;
                acks.fetch_add(1, Ordering::Relaxed);
                for i in idx {
                    t.acked[i] += 1;
                }
            }
            Err(e) => {
                t.pushes_failed += 1;
                if t.errors.len() < 8 {
                    t.errors.push(e.to_string());
                }
                for i in idx {
                    t.failed[i] += 1;
                }
            }
        }
    }
    t
}

/// Compares pulled values with the tally: a key must hold at least its
/// acknowledged pushes and at most those plus its failed ones.
fn check_counts(got: &[f32], t: &Tally) -> (u64, u64, Vec<String>) {
    let (mut lost, mut doubled) = (0u64, 0u64);
    let mut wrong = Vec::new();
    for (i, ((&v, &acked), &failed)) in got.iter().zip(&t.acked).zip(&t.failed).enumerate() {
        let v = v as u64;
        lost += acked.saturating_sub(v);
        doubled += v.saturating_sub(acked + failed);
        if (v < acked || v > acked + failed) && wrong.len() < 6 {
            wrong.push(format!(
                "key #{i}: value {v}, acknowledged {acked}, failed {failed}"
            ));
        }
    }
    (lost, doubled, wrong)
}

/// What a server said to a pull sent with an old map.
#[derive(Debug)]
enum Probe {
    /// It answered with values: it served a range it no longer holds.
    Answered(Vec<f32>),
    /// It sent its map: a newer epoch than the one asked with.
    Redirect(u64, bool),
    /// It refused.
    Refused(String),
    /// No connection, or no answer within a second.
    Unreachable,
}

/// A pull to send straight to one server.
struct Ask {
    /// The registered client it comes from.
    sender: u32,
    table: u32,
    range: pserver_core::KeyRange,
    key: u64,
    /// The server asked.
    server: u32,
}

/// Sends the pull at `epoch` straight to `addr`.
async fn probe(net: &Net, addr: &str, epoch: u64, ask: &Ask) -> Probe {
    let Ask {
        sender,
        table,
        range,
        key,
        server: me,
    } = *ask;
    let attempt = async {
        let (peer, _notices) = Peer::connect_via(net, addr, Limits::default()).await.ok()?;
        let mut h = Header::new(Kind::Pull);
        h.sender = sender;
        h.table = table;
        h.epoch = epoch;
        h.range = range;
        let mut f = Frame::new(h);
        f.keys = vec![key];
        let reply = peer.request(f).await.ok()?;
        peer.close();
        Some(match reply.header.kind {
            Kind::Reply => Probe::Answered(reply.vals.to_vec()),
            Kind::Redirect => match reply.control_msg() {
                Ok(Control::Map(m)) => Probe::Redirect(
                    m.epoch,
                    m.node(me).is_none_or(|n| n.state == NodeState::Dead),
                ),
                other => Probe::Refused(format!("redirect without a map: {other:?}")),
            },
            _ => Probe::Refused(format!("{:?}", reply.control_msg())),
        })
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(Probe::Unreachable)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Distinct lines of a log (timestamps cut off) that say one of `words`,
/// with how often each came, at most `max`.
fn log_lines(text: &str, words: &[&str], max: usize) -> Vec<String> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for l in text.lines().filter(|l| words.iter().any(|w| l.contains(w))) {
        let body = l.split_once(' ').map_or(l, |(_, rest)| rest).trim();
        let body: String = body.chars().take(200).collect();
        if let Some(i) = seen.iter().position(|(b, _)| *b == body) {
            seen[i].1 += 1;
        } else if seen.len() < max {
            seen.push((body, 1));
        }
    }
    seen.into_iter()
        .map(|(b, n)| if n > 1 { format!("{b} (x{n})") } else { b })
        .collect()
}

#[test]
fn a_server_cut_off_past_its_lease_is_replaced_refused_and_leaves() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut ns) = netns_or_skip("netns cut") else {
        return;
    };
    let test_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path());
    let lease_ms = 1000u64;
    let lease = lease_ms.to_string();
    let manager = Proc::start(
        BIN,
        &pserver(
            &secret,
            &[
                "manager",
                "--listen",
                &format!("{HOST_IP}:0"),
                "--replicas",
                "1",
                "--lease-ms",
                &lease,
            ],
        ),
        dir.path().join("manager.log"),
    );
    let maddr = manager.addr();
    let mut host = Vec::new();
    for i in 0..2 {
        host.push(Proc::start(
            BIN,
            &pserver(
                &secret,
                &[
                    "server",
                    "--manager",
                    &maddr,
                    "--listen",
                    &format!("{HOST_IP}:0"),
                ],
            ),
            dir.path().join(format!("host{i}.log")),
        ));
    }
    let mut args = ns.exec();
    args.push(BIN.into());
    args.extend(pserver(
        &secret,
        &[
            "server",
            "--manager",
            &maddr,
            "--listen",
            &format!("{NS_IP}:0"),
        ],
    ));
    let mut cut_off = Proc::start("ip", &args, dir.path().join("cutoff.log"));
    let victim = cut_off.server_id();
    let victim_addr = cut_off.addr();
    assert!(victim_addr.starts_with(NS_IP), "{victim_addr}");

    let net = authenticated(Net::tcp(), Secret::from_file(&secret).unwrap());
    let rt = runtime();
    let report = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(55), async {
            let client = || async {
                let mut cfg = WorkerConfig::client(maddr.clone());
                cfg.net = net.clone();
                cfg.timeout = Duration::from_secs(20);
                Worker::connect(cfg).await.unwrap()
            };
            let setup = client().await;
            setup
                .create_table("n", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            setup
                .create_table("p", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let table = setup.table("n").await.unwrap().id;
            let keys = Arc::new(ring_keys(96));
            let map = setup.refresh().await.unwrap();
            let alive = map
                .nodes
                .iter()
                .filter(|n| n.state == NodeState::Alive && n.role == pserver_core::Role::Server)
                .count();
            assert_eq!(alive, 3, "{:?}", map.nodes);
            let lost: Vec<_> = map
                .partitions
                .iter()
                .filter(|p| p.primary == victim)
                .cloned()
                .collect();
            assert!(!lost.is_empty(), "the namespaced server holds no range");
            let probe_key = keys
                .iter()
                .copied()
                .find(|k| lost.iter().any(|p| p.range.contains(*k)))
                .unwrap_or(lost[0].range.begin);
            let probe_range = lost
                .iter()
                .find(|p| p.range.contains(probe_key))
                .unwrap()
                .range;

            let stop = Arc::new(AtomicBool::new(false));
            let acks = Arc::new(AtomicU64::new(0));
            let mut loads = Vec::new();
            for i in 0..3 {
                let w = client().await;
                loads.push(tokio::spawn(pipelined_pushes(
                    w,
                    keys.clone(),
                    16,
                    i * 31,
                    stop.clone(),
                    acks.clone(),
                )));
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let before_cut = acks.load(Ordering::Relaxed);
            let epoch_at_cut = setup.refresh().await.unwrap().epoch;

            // Cut. A sequential client pushes to a key the cut-off server
            // is primary of, to time the first acknowledgement after it.
            ns.cut().unwrap();
            let cut_at = Instant::now();
            let prober = client().await;
            let probe_acks = Arc::new(AtomicU64::new(0));
            let first_ack = {
                let (stop, probe_acks) = (stop.clone(), probe_acks.clone());
                tokio::spawn(async move {
                    let mut first = None;
                    let mut failed = 0u64;
                    for _ in 0..2000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        prober.advance();
                        match prober.push("p", vec![probe_key], vec![1.0]).await {
                            Ok(_) => {
                                probe_acks.fetch_add(1, Ordering::Relaxed);
                                first.get_or_insert(cut_at.elapsed());
                            }
                            Err(_) => failed += 1,
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (first, failed)
                })
            };
            let mut declared = None;
            while cut_at.elapsed() < Duration::from_millis(3 * lease_ms) {
                if declared.is_none() {
                    let m = setup.refresh().await.unwrap();
                    if m.node(victim).is_some_and(|n| n.state == NodeState::Dead) {
                        declared = Some((cut_at.elapsed(), m.epoch));
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let during_cut = acks.load(Ordering::Relaxed) - before_cut;
            let map_after = setup.refresh().await.unwrap();
            let still_primary = map_after
                .partitions
                .iter()
                .filter(|p| p.primary == victim || p.replicas.contains(&victim))
                .count();

            // Heal, then ask the cut-off server, as a client with the map it
            // last had would, for a key of a range it lost.
            ns.heal().unwrap();
            let healed_at = Instant::now();
            let mut probes = Vec::new();
            let mut exited = None;
            let mut epoch = epoch_at_cut;
            let mut truth_then = None;
            let ask = Ask {
                sender: setup.id(),
                table,
                range: probe_range,
                key: probe_key,
                server: victim,
            };
            while healed_at.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(status)) = cut_off.child.try_wait() {
                    exited = Some((healed_at.elapsed(), status));
                    break;
                }
                let p = probe(&net, &victim_addr, epoch, &ask).await;
                if let Probe::Redirect(e, _) = &p {
                    epoch = *e;
                }
                if matches!(p, Probe::Answered(_)) && truth_then.is_none() {
                    // What the key holds on its live primary meanwhile.
                    truth_then = setup.pull("n", vec![probe_key]).await.ok();
                }
                if probes.len() < 400 {
                    probes.push((healed_at.elapsed(), p));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Load goes on a moment after the server left, then stops.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            let mut tally = Tally::default();
            for l in loads {
                tally.add(l.await.unwrap());
            }
            let (first_probe_ack, probe_failed) = first_ack.await.unwrap();
            let got = setup.pull("n", keys.to_vec()).await.unwrap();
            let probe_value = setup.pull("p", vec![probe_key]).await.unwrap()[0];
            let final_map = setup.refresh().await.unwrap();
            (
                tally,
                got,
                keys,
                declared,
                during_cut,
                still_primary,
                probes,
                exited,
                first_probe_ack,
                probe_failed,
                probe_acks.load(Ordering::Relaxed),
                probe_value,
                final_map,
                lost.len(),
                truth_then,
            )
        })
        .await
        .expect("the test finishes in 55 s")
    });
    let (
        tally,
        got,
        keys,
        declared,
        during_cut,
        still_primary,
        probes,
        exited,
        first_probe_ack,
        probe_failed,
        probe_acks,
        probe_value,
        final_map,
        lost_ranges,
        truth_then,
    ) = report;
    assert_eq!(got.len(), keys.len(), "one value per key");
    let (lost, doubled, wrong) = check_counts(&got, &tally);
    let answered: Vec<(Duration, Vec<f32>)> = probes
        .iter()
        .filter_map(|(t, p)| match p {
            Probe::Answered(v) => Some((*t, v.clone())),
            _ => None,
        })
        .collect();
    let first_refusal = probes.iter().find_map(|(t, p)| match p {
        Probe::Refused(m) => Some((*t, m.clone())),
        _ => None,
    });
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    for (_, p) in &probes {
        let k = match p {
            Probe::Answered(_) => "answered",
            Probe::Redirect(_, true) => "redirect (map says it is dead)",
            Probe::Redirect(_, false) => "redirect (map says it is alive)",
            Probe::Refused(_) => "refused",
            Probe::Unreachable => "unreachable",
        };
        *kinds.entry(k).or_default() += 1;
    }
    let cut_log = cut_off.log_text();
    let mut host_log = String::new();
    for h in &host {
        host_log.push_str(&h.log_text());
    }
    println!(
        "netns cut: lease {lease_ms} ms, cut for {} ms",
        3 * lease_ms
    );
    println!(
        "  pushes acknowledged {}, failed {}; acknowledged while cut {during_cut}",
        tally.pushes_acked, tally.pushes_failed
    );
    println!("  keys: {lost} acknowledged increments lost, {doubled} doubled; {wrong:?}");
    println!("  errors: {:?}", tally.errors);
    println!("  server {victim} held {lost_ranges} primary ranges; declared dead {declared:?}");
    println!(
        "  first push to its range acknowledged {first_probe_ack:?} after the cut \
         ({probe_acks} acknowledged, {probe_failed} failed, value {probe_value})"
    );
    println!("  ranges still naming it after the lease: {still_primary}");
    println!("  after heal: exited {exited:?}; probes {kinds:?}");
    if let Some((t, v)) = answered.first() {
        println!(
            "  first stale answer {t:?} after heal: values {v:?}; the live primary had {truth_then:?}"
        );
    }
    if let Some((t, m)) = &first_refusal {
        println!("  first refusal {t:?} after heal: {m}");
    }
    println!(
        "  its log: {:?}",
        log_lines(
            &cut_log,
            &[
                "map", "manager", "stopping", "NotOwner", "refus", "WARN", "ERROR"
            ],
            12
        )
    );
    println!(
        "  other servers' logs: {:?}",
        log_lines(
            &host_log,
            &["NotOwner", "refus", "dead", "WARN", "ERROR"],
            12
        )
    );
    println!("  whole test {:?}", test_start.elapsed());

    let mut failures = Vec::new();
    if tally.pushes_acked == 0 {
        failures.push("no push was acknowledged".to_string());
    }
    if lost > 0 || doubled > 0 {
        failures.push(format!(
            "{lost} acknowledged increments lost, {doubled} doubled: {wrong:?}"
        ));
    }
    if probe_value as u64 != probe_acks {
        failures.push(format!(
            "probe key holds {probe_value}, {probe_acks} pushes acknowledged ({probe_failed} failed)"
        ));
    }
    match declared {
        Some((t, _)) if t <= Duration::from_millis(lease_ms) => {}
        other => failures.push(format!("not declared dead within its lease: {other:?}")),
    }
    if still_primary > 0 {
        failures.push(format!(
            "{still_primary} ranges still name the cut-off server"
        ));
    }
    if first_probe_ack.is_none_or(|t| t > Duration::from_millis(3 * lease_ms)) {
        failures.push(format!(
            "its range took no push while it was cut off: {first_probe_ack:?}"
        ));
    }
    if !answered.is_empty() {
        failures.push(format!(
            "after heal it answered {} pulls for a range it lost (first {:?} after heal: values {:?})",
            answered.len(),
            answered[0].0,
            answered[0].1
        ));
    }
    match &exited {
        Some((t, _)) if *t <= Duration::from_secs(10) => {}
        other => failures.push(format!("did not exit within 10 s of the heal: {other:?}")),
    }
    if final_map
        .node(victim)
        .is_none_or(|n| n.state != NodeState::Dead)
        || final_map
            .partitions
            .iter()
            .any(|p| p.primary == victim || p.replicas.contains(&victim))
    {
        failures.push(format!(
            "the final map still has it: {:?}",
            final_map.node(victim)
        ));
    }
    // What a server's forwarder to the cut-off server gave up on is said
    // in a line, not one line per batch of its queue (issue #16, 9: 32
    // identical warnings).
    let target = format!("target={victim}");
    for h in &host {
        let lines = h
            .log_text()
            .lines()
            .filter(|l| l.contains("replica unreachable") && l.contains(&target))
            .count();
        if lines > 1 {
            failures.push(format!(
                "a server logged {lines} 'replica unreachable' lines for server {victim}"
            ));
        }
    }
    if test_start.elapsed() > Duration::from_secs(60) {
        failures.push(format!("took {:?}", test_start.elapsed()));
    }
    drop(cut_off);
    drop(host);
    drop(manager);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn pushes_through_slow_lossy_links_are_counted_exactly_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(ns) = netns_or_skip("netns relay") else {
        return;
    };
    let test_start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path());
    let lease_ms = 2000u64;
    let lease = lease_ms.to_string();
    let manager = Proc::start(
        BIN,
        &pserver(
            &secret,
            &[
                "manager",
                "--listen",
                &format!("{HOST_IP}:0"),
                "--replicas",
                "1",
                "--lease-ms",
                &lease,
            ],
        ),
        dir.path().join("manager.log"),
    );
    let maddr = manager.addr();
    let relay = |listen: &str, to: &str, reset: &str, seed: u64, name: &str| {
        Proc::start(
            BIN,
            &[
                "relay",
                "--listen",
                listen,
                "--to",
                to,
                "--delay-ms",
                "20",
                "--jitter-ms",
                "10",
                "--stall-prob",
                "0.02",
                "--stall-ms",
                "200",
                "--reset-prob",
                reset,
                "--seed",
                &seed.to_string(),
                "--for-secs",
                "60",
            ]
            .map(String::from),
            dir.path().join(format!("{name}.log")),
        )
    };
    // The namespaced server reaches the manager through a relay on the
    // host side of the veth: delayed and stalled heartbeats and maps, but
    // no resets (a server whose manager link drops is declared dead at
    // once, by design).
    let mut relays = vec![relay(&format!("{HOST_IP}:0"), &maddr, "0", 11, "relay-m")];
    let mut servers = Vec::new();
    for i in 0..2 {
        servers.push(Proc::start(
            BIN,
            &pserver(
                &secret,
                &[
                    "server",
                    "--manager",
                    &maddr,
                    "--listen",
                    &format!("{HOST_IP}:0"),
                ],
            ),
            dir.path().join(format!("host{i}.log")),
        ));
    }
    let mut args = ns.exec();
    args.push(BIN.into());
    args.extend(pserver(
        &secret,
        &[
            "server",
            "--manager",
            &relays[0].addr(),
            "--listen",
            &format!("{NS_IP}:0"),
        ],
    ));
    servers.push(Proc::start("ip", &args, dir.path().join("ns.log")));
    // Clients reach every server through a relay of its own, with resets.
    let redirect = Arc::new(Mutex::new(HashMap::new()));
    for (i, s) in servers.iter().enumerate() {
        let r = relay("127.0.0.1:0", &s.addr(), "0.003", 20 + i as u64, "relay-s");
        redirect.lock().unwrap().insert(s.addr(), r.addr());
        relays.push(r);
    }
    let ids: Vec<u32> = servers.iter().map(Proc::server_id).collect();
    let secret_key = Secret::from_file(&secret).unwrap();
    let direct = authenticated(Net::tcp(), secret_key.clone());
    let relayed = authenticated(Net::new(Redirect(redirect)), secret_key);
    let rt = runtime();
    let (tally, got, keys, epochs, dead, retries, secs) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(55), async {
            let client = |net: Net| {
                let maddr = maddr.clone();
                async move {
                    let mut cfg = WorkerConfig::client(maddr);
                    cfg.net = net;
                    cfg.timeout = Duration::from_secs(20);
                    Worker::connect(cfg).await.unwrap()
                }
            };
            let setup = client(direct.clone()).await;
            setup
                .create_table("n", TableOptions::new(1, UpdaterSpec::Add))
                .await
                .unwrap();
            let before = setup.refresh().await.unwrap();
            let keys = Arc::new(ring_keys(96));
            let stop = Arc::new(AtomicBool::new(false));
            let acks = Arc::new(AtomicU64::new(0));
            let mut loads = Vec::new();
            let mut workers = Vec::new();
            for i in 0..3 {
                let w = client(relayed.clone()).await;
                workers.push(w.clone());
                loads.push(tokio::spawn(pipelined_pushes(
                    w,
                    keys.clone(),
                    16,
                    i * 31,
                    stop.clone(),
                    acks.clone(),
                )));
            }
            let load_start = Instant::now();
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.store(true, Ordering::Relaxed);
            let mut tally = Tally::default();
            for l in loads {
                tally.add(l.await.unwrap());
            }
            let secs = load_start.elapsed().as_secs_f64();
            let retries: u64 = workers
                .iter()
                .map(|w| w.traffic().retries.load(Ordering::Relaxed))
                .sum();
            let got = setup.pull("n", keys.to_vec()).await.unwrap();
            let after = setup.refresh().await.unwrap();
            let dead: Vec<u32> = ids
                .iter()
                .copied()
                .filter(|&id| after.node(id).is_none_or(|n| n.state != NodeState::Alive))
                .collect();
            (
                tally,
                got,
                keys,
                (before.epoch, after.epoch),
                dead,
                retries,
                secs,
            )
        })
        .await
        .expect("the test finishes in 55 s")
    });
    let mut relay_stats = Vec::new();
    for r in &mut relays {
        r.terminate();
        let lines = r.lines.lock().unwrap();
        relay_stats.push(lines.get(1).cloned().unwrap_or_else(|| "no summary".into()));
    }
    assert_eq!(got.len(), keys.len(), "one value per key");
    let (lost, doubled, wrong) = check_counts(&got, &tally);
    println!("netns relay: delay 20 +- 10 ms, stall 2 % x 200 ms, resets 0.3 % on client links");
    println!(
        "  pushes acknowledged {} ({:.0}/s), failed {}, slices resent {retries}",
        tally.pushes_acked,
        tally.pushes_acked as f64 / secs,
        tally.pushes_failed
    );
    println!("  keys: {lost} acknowledged increments lost, {doubled} doubled; {wrong:?}");
    println!("  errors: {:?}", tally.errors);
    println!("  epochs {epochs:?}; servers not alive at the end: {dead:?}");
    for s in &relay_stats {
        println!("  {s}");
    }
    println!("  whole test {:?}", test_start.elapsed());
    let mut failures = Vec::new();
    if tally.pushes_acked == 0 {
        failures.push("no push was acknowledged".to_string());
    }
    if lost > 0 || doubled > 0 {
        failures.push(format!(
            "{lost} acknowledged increments lost, {doubled} doubled: {wrong:?}"
        ));
    }
    if !dead.is_empty() {
        failures.push(format!("servers declared dead: {dead:?}"));
    }
    if test_start.elapsed() > Duration::from_secs(60) {
        failures.push(format!("took {:?}", test_start.elapsed()));
    }
    drop(servers);
    drop(relays);
    drop(manager);
    drop(ns);
    assert!(failures.is_empty(), "{failures:#?}");
}
