//! A dead server coming back under its id (`pserver server --id N`): a
//! process restarted in place of one that failed (a Ray actor restarted by
//! Ray, say) takes the id, so the ring puts it where it was and its old
//! ranges come back to it through the usual hand-off; and that id's
//! earlier process, should it still run, is told it was replaced.

use super::*;

/// How many earlier processes of one server id [`Membership`] remembers.
const REPLACED_KEPT: usize = 4;

impl Membership {
    /// A server comes back under id `id` (`pserver server --id`: a process
    /// restarted in place of one that failed, such as a Ray actor), so it
    /// takes its old ring positions and, once the hand-off completes, its
    /// old ranges. Only a server the map holds as dead (declared dead by
    /// its lease or its closed connection, or retired after a drain) may be
    /// taken back: its ranges went to the others, and the new process
    /// holds nothing, so it enters exactly as a joining server does (the
    /// epoch goes up, the ranges the ring gives it are copied to it by
    /// their primaries before they switch to it), at `addr`, with
    /// [`NodeInfo::joined`] this map's epoch so its earlier process's
    /// frames are told apart. Nothing is kept by its id from before: the
    /// clock records that deduplicate pushes are by worker, and the
    /// servers drop their queues to the old process when they see the map.
    pub fn register_as(
        &mut self,
        id: NodeId,
        role: Role,
        addr: &str,
        now_ms: u64,
    ) -> Result<NodeId, MembershipError> {
        if role != Role::Server {
            return Err(MembershipError::IdNotForRole(role));
        }
        if addr.is_empty() {
            return Err(MembershipError::NoAddress);
        }
        if !self.reports.is_empty() {
            return Err(MembershipError::Rebuilding {
                missing: self.missing(),
            });
        }
        let Ok(i) = self.map.nodes.binary_search_by_key(&id, |n| n.id) else {
            return Err(MembershipError::NoSuchId(id));
        };
        let epoch = self.map.epoch + 1;
        let node = &mut self.map.nodes[i];
        if node.role != Role::Server {
            return Err(MembershipError::IdOfNonServer {
                id,
                role: node.role,
            });
        }
        if node.state == NodeState::Alive {
            return Err(MembershipError::IdAlive {
                id,
                addr: node.addr.clone(),
            });
        }
        let before = (
            std::mem::replace(&mut node.addr, addr.to_string()),
            node.joined,
        );
        node.state = NodeState::Alive;
        node.group = Group::Default;
        // A drained server's mark: it is not leaving now.
        node.task.clear();
        node.joined = epoch;
        let earlier = self.replaced.entry(id).or_default();
        earlier.push(before);
        let excess = earlier.len().saturating_sub(REPLACED_KEPT);
        earlier.drain(..excess);
        // It left all of these when it was declared dead; a joiner has none.
        self.leaving.remove(&id);
        self.synced.remove(&id);
        self.recovering.remove(&id);
        self.last_seen.insert(id, now_ms);
        self.fresh = false;
        self.changed(true);
        Ok(id)
    }

    /// Whether `r` comes from an earlier process of a server that came back
    /// under its id: its own map gives it an earlier [`NodeInfo::joined`]
    /// than this map does, and it is at the address this map gives the id
    /// (the new process took the old one's address) or at one of the
    /// id's earlier processes. A node of another cluster that happens to
    /// share the id is neither, and stays a stranger.
    pub(super) fn replaced_by(&self, r: &Report) -> Option<MembershipError> {
        let ours = self.map.node(r.id).filter(|n| n.role == Role::Server)?;
        let theirs = r.map.node(r.id)?;
        if theirs.joined >= ours.joined {
            return None;
        }
        let earlier = self
            .replaced
            .get(&r.id)
            .is_some_and(|e| e.iter().any(|(addr, _)| *addr == r.addr));
        (r.addr == ours.addr || earlier).then(|| MembershipError::Replaced {
            id: r.id,
            addr: ours.addr.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
