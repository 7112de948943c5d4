//! A manager's restart: what it keeps ([`Persisted`]) and gets back
//! ([`Membership::restore`], with a grace for the nodes of the restored
//! map), nodes rejoining it, and a manager without state rebuilding the
//! map from what the servers report ([`Membership::recover`]).

use super::*;

/// How many leases, beyond the usual silence limit, a node of a restored
/// map has to rejoin before it is declared dead. Nodes retry a lost manager
/// at most a quarter of a lease apart (`pserver_node::proto::rejoin`), so one
/// lease is several tries; a node that has not come back by then is dead
/// or cut off (and then fenced by its own lease) and fails over as usual.
pub const RECOVERY_GRACE_LEASES: u64 = 1;

/// What the manager must keep across a restart: the map (nodes, ranges,
/// tables, epoch) and the id counters, so that no id is ever reused.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    /// The map at the last change.
    pub map: ClusterMap,
    /// The next node id to hand out.
    pub next_id: NodeId,
    /// The next table id to hand out.
    pub next_table: u32,
}

/// What a server tells a manager that has no record of it (one started
/// without state): the map it holds and the highest sender id it has seen.
/// Such a manager rebuilds its map from these ([`Membership::recover`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The server's id.
    pub id: NodeId,
    /// The address it listens on.
    pub addr: String,
    /// The latest map it holds.
    pub map: ClusterMap,
    /// The highest id that sent it a request.
    pub senders: NodeId,
}

/// What became of a server's [`Report`].
#[derive(Clone, Debug, PartialEq)]
pub enum Recovered {
    /// This manager knows the server: it rejoined, as by
    /// [`Membership::rejoin`].
    Rejoined,
    /// Counted; the manager waits for these servers (id, address) of the
    /// latest reported map before it takes that map over.
    Waiting(Vec<(NodeId, String)>),
    /// That report completed the roll call: the manager took over the map
    /// and the server rejoined.
    Rebuilt {
        /// The server whose map was taken (the latest reported).
        from: NodeId,
        /// Its epoch.
        reported: u64,
        /// The new map's epoch.
        epoch: u64,
        /// How many servers reported.
        servers: usize,
        /// Whether the server that completed the roll call rejoined: the
        /// taken map may have declared it dead.
        rejoined: Result<(), MembershipError>,
    },
}

/// How far a rebuilt map's epoch jumps past the latest reported one, so
/// that it is newer than any map a node may hold: a worker may have seen a
/// map from the lost manager that no server got (the broadcast in flight
/// when it died); far fewer than this many maps can be made in that time.
pub const REBUILT_EPOCH_JUMP: u64 = 1 << 16;

/// The names of the servers a rebuild waits for, for its message.
pub(super) fn waiting_for(missing: &[(NodeId, String)]) -> String {
    let names: Vec<String> = missing
        .iter()
        .take(8)
        .map(|(id, addr)| format!("server {id} at {addr}"))
        .collect();
    let more = missing.len().saturating_sub(names.len());
    if more > 0 {
        format!("{} and {more} more", names.join(", "))
    } else {
        names.join(", ")
    }
}

impl Membership {
    /// What a restarted manager needs ([`Membership::restore`]).
    pub fn persisted(&self) -> Persisted {
        Persisted {
            map: self.map.clone(),
            next_id: self.next_id,
            next_table: self.next_table,
        }
    }

