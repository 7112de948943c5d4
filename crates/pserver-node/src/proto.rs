//! Small helpers shared by every node for building replies and reading them.

use crate::conn::Peer;
use crate::error::NodeError;
use pserver_core::map::Group;
use pserver_core::{ClusterMap, NodeId, Role};
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind};

/// A reply header to `req`: same id, table, clock and range, from `me` at `epoch`.
pub fn reply_header(req: &Header, kind: Kind, me: NodeId, epoch: u64) -> Header {
    Header {
        kind,
        flags: 0,
        request_id: req.request_id,
        sender: me,
        table: req.table,
        epoch,
        clock: req.clock,
        range: req.range,
    }
}

/// An error reply to `req`.
pub fn error_reply(
    req: &Header,
    me: NodeId,
    epoch: u64,
    code: ErrorCode,
    message: String,
) -> Frame {
    Frame::control(
        reply_header(req, Kind::Error, me, epoch),
        &Control::Error { code, message },
    )
}

/// A control reply to `req`.
pub fn control_reply(req: &Header, me: NodeId, epoch: u64, msg: &Control) -> Frame {
    Frame::control(reply_header(req, Kind::Reply, me, epoch), msg)
}

/// A control request from `me` at `epoch`.
pub fn control_request(me: NodeId, epoch: u64, msg: &Control) -> Frame {
    let mut h = Header::new(Kind::Control);
    h.sender = me;
    h.epoch = epoch;
    Frame::control(h, msg)
}

/// Turns an error frame into [`NodeError::Remote`] and decodes a reply's control section.
pub fn reply_control(frame: &Frame, peer: &str) -> Result<Control, NodeError> {
    let msg = frame.control_msg().map_err(|e| NodeError::Protocol {
        peer: peer.to_string(),
        what: e.to_string(),
    })?;
    match (frame.header.kind, msg) {
        (Kind::Error, Control::Error { code, message }) => Err(NodeError::Remote {
            peer: peer.to_string(),
            code,
            message,
        }),
        (Kind::Reply, msg) => Ok(msg),
        (kind, msg) => Err(NodeError::Protocol {
            peer: peer.to_string(),
            what: format!("{kind:?} frame carrying {msg:?}"),
        }),
    }
}

/// Registers with the manager over `manager` as `role` (servers give the
/// address they listen on; a server coming back under its id gives it as
/// `want`); returns the node's id and the current map.
pub async fn register(
    manager: &Peer,
    role: Role,
    addr: &str,
    group: Group,
    want: Option<NodeId>,
) -> Result<(NodeId, ClusterMap), NodeError> {
    let msg = Control::Register {
        role,
        addr: addr.to_string(),
        group,
        id: want,
    };
    let reply = manager.request(control_request(0, 0, &msg)).await?;
    match reply_control(&reply, manager.label())? {
        Control::Registered { id, .. } if want.is_some_and(|w| w != id) => {
            Err(NodeError::Protocol {
                peer: manager.label().to_string(),
                what: format!("asked for id {want:?}, registered as {id}"),
            })
        }
        Control::Registered { id, map } => Ok((id, map)),
        other => Err(NodeError::Protocol {
            peer: manager.label().to_string(),
            what: format!("expected Registered, got {other:?}"),
        }),
    }
}

/// The longest pause between two attempts to rejoin a lost manager (and
/// never more than a quarter of the lease, so that a node of a restored
/// map tries several times within its grace).
pub const REJOIN_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// How long one attempt (connect, then the manager's answer) may take: a
/// connection into a black hole must not stop the retries.
const REJOIN_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(5);

/// The first outage report comes at once; later ones wait this long, then
/// twice as long each time up to [`OUTAGE_LOG_MAX`], so a long outage
/// fills no log.
const OUTAGE_LOG_FIRST: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest wait between two reports of one outage.
const OUTAGE_LOG_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// Who rejoins a manager ([`rejoin`]).
#[derive(Clone, Debug)]
pub struct Rejoining {
    /// The node's id.
    pub id: NodeId,
    /// What it is.
    pub role: Role,
    /// The address it accepts connections on ("" for workers and clients).
    pub addr: String,
    /// The epoch of the node's map, so the manager can say what it saw.
    pub epoch: u64,
    /// The node's lease: the pause between attempts stays within a quarter
    /// of it.
    pub lease_ms: u64,
    /// A server's map and the highest sender id it has seen: it rejoins
    /// with [`Control::Recover`], from which a manager without state can
    /// rebuild the map. `None` for workers and clients.
    pub report: Option<(ClusterMap, NodeId)>,
}

