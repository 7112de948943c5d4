//! The manager node: registers nodes, keeps the cluster map, watches leases,
//! creates tables, runs barriers and answers status queries. The decisions are
//! [`pserver_core::membership::Membership`]'s; this module does the I/O.

use crate::conn::{Outbox, accept_loop, bind, lock, split};
use crate::error::NodeError;
use crate::net::Net;
use crate::proto::{control_reply, error_reply};
use futures_util::StreamExt;
use pserver_core::map::MANAGER_ID;
use pserver_core::membership::{Membership, MembershipConfig, MembershipError, Released};
use pserver_core::{NodeId, Role};
use pserver_wire::message::Status;
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind, Limits};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How to run a manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Placement and lease settings.
    pub membership: MembershipConfig,
    /// Frame limits.
    pub limits: Limits,
    /// How to listen (TCP unless a test simulates the network).
    pub net: Net,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            listen: "127.0.0.1:0".into(),
            membership: MembershipConfig::default(),
            limits: Limits::default(),
            net: Net::tcp(),
        }
    }
}

/// A running manager. Dropping it does not stop it; call [`ManagerHandle::shutdown`].
#[derive(Debug)]
pub struct ManagerHandle {
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl ManagerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// A token cancelled when the manager stops.
    pub fn cancelled(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

struct State {
    members: Membership,
    conns: BTreeMap<NodeId, Outbox>,
    /// Barrier name -> (node, request id) waiting in it.
    waiters: BTreeMap<String, Vec<(NodeId, u64)>>,
    start: Instant,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn map_frame(&self) -> Frame {
        let map = self.members.map();
        let mut h = Header::new(Kind::Control);
        h.epoch = map.epoch;
        Frame::control(h, &Control::Map(map.clone()))
    }

    /// Sends the map to every connected node. A node whose queue is full
    /// learns the map from its next redirect instead.
    fn broadcast(&self) {
        let frame = self.map_frame();
        for out in self.conns.values() {
            out.try_send(frame.clone());
        }
    }

    fn release(&mut self, released: Vec<Released>) {
        for r in released {
            let epoch = self.members.map().epoch;
            for (node, req) in self.waiters.remove(&r.name).unwrap_or_default() {
                if let Some(out) = self.conns.get(&node) {
                    let mut h = Header::new(Kind::Control);
                    h.request_id = req;
                    out.try_send(control_reply(&h, MANAGER_ID, epoch, &Control::Ok));
                }
            }
        }
    }
}

/// Starts a manager; returns once it listens.
pub async fn start_manager(cfg: ManagerConfig) -> Result<ManagerHandle, NodeError> {
    let members = Membership::new(cfg.membership)?;
    let (listener, addr) = bind(&cfg.net, &cfg.listen).await?;
    let cancel = CancellationToken::new();
    let state = Arc::new(Mutex::new(State {
        members,
        conns: BTreeMap::new(),
        waiters: BTreeMap::new(),
        start: Instant::now(),
    }));
    tokio::spawn(lease_ticker(
        state.clone(),
        cfg.membership.lease_ms,
        cancel.clone(),
    ));
    let limits = cfg.limits;
    accept_loop(listener, cancel.clone(), move |stream, peer| {
        serve(stream, peer, state.clone(), limits)
    });
    tracing::info!(%addr, "manager listening");
    Ok(ManagerHandle { addr, cancel })
}

async fn lease_ticker(state: Arc<Mutex<State>>, lease_ms: u64, cancel: CancellationToken) {
    // Checked often, so that a silent node is declared dead soon after its
    // silence limit and always within its lease.
    let period = Duration::from_millis((lease_ms / 16).max(2));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let mut st = lock(&state);
        let now = st.now_ms();
        let dead = st.members.expire(now);
        if !dead.is_empty() {
            tracing::warn!(?dead, epoch = st.members.map().epoch, "lease expired");
            st.broadcast();
            let released = st.members.release_ready();
            st.release(released);
        }
    }
}

async fn serve<S>(stream: S, peer: String, state: Arc<Mutex<State>>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, out) = split(stream, limits);
    let mut me: Option<NodeId> = None;
    while let Some(item) = reader.next().await {
        let frame = match item {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad frame; closing");
                let h = Header::new(Kind::Control);
                let _ = out
                    .send(error_reply(
                        &h,
                        MANAGER_ID,
                        0,
                        ErrorCode::Malformed,
                        e.to_string(),
                    ))
                    .await;
                break;
            }
        };
        let reply = handle(&state, &out, &mut me, &frame);
        let close = matches!(&reply, Some(f) if f.header.kind == Kind::Error && me.is_none());
        if let Some(r) = reply {
            if out.send(r).await.is_err() {
                break;
            }
        }
        if close {
            break;
        }
    }
    if let Some(id) = me {
        let mut st = lock(&state);
        st.conns.remove(&id);
        if st.members.disconnected(id) {
            tracing::warn!(
                node = id,
                epoch = st.members.map().epoch,
                "node disconnected"
            );
            st.broadcast();
            let released = st.members.release_ready();
            st.release(released);
        }
    }
}