    /// A manager restarted from `p`: the map as it was, ids continuing
    /// where they stopped. Every live server and worker may rejoin with
    /// [`Membership::rejoin`] until the silence limit plus
    /// [`RECOVERY_GRACE_LEASES`] leases after `now_ms` (however long the
    /// manager was away: their leases count from the restart); those that
    /// do not are declared dead as usual. The config's placement settings
    /// must match the map's.
    pub fn restore(
        cfg: MembershipConfig,
        p: Persisted,
        now_ms: u64,
    ) -> Result<Membership, MembershipError> {
        let mut m = Membership::new(cfg)?;
        if p.map.replicas != cfg.replicas || p.map.vnodes != cfg.vnodes {
            return Err(MembershipError::Config(format!(
                "the saved map has {} replicas and {} vnodes, the config {} and {}",
                p.map.replicas, p.map.vnodes, cfg.replicas, cfg.vnodes
            )));
        }
        let max_id = p.map.nodes.iter().map(|n| n.id).max().unwrap_or(0);
        let max_table = p.map.tables.iter().map(|t| t.id).max().unwrap_or(0);
        if p.next_id <= max_id || p.next_id < p.map.clients.below || p.next_table <= max_table {
            return Err(MembershipError::Config(format!(
                "the saved id counters ({}, {}) are not above the ids in use ({max_id}, {max_table})",
                p.next_id, p.next_table
            )));
        }
        m.last_seen = p
            .map
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Alive)
            .map(|n| (n.id, now_ms))
            .collect();
        m.recovering = m.last_seen.keys().copied().collect();
        // The clients present at the last saved map have their silence
        // limit from the restart to rejoin; the others are gone already.
        m.clients = p.map.clients.here.iter().map(|&id| (id, now_ms)).collect();
        m.fresh = false;
        m.map = p.map;
        m.map.lease_ms = cfg.lease_ms;
        m.next_id = p.next_id;
        m.next_table = p.next_table;
        Ok(m)
    }

    /// A node that was registered before the manager restarted (or lost its
    /// connection) comes back with its id: a live server or worker of the
    /// map with the same role and address renews its lease; a client whose
    /// id this manager gave out is taken back. A node of the map declared
    /// dead meanwhile is refused as [`MembershipError::Dead`] (its ranges
    /// went to others: it must drop them). Any other is a
    /// [`MembershipError::Stranger`]: this manager never registered it.
    pub fn rejoin(
        &mut self,
        id: NodeId,
        role: Role,
        addr: &str,
        now_ms: u64,
    ) -> Result<(), MembershipError> {
        if !self.reports.is_empty() {
            return Err(MembershipError::Rebuilding {
                missing: self.missing(),
            });
        }
        let stranger = || MembershipError::Stranger {
            id,
            role,
            addr: addr.to_string(),
        };
        if role == Role::Client {
            // An id at or above the counter, or one the map gives a node,
            // is not one this manager gave a client.
            let ours = id < self.next_id
                || (self.fresh_base..self.fresh_base.saturating_add(self.fresh_clients))
                    .contains(&id);
            if !ours || self.map.node(id).is_some() {
                return Err(stranger());
            }
            // The map said it left: servers forgot its clocks, so its
            // pushes could be applied twice; it must not come back.
            if self.map.departed(id) {
                return Err(MembershipError::Dead(id));
            }
            self.clients.insert(id, now_ms);
            return Ok(());
        }
        match self.map.node(id) {
            // Checked before its state: a dead node of another role or
            // address is someone else's id, not this node's verdict.
            Some(n) if n.role != role || n.addr != addr => Err(stranger()),
            None => Err(stranger()),
            Some(n) if n.state == NodeState::Dead => Err(MembershipError::Dead(id)),
            Some(_) => {
                self.last_seen.insert(id, now_ms);
                self.recovering.remove(&id);
                Ok(())
            }
        }
    }

    /// A server lost its manager and reports to this one. A manager that
    /// knows it takes it back ([`Recovered::Rejoined`], as
    /// [`Membership::rejoin`]). A fresh one (started without state, no id
    /// handed out) rebuilds its map from the reports instead: it takes over
    /// the latest reported map once every server alive in that map has
    /// reported, so no server that holds a later map (or the only copy of
    /// some range) is left out; until then it answers
    /// [`Recovered::Waiting`] and refuses to register servers and workers
    /// (clients get ids from [`FRESH_CLIENT_IDS`]). The taken
    /// map's epoch jumps by [`REBUILT_EPOCH_JUMP`], ids go on above every
    /// id the reports name (nodes and senders), and every live node has the
    /// grace of a restored map to rejoin.
    pub fn recover(&mut self, r: Report, now_ms: u64) -> Result<Recovered, MembershipError> {
        if !self.fresh {
            if let Some(e) = self.replaced_by(&r) {
                return Err(e);
            }
            return self
                .rejoin(r.id, Role::Server, &r.addr, now_ms)
                .map(|()| Recovered::Rejoined);
        }
        let cannot = |why: String| MembershipError::CannotRebuild { id: r.id, why };
        if r.map.replicas != self.cfg.replicas || r.map.vnodes != self.cfg.vnodes {
            return Err(cannot(format!(
                "its map has {} replicas and {} vnodes, this manager {} and {}",
                r.map.replicas, r.map.vnodes, self.cfg.replicas, self.cfg.vnodes
            )));
        }
        match r.map.node(r.id) {
            Some(n) if n.role == Role::Server && n.addr == r.addr => {}
            _ => {
                return Err(cannot(format!(
                    "its own map does not hold it as a server at {:?}",
                    r.addr
                )));
            }
        }
        let id = r.id;
        self.reports.insert(id, r);
        let missing = self.missing();
        if !missing.is_empty() {
            return Ok(Recovered::Waiting(missing));
        }
        let reports = std::mem::take(&mut self.reports);
        let Some(best) = reports.values().max_by_key(|r| (r.map.epoch, r.id)) else {
            return Ok(Recovered::Waiting(Vec::new()));
        };
        // Clients of an earlier fresh manager (ids from FRESH_CLIENT_IDS)
        // must not move the counter into their range.
        // Ids below a map's client record were all handed out, whether or
        // not any server heard from them.
        let next_id = reports
            .values()
            .flat_map(|r| r.map.nodes.iter().map(|n| n.id).chain([r.id, r.senders]))
            .filter(|&id| id < FRESH_CLIENT_IDS)
            .max()
            .unwrap_or(0)
            .saturating_add(1)
            .max(
                reports
                    .values()
                    .map(|r| r.map.clients.below)
                    .max()
                    .unwrap_or(0),
            );
        let next_table = reports
            .values()
            .flat_map(|r| r.map.tables.iter().map(|t| t.id))
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let mut map = best.map.clone();
        let (from, reported) = (best.id, map.epoch);
        map.epoch = map.epoch.saturating_add(REBUILT_EPOCH_JUMP);
        let p = Persisted {
            map,
            next_id,
            next_table,
        };
        let clients = std::mem::take(&mut self.clients);
        let fresh = (self.fresh_base, self.fresh_clients);
        *self = Membership::restore(self.cfg, p, now_ms)?;
        // Clients that registered while this manager was fresh stay, beside
        // those the taken map says are present.
        self.clients.extend(clients);
        (self.fresh_base, self.fresh_clients) = fresh;
        // The reporter may be one the taken map declared dead (its own map
        // was older): it must drop its ranges, as any node so refused.
        let rejoined = self.rejoin(id, Role::Server, &reports[&id].addr, now_ms);
        Ok(Recovered::Rebuilt {
            from,
            reported,
            epoch: self.map.epoch,
            servers: reports.len(),
            rejoined,
        })
    }

    /// Salts where the ids of clients registered while fresh start
    /// ([`FRESH_CLIENT_IDS`]): the runtime passes something that differs
    /// between starts (the wall clock), the core reads none. Only before
    /// any such client registered.
    pub fn salt_fresh_clients(&mut self, salt: u64) {
        if self.fresh_clients == 0 {
            self.fresh_base = FRESH_CLIENT_IDS + (salt % (1 << 30)) as NodeId;
        }
    }

    /// True while this manager collects servers' reports to rebuild the
    /// map from ([`Membership::recover`]).
    pub fn rebuilding(&self) -> bool {
        !self.reports.is_empty()
    }

    /// While rebuilding: the servers alive in the latest reported map that
    /// have not reported (as that server, at that address).
    pub(super) fn missing(&self) -> Vec<(NodeId, String)> {
        let Some(best) = self.reports.values().max_by_key(|r| (r.map.epoch, r.id)) else {
            return Vec::new();
        };
        best.map
            .live(Role::Server)
            .filter(|n| self.reports.get(&n.id).is_none_or(|r| r.addr != n.addr))
            .map(|n| (n.id, n.addr.clone()))
            .collect()
    }
}
