//! Control messages, postcard-encoded in a frame's control section.

use pserver_core::map::Group;
use pserver_core::{ClusterMap, Consistency, KeyRange, NodeId, Role, TableSpec};
use serde::{Deserialize, Serialize};

/// Machine-readable reason carried by an error reply. Postcard encodes the
/// variant's index, so new codes go at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed,
    /// The table id is not known to this node.
    UnknownTable,
    /// Values do not match keys x width.
    WrongWidth,
    /// A value is NaN or infinite.
    NotFinite,
    /// Keys not sorted and unique, or outside the request's range.
    BadKeys,
    /// This server does not own the range (and the epoch did not tell).
    NotOwner,
    /// The sender's epoch is newer than this node's: retry shortly.
    EpochAhead,
    /// The whole push was already applied at this clock and is not a retry.
    Duplicate,
    /// A configured limit (keys per request, frame size, tables) was hit.
    Limit,
    /// The request is not valid for this node's role or state.
    Invalid,
    /// Something failed inside the node.
    Internal,
    /// A key-reference frame (`FLAG_KEYREF`) named a key list the receiver
    /// does not hold (never sent, evicted, or the receiver restarted). Nothing
    /// was done: resend the frame with its keys.
    KeyCacheMiss,
    /// A push's clock is so far below the sender's latest over its range
    /// (more than the range clock's window) that the server can no longer
    /// tell whether it was applied; nothing was done.
    TooOld,
    /// The manager has no record of the node that asked to rejoin: another
    /// manager registered it (this one was started without its state).
    /// Nothing was done; the node keeps its data and asks again later.
    Stranger,
}

