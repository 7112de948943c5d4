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
/// address they listen on); returns the node's id and the current map.
pub async fn register(
    manager: &Peer,
    role: Role,
    addr: &str,
    group: Group,
) -> Result<(NodeId, ClusterMap), NodeError> {
    let msg = Control::Register {
        role,
        addr: addr.to_string(),
        group,
    };
    let reply = manager.request(control_request(0, 0, &msg)).await?;
    match reply_control(&reply, manager.label())? {
        Control::Registered { id, map } => Ok((id, map)),
        other => Err(NodeError::Protocol {
            peer: manager.label().to_string(),
            what: format!("expected Registered, got {other:?}"),
        }),
    }
}

/// How long a node keeps trying to rejoin a manager it lost: long enough
/// for the manager to be restarted, short enough that a node whose manager
/// is gone for good stops.
pub const REJOIN_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Reconnects to the manager at `addr` and rejoins as node `id` (the
/// manager restarted or the connection broke). Retries until [`REJOIN_FOR`]
/// has passed; a manager that answers but refuses (it declared the node
/// dead, or does not know it) ends the attempt at once.
pub async fn rejoin(
    net: &crate::net::Net,
    addr: &str,
    limits: pserver_wire::Limits,
    id: NodeId,
    role: Role,
    my_addr: &str,
) -> Result<(Peer, tokio::sync::mpsc::Receiver<Frame>, ClusterMap), NodeError> {
    let deadline = tokio::time::Instant::now() + REJOIN_FOR;
    let msg = Control::Rejoin {
        id,
        role,
        addr: my_addr.to_string(),
    };
    loop {
        match Peer::connect_via(net, addr, limits).await {
            Ok((peer, notices)) => match peer.request(control_request(id, 0, &msg)).await {
                Ok(reply) => {
                    return match reply_control(&reply, peer.label())? {
                        Control::Registered { map, .. } => Ok((peer, notices, map)),
                        other => Err(NodeError::Protocol {
                            peer: peer.label().to_string(),
                            what: format!("expected Registered, got {other:?}"),
                        }),
                    };
                }
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {}
            },
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
