//! The manager's state machine: registration, leases, tables and barriers.
//!
//! Time comes in as milliseconds from the caller (the runtime reads its clock;
//! tests pass numbers), so every transition is deterministic.

use crate::map::{ClusterMap, NodeId, NodeInfo, NodeState, Role};
use crate::ring;
use crate::spec::{SpecError, TableSpec};
use std::collections::{BTreeMap, BTreeSet};

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
    /// The node was declared dead; it must register again.
    #[error("node {0} was declared dead; register again")]
    Dead(NodeId),
    /// The table spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A table of this name exists with another spec.
    #[error("table {0:?} exists with a different spec")]
    TableExists(String),
    /// Too many tables.
    #[error("the cluster holds the maximum of {MAX_TABLES} tables")]
    TooManyTables,
    /// Only workers take part in barriers.
    #[error("node {0} is not a live worker and cannot enter a barrier")]
    NotWorker(NodeId),
}

/// The manager's state: the map plus what it needs to keep the map true.
#[derive(Clone, Debug)]
pub struct Membership {
    cfg: MembershipConfig,
    map: ClusterMap,
    /// Last heartbeat of every live server and worker.
    last_seen: BTreeMap<NodeId, u64>,
    /// Ad-hoc clients: they get ids but are not in the map, so they never
    /// change the epoch.
    clients: BTreeMap<NodeId, u64>,
    next_id: NodeId,
    next_table: u32,
    barriers: BTreeMap<String, BTreeSet<NodeId>>,
}