/// A control message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// First frame of a node to the manager.
    Register {
        /// What the node is.
        role: Role,
        /// Address it accepts connections on ("" for clients, and for
        /// workers that take no tasks).
        addr: String,
        /// The worker group a worker starts in.
        group: Group,
        /// The id a server comes back under (`pserver server --id`): that
        /// of a server of the map declared dead, whose ring positions and
        /// ranges it takes over as a joiner. `None`: a new id.
        id: Option<NodeId>,
    },
    /// The manager's answer to `Register`.
    Registered {
        /// The node's id.
        id: NodeId,
        /// The current map.
        map: ClusterMap,
    },
    /// Keeps a node's lease alive.
    Heartbeat,
    /// A cluster map (broadcast by the manager; body of a redirect).
    Map(ClusterMap),
    /// Ask the manager for the current map.
    GetMap,
    /// Ask the manager to create a table (its `id` is ignored; the manager assigns one).
    CreateTable(TableSpec),
    /// A table was created (or already existed with the same spec).
    TableCreated(TableSpec),
    /// Enter a named barrier; the reply comes once every live worker entered.
    Barrier {
        /// Barrier name.
        name: String,
    },
    /// Ask the manager for the cluster's status.
    Status,
    /// The manager's status answer.
    StatusReply(Status),
    /// Overrides the table's consistency for one pull.
    Consistency(Consistency),
    /// Acknowledges a push: how many keys were applied, and whether part or
    /// all of it had been applied before at this clock.
    PushAck {
        /// Keys applied now.
        applied: u64,
        /// Keys skipped because their range already had this clock.
        duplicate: u64,
    },
    /// Generic success.
    Ok,
    /// A refused request.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// One line for people.
        message: String,
    },
    /// Chain replication, primary (or a replica) to the next replica: apply
    /// this frame's contents, forward it to `chain`, then reply `Ok`. The
    /// frame's keys, table and range are those of the change.
    Replicate {
        /// The table (so a replica that has not yet seen the map that
        /// created it can still take the change).
        spec: TableSpec,
        /// What the values are.
        what: Replica,
        /// Clock records to replay (`node`, range, clock), so the replica
        /// refuses the same duplicate pushes its primary would.
        records: Vec<(NodeId, KeyRange, u64)>,
        /// The replicas after the receiver, in chain order.
        chain: Vec<NodeId>,
    },
    /// Server to manager: every copy this server owed under map `epoch`
    /// (and earlier) has reached its chain, so a hand-off waiting on it may
    /// complete. Server to server: a marker queued behind earlier changes;
    /// its `Ok` says they all arrived.
    Synced {
        /// The map epoch.
        epoch: u64,
    },
    /// The old primary of the frame's range stopped serving it (it applied
    /// a map that hands the range on). Sent down the range's old chain
    /// behind every change it made there, so the new primary, which holds
    /// the range back until this arrives, has them all before it serves.
    Fence {
        /// The old primary.
        from: NodeId,
        /// The servers after the receiver, in chain order.
        chain: Vec<NodeId>,
    },
    /// A node's first frame on a new connection to a manager that already
    /// knows it (the manager restarted, or the connection broke): it keeps
    /// its id. Answered with `Registered` (same id) or an error, after
    /// which the node must register anew.
    Rejoin {
        /// The node's id.
        id: NodeId,
        /// What the node is.
        role: Role,
        /// Address it accepts connections on ("" for workers and clients).
        addr: String,
    },
    /// Ask a server to write the ranges it is primary of, for every table,
    /// into checkpoint directory `dir` (on its file system).
    Snapshot {
        /// The directory.
        dir: String,
    },
    /// A server's answer to `Snapshot`: the files it wrote.
    Snapshotted {
        /// One per (table, range).
        files: Vec<SnapshotFile>,
    },
    /// Ask the manager to drain a server: hand its ranges to the others,
    /// then let it exit.
    Drain {
        /// The server.
        node: NodeId,
    },
    /// A checkpoint's slots for the frame's keys (weights then optimizer
    /// state), sent to the primary of the frame's range: it stores them
    /// and copies them down its own chain. Clock records of the old
    /// cluster are not carried over.
    Restore {
        /// The table (so a server that has not yet seen the map that
        /// created it can still take the slots).
        spec: TableSpec,
    },
    /// A worker moves to another group (a scheduler gave it a job, or the
    /// job ended) and says what it works on; answered with the new map.
    Join {
        /// The group.
        group: Group,
        /// What it works on, for `pserver status`.
        task: String,
    },
    /// A job's scheduler claims the job's name: one scheduler per job.
    /// Answered `Ok`, or refused while another live node holds it; the
    /// claim ends when its holder leaves.
    ClaimJob {
        /// The job.
        job: String,
    },
    /// A server's first frame on a new connection to the manager after it
    /// lost it: [`Control::Rejoin`] with what the server knows of the
    /// cluster, so a manager without state can rebuild the map from the
    /// servers that report in. Answered like `Rejoin`.
    Recover {
        /// The server's id.
        id: NodeId,
        /// Address it accepts connections on.
        addr: String,
        /// The latest map the server holds.
        map: ClusterMap,
        /// The highest sender id the server has seen on a request, so a
        /// rebuilt manager hands out no id a node or client still holds.
        senders: NodeId,
    },
    /// A client (or worker) is done and leaves for good: its id is not
    /// taken back, and the servers forget its clocks once the map says it
    /// left (a client that says nothing leaves when its lease runs out).
    /// Answered `Ok`.
    Goodbye,
    /// The control section of a pull flagged `FLAG_SIGNIFICANT`: send only
    /// the entries that moved by more than `threshold` since what the
    /// sender holds (`basis`; `None`: it holds nothing to rely on).
    SignificantPull {
        /// Largest change of a value left out, `>= 0`.
        threshold: f32,
        /// The replies the sender has applied.
        basis: Option<pserver_core::significant::Basis>,
        /// The pull's own consistency model (what `Control::Consistency`
        /// says for other pulls).
        consistency: Option<Consistency>,
    },
    /// The control section of a reply flagged `FLAG_SIGNIFICANT`: which
    /// keys' values it carries, and its place among the filtered replies.
    Significant(pserver_core::significant::Stamp),
    /// Asks a server for its figures (`pserver status --watch`); answered
    /// with [`Control::ServerReport`].
    Stats,
    /// A server's figures: what its metrics listener exports, for the
    /// live view of a cluster.
    ServerReport(ServerReport),
}

