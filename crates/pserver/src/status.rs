//! `pserver status`: what the manager knows, for people or as JSON.

use anyhow::{Context, Result};
use pserver_core::map::Group;
use pserver_core::{ClusterMap, KEY_END, Role};
use pserver_node::worker::{Worker, WorkerConfig};
use serde::Serialize;

/// One node in the status report.
#[derive(Serialize)]
struct NodeView {
    id: u32,
    role: String,
    state: String,
    addr: String,
    /// Key ranges this node is primary for, as `[begin, end)` pairs.
    ranges: Vec<[u64; 2]>,
    /// Fraction of the key space it is primary for.
    share: f64,
    /// A worker's job (`idle`: waiting for one; absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    /// What a worker says it works on (its data shard).
    #[serde(skip_serializing_if = "String::is_empty")]
    task: String,
}

/// One table in the status report.
#[derive(Serialize)]
struct TableView {
    id: u32,
    name: String,
    dim: u32,
    updater: String,
    consistency: String,
    /// The job whose workers it counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
}

/// The whole report.
#[derive(Serialize)]
struct StatusView {
    epoch: u64,
    replicas: usize,
    vnodes: u32,
    nodes: Vec<NodeView>,
    tables: Vec<TableView>,
}

fn view(map: &ClusterMap) -> StatusView {
    let nodes = map
        .nodes
        .iter()
        .map(|n| {
            let ranges: Vec<[u64; 2]> = if n.role == Role::Server {
                map.primary_ranges(n.id)
                    .iter()
                    .map(|r| [r.begin, r.end])
                    .collect()
            } else {
                Vec::new()
            };
            let owned: u128 = ranges.iter().map(|r| (r[1] - r[0]) as u128).sum();
            NodeView {
                id: n.id,
                role: n.role.to_string(),
                state: n.state.to_string(),
                addr: n.addr.clone(),
                ranges,
                share: owned as f64 / KEY_END as f64,
                job: match (&n.role, &n.group) {
                    (Role::Worker, Group::Idle) => Some("idle".into()),
                    (Role::Worker, Group::Job(j)) => Some(j.clone()),
                    _ => None,
                },
                task: n.task.clone(),
            }
        })
        .collect();
    let tables = map
        .tables
        .iter()
        .map(|t| TableView {
            id: t.id,
            name: t.name.clone(),
            dim: t.dim,
            updater: t.updater.name().to_string(),
            consistency: t.consistency.to_string(),
            job: t.job.clone(),
        })
        .collect();
    StatusView {
        epoch: map.epoch,
        replicas: map.replicas,
        vnodes: map.vnodes,
        nodes,
        tables,
    }
}

/// Prints the manager's status (connecting over `net`).
pub async fn run(manager: &str, net: &pserver_node::net::Net, json: bool) -> Result<()> {
    let w = Worker::connect(WorkerConfig {
        net: net.clone(),
        ..WorkerConfig::client(manager)
    })
    .await
    .with_context(|| format!("connecting to the manager at {manager}"))?;
    let map = w.refresh().await?;
    w.leave().await;
    let v = view(&map);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "epoch {}  replicas {}  vnodes {}",
        v.epoch, v.replicas, v.vnodes
    );
    println!(
        "{:>4}  {:<7} {:<6} {:<22} {:>7} {:>7}  job / task",
        "id", "role", "state", "addr", "ranges", "share"
    );
    for n in &v.nodes {
        let work = match (&n.job, n.task.as_str()) {
            (Some(j), "") => j.clone(),
            (Some(j), t) => format!("{j}: {t}"),
            (None, _) => String::new(),
        };
        let line = format!(
            "{:>4}  {:<7} {:<6} {:<22} {:>7} {:>6.1}%  {work}",
            n.id,
            n.role,
            n.state,
            if n.addr.is_empty() { "-" } else { &n.addr },
            n.ranges.len(),
            n.share * 100.0
        );
        println!("{}", line.trim_end());
    }
    if v.tables.is_empty() {
        println!("no tables");
    } else {
        println!(
            "{:>4}  {:<20} {:>5} {:<8} {:<14} job",
            "id", "table", "dim", "updater", "consistency"
        );
        for t in &v.tables {
            let line = format!(
                "{:>4}  {:<20} {:>5} {:<8} {:<14} {}",
                t.id,
                t.name,
                t.dim,
                t.updater,
                t.consistency,
                t.job.as_deref().unwrap_or("")
            );
            println!("{}", line.trim_end());
        }
    }
    Ok(())
}