fn handle(
    state: &Arc<Mutex<State>>,
    out: &Outbox,
    me: &mut Option<NodeId>,
    frame: &Frame,
) -> Option<Frame> {
    let h = &frame.header;
    let mut st = lock(state);
    let epoch = st.members.map().epoch;
    let err = |code, msg: String| Some(error_reply(h, MANAGER_ID, epoch, code, msg));
    if h.kind != Kind::Control {
        return err(
            ErrorCode::Invalid,
            format!("the manager takes control frames, not {:?}", h.kind),
        );
    }
    let msg = match frame.control_msg() {
        Ok(m) => m,
        Err(e) => return err(ErrorCode::Malformed, e.to_string()),
    };
    let Some(id) = *me else {
        let Control::Register { role, addr } = msg else {
            return err(ErrorCode::Invalid, "register first".into());
        };
        let now = st.now_ms();
        return match st.members.register(role, &addr, now) {
            Ok(id) => {
                *me = Some(id);
                st.conns.insert(id, out.clone());
                tracing::info!(node = id, %role, %addr, epoch = st.members.map().epoch, "registered");
                if role != Role::Client {
                    st.broadcast();
                }
                let map = st.members.map().clone();
                Some(control_reply(
                    h,
                    MANAGER_ID,
                    map.epoch,
                    &Control::Registered { id, map },
                ))
            }
            Err(e) => err(ErrorCode::Invalid, e.to_string()),
        };
    };
    match msg {
        Control::Heartbeat => {
            let now = st.now_ms();
            match st.members.heartbeat(id, now) {
                Ok(()) => None,
                Err(e) => err(ErrorCode::Invalid, e.to_string()),
            }
        }
        Control::GetMap => Some(control_reply(
            h,
            MANAGER_ID,
            epoch,
            &Control::Map(st.members.map().clone()),
        )),
        Control::Status => Some(control_reply(
            h,
            MANAGER_ID,
            epoch,
            &Control::StatusReply(Status {
                map: st.members.map().clone(),
                servers: Vec::new(),
            }),
        )),
        Control::CreateTable(spec) => match st.members.create_table(spec) {
            Ok((spec, new)) => {
                if new {
                    tracing::info!(table = %spec.name, id = spec.id, dim = spec.dim, "table created");
                    st.broadcast();
                }
                let epoch = st.members.map().epoch;
                Some(control_reply(
                    h,
                    MANAGER_ID,
                    epoch,
                    &Control::TableCreated(spec),
                ))
            }
            Err(e @ MembershipError::TooManyTables) => err(ErrorCode::Limit, e.to_string()),
            Err(e) => err(ErrorCode::Invalid, e.to_string()),
        },
        Control::Synced { epoch: e } => {
            if st.members.synced(id, e) {
                tracing::info!(epoch = st.members.map().epoch, "hand-off complete");
                st.broadcast();
            }
            None
        }
        Control::Drain { node } => match st.members.drain(node) {
            Ok(changed) => {
                if changed {
                    tracing::info!(node, epoch = st.members.map().epoch, "draining");
                    st.broadcast();
                }
                let epoch = st.members.map().epoch;
                Some(control_reply(h, MANAGER_ID, epoch, &Control::Ok))
            }
            Err(e) => err(ErrorCode::Invalid, e.to_string()),
        },
        Control::Barrier { name } => match st.members.barrier_enter(&name, id) {
            Ok(released) => {
                st.waiters.entry(name).or_default().push((id, h.request_id));
                st.release(released.into_iter().collect());
                None
            }
            Err(e) => err(ErrorCode::Invalid, e.to_string()),
        },
        other => err(
            ErrorCode::Invalid,
            format!("the manager does not take {other:?}"),
        ),
    }
}