/// A server's figures at one moment ([`Control::Stats`]'s answer): its
/// counters since it started (rates are their differences) and what it
/// holds and queues now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    /// The epoch of the map it serves under.
    pub epoch: u64,
    /// Per table of its map.
    pub tables: Vec<TableReport>,
    /// The queue to each next server of a chain it feeds.
    pub links: Vec<LinkReport>,
    /// Pulls parked until slower workers push.
    pub pulls_waiting: u64,
    /// Replies waiting for the chain.
    pub acks_waiting: u64,
    /// Maps whose hand-off copies are not all answered yet.
    pub handoff_copies_pending: u64,
    /// Error replies sent so far.
    pub errors: u64,
    /// Connections open.
    pub connections: u64,
}

/// One table on one server, in a [`ServerReport`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    /// The table's id.
    pub id: u32,
    /// Data requests read, by operation: push, pull, push-pull, scan.
    pub requests: [u64; 4],
    /// Keys in them, by operation.
    pub keys: [u64; 4],
    /// Bytes of them on the wire, by operation.
    pub bytes: [u64; 4],
    /// Keys stored (`None` while the table is lent out for a big request).
    pub stored_keys: Option<u64>,
}

/// One chain link's queue, in a [`ServerReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The next server.
    pub to: NodeId,
    /// Bytes queued and not yet answered.
    pub bytes: u64,
    /// Changes queued and not yet answered.
    pub changes: u64,
}

/// One range file of a checkpoint, as its manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// The table.
    pub table: u32,
    /// The keys it covers.
    pub range: KeyRange,
    /// Its name in the checkpoint directory.
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// CRC32 of its contents after the header.
    pub crc: u32,
}

/// What a [`Control::Replicate`] frame's values are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Replica {
    /// Whole slots (weights then optimizer state) to store as they are:
    /// the result of a push (chain replication forwards values, not
    /// gradients), or a copy of a range for a new replica.
    Slots,
    /// The not yet applied sum of pushes to an aggregating table for
    /// `clock` (keys and summed values), part of a copy to a new replica:
    /// the receiver adds it to its own sums for that clock. The clock
    /// records of who contributed travel with the copy's slots.
    Pending {
        /// The clock the sums belong to.
        clock: u64,
    },
    /// Part of a copy of a range to a new holder: whole slots, as `Slots`.
    /// The first part (`reset`) also drops the receiver's own unapplied
    /// sums for keys of the frame's range: the copy's `Pending` parts that
    /// follow are the primary's, which are the truth.
    Copy {
        /// First part of the copy of this range.
        reset: bool,
    },
    /// The result of applying the sum of `clock`'s pushes to an
    /// aggregating table (replication *after* aggregation: one message per
    /// clock instead of one per worker): whole slots to store, the clock
    /// records of every worker whose push is in the sum, and the receiver
    /// drops its own unapplied sum for that clock (any part it got raw is
    /// in these slots).
    Flushed {
        /// The clock whose sum was applied.
        clock: u64,
    },
    /// A worker's push to an aggregating table, to be summed like the
    /// primary sums it (the sum is applied when the clock completes); the
    /// frame's clock and the record say whose and when.
    Push {
        /// The worker that pushed.
        worker: NodeId,
    },
}

/// What `pserver status` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The map (nodes, partitions, tables, epoch).
    pub map: ClusterMap,
    /// Per server: keys stored per table, as last reported (may be empty).
    pub servers: Vec<ServerStats>,
    /// Claimed jobs and the node (scheduler) holding each.
    pub jobs: Vec<(String, NodeId)>,
}

/// A server's counters as reported with its heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// Server id.
    pub id: NodeId,
    /// (table id, keys stored).
    pub keys: Vec<(u32, u64)>,
    /// Bytes held by its tables.
    pub bytes: u64,
}

impl Control {
    /// Encodes with postcard.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("control messages always serialize")
    }

    /// Decodes with postcard; errors name what failed.
    pub fn from_bytes(b: &[u8]) -> Result<Control, crate::WireError> {
        postcard::from_bytes(b).map_err(|e| crate::WireError::Control(e.to_string()))
    }
}
