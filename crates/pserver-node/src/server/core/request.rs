//! What a server takes, parsed once from a frame into a typed request, and
//! why it refuses one.
//!
//! [`Request::parse`] reads the header's kind and the control section once;
//! the handlers take the typed values and never look at raw control bytes
//! again. Three families: data (push, pull, push-pull, scan, from workers
//! and clients), chain (changes, fences and markers from other servers),
//! and admin (the map, checkpoints, restores).

use pserver_core::map::Group;
use pserver_core::significant::Basis;
use pserver_core::table::TableError;
use pserver_core::{Consistency, KeyRange, NodeId, TableSpec};
use pserver_wire::header::{FLAG_SCAN, FLAG_SIGNIFICANT};
use pserver_wire::message::Replica;
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind};

/// A request, parsed.
#[derive(Debug)]
pub enum Request {
    /// A push, pull, push-pull or scan.
    Data(Data),
    /// A change from the previous server of a chain.
    Replicate(Replicate),
    /// A hand-off fence from the old primary of `header.range`.
    Fence {
        /// The frame's header.
        header: Header,
        /// The old primary.
        from: NodeId,
        /// The rest of the chain it travels.
        chain: Vec<NodeId>,
    },
    /// A forwarder's marker: everything queued before it has arrived.
    Marker(Header),
    /// Asks for the map.
    GetMap(Header),
    /// Asks for this server's figures (`pserver status --watch`).
    Stats(Header),
    /// Asks for a checkpoint of this server's primary ranges into `dir`.
    Snapshot {
        /// The frame's header.
        header: Header,
        /// The checkpoint directory.
        dir: String,
    },
    /// Slots of a checkpoint to store over `frame.header.range`, which
    /// this server is primary of, and copy down its chain.
    Restore {
        /// The table.
        spec: TableSpec,
        /// Keys and slots.
        frame: Frame,
    },
}

/// A data request.
#[derive(Debug)]
pub struct Data {
    /// The frame (keys may still be a key-list reference).
    pub frame: Frame,
    /// What it is.
    pub op: Op,
    /// A pull's own consistency model, overriding the table's.
    pub consistency: Option<Consistency>,
    /// A pull flagged `FLAG_SIGNIFICANT`: its threshold and basis.
    pub significant: Option<Significant>,
}

/// What a pull asks of the significantly-modified filter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Significant {
    /// Largest change of a value left out.
    pub threshold: f32,
    /// The replies the sender has applied.
    pub basis: Option<Basis>,
}

/// A data request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Apply values.
    Push,
    /// Read weights.
    Pull,
    /// Apply, then read.
    PushPull,
    /// Read every stored key of the range.
    Scan,
}

impl Op {
    /// True when the request applies values.
    pub fn pushes(self) -> bool {
        matches!(self, Op::Push | Op::PushPull)
    }

    /// True when the request may wait for slower workers.
    pub fn waits(self) -> bool {
        matches!(self, Op::Pull | Op::PushPull)
    }
}

/// A chain change.
#[derive(Debug)]
pub struct Replicate {
    /// The frame: keys and values.
    pub frame: Frame,
    /// The table.
    pub spec: TableSpec,
    /// What the values are.
    pub what: Replica,
    /// Clock records to replay.
    pub records: Vec<(NodeId, KeyRange, u64)>,
    /// The rest of the chain.
    pub chain: Vec<NodeId>,
}

impl Request {
    /// The header of the frame it was parsed from.
    pub fn header(&self) -> Header {
        match self {
            Request::Data(d) => d.frame.header,
            Request::Replicate(c) => c.frame.header,
            Request::Restore { frame, .. } => frame.header,
            Request::Fence { header, .. } | Request::Snapshot { header, .. } => *header,
            Request::Marker(h) | Request::GetMap(h) | Request::Stats(h) => *h,
        }
    }

