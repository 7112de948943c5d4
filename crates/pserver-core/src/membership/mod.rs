//! The manager's state machine: registration, leases, tables and barriers.
//!
//! Time comes in as milliseconds from the caller (the runtime reads its clock;
//! tests pass numbers), so every transition is deterministic.

use crate::map::{ClusterMap, Group, NodeId, NodeInfo, NodeState, Role};
use crate::ring;
use crate::spec::{SpecError, TableSpec};
use recovery::waiting_for;
use std::collections::{BTreeMap, BTreeSet};

pub use recovery::{Persisted, REBUILT_EPOCH_JUMP, RECOVERY_GRACE_LEASES, Recovered, Report};

/// Most tables a cluster may hold.
pub const MAX_TABLES: usize = 1024;

/// How the manager places and watches nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Replicas per key range (`k`).
    pub replicas: usize,
    /// Virtual nodes per server on the ring.
    pub vnodes: u32,
    /// A node that stops is declared dead within this long: nodes
    /// heartbeat every eighth of it ([`ClusterMap::heartbeat_interval`]) and
    /// one silent for three quarters of it is dead ([`silence_limit_ms`]), so
    /// the manager, checking every sixteenth, acts between 5/8 and 13/16 of
    /// the lease after the node's last sign of life.
    pub lease_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            replicas: 0,
            vnodes: 16,
            lease_ms: 2000,
        }
    }
}

/// How long a node may stay silent before it is declared dead: three
/// quarters of the lease, six heartbeat intervals, so that a node that stops
/// is declared dead within its lease (see [`MembershipConfig::lease_ms`]).
pub fn silence_limit_ms(lease_ms: u64) -> u64 {
    lease_ms / 4 * 3
}

