//! The cluster map: which nodes exist, which server holds which key range,
//! which tables exist, all versioned by an epoch. Every node caches a copy;
//! every request carries the sender's epoch.

use crate::key::{Key, KeyRange};
use crate::spec::TableSpec;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// A node's id, assigned by the manager at registration. Id 0 is the manager.
pub type NodeId = u32;

/// The manager's own node id.
pub const MANAGER_ID: NodeId = 0;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Holds key ranges of every table.
    Server,
    /// Runs the user's program; counted by consistency and barriers.
    Worker,
    /// An ad-hoc client (the `kv` command): may push and pull, is never waited for.
    Client,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Worker => "worker",
            Role::Client => "client",
        })
    }
}

/// Whether a node is believed to be up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Heartbeats arrive within the lease.
    Alive,
    /// Past its lease, or disconnected.
    Dead,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Alive => "alive",
            NodeState::Dead => "dead",
        })
    }
}

/// Which worker group a worker counts in: consistency, aggregation and
/// barriers of a table count the live workers of the table's group only,
/// so jobs that share a cluster never wait on each other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Group {
    /// Workers and tables outside any job (what the worker library makes
    /// unless told otherwise): they count one another, as before jobs.
    #[default]
    Default,
    /// A worker process waiting for a task (`pserver worker`): counted by
    /// no table and no barrier until a scheduler gives it a job.
    Idle,
    /// The workers of one training job (its name).
    Job(String),
}

impl Group {
    /// The group of a table of job `job` (`None`: the default group).
    pub fn of_table(job: Option<&str>) -> Group {
        job.map_or(Group::Default, |j| Group::Job(j.to_string()))
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Default => f.write_str("-"),
            Group::Idle => f.write_str("idle"),
            Group::Job(j) => write!(f, "job {j}"),
        }
    }
}

/// One node as the map records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Address it accepts connections on: a server's for data, a worker
    /// process's for tasks (empty for workers of the library that take
    /// none).
    pub addr: String,
    /// Believed up or not.
    pub state: NodeState,
    /// The worker group a worker counts in ([`Group::Default`] for servers).
    #[serde(default)]
    pub group: Group,
    /// What the worker says it is doing (its job's data shard), for people
    /// reading `pserver status`; empty when it says nothing. For a server,
    /// [`DRAINING`] once a drain of it started.
    #[serde(default)]
    pub task: String,
    /// The epoch of the map that took this node in: its registration, or
    /// a dead server's return under its id (`pserver server --id`). Every
    /// frame of the process holding the id now carries this epoch or a
    /// later one, so a frame from the id at an earlier epoch comes from an
    /// earlier process, and a map whose `joined` differs from the one
    /// before names a new process (empty, at its own address) even when
    /// the map between, where it was dead, never arrived.
    #[serde(default)]
    pub joined: u64,
}

/// The [`NodeInfo::task`] of a server being drained: the manager sets it
/// when the drain starts, so the server stops saying it is ready and
/// `pserver status` shows it.
pub const DRAINING: &str = "draining";

/// A key range with the server that owns it and the servers that replicate it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// The keys.
    pub range: KeyRange,
    /// Server that applies pushes and answers pulls.
    pub primary: NodeId,
    /// Next distinct servers clockwise, in chain order.
    pub replicas: Vec<NodeId>,
}

/// The versioned assignment of everything in the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Goes up at every change.
    pub epoch: u64,
    /// Every node ever registered, sorted by id.
    pub nodes: Vec<NodeInfo>,
    /// Sorted, disjoint, covering [`KeyRange::ALL`] whenever a server is alive.
    pub partitions: Vec<Partition>,
    /// Tables, sorted by id.
    pub tables: Vec<TableSpec>,
    /// Replicas per range the map was built with.
    pub replicas: usize,
    /// Virtual nodes per server on the ring.
    pub vnodes: u32,
    /// A node silent this long is declared dead; nodes heartbeat at a quarter of it.
    pub lease_ms: u64,
    /// Which ad-hoc clients have left, so that servers forget their clocks
    /// and refuse their pushes ([`ClusterMap::departed`]).
    #[serde(default)]
    pub clients: Clients,
}

/// The manager's word on ad-hoc clients ([`Role::Client`]), which are not
/// in [`ClusterMap::nodes`]: clients get ids from the same counter as
/// servers and workers, so every id below `below` that is neither a node
/// of the map nor in `here` is a client that left (said goodbye, or fell
/// silent past its lease). Ids at or above `below` were handed out after
/// this was written and count as present. Its size is the clients present,
/// however many came and went; it only ever grows the set of clients gone
/// (a gone id is never taken back), so a server at a later epoch knows at
/// least what one at an earlier epoch knew.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clients {
    /// Every id handed out before this was written is below it.
    pub below: NodeId,
    /// The clients with ids below `below` still present, sorted.
    pub here: Vec<NodeId>,
}

/// The part of one request that goes to one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Index into [`ClusterMap::partitions`].
    pub partition: usize,
    /// The request's range intersected with the partition's range.
    pub range: KeyRange,
    /// Positions of this slice's keys in the request's key list.
    pub keys: Range<usize>,
}

impl ClusterMap {
    /// An empty map at epoch 0.
    pub fn empty(replicas: usize, vnodes: u32) -> ClusterMap {
        ClusterMap {
            epoch: 0,
            nodes: Vec::new(),
            partitions: Vec::new(),
            tables: Vec::new(),
            replicas,
            vnodes,
            lease_ms: 2000,
            clients: Clients::default(),
        }
    }