    /// Parses a frame. The error is the refusal to send back.
    pub fn parse(frame: Frame) -> Result<Request, Refusal> {
        let h = frame.header;
        match h.kind {
            Kind::Push | Kind::Pull | Kind::PushPull => {
                let op = match h.kind {
                    Kind::Push => Op::Push,
                    Kind::PushPull => Op::PushPull,
                    _ if h.flags & FLAG_SCAN != 0 => Op::Scan,
                    _ => Op::Pull,
                };
                if h.flags & FLAG_SIGNIFICANT != 0 {
                    return significant_pull(frame, op);
                }
                let consistency = if op == Op::Pull && !frame.ctrl.is_empty() {
                    match frame.control_msg() {
                        Ok(Control::Consistency(c)) => Some(c),
                        Ok(other) => return Err(Refusal::NotConsistency(name(&other))),
                        Err(e) => return Err(Refusal::Malformed(e.to_string())),
                    }
                } else {
                    None
                };
                Ok(Request::Data(Data {
                    frame,
                    op,
                    consistency,
                    significant: None,
                }))
            }
            Kind::Control => match frame.control_msg() {
                Ok(Control::Replicate {
                    spec,
                    what,
                    records,
                    chain,
                }) => {
                    if spec.id != h.table {
                        return Err(Refusal::TableMismatch {
                            spec: spec.id,
                            frame: h.table,
                        });
                    }
                    Ok(Request::Replicate(Replicate {
                        frame,
                        spec,
                        what,
                        records,
                        chain,
                    }))
                }
                Ok(Control::Fence { from, chain }) => Ok(Request::Fence {
                    header: h,
                    from,
                    chain,
                }),
                Ok(Control::Synced { .. }) => Ok(Request::Marker(h)),
                Ok(Control::GetMap) => Ok(Request::GetMap(h)),
                Ok(Control::Stats) => Ok(Request::Stats(h)),
                Ok(Control::Snapshot { dir }) => Ok(Request::Snapshot { header: h, dir }),
                Ok(Control::Restore { spec }) => {
                    if spec.id != h.table {
                        return Err(Refusal::TableMismatch {
                            spec: spec.id,
                            frame: h.table,
                        });
                    }
                    Ok(Request::Restore { spec, frame })
                }
                Ok(other) => Err(Refusal::NotForServer(name(&other))),
                Err(e) => Err(Refusal::Malformed(e.to_string())),
            },
            other => Err(Refusal::NotForServer(format!("{other:?} frames"))),
        }
    }
}

/// Parses a data frame flagged `FLAG_SIGNIFICANT`: only a pull (not a
/// scan, a push or a push-pull, whose replies the filter does not cover),
/// with a `SignificantPull` whose threshold is a number `>= 0`.
fn significant_pull(frame: Frame, op: Op) -> Result<Request, Refusal> {
    if op != Op::Pull {
        return Err(Refusal::SignificantNotPull(frame.header.kind));
    }
    let (threshold, basis, consistency) = match frame.control_msg() {
        Ok(Control::SignificantPull {
            threshold,
            basis,
            consistency,
        }) => (threshold, basis, consistency),
        Ok(other) => return Err(Refusal::NotSignificantPull(name(&other))),
        Err(e) => return Err(Refusal::Malformed(e.to_string())),
    };
    if !(threshold >= 0.0 && threshold.is_finite()) {
        return Err(Refusal::BadThreshold(threshold));
    }
    Ok(Request::Data(Data {
        frame,
        op,
        consistency,
        significant: Some(Significant { threshold, basis }),
    }))
}

/// A control message's name, for refusals (not its whole contents: a map
/// or a status would make a huge error message).
fn name(c: &Control) -> String {
    let dbg = format!("{c:?}");
    dbg.split(['(', ' ', '{']).next().unwrap_or("?").to_string()
}