/// Why the manager refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MembershipError {
    /// A config value is out of range.
    #[error("invalid manager config: {0}")]
    Config(String),
    /// A server registered without an address to reach it at.
    #[error("a server must register with the address it listens on")]
    NoAddress,
    /// The id is not registered.
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
    /// A node asked to rejoin under an id this manager never gave it: no
    /// node of the map has that id, role and address. It was registered by
    /// a manager whose state this one does not hold (started without
    /// `--state`, or with another file), so this one cannot know its
    /// ranges; the node must keep its data and wait for a manager that
    /// knows it, not register anew (which would drop them).
    #[error(
        "this manager has no record of {role} {id} at {addr:?}: it was registered by a manager \
         whose state this one does not hold (this one was started without --state, or with \
         another file); the node keeps its data and keeps trying: restart this manager with \
         the --state FILE of the one that registered it"
    )]
    Stranger {
        /// The id the node gave.
        id: NodeId,
        /// The role it gave.
        role: Role,
        /// The address it gave ("" for workers and clients).
        addr: String,
    },
    /// The node was declared dead; it must register again.
    #[error("node {0} was declared dead; register again")]
    Dead(NodeId),
    /// A node other than a server asked to register under an id.
    #[error("a {0} cannot register under an id: only a server comes back under its old one (--id)")]
    IdNotForRole(Role),
    /// A server asked to come back under an id no node of the map has.
    #[error(
        "this manager's map has no node {0}: a server comes back only under an id this \
         cluster's manager gave it (a restarted manager knows its servers only from its \
         --state FILE); start the server without --id to join as a new one"
    )]
    NoSuchId(NodeId),
    /// A server asked to come back under the id of a worker.
    #[error("node {id} is a {role}, not a server: --id takes the id of a server that failed")]
    IdOfNonServer {
        /// The id asked for.
        id: NodeId,
        /// What that node is.
        role: Role,
    },
    /// A server asked to come back under the id of a live one.
    #[error("server {id} is alive at {addr}; stop it first or wait for its lease to run out")]
    IdAlive {
        /// The id asked for.
        id: NodeId,
        /// Where the live server is.
        addr: String,
    },
    /// A server's earlier process asked to rejoin after a newer one came
    /// back under its id: the newer one holds the id (and the ranges the
    /// map gives it), so this one must stop, dropping what it holds.
    #[error(
        "server {id} came back under its id as a newer process at {addr}; this earlier \
         process of it must stop (its data went to others when it was declared dead)"
    )]
    Replaced {
        /// The id.
        id: NodeId,
        /// The newer process's address.
        addr: String,
    },
    /// This manager, started without state, is rebuilding the map from
    /// the servers' reports and waits for the servers it names; until they
    /// report, no server or worker registers and nothing rejoins.
    #[error(
        "this manager was started without state and is rebuilding the cluster's map from what \
         its servers report; it waits for {}: ask again shortly (if they are gone for good, \
         restart the manager with the --state FILE of the one that registered them)",
        waiting_for(.missing)
    )]
    Rebuilding {
        /// The servers of the latest reported map that have not reported
        /// yet, with their addresses.
        missing: Vec<(NodeId, String)>,
    },
    /// A server's report cannot become this manager's map.
    #[error(
        "server {id} reports a map this manager cannot take over: {why}; restart the manager \
         with matching settings, or with the --state FILE of the one that registered it"
    )]
    CannotRebuild {
        /// The server.
        id: NodeId,
        /// Why not.
        why: String,
    },
    /// The table spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A table of this name exists with another spec.
    #[error("table {0:?} exists with a different spec")]
    TableExists(String),
    /// Too many tables.
    #[error("the cluster holds the maximum of {MAX_TABLES} tables")]
    TooManyTables,
    /// Only workers of a group take part in barriers.
    #[error("node {0} is not a live worker of a group and cannot enter a barrier")]
    NotWorker(NodeId),
    /// Only live workers change groups.
    #[error("node {0} is not a live worker and cannot join a job")]
    NotAWorker(NodeId),
    /// A worker of one job was asked into another.
    #[error("worker {node} is in job {job:?}; it must finish (go idle) before joining another")]
    OtherJob {
        /// The worker.
        node: NodeId,
        /// The job it is in.
        job: String,
    },
    /// The job's name is taken by another live scheduler.
    #[error(
        "job {job:?} is already run by node {by}; one scheduler per job (wait for it to end, or pick another --job)"
    )]
    JobClaimed {
        /// The job.
        job: String,
        /// The node holding it.
        by: NodeId,
    },
    /// A job name that breaks the naming rule.
    #[error("job name {0:?} is invalid: use 1-128 letters, digits, '_', '-' or '.'")]
    BadJob(String),
    /// A drain that would leave no server, or of a node that is no live server.
    #[error("cannot drain node {node}: {why}")]
    Drain {
        /// The node.
        node: NodeId,
        /// Why not.
        why: String,
    },
}

/// The manager's state: the map plus what it needs to keep the map true.
#[derive(Clone, Debug)]
pub struct Membership {
    cfg: MembershipConfig,
    map: ClusterMap,
    /// Last heartbeat of every live server and worker.
    last_seen: BTreeMap<NodeId, u64>,
    /// Ad-hoc clients present, with their last sign of life: they get ids
    /// but are not in the map, so they never change the epoch. One leaves
    /// when it says goodbye or falls silent past its lease; the map says
    /// so in [`ClusterMap::clients`] at the next change, or at the latest a
    /// lease later ([`Membership::publish_departures`]).
    clients: BTreeMap<NodeId, u64>,
    /// Clients that left since the map last said which are present.
    departures: usize,
    /// When the map last said so because clients left.
    published_ms: u64,
    next_id: NodeId,
    next_table: u32,
    /// Barriers by group and name: each counts its group's live workers.
    barriers: BTreeMap<(Group, String), BTreeSet<NodeId>>,
    /// Claimed jobs and their schedulers; a claim ends when its holder
    /// leaves (is declared dead, or, a client, disconnects or falls silent).
    jobs: BTreeMap<String, NodeId>,
    /// Servers draining: alive and serving, but placed on no range once the
    /// hand-off completes; then declared gone, which tells them to exit.
    leaving: BTreeSet<NodeId>,
    /// A hand-off in progress: the map to switch to once every primary of
    /// the intermediate map has copied what moves ([`crate::transition`]).
    target: Option<Handoff>,
    /// The latest map epoch each server reported its copies done for.
    synced: BTreeMap<NodeId, u64>,
    /// Nodes of a restored map that have not rejoined yet: they get
    /// [`RECOVERY_GRACE_LEASES`] more leases than the silence limit from the
    /// restart, since they learn of the new manager only by retrying.
    recovering: BTreeSet<NodeId>,
    /// No id handed out yet and no state restored: a manager that may take
    /// over a map from servers' reports ([`Membership::recover`]).
    fresh: bool,
    /// The servers' reports so far, by id, while rebuilding.
    reports: BTreeMap<NodeId, Report>,
    /// The first id of clients registered while fresh (in
    /// [`FRESH_CLIENT_IDS`]' range, at a salt the runtime gives) and how
    /// many there were.
    fresh_base: NodeId,
    fresh_clients: NodeId,
    /// Earlier processes of servers that came back under their ids
    /// ([`Membership::register_as`]): the address each listened on and the
    /// epoch it joined at, at most [`REPLACED_KEPT`] per id, so one that
    /// asks to rejoin is told it was replaced ([`MembershipError::Replaced`])
    /// rather than taken for a stranger. Kept in memory only: after a
    /// restart of the manager such a process is a stranger, which keeps it
    /// waiting, fenced by its own lease.
    replaced: BTreeMap<NodeId, Vec<(String, u64)>>,
}