/// Reconnects to the manager at `addr` and rejoins as `who` (the manager
/// restarted or the connection broke), for as long as it takes: a node
/// keeps its id, and a server its data, however long the manager is away.
/// A manager that has no record of the node
/// ([`ErrorCode::Stranger`]) is asked again like an absent one: a manager
/// that knows it may take its place. The outage is logged when it starts
/// and then at growing intervals.
///
/// Returns an error only when the manager knows the node and refuses it
/// ([`ErrorCode::Invalid`]: it declared the node dead, so its ranges are
/// others' now).
pub async fn rejoin(
    net: &crate::net::Net,
    addr: &str,
    limits: pserver_wire::Limits,
    who: &Rejoining,
) -> Result<(Peer, tokio::sync::mpsc::Receiver<Frame>, ClusterMap), NodeError> {
    use std::time::Duration;
    use tokio::time::{Instant, sleep, timeout};
    let Rejoining {
        id,
        role,
        epoch,
        lease_ms,
        ..
    } = *who;
    let msg = match &who.report {
        Some((map, senders)) => Control::Recover {
            id,
            addr: who.addr.clone(),
            map: map.clone(),
            senders: *senders,
        },
        None => Control::Rejoin {
            id,
            role,
            addr: who.addr.clone(),
        },
    };
    let max_pause = REJOIN_PAUSE_MAX
        .min(Duration::from_millis(lease_ms / 4))
        .max(Duration::from_millis(10));
    let mut pause = Duration::from_millis(10).min(max_pause);
    let since = Instant::now();
    let mut next_log = since;
    let mut log_every = OUTAGE_LOG_FIRST;
    // Whether the last attempt was answered by a manager that does not
    // know this node (`None` before any failure).
    let mut stranger: Option<bool> = None;
    loop {
        let attempt = async {
            let (peer, notices) = Peer::connect_via(net, addr, limits).await?;
            let reply = peer.request(control_request(id, epoch, &msg)).await?;
            match reply_control(&reply, peer.label())? {
                Control::Registered { map, .. } => Ok((peer, notices, map)),
                other => Err(NodeError::Protocol {
                    peer: peer.label().to_string(),
                    what: format!("expected Registered, got {other:?}"),
                }),
            }
        };
        let (why, refused) = match timeout(REJOIN_ATTEMPT, attempt).await {
            Ok(Ok(joined)) => {
                if stranger.is_some() {
                    tracing::info!(
                        node = id,
                        away_ms = since.elapsed().as_millis() as u64,
                        "rejoined the manager"
                    );
                }
                return Ok(joined);
            }
            // The manager knows this node and refuses it: it was declared
            // dead. Every other refusal (a stranger, a manager at its
            // connection limit) may pass.
            Ok(Err(
                e @ NodeError::Remote {
                    code: ErrorCode::Invalid,
                    ..
                },
            )) => {
                return Err(e);
            }
            Ok(Err(e)) => {
                let refused = matches!(e, NodeError::Remote { .. });
                (e.to_string(), refused)
            }
            Err(_) => (
                format!("no answer within {} s", REJOIN_ATTEMPT.as_secs()),
                false,
            ),
        };
        let now = Instant::now();
        // Logged when the outage starts, when a manager that does not know
        // this node starts or stops answering, and then rarely.
        if stranger != Some(refused) || now >= next_log {
            tracing::warn!(
                node = id,
                %role,
                manager = addr,
                away_s = since.elapsed().as_secs(),
                error = %why,
                "cannot rejoin the manager; this node keeps its state and keeps trying"
            );
            next_log = now + log_every;
            log_every = (log_every * 2).min(OUTAGE_LOG_MAX);
            stranger = Some(refused);
        }
        sleep(pause).await;
        pause = (pause * 2).min(max_pause);
    }
}