/// Why a server refused a request. Nothing was changed when one is sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The frame's contents could not be decoded.
    #[error("{0}")]
    Malformed(String),
    /// A message a server does not take.
    #[error("a server does not take {0}")]
    NotForServer(String),
    /// A pull's control section is another message.
    #[error("a pull carries Consistency, not {0}")]
    NotConsistency(String),
    /// `FLAG_SIGNIFICANT` on a frame other than a pull.
    #[error(
        "the significantly-modified filter (FLAG_SIGNIFICANT) is for pulls, not a {0:?} frame or a scan"
    )]
    SignificantNotPull(Kind),
    /// A pull flagged `FLAG_SIGNIFICANT` carries another message.
    #[error("a pull flagged FLAG_SIGNIFICANT carries SignificantPull, not {0}")]
    NotSignificantPull(String),
    /// A significantly-modified pull's threshold is negative or not a number.
    #[error("the significantly-modified filter's threshold must be a number >= 0, not {0}")]
    BadThreshold(f32),
    /// A table's id differs between the spec and the header.
    #[error("the spec names table {spec} but the frame table {frame}")]
    TableMismatch {
        /// The spec's id.
        spec: u32,
        /// The header's.
        frame: u32,
    },
    /// A worker pushed to a table of another worker group (job).
    #[error(
        "worker {sender} ({group}) may not push to table {table:?} of {table_group}: a table counts the workers of its own job only"
    )]
    OtherGroup {
        /// The worker.
        sender: NodeId,
        /// Its group.
        group: Group,
        /// The table's name.
        table: String,
        /// The table's group.
        table_group: Group,
    },
    /// The sender's map is older than this server's.
    #[error("stale epoch")]
    StaleEpoch,
    /// The sender's map is newer: retry once the broadcast arrives.
    #[error("request epoch {got} is ahead of this server's {have}")]
    EpochAhead {
        /// The request's epoch.
        got: u64,
        /// This server's.
        have: u64,
    },
    /// A table this server does not know.
    #[error("no table with id {0}")]
    UnknownTable(u32),
    /// A table whose updater this server cannot build.
    #[error("table {table}: {why}")]
    TableUnusable {
        /// The table.
        table: u32,
        /// Why.
        why: String,
    },
    /// This server is not the primary of the whole range.
    #[error("server {me} is not primary for all of {range}")]
    NotPrimary {
        /// This server.
        me: NodeId,
        /// The request's range.
        range: KeyRange,
    },
    /// This server has not heard from the manager for over half its lease:
    /// it may have been declared dead and its ranges given to others, so it
    /// serves nothing until it hears again.
    #[error(
        "server {me}'s lease expired: the manager has been unreachable for {silent_ms} ms \
         (down, or this server cut off from it), past half the lease ({half_ms} ms), so it \
         serves nothing in case another server was given its ranges; it keeps its data and \
         serves again once it rejoins the manager: retry later, at the current primary"
    )]
    LeaseLapsed {
        /// This server.
        me: NodeId,
        /// Since the last answer.
        silent_ms: u64,
        /// Half the lease.
        half_ms: u64,
    },
    /// The range is being handed over to this server: retry shortly.
    #[error("{range} is still being handed over from server {from}; retry")]
    HandingOver {
        /// The part still held back.
        range: KeyRange,
        /// The old primary.
        from: NodeId,
    },
    /// Keys not sorted and unique.
    #[error("keys are not sorted and unique at position {0}")]
    Unsorted(usize),
    /// Keys outside the request's range.
    #[error("keys fall outside the request range {0}")]
    OutsideRange(KeyRange),
    /// A dense range over the key limit.
    #[error("dense range {range} has more than {max} keys")]
    DenseTooLarge {
        /// The range.
        range: KeyRange,
        /// The limit.
        max: usize,
    },
    /// A scan whose reply would be over the key limit.
    #[error("{range} holds {keys} keys, over the {max} a reply may carry; scan smaller ranges")]
    ScanTooLarge {
        /// The range.
        range: KeyRange,
        /// Keys stored there.
        keys: usize,
        /// The limit.
        max: usize,
    },
    /// Too many pulls waiting on one connection.
    #[error(
        "{0} pulls already wait on this connection (the limit); wait for their answers \
         before sending more"
    )]
    TooManyWaiting(usize),
    /// A key reference that is not `[hash, count]`.
    #[error("a key reference carries exactly [hash, count]")]
    BadKeyRef,
    /// A key reference naming a list this server does not hold.
    #[error("no cached list {hash:#018x} of {count} keys from node {sender} in table {table}")]
    KeyCacheMiss {
        /// The list's hash.
        hash: u64,
        /// Its length.
        count: u64,
        /// Who referred to it.
        sender: NodeId,
        /// The table.
        table: u32,
    },
    /// The table refused the change.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A chain change or fence from a node that is not a server.
    #[error("node {0} is not a server; only servers send {1}")]
    NotAServer(NodeId, &'static str),
    /// A chain change from a server the map says is dead.
    #[error("server {0} was declared dead")]
    SenderDead(NodeId),
    /// A chain change from an earlier process of a server that came back
    /// under its id: it was made under a map from before the new process
    /// took the id.
    #[error(
        "server {node} came back under its id at epoch {joined}; this change, at epoch {epoch}, \
         is from its earlier process"
    )]
    EarlierProcess {
        /// The server.
        node: NodeId,
        /// The change's epoch.
        epoch: u64,
        /// The epoch the newer process joined at.
        joined: u64,
    },
    /// A push from a worker or client that left the cluster for good: this
    /// server forgot its clock records, so it could no longer tell the push
    /// from one already applied.
    #[error(
        "node {0} has left the cluster (it said goodbye, was declared dead, or fell silent past \
         its lease), so the servers forgot which of its pushes they applied: this push was \
         refused, not applied now (an earlier send of it may have been); connect again for a \
         new id"
    )]
    Departed(NodeId),
    /// A chain change for a range this server no longer holds.
    #[error("server {me} does not hold {range} at epoch {epoch}")]
    NotHeld {
        /// This server.
        me: NodeId,
        /// The change's range.
        range: KeyRange,
        /// This server's epoch.
        epoch: u64,
    },
    /// A chain change from a server one of whose earlier changes, made
    /// under the same map or an older one, this server refused: it follows
    /// that change on the same ordered queue, and its absolute slots carry
    /// the refused change's effect without its clock record, so taking it
    /// would apply that push again when its worker resends it.
    #[error(
        "server {me} refused a change server {from} made under epoch {refused}; this later one, \
         made under epoch {got}, is refused with it"
    )]
    AfterRefused {
        /// This server.
        me: NodeId,
        /// The server the change came from.
        from: NodeId,
        /// The epoch of the latest refused change from it.
        refused: u64,
        /// This change's epoch.
        got: u64,
    },
    /// A chain change made under an older map for a range this server now
    /// serves as primary, with no fence of a former primary awaited there:
    /// the primary that made it was replaced since.
    #[error(
        "server {me} is primary of {range} since epoch {have}; this change was made under \
         epoch {got} by a primary replaced since"
    )]
    Superseded {
        /// This server.
        me: NodeId,
        /// The change's range.
        range: KeyRange,
        /// The change's epoch.
        got: u64,
        /// This server's epoch.
        have: u64,
    },
    /// A chain names a server this server's map does not know yet, or
    /// holds as dead while the sender's map is newer (it may have come
    /// back under its id).
    #[error("server {node} is not a live server in this server's map yet (epoch {have} < {got})")]
    UnknownServer {
        /// The server.
        node: NodeId,
        /// This server's epoch.
        have: u64,
        /// The sender's.
        got: u64,
    },
}