/// Ids from here up go to clients that register with a fresh manager (one
/// that may still take over a running cluster's map and ids): far above any
/// id a cluster hands out, so none collides with the ids of a taken map.
/// Where in the range a manager starts is salted
/// ([`Membership::salt_fresh_clients`]), so the clients of two fresh
/// managers in turn, which may both push to the same servers, are unlikely
/// to share an id.
pub const FRESH_CLIENT_IDS: NodeId = 1 << 31;

/// A hand-off in progress.
#[derive(Clone, Debug)]
struct Handoff {
    /// The partitions to switch to.
    partitions: Vec<crate::map::Partition>,
    /// The epoch of the intermediate map: primaries must report copies
    /// done for this epoch or a later one.
    epoch: u64,
}

/// A barrier every live worker of its group has entered: reply to these nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// The group whose barrier it is.
    pub group: Group,
    /// The barrier's name.
    pub name: String,
    /// The nodes waiting in it.
    pub nodes: BTreeSet<NodeId>,
}

impl Membership {
    /// A manager with no nodes, after checking `cfg`.
    pub fn new(cfg: MembershipConfig) -> Result<Membership, MembershipError> {
        if cfg.vnodes == 0 || cfg.vnodes > 4096 {
            return Err(MembershipError::Config(format!(
                "vnodes {} is out of range 1..=4096",
                cfg.vnodes
            )));
        }
        if cfg.replicas > 16 {
            return Err(MembershipError::Config(format!(
                "replicas {} is out of range 0..=16",
                cfg.replicas
            )));
        }
        if cfg.lease_ms < 10 {
            return Err(MembershipError::Config(format!(
                "lease {} ms is below 10 ms",
                cfg.lease_ms
            )));
        }
        let mut map = ClusterMap::empty(cfg.replicas, cfg.vnodes);
        map.lease_ms = cfg.lease_ms;
        Ok(Membership {
            cfg,
            map,
            last_seen: BTreeMap::new(),
            clients: BTreeMap::new(),
            departures: 0,
            published_ms: 0,
            next_id: 1,
            next_table: 1,
            barriers: BTreeMap::new(),
            jobs: BTreeMap::new(),
            leaving: BTreeSet::new(),
            target: None,
            synced: BTreeMap::new(),
            recovering: BTreeSet::new(),
            fresh: true,
            reports: BTreeMap::new(),
            fresh_base: FRESH_CLIENT_IDS,
            fresh_clients: 0,
            replaced: BTreeMap::new(),
        })
    }