/// A barrier every live worker has entered: reply to these nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
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
            next_id: 1,
            next_table: 1,
            barriers: BTreeMap::new(),
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
    /// (the epoch goes up); clients do not.
    pub fn register(
        &mut self,
        role: Role,
        addr: &str,
        now_ms: u64,
    ) -> Result<NodeId, MembershipError> {
        if role == Role::Server && addr.is_empty() {
            return Err(MembershipError::NoAddress);
        }
        let id = self.next_id;
        self.next_id += 1;
        if role == Role::Client {
            self.clients.insert(id, now_ms);
            return Ok(id);
        }
        self.map.nodes.push(NodeInfo {
            id,
            role,
            addr: addr.to_string(),
            state: NodeState::Alive,
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
                Ok(())
            }
        }
    }

    /// The node's connection closed: a client is forgotten, a server or
    /// worker is declared dead. Returns true when the map changed.
    pub fn disconnected(&mut self, id: NodeId) -> bool {
        if self.clients.remove(&id).is_some() {
            return false;
        }
        self.declare_dead(&[id])
    }

    /// Declares dead every node silent for more than [`silence_limit_ms`]
    /// by `now_ms`; returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<NodeId> {
        let lease = self.cfg.lease_ms;
        let limit = silence_limit_ms(lease);
        let late: Vec<NodeId> = self
            .last_seen
            .iter()
            .filter(|&(_, &t)| now_ms.saturating_sub(t) > limit)
            .map(|(&id, _)| id)
            .collect();
        // Clients hold no state anyone waits on; drop silent ones quietly.
        self.clients
            .retain(|_, t| now_ms.saturating_sub(*t) <= lease.saturating_mul(4));
        self.declare_dead(&late);
        late
    }

    fn declare_dead(&mut self, ids: &[NodeId]) -> bool {
        let mut changed = false;
        let mut servers = false;
        for &id in ids {
            self.last_seen.remove(&id);
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
        if servers {
            let live: Vec<NodeId> = self.map.live(Role::Server).map(|n| n.id).collect();
            self.map.partitions = ring::place(&live, self.cfg.vnodes, self.cfg.replicas);
        }
        self.map.epoch += 1;
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

    /// `node` enters barrier `name`. Returns the barrier to release when every
    /// live worker is now in it.
    pub fn barrier_enter(
        &mut self,
        name: &str,
        node: NodeId,
    ) -> Result<Option<Released>, MembershipError> {
        match self.map.node(node) {
            Some(n) if n.role == Role::Worker && n.state == NodeState::Alive => {}
            _ => return Err(MembershipError::NotWorker(node)),
        }
        self.barriers
            .entry(name.to_string())
            .or_default()
            .insert(node);
        Ok(self.release_ready().into_iter().next())
    }

    /// Barriers that every live worker has entered (call after workers die).
    pub fn release_ready(&mut self) -> Vec<Released> {
        let live: BTreeSet<NodeId> = self.map.live_workers().into_iter().collect();
        let ready: Vec<String> = self
            .barriers
            .iter()
            .filter(|(_, entered)| live.is_subset(entered))
            .map(|(name, _)| name.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|name| {
                self.barriers
                    .remove(&name)
                    .map(|nodes| Released { name, nodes })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::spec::{Consistency, Init, UpdaterSpec};

    fn spec_of(name: &str, dim: u32) -> TableSpec {
        TableSpec {
            id: 0,
            name: name.into(),
            dim,
            init: Init::Zero,
            updater: UpdaterSpec::Add,
            consistency: Consistency::Eventual,
            aggregate: false,
        }
    }

    fn mgr() -> Membership {
        Membership::new(MembershipConfig {
            replicas: 1,
            vnodes: 8,
            lease_ms: 100,
        })
        .unwrap()
    }

    #[test]
    fn config_is_checked() {
        let bad = MembershipConfig {
            vnodes: 0,
            ..Default::default()
        };
        assert!(matches!(
            Membership::new(bad),
            Err(MembershipError::Config(_))
        ));
    }

    #[test]
    fn servers_change_the_map_clients_do_not() {
        let mut m = mgr();
        let s1 = m.register(Role::Server, "127.0.0.1:1", 0).unwrap();
        assert_eq!(m.map().epoch, 1);
        let s2 = m.register(Role::Server, "127.0.0.1:2", 0).unwrap();
        assert_eq!(m.map().epoch, 2);
        assert!(m.map().partitions.iter().any(|p| p.primary == s1));
        assert!(m.map().partitions.iter().any(|p| p.primary == s2));
        let c = m.register(Role::Client, "", 0).unwrap();
        assert_eq!(m.map().epoch, 2);
        assert!(m.map().node(c).is_none());
        assert!(m.heartbeat(c, 5).is_ok());
        assert_eq!(
            m.register(Role::Server, "", 0),
            Err(MembershipError::NoAddress)
        );
    }

    #[test]
    fn lease_expiry_marks_dead_and_moves_ranges() {
        let mut m = mgr();
        let s1 = m.register(Role::Server, "a", 0).unwrap();
        let s2 = m.register(Role::Server, "b", 0).unwrap();
        m.heartbeat(s1, 50).unwrap();
        // Silent for three quarters of the lease (75 ms) is alive; longer is dead.
        assert!(m.expire(75).is_empty());
        let epoch = m.map().epoch;
        assert_eq!(m.expire(76), vec![s2]);
        assert_eq!(m.map().epoch, epoch + 1);
        assert_eq!(m.map().node(s2).unwrap().state, NodeState::Dead);
        assert!(m.map().partitions.iter().all(|p| p.primary == s1));
        assert_eq!(m.heartbeat(s2, 160), Err(MembershipError::Dead(s2)));
        assert_eq!(m.heartbeat(99, 160), Err(MembershipError::UnknownNode(99)));
    }

    #[test]
    fn tables_are_idempotent_and_checked() {
        let mut m = mgr();
        let (t, new) = m.create_table(spec_of("w", 1)).unwrap();
        assert!(new);
        let (t2, new2) = m.create_table(spec_of("w", 1)).unwrap();
        assert!(!new2);
        assert_eq!(t, t2);
        assert_eq!(
            m.create_table(spec_of("w", 2)),
            Err(MembershipError::TableExists("w".into()))
        );
        assert!(matches!(
            m.create_table(spec_of("x", 0)),
            Err(MembershipError::Spec(_))
        ));
    }

    #[test]
    fn barriers_release_when_all_live_workers_entered() {
        let mut m = mgr();
        let w1 = m.register(Role::Worker, "", 0).unwrap();
        let w2 = m.register(Role::Worker, "", 0).unwrap();
        assert_eq!(m.barrier_enter("b", w1).unwrap(), None);
        let r = m.barrier_enter("b", w2).unwrap().unwrap();
        assert_eq!(r.nodes, [w1, w2].into_iter().collect());
        // A worker dying releases the others.
        assert_eq!(m.barrier_enter("c", w1).unwrap(), None);
        assert!(m.disconnected(w2));
        let r = m.release_ready();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, "c");
        assert_eq!(
            m.barrier_enter("d", w2),
            Err(MembershipError::NotWorker(w2))
        );
    }
}