impl Refusal {
    /// The wire's code for it.
    pub fn code(&self) -> ErrorCode {
        use pserver_core::store::StoreError;
        match self {
            Refusal::Malformed(_) => ErrorCode::Malformed,
            Refusal::NotForServer(_)
            | Refusal::NotConsistency(_)
            | Refusal::SignificantNotPull(_)
            | Refusal::NotSignificantPull(_)
            | Refusal::BadThreshold(_)
            | Refusal::TableMismatch { .. }
            | Refusal::TableUnusable { .. }
            | Refusal::OtherGroup { .. }
            | Refusal::Departed(_)
            | Refusal::NotAServer(..) => ErrorCode::Invalid,
            Refusal::StaleEpoch
            | Refusal::NotPrimary { .. }
            | Refusal::SenderDead(_)
            | Refusal::EarlierProcess { .. }
            | Refusal::NotHeld { .. }
            | Refusal::AfterRefused { .. }
            | Refusal::Superseded { .. } => ErrorCode::NotOwner,
            Refusal::EpochAhead { .. }
            | Refusal::LeaseLapsed { .. }
            | Refusal::HandingOver { .. }
            | Refusal::UnknownServer { .. } => ErrorCode::EpochAhead,
            Refusal::UnknownTable(_) => ErrorCode::UnknownTable,
            Refusal::Unsorted(_) | Refusal::OutsideRange(_) => ErrorCode::BadKeys,
            Refusal::DenseTooLarge { .. }
            | Refusal::ScanTooLarge { .. }
            | Refusal::TooManyWaiting(_) => ErrorCode::Limit,
            Refusal::BadKeyRef => ErrorCode::Malformed,
            Refusal::KeyCacheMiss { .. } => ErrorCode::KeyCacheMiss,
            Refusal::Table(e) => match e {
                TableError::Store(StoreError::WrongWidth { .. }) => ErrorCode::WrongWidth,
                TableError::Store(StoreError::NotFinite { .. }) | TableError::Overflow { .. } => {
                    ErrorCode::NotFinite
                }
                TableError::Store(StoreError::Unsorted { .. }) => ErrorCode::BadKeys,
                TableError::NoClock { .. } => ErrorCode::Invalid,
                TableError::Duplicate { .. } => ErrorCode::Duplicate,
                TableError::TooOld { .. } => ErrorCode::TooOld,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_once_into_their_request() {
        let data = |kind, flags| {
            let mut h = Header::new(kind);
            h.flags = flags;
            Frame::new(h)
        };
        let op = |f| match Request::parse(f) {
            Ok(Request::Data(d)) => d.op,
            other => panic!("{other:?}"),
        };
        assert_eq!(op(data(Kind::Push, 0)), Op::Push);
        assert_eq!(op(data(Kind::Pull, 0)), Op::Pull);
        assert_eq!(op(data(Kind::Pull, FLAG_SCAN)), Op::Scan);
        assert_eq!(op(data(Kind::PushPull, 0)), Op::PushPull);
        let mut p = data(Kind::Pull, 0);
        p.ctrl = Control::Consistency(Consistency::Bounded(2))
            .to_bytes()
            .into();
        assert!(matches!(
            Request::parse(p),
            Ok(Request::Data(Data {
                consistency: Some(Consistency::Bounded(2)),
                ..
            }))
        ));
        let ctl = |c: &Control| Frame::control(Header::new(Kind::Control), c);
        assert!(matches!(
            Request::parse(ctl(&Control::GetMap)),
            Ok(Request::GetMap(_))
        ));
        assert!(matches!(
            Request::parse(ctl(&Control::Synced { epoch: 3 })),
            Ok(Request::Marker(_))
        ));
        let e =
            Request::parse(ctl(&Control::Map(pserver_core::ClusterMap::empty(1, 1)))).unwrap_err();
        assert_eq!(e, Refusal::NotForServer("Map".into()));
        assert_eq!(e.code(), ErrorCode::Invalid);
        let mut junk = Frame::new(Header::new(Kind::Control));
        junk.ctrl = bytes::Bytes::from_static(&[0xff, 0xff]);
        assert_eq!(
            Request::parse(junk).unwrap_err().code(),
            ErrorCode::Malformed
        );
        assert_eq!(
            Request::parse(Frame::new(Header::new(Kind::Reply)))
                .unwrap_err()
                .code(),
            ErrorCode::Invalid
        );
    }
}