    /// Whether `sender` left the cluster for good: a worker the map
    /// declares dead, or a client id [`ClusterMap::clients`] counts gone.
    /// Neither can come back (the manager refuses their heartbeats and
    /// rejoins), so a server forgets their clock records and refuses their
    /// pushes: a push of theirs still in flight would otherwise find no
    /// record and be applied a second time.
    pub fn departed(&self, sender: NodeId) -> bool {
        match self.node(sender) {
            Some(n) => n.role == Role::Worker && n.state == NodeState::Dead,
            None => {
                sender != MANAGER_ID
                    && sender < self.clients.below
                    && self.clients.here.binary_search(&sender).is_err()
            }
        }
    }

    /// How often a node should heartbeat to keep its lease: an eighth of
    /// it, so six can go missing before the manager gives up on the node.
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis((self.lease_ms / 8).max(2))
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// Live nodes of a role, sorted by id.
    pub fn live(&self, role: Role) -> impl Iterator<Item = &NodeInfo> {
        self.nodes
            .iter()
            .filter(move |n| n.role == role && n.state == NodeState::Alive)
    }

    /// Ids of live workers, sorted.
    pub fn live_workers(&self) -> Vec<NodeId> {
        self.live(Role::Worker).map(|n| n.id).collect()
    }

    /// Ids of the live workers of `group`, sorted: those a table of that
    /// group (or a barrier) waits for.
    pub fn group_workers(&self, group: &Group) -> Vec<NodeId> {
        self.live(Role::Worker)
            .filter(|n| n.group == *group)
            .map(|n| n.id)
            .collect()
    }

    /// Ids of the live workers a table counts in its consistency and
    /// aggregation: its job's, sorted.
    pub fn workers_of(&self, table: &TableSpec) -> Vec<NodeId> {
        self.group_workers(&table.group())
    }

    /// Index of the partition holding `key`.
    pub fn partition_of(&self, key: Key) -> Option<usize> {
        let i = self.partitions.partition_point(|p| p.range.end <= key);
        (i < self.partitions.len() && self.partitions[i].range.contains(key)).then_some(i)
    }

    /// Indexes of the partitions overlapping `range`, in key order.
    pub fn partitions_overlapping(&self, range: KeyRange) -> Range<usize> {
        if range.is_empty() {
            return 0..0;
        }
        let first = self
            .partitions
            .partition_point(|p| p.range.end <= range.begin);
        let last = self
            .partitions
            .partition_point(|p| p.range.begin < range.end);
        first..last.max(first)
    }

    /// Ranges for which `server` is primary, in key order.
    pub fn primary_ranges(&self, server: NodeId) -> Vec<KeyRange> {
        self.partitions
            .iter()
            .filter(|p| p.primary == server)
            .map(|p| p.range)
            .collect()
    }

    /// The table with this name.
    pub fn table(&self, name: &str) -> Option<&TableSpec> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The table with this id.
    pub fn table_by_id(&self, id: u32) -> Option<&TableSpec> {
        self.tables
            .binary_search_by_key(&id, |t| t.id)
            .ok()
            .map(|i| &self.tables[i])
    }

    /// Splits a request over `range` with sorted `keys` (all inside `range`)
    /// into one slice per overlapping partition, in key order. Partitions
    /// with no keys still get a slice: the push of an empty slice advances
    /// that range's clock, which pulls under bounded delay wait for.
    pub fn slice(&self, range: KeyRange, keys: &[Key]) -> Vec<Slice> {
        let mut out = Vec::new();
        let mut start = 0;
        for p in self.partitions_overlapping(range) {
            let part = &self.partitions[p];
            let Some(r) = part.range.intersect(&range) else {
                continue;
            };
            let end = start + keys[start..].partition_point(|&k| k < r.end);
            out.push(Slice {
                partition: p,
                range: r,
                keys: start..end,
            });
            start = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(bounds: &[u64]) -> ClusterMap {
        let mut m = ClusterMap::empty(0, 1);
        let mut begin = 0;
        for (i, &end) in bounds
            .iter()
            .chain(std::iter::once(&crate::KEY_END))
            .enumerate()
        {
            m.partitions.push(Partition {
                range: KeyRange { begin, end },
                primary: i as NodeId + 1,
                replicas: vec![],
            });
            begin = end;
        }
        m
    }

    #[test]
    fn lookup() {
        let m = map(&[100, 200]);
        assert_eq!(m.partition_of(0), Some(0));
        assert_eq!(m.partition_of(99), Some(0));
        assert_eq!(m.partition_of(100), Some(1));
        assert_eq!(m.partition_of(crate::KEY_END - 1), Some(2));
        assert_eq!(m.partition_of(crate::KEY_END), None);
        assert_eq!(
            m.partitions_overlapping(KeyRange::new(50, 150).unwrap()),
            0..2
        );
        assert_eq!(
            m.partitions_overlapping(KeyRange::new(100, 200).unwrap()),
            1..2
        );
        assert_eq!(m.partitions_overlapping(KeyRange::new(5, 5).unwrap()), 0..0);
    }

    #[test]
    fn slicing_keeps_every_key_once_in_order() {
        let m = map(&[100, 200]);
        let keys = [1, 5, 100, 150, 199, 250];
        let s = m.slice(KeyRange::ALL, &keys);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].keys, 0..2);
        assert_eq!(s[1].keys, 2..5);
        assert_eq!(s[2].keys, 5..6);
        assert_eq!(s[1].range, KeyRange::new(100, 200).unwrap());
        let s = m.slice(KeyRange::new(150, 160).unwrap(), &[155]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].range, KeyRange::new(150, 160).unwrap());
        // Partitions without keys still get a slice.
        let s = m.slice(KeyRange::ALL, &[]);
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|x| x.keys.is_empty()));
    }
}
