//! `pserver status --watch`: the cluster redrawn every second: nodes,
//! ranges, per-table request rates, replication lag and jobs.
//!
//! Each frame takes the map from the manager and asks every live server
//! for its figures (`Control::Stats`, answered with a `ServerReport`:
//! counters since it started, queues now); rates are the counters'
//! differences between two frames. [`render`] makes a frame's text from
//! plain data, so it is tested without a cluster; [`run`] fetches and
//! prints. On a terminal each frame replaces the last; otherwise frames
//! follow one another, each opened by a `--- frame N ---` line.

use anyhow::{Context, Result};
use pserver_core::map::Group;
use pserver_core::{ClusterMap, KEY_END, NodeId, NodeState, Role};
use pserver_node::conn::Peer;
use pserver_node::net::Net;
use pserver_node::proto::{control_request, reply_control};
use pserver_node::worker::{Worker, WorkerConfig};
use pserver_wire::message::ServerReport;
use pserver_wire::{Control, Limits};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

/// How long a server has to answer for its figures before its row says so.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What one frame shows: the map and each live server's answer.
pub struct Snapshot {
    /// The manager's map.
    pub map: ClusterMap,
    /// Per live server: its figures, or why it did not answer.
    pub servers: BTreeMap<NodeId, Result<ServerReport, String>>,
    /// When it was taken.
    pub at: Instant,
}

/// Per table: requests and keys per operation, summed over the servers.
fn totals(s: &Snapshot) -> HashMap<u32, ([u64; 4], [u64; 4])> {
    let mut out: HashMap<u32, ([u64; 4], [u64; 4])> = HashMap::new();
    for r in s.servers.values().flatten() {
        for t in &r.tables {
            let e = out.entry(t.id).or_default();
            for i in 0..4 {
                e.0[i] += t.requests[i];
                e.1[i] += t.keys[i];
            }
        }
    }
    out
}