    /// The current map.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// The config.
    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    /// Registers a node and returns its id. Servers and workers enter the map
    /// (the epoch goes up); clients do not. A worker starts in `group`
    /// (servers and clients are in none: theirs is ignored).
    pub fn register(
        &mut self,
        role: Role,
        addr: &str,
        group: Group,
        now_ms: u64,
    ) -> Result<NodeId, MembershipError> {
        if role == Role::Server && addr.is_empty() {
            return Err(MembershipError::NoAddress);
        }
        if let Group::Job(j) = &group {
            if !crate::spec::valid_job_name(j) {
                return Err(MembershipError::BadJob(j.clone()));
            }
        }
        let group = if role == Role::Worker {
            group
        } else {
            Group::Default
        };
        if role == Role::Client && self.fresh {
            // A client (`pserver status`, say) asking before or while the
            // servers of a running cluster report must not stop this
            // manager from taking that cluster over: its id comes from a
            // range no cluster reaches, and the manager stays fresh.
            let id = self.fresh_base.saturating_add(self.fresh_clients);
            self.fresh_clients = self.fresh_clients.saturating_add(1);
            self.clients.insert(id, now_ms);
            return Ok(id);
        }
        // An id handed out now could be one the cluster being rebuilt
        // already uses.
        if !self.reports.is_empty() {
            return Err(MembershipError::Rebuilding {
                missing: self.missing(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        // This manager's own cluster starts: it will take over no other.
        self.fresh = false;
        if role == Role::Client {
            self.clients.insert(id, now_ms);
            return Ok(id);
        }
        self.map.nodes.push(NodeInfo {
            id,
            role,
            addr: addr.to_string(),
            state: NodeState::Alive,
            group,
            task: String::new(),
            // The map `changed` makes next.
            joined: self.map.epoch + 1,
        });
        self.last_seen.insert(id, now_ms);
        self.changed(role == Role::Server);
        Ok(id)
    }

    /// Renews a node's lease.
    pub fn heartbeat(&mut self, id: NodeId, now_ms: u64) -> Result<(), MembershipError> {
        if let Some(t) = self.clients.get_mut(&id) {
            *t = now_ms;
            return Ok(());
        }
        match self.map.node(id) {
            None => Err(MembershipError::UnknownNode(id)),
            Some(n) if n.state == NodeState::Dead => Err(MembershipError::Dead(id)),
            Some(_) => {
                self.last_seen.insert(id, now_ms);
                self.recovering.remove(&id);
                Ok(())
            }
        }
    }

    /// The node's connection closed: a server or worker is declared dead.
    /// A client stays until its lease runs out, so one whose link broke
    /// may rejoin with its id; one that is done says goodbye
    /// ([`Membership::goodbye`]). Returns true when the map changed.
    pub fn disconnected(&mut self, id: NodeId) -> bool {
        self.jobs.retain(|_, by| *by != id);
        if self.clients.contains_key(&id) {
            return false;
        }
        self.declare_dead(&[id])
    }

    /// Node `id` leaves for good: a client is gone at once (the servers
    /// forget its clocks once the map says so), a worker is declared dead;
    /// a server must be drained instead, and is not changed. Neither comes
    /// back under this id. Returns true when the map changed.
    pub fn goodbye(&mut self, id: NodeId) -> bool {
        self.jobs.retain(|_, by| *by != id);
        if self.clients.remove(&id).is_some() {
            // A fresh manager's clients are never counted gone.
            self.departures += usize::from(id < self.next_id);
            return false;
        }
        match self.map.node(id) {
            Some(n) if n.role == Role::Worker => self.declare_dead(&[id]),
            _ => false,
        }
    }

    /// Makes the map say which clients left, when some did and the map has
    /// not said so for a lease: each such map is one more epoch (a redirect
    /// for every worker), so clients coming and going cost at most one map
    /// per lease. Until then the servers keep the clocks of the clients
    /// that left, which is safe (their pushes are still recognised), only
    /// larger. True when the map changed.
    pub fn publish_departures(&mut self, now_ms: u64) -> bool {
        if self.departures == 0
            || now_ms.saturating_sub(self.published_ms) < self.cfg.lease_ms
            || !self.reports.is_empty()
        {
            return false;
        }
        self.published_ms = now_ms;
        self.changed(false);
        true
    }

    /// The map's record of the clients present: every id handed out so
    /// far is below it (ids of clients of a fresh manager, far above the
    /// counter, are never counted gone).
    fn note_clients(&mut self) {
        let below = self.next_id.max(self.map.clients.below);
        self.map.clients = crate::map::Clients {
            below,
            here: self
                .clients
                .keys()
                .copied()
                .filter(|&id| id < below)
                .collect(),
        };
        self.departures = 0;
    }

    /// Worker `id` moves to `group` (a scheduler gave it a job, or its job
    /// ended: [`Group::Idle`]) and says what it works on. A worker of one
    /// job must go idle before it joins another, so two schedulers can never
    /// share one. Returns true when the map changed.
    pub fn join(&mut self, id: NodeId, group: Group, task: &str) -> Result<bool, MembershipError> {
        if let Group::Job(j) = &group {
            if !crate::spec::valid_job_name(j) {
                return Err(MembershipError::BadJob(j.clone()));
            }
        }
        let Ok(i) = self.map.nodes.binary_search_by_key(&id, |n| n.id) else {
            return Err(MembershipError::NotAWorker(id));
        };
        let node = &mut self.map.nodes[i];
        if node.role != Role::Worker || node.state != NodeState::Alive {
            return Err(MembershipError::NotAWorker(id));
        }
        if let (Group::Job(now), Group::Job(next)) = (&node.group, &group) {
            if now != next {
                return Err(MembershipError::OtherJob {
                    node: id,
                    job: now.clone(),
                });
            }
        }
        if node.group == group && node.task == task {
            return Ok(false);
        }
        node.group = group;
        node.task = task.to_string();
        self.changed(false);
        Ok(true)
    }

    /// Node `by` (a job's scheduler) claims job `job`: refused while
    /// another node that is still here holds it. Claiming again is fine.
    pub fn claim_job(&mut self, job: &str, by: NodeId) -> Result<(), MembershipError> {
        if !crate::spec::valid_job_name(job) {
            return Err(MembershipError::BadJob(job.to_string()));
        }
        if let Some(&holder) = self.jobs.get(job) {
            if holder != by && self.is_here(holder) {
                return Err(MembershipError::JobClaimed {
                    job: job.to_string(),
                    by: holder,
                });
            }
        }
        self.jobs.insert(job.to_string(), by);
        Ok(())
    }

    /// Claimed jobs and their schedulers.
    pub fn jobs(&self) -> impl Iterator<Item = (&str, NodeId)> {
        self.jobs.iter().map(|(j, by)| (j.as_str(), *by))
    }

    /// Whether node `id` is a connected client or a live node of the map.
    fn is_here(&self, id: NodeId) -> bool {
        self.clients.contains_key(&id)
            || self
                .map
                .node(id)
                .is_some_and(|n| n.state == NodeState::Alive)
    }

    /// Declares dead every node silent for more than [`silence_limit_ms`]
    /// by `now_ms` (a node of a restored map that has not rejoined yet: for
    /// more than that plus [`RECOVERY_GRACE_LEASES`] leases); returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<NodeId> {
        let lease = self.cfg.lease_ms;
        let limit = silence_limit_ms(lease);
        let grace = lease.saturating_mul(RECOVERY_GRACE_LEASES);
        let late: Vec<NodeId> = self
            .last_seen
            .iter()
            .filter(|&(id, &t)| {
                let limit = if self.recovering.contains(id) {
                    limit.saturating_add(grace)
                } else {
                    limit
                };
                now_ms.saturating_sub(t) > limit
            })
            .map(|(&id, _)| id)
            .collect();
        // Clients hold no state anyone waits on; drop silent ones quietly.
        let next_id = self.next_id;
        let mut left = 0;
        self.clients.retain(|&id, t| {
            let here = now_ms.saturating_sub(*t) <= lease.saturating_mul(4);
            left += usize::from(!here && id < next_id);
            here
        });
        self.departures += left;
        self.declare_dead(&late);
        let jobs = std::mem::take(&mut self.jobs);
        self.jobs = jobs
            .into_iter()
            .filter(|(_, by)| self.is_here(*by))
            .collect();
        late
    }

    fn declare_dead(&mut self, ids: &[NodeId]) -> bool {
        let mut changed = false;
        let mut servers = false;
        for &id in ids {
            self.last_seen.remove(&id);
            self.recovering.remove(&id);
            self.leaving.remove(&id);
            self.synced.remove(&id);
            if let Ok(i) = self.map.nodes.binary_search_by_key(&id, |n| n.id) {
                let node = &mut self.map.nodes[i];
                if node.state == NodeState::Alive {
                    node.state = NodeState::Dead;
                    changed = true;
                    servers |= node.role == Role::Server;
                }
            }
        }
        if changed {
            self.changed(servers);
        }
        changed
    }

    fn changed(&mut self, servers: bool) {
        self.map.epoch += 1;
        self.note_clients();
        if servers {
            self.replan();
        }
    }

    /// Places the live, non-leaving servers on the ring. When that moves a
    /// range to a new primary while tables exist, publishes the intermediate
    /// map of a hand-off instead ([`crate::transition::plan`]) and remembers
    /// the target; otherwise switches at once.
    fn replan(&mut self) {
        let placed: Vec<NodeId> = self
            .map
            .live(Role::Server)
            .map(|n| n.id)
            .filter(|id| !self.leaving.contains(id))
            .collect();
        let target = ring::place(&placed, self.cfg.vnodes, self.cfg.replicas);
        let map = &self.map;
        let alive = |id: NodeId| map.node(id).is_some_and(|n| n.state == NodeState::Alive);
        let plan = if map.tables.is_empty() || map.partitions.is_empty() {
            None
        } else {
            crate::transition::plan(&map.partitions, &target, alive)
        };
        match plan {
            Some(intermediate) => {
                self.map.partitions = intermediate;
                self.target = Some(Handoff {
                    partitions: target,
                    epoch: self.map.epoch,
                });
                // The hand-off may already be complete (nothing held data).
                self.try_finish();
            }
            None => {
                self.map.partitions = target;
                self.target = None;
                self.retire_leavers();
            }
        }
    }

    /// Switches to the hand-off's target once every live primary of the
    /// intermediate map has reported its copies done. True when it did.
    fn try_finish(&mut self) -> bool {
        let Some(h) = &self.target else {
            return false;
        };
        let map = &self.map;
        let done = map
            .partitions
            .iter()
            .map(|p| p.primary)
            .filter(|&id| map.node(id).is_some_and(|n| n.state == NodeState::Alive))
            .all(|id| self.synced.get(&id).is_some_and(|&e| e >= h.epoch));
        if !done {
            return false;
        }
        let h = self.target.take().expect("checked above");
        self.map.partitions = h.partitions;
        self.map.epoch += 1;
        self.retire_leavers();
        true
    }

    /// Declares gone every draining server the map no longer places on any
    /// range: it sees itself dead in the next map and exits.
    fn retire_leavers(&mut self) {
        let parts = &self.map.partitions;
        let done: Vec<NodeId> = self
            .leaving
            .iter()
            .copied()
            .filter(|id| {
                parts
                    .iter()
                    .all(|p| p.primary != *id && !p.replicas.contains(id))
            })
            .collect();
        for id in done {
            self.leaving.remove(&id);
            self.last_seen.remove(&id);
            if let Ok(i) = self.map.nodes.binary_search_by_key(&id, |n| n.id) {
                self.map.nodes[i].state = NodeState::Dead;
            }
        }
    }

    /// A server reports that the copies it owed under map `epoch` (and
    /// every earlier one) are done. True when that completed a hand-off
    /// (the map changed: broadcast it).
    pub fn synced(&mut self, id: NodeId, epoch: u64) -> bool {
        let e = self.synced.entry(id).or_insert(0);
        *e = (*e).max(epoch);
        self.try_finish()
    }

    /// Starts draining server `id`: its ranges are handed to the others
    /// (two-phase, like a join), then it is told to exit. True when the map
    /// changed.
    pub fn drain(&mut self, id: NodeId) -> Result<bool, MembershipError> {
        let refuse = |why: &str| MembershipError::Drain {
            node: id,
            why: why.to_string(),
        };
        match self.map.node(id) {
            Some(n) if n.role == Role::Server && n.state == NodeState::Alive => {}
            Some(_) => return Err(refuse("it is not a live server")),
            None => return Err(MembershipError::UnknownNode(id)),
        }
        if self.leaving.contains(&id) {
            return Ok(false);
        }
        let others = self
            .map
            .live(Role::Server)
            .filter(|n| n.id != id && !self.leaving.contains(&n.id))
            .count();
        if others == 0 {
            return Err(refuse(
                "it is the last server; its data would have nowhere to go",
            ));
        }
        self.leaving.insert(id);
        // Said in the map, so the server (its readiness) and `pserver
        // status` can tell.
        if let Ok(i) = self.map.nodes.binary_search_by_key(&id, |n| n.id) {
            self.map.nodes[i].task = crate::map::DRAINING.to_string();
        }
        self.changed(true);
        Ok(true)
    }

    /// Servers being drained.
    pub fn leaving(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.leaving.iter().copied()
    }

    /// True while a hand-off waits for copies.
    pub fn handing_off(&self) -> bool {
        self.target.is_some()
    }

    /// While a hand-off waits for copies: how many live primaries of the
    /// intermediate map have reported theirs done, of how many.
    pub fn handoff_progress(&self) -> Option<(usize, usize)> {
        let h = self.target.as_ref()?;
        let mut primaries: Vec<NodeId> = self
            .map
            .partitions
            .iter()
            .map(|p| p.primary)
            .filter(|&id| {
                self.map
                    .node(id)
                    .is_some_and(|n| n.state == NodeState::Alive)
            })
            .collect();
        primaries.sort_unstable();
        primaries.dedup();
        let synced = primaries
            .iter()
            .filter(|id| self.synced.get(id).is_some_and(|&e| e >= h.epoch))
            .count();
        Some((synced, primaries.len()))
    }

    /// Each live server's and worker's last sign of life (ms), by id.
    pub fn last_seen(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.last_seen.iter().map(|(&id, &t)| (id, t))
    }

    /// Ad-hoc clients present now.
    pub fn clients_present(&self) -> usize {
        self.clients.len()
    }

    /// Creates a table, or returns the existing one when the spec matches.
    /// The bool is true when the table is new (the epoch went up).
    /// The spec's id is ignored: the manager assigns ids.
    pub fn create_table(
        &mut self,
        mut spec: TableSpec,
    ) -> Result<(TableSpec, bool), MembershipError> {
        spec.id = self.next_table;
        spec.validate()?;
        let name = spec.name.clone();
        let name = name.as_str();
        if let Some(old) = self.map.table(name) {
            spec.id = old.id;
            return if *old == spec {
                Ok((spec, false))
            } else {
                Err(MembershipError::TableExists(name.to_string()))
            };
        }
        if self.map.tables.len() >= MAX_TABLES {
            return Err(MembershipError::TooManyTables);
        }
        self.next_table += 1;
        self.map.tables.push(spec.clone());
        self.changed(false);
        Ok((spec, true))
    }

    /// `node` enters barrier `name` of its group. Returns the barrier to
    /// release when every live worker of the group is now in it.
    pub fn barrier_enter(
        &mut self,
        name: &str,
        node: NodeId,
    ) -> Result<Option<Released>, MembershipError> {
        let group = match self.map.node(node) {
            Some(n)
                if n.role == Role::Worker
                    && n.state == NodeState::Alive
                    && n.group != Group::Idle =>
            {
                n.group.clone()
            }
            _ => return Err(MembershipError::NotWorker(node)),
        };
        self.barriers
            .entry((group, name.to_string()))
            .or_default()
            .insert(node);
        Ok(self.release_ready().into_iter().next())
    }

    /// Barriers that every live worker of their group has entered (call
    /// after workers die or change groups).
    pub fn release_ready(&mut self) -> Vec<Released> {
        let ready: Vec<(Group, String)> = self
            .barriers
            .iter()
            .filter(|((group, _), entered)| {
                self.map
                    .group_workers(group)
                    .iter()
                    .all(|w| entered.contains(w))
            })
            .map(|(key, _)| key.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|key| {
                self.barriers.remove(&key).map(|nodes| Released {
                    group: key.0,
                    name: key.1,
                    nodes,
                })
            })
            .collect()
    }
}

mod recovery;
mod returning;

#[cfg(test)]
mod tests;