/// The text of frame `n` (from 1): `now`, and the rates since `prev`.
pub fn render(n: u64, now: &Snapshot, prev: Option<&Snapshot>) -> String {
    let map = &now.map;
    let mut out = String::new();
    let secs = prev.map(|p| now.at.duration_since(p.at).as_secs_f64());
    let _ = writeln!(
        out,
        "epoch {}  replicas {}  vnodes {}  frame {n}{}",
        map.epoch,
        map.replicas,
        map.vnodes,
        match secs {
            Some(s) => format!("  rates over {s:.1} s"),
            None => "  rates from the next frame".into(),
        }
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<7} {:<6} {:<22} {:>6} {:>6} {:>12} {:>10}  job / task",
        "id", "role", "state", "addr", "ranges", "share", "stored keys", "repl queue"
    );
    for node in &map.nodes {
        let (ranges, share) = if node.role == Role::Server {
            let r = map.primary_ranges(node.id);
            let owned: u128 = r.iter().map(|r| (r.end - r.begin) as u128).sum();
            (
                r.len().to_string(),
                format!("{:.1}%", owned as f64 / KEY_END as f64 * 100.0),
            )
        } else {
            (String::new(), String::new())
        };
        let (stored, queue, note) = match now.servers.get(&node.id) {
            Some(Ok(r)) => {
                let keys: u64 = r.tables.iter().filter_map(|t| t.stored_keys).sum();
                let bytes: u64 = r.links.iter().map(|l| l.bytes).sum();
                (thousands(keys), bytes_text(bytes), String::new())
            }
            Some(Err(why)) => (
                String::new(),
                String::new(),
                format!("not answering: {why}"),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        let work = match (&node.role, &node.group) {
            (Role::Worker, Group::Idle) => "idle".to_string(),
            (Role::Worker, Group::Job(j)) if node.task.is_empty() => j.clone(),
            (Role::Worker, Group::Job(j)) => format!("{j}: {}", node.task),
            _ => node.task.clone(),
        };
        let line = format!(
            "{:>4}  {:<7} {:<6} {:<22} {:>6} {:>6} {:>12} {:>10}  {}",
            node.id,
            node.role.to_string(),
            node.state.to_string(),
            if node.addr.is_empty() {
                "-"
            } else {
                &node.addr
            },
            ranges,
            share,
            stored,
            queue,
            if note.is_empty() { work } else { note }
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if map.tables.is_empty() {
        let _ = writeln!(out, "no tables");
    } else {
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>10} {:>11} {:>10} {:>12}",
            "table", "push/s", "pull/s", "push_pull/s", "scan/s", "keys/s"
        );
        let (cur, old) = (totals(now), prev.map(totals));
        for t in &map.tables {
            let (req, keys) = cur.get(&t.id).copied().unwrap_or_default();
            let before = old
                .as_ref()
                .map(|o| o.get(&t.id).copied().unwrap_or_default());
            let rate = |now: u64, then: Option<u64>| match (secs, then) {
                (Some(s), Some(then)) if s > 0.0 => {
                    format!("{:.1}", now.saturating_sub(then) as f64 / s)
                }
                _ => "-".to_string(),
            };
            let r: Vec<String> = (0..4)
                .map(|i| rate(req[i], before.map(|b| b.0[i])))
                .collect();
            let k = rate(keys.iter().sum(), before.map(|b| b.1.iter().sum()));
            let _ = writeln!(
                out,
                "{:<20} {:>10} {:>10} {:>11} {:>10} {:>12}",
                t.name, r[0], r[1], r[2], r[3], k
            );
        }
    }
    let links: Vec<String> = now
        .servers
        .iter()
        .filter_map(|(id, r)| r.as_ref().ok().map(|r| (id, r)))
        .flat_map(|(id, r)| {
            r.links.iter().map(move |l| {
                format!(
                    "  {id} -> {}: {} in {} changes",
                    l.to,
                    bytes_text(l.bytes),
                    l.changes
                )
            })
        })
        .collect();
    if links.is_empty() {
        let _ = writeln!(out, "replication: no chain links");
    } else {
        let _ = writeln!(out, "replication (queued, not yet answered):");
        for l in links {
            let _ = writeln!(out, "{l}");
        }
    }
    let mut jobs: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    let mut idle = 0;
    for n in map.live(Role::Worker) {
        match &n.group {
            Group::Job(j) => jobs.entry(j.as_str()).or_default().push(n.id),
            Group::Idle => idle += 1,
            Group::Default => {}
        }
    }
    if jobs.is_empty() {
        let _ = writeln!(out, "jobs: none ({idle} idle workers)");
    } else {
        let _ = writeln!(out, "jobs ({idle} idle workers):");
        for (j, ws) in jobs {
            let ids: Vec<String> = ws.iter().map(|w| w.to_string()).collect();
            let _ = writeln!(out, "  {j}: {} workers ({})", ws.len(), ids.join(", "));
        }
    }
    out
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes for people.
fn bytes_text(b: u64) -> String {
    match b {
        0..1_000 => format!("{b} B"),
        1_000..1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        _ => format!("{:.1} GB", b as f64 / 1e9),
    }
}

/// Asks one server for its figures.
async fn ask(peer: &Peer, epoch: u64) -> Result<ServerReport, String> {
    let reply = tokio::time::timeout(
        ASK_TIMEOUT,
        peer.request(control_request(0, epoch, &Control::Stats)),
    )
    .await
    .map_err(|_| format!("no answer within {ASK_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    match reply_control(&reply, peer.label()).map_err(|e| e.to_string())? {
        Control::ServerReport(r) => Ok(r),
        other => Err(format!("answered {other:?} instead of its figures")),
    }
}

/// Redraws the cluster every `interval`, `frames` times (or until Ctrl-C).
pub async fn run(manager: &str, net: &Net, frames: Option<u64>, interval: Duration) -> Result<()> {
    let w = Worker::connect(WorkerConfig {
        net: net.clone(),
        ..WorkerConfig::client(manager)
    })
    .await
    .with_context(|| format!("connecting to the manager at {manager}"))?;
    let tty = std::io::stdout().is_terminal();
    let mut peers: HashMap<NodeId, (String, Peer)> = HashMap::new();
    let mut prev: Option<Snapshot> = None;
    let mut n = 0;
    let result = loop {
        n += 1;
        let map = match w.refresh().await {
            Ok(m) => (*m).clone(),
            Err(e) => break Err(anyhow::Error::new(e).context("reading the map")),
        };
        let mut servers = BTreeMap::new();
        for node in map.live(Role::Server) {
            let fresh = match peers.get(&node.id) {
                Some((addr, p)) if *addr == node.addr && !p.is_closed() => None,
                _ => Some(Peer::connect_via(net, &node.addr, Limits::default()).await),
            };
            match fresh {
                Some(Ok((p, _notices))) => {
                    peers.insert(node.id, (node.addr.clone(), p));
                }
                Some(Err(e)) => {
                    peers.remove(&node.id);
                    servers.insert(node.id, Err(e.to_string()));
                    continue;
                }
                None => {}
            }
            let (_, p) = &peers[&node.id];
            servers.insert(node.id, ask(p, map.epoch).await);
        }
        peers.retain(|id, _| map.node(*id).is_some_and(|n| n.state == NodeState::Alive));
        let snap = Snapshot {
            map,
            servers,
            at: Instant::now(),
        };
        let text = render(n, &snap, prev.as_ref());
        let mut stdout = std::io::stdout().lock();
        if tty {
            // Home and clear: the frame replaces the last one.
            let _ = write!(stdout, "\x1b[H\x1b[2J{text}");
        } else {
            let _ = write!(stdout, "--- frame {n} ---\n{text}");
        }
        let _ = stdout.flush();
        drop(stdout);
        prev = Some(snap);
        if frames.is_some_and(|f| n >= f) {
            break Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    w.leave().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use pserver_wire::message::{LinkReport, TableReport};

    #[test]
    fn a_frame_shows_rates_between_two_snapshots() {
        let mut map = ClusterMap::empty(3, 4);
        map.tables.push(pserver_core::TableSpec {
            id: 7,
            name: "w".into(),
            dim: 1,
            init: pserver_core::spec::Init::Zero,
            updater: pserver_core::UpdaterSpec::Add,
            consistency: pserver_core::Consistency::Eventual,
            aggregate: false,
            job: None,
        });
        let report = |pushes: u64, keys: u64| ServerReport {
            epoch: 3,
            tables: vec![TableReport {
                id: 7,
                requests: [pushes, 0, 0, 0],
                keys: [keys, 0, 0, 0],
                bytes: [0; 4],
                stored_keys: Some(keys),
            }],
            links: vec![LinkReport {
                to: 2,
                bytes: 2_500,
                changes: 3,
            }],
            ..Default::default()
        };
        let t0 = Instant::now();
        let snap = |r, at| Snapshot {
            map: map.clone(),
            servers: BTreeMap::from([(1, Ok(r))]),
            at,
        };
        let a = snap(report(10, 100), t0);
        let b = snap(report(30, 300), t0 + Duration::from_secs(2));
        let first = render(1, &a, None);
        assert!(first.contains("rates from the next frame"), "{first}");
        let text = render(2, &b, Some(&a));
        let row = text.lines().find(|l| l.starts_with("w ")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols, ["w", "10.0", "0.0", "0.0", "0.0", "100.0"], "{text}");
        assert!(text.contains("1 -> 2: 2.5 kB in 3 changes"), "{text}");
        assert!(text.contains("jobs: none (0 idle workers)"), "{text}");
    }
}
