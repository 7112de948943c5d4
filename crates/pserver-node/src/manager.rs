//! The manager node: registers nodes, keeps the cluster map, watches leases,
//! creates tables, runs barriers and answers status queries. The decisions are
//! [`pserver_core::membership::Membership`]'s; this module does the I/O.

use crate::conn::{Outbox, accept_loop, bind, lock, split};
use crate::durable::{Disk, FileSystem};
use crate::error::NodeError;
use crate::metrics::{BoxFuture, Exporter, Scrape};
use crate::net::Net;
use crate::proto::{control_reply, error_reply};
use futures_util::StreamExt;
use pserver_core::map::{Group, MANAGER_ID};
use pserver_core::membership::Persisted;
use pserver_core::membership::{
    Membership, MembershipConfig, MembershipError, Recovered, Released, Report,
};
use pserver_core::{NodeId, NodeState, Role};
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
    /// Where the manager keeps its state (map, tables, epoch, id counters)
    /// across restarts: written after every change (through `fs`), read at
    /// start. `None`: kept in memory only.
    pub state_file: Option<std::path::PathBuf>,
    /// How `state_file` is written: [`Disk`] unless a test injects failures.
    pub fs: Arc<dyn FileSystem>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            listen: "127.0.0.1:0".into(),
            membership: MembershipConfig::default(),
            limits: Limits::default(),
            net: Net::tcp(),
            state_file: None,
            fs: Arc::new(Disk::new()),
        }
    }
}

/// A running manager. Dropping it does not stop it; call [`ManagerHandle::shutdown`].
pub struct ManagerHandle {
    addr: SocketAddr,
    cancel: CancellationToken,
    /// Weak: the state holds the nodes' outboxes, so a handle kept after
    /// `shutdown` must not keep their connections open (servers would
    /// never see the manager go, nor rejoin the next one).
    state: std::sync::Weak<Mutex<State>>,
}

impl std::fmt::Debug for ManagerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What a manager tells its metrics listener; nothing once it has stopped.
struct ManagerExporter(std::sync::Weak<Mutex<State>>);

impl Exporter for ManagerExporter {
    fn scrape(&self) -> BoxFuture<'_, Scrape> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(state) => {
                    let st = lock(&state);
                    crate::metrics::manager::scrape(
                        &st.members,
                        st.now_ms(),
                        st.epoch(),
                        st.unsaved,
                    )
                }
                None => Scrape::default(),
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(state) => crate::metrics::manager::ready(&lock(&state).members),
                None => Err("the manager has stopped".into()),
            }
        })
    }
}

impl ManagerHandle {
    /// What this manager tells a metrics listener
    /// ([`metrics::serve`](crate::metrics::serve)): its map, nodes,
    /// leases, jobs and hand-offs, and whether it has a map to hand out.
    pub fn exporter(&self) -> Arc<dyn Exporter> {
        Arc::new(ManagerExporter(self.state.clone()))
    }

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

/// A node of another manager's cluster that asked this one to rejoin it.
struct Stranger {
    role: Role,
    addr: String,
    /// When it last asked (ms on the manager's clock).
    asked_ms: u64,
}

/// A stranger that has not asked for this long is taken to have stopped
/// (nodes ask at least once a second, an attempt lasting at most 5 s).
const STRANGER_GONE_MS: u64 = 10_000;

struct State {
    members: Membership,
    conns: BTreeMap<NodeId, Outbox>,
    /// Barrier name -> (node, request id) waiting in it.
    waiters: BTreeMap<(Group, String), Vec<(NodeId, u64)>>,
    start: Instant,
    state_file: Option<std::path::PathBuf>,
    fs: Arc<dyn FileSystem>,
    /// The last map saved (and so the last one nodes may have seen): what
    /// the manager shows while a newer one is not saved yet.
    shown: pserver_core::map::ClusterMap,
    /// The map changed but could not be saved, so no one has been told;
    /// the lease ticker tries again.
    unsaved: bool,
    /// The last save error logged, so a failure that lasts is logged once.
    save_error: Option<String>,
    /// Nodes refused as strangers (registered by another manager) with
    /// their role and address: each is logged once however often it asks,
    /// and while servers of such a cluster wait this manager starts no new
    /// cluster of its own over them.
    strangers: BTreeMap<NodeId, Stranger>,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The epoch nodes may know: that of the last saved map.
    fn epoch(&self) -> u64 {
        self.shown.epoch
    }

    /// Saves the state, then sends the map to every connected node. A node
    /// whose queue is full learns the map from its next redirect instead.
    ///
    /// Nothing is sent unless the save succeeded, so a restarted manager
    /// never goes back on a map a node has seen. A failed save is logged,
    /// leaves the change pending (the ticker calls this again) and is
    /// returned, so a request that caused the change can be refused.
    fn broadcast(&mut self) -> Result<(), NodeError> {
        if let Some(path) = &self.state_file {
            if let Err(e) = save_state(&*self.fs, path, &self.members.persisted()) {
                let why = e.to_string();
                if self.save_error.as_ref() != Some(&why) {
                    tracing::error!(error = %why, "cannot save the manager's state; the map is not sent until it is saved");
                    self.save_error = Some(why);
                }
                self.unsaved = true;
                return Err(e);
            }
            if self.save_error.take().is_some() {
                tracing::info!(path = %path.display(), epoch = self.members.map().epoch, "manager state saved again; sending the map");
            }
        }
        self.unsaved = false;
        self.shown = self.members.map().clone();
        let mut h = Header::new(Kind::Control);
        h.epoch = self.shown.epoch;
        let frame = Frame::control(h, &Control::Map(self.shown.clone()));
        for out in self.conns.values() {
            out.try_send(frame.clone());
        }
        Ok(())
    }

    /// Makes a change a node asked for, saves and broadcasts it. A change
    /// that cannot be saved is undone, so the request can be refused with
    /// nothing changed (the caller may retry), instead of reported as done
    /// while no one may learn of it.
    fn change<T>(
        &mut self,
        apply: impl FnOnce(&mut Membership) -> Result<(T, bool), MembershipError>,
    ) -> Result<Result<T, MembershipError>, NodeError> {
        let before = (self.members.clone(), self.unsaved);
        let (out, changed) = match apply(&mut self.members) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        if changed {
            if let Err(e) = self.broadcast() {
                (self.members, self.unsaved) = before;
                return Err(e);
            }
        }
        Ok(Ok(out))
    }

    /// Takes node `id` on this connection and answers `Registered`.
    fn welcome(&mut self, h: &Header, id: NodeId, out: &Outbox, me: &mut Option<NodeId>) -> Frame {
        *me = Some(id);
        // The connection this one replaces (the node lost it, or a new
        // process took the id) is closed: nothing on it counts any more.
        if let Some(old) = self.conns.insert(id, out.clone()) {
            if !old.same(out) {
                old.shutdown();
            }
        }
        let map = self.shown.clone();
        control_reply(h, MANAGER_ID, map.epoch, &Control::Registered { id, map })
    }

    /// Notes that node `id` of a cluster this manager does not know asked
    /// to rejoin it; true the first time (so each is logged once).
    fn note_stranger(&mut self, id: NodeId, role: Role, addr: &str, now_ms: u64) -> bool {
        let seen = Stranger {
            role,
            addr: addr.to_string(),
            asked_ms: now_ms,
        };
        self.strangers.insert(id, seen).is_none()
    }

    /// The answer to a node whose rejoin (or report) was refused for `e`.
    /// Only a verdict on the node itself (dead, as this manager knows it)
    /// is final ([`ErrorCode::Invalid`]); the node takes every other as
    /// "not yet" ([`ErrorCode::Stranger`]) and asks again, keeping its
    /// data.
    fn refuse(
        &mut self,
        h: &Header,
        id: NodeId,
        role: Role,
        addr: &str,
        e: MembershipError,
    ) -> Frame {
        let epoch = self.epoch();
        let code = match &e {
            MembershipError::Stranger { .. } | MembershipError::CannotRebuild { .. } => {
                let now = self.now_ms();
                if self.note_stranger(id, role, addr, now) {
                    tracing::error!(
                        node = id,
                        %role,
                        %addr,
                        their_epoch = h.epoch,
                        our_epoch = epoch,
                        "refused a node of another manager's cluster: {e}"
                    );
                }
                ErrorCode::Stranger
            }
            MembershipError::Rebuilding { .. } => ErrorCode::Stranger,
            _ => ErrorCode::Invalid,
        };
        error_reply(h, MANAGER_ID, epoch, code, e.to_string())
    }

    /// A server comes back under id `want` ([`Membership::register_as`]):
    /// answers `Registered` with that id, or the refusal. The connection
    /// of the id's earlier process, if the manager still has one (it was
    /// declared dead by its lease: frozen, or cut off), is closed first, so
    /// the map that takes the id back never reaches it; should it ask to
    /// rejoin, it hears it was replaced.
    #[allow(clippy::too_many_arguments)]
    fn register_as(
        &mut self,
        h: &Header,
        out: &Outbox,
        me: &mut Option<NodeId>,
        want: NodeId,
        role: Role,
        addr: &str,
        now: u64,
    ) -> Frame {
        let epoch = self.epoch();
        let dead_server = self
            .members
            .map()
            .node(want)
            .is_some_and(|n| n.role == Role::Server && n.state == NodeState::Dead);
        if dead_server {
            if let Some(old) = self.conns.remove(&want) {
                old.shutdown();
            }
        }
        match self.change(|m| Ok((m.register_as(want, role, addr, now)?, true))) {
            Ok(Ok(id)) => {
                tracing::info!(node = id, %addr, epoch = self.epoch(), "a server came back under its id");
                self.welcome(h, id, out, me)
            }
            Ok(Err(e)) => {
                tracing::warn!(node = want, %addr, "refused a server asking for its id back: {e}");
                error_reply(h, MANAGER_ID, epoch, ErrorCode::Invalid, e.to_string())
            }
            Err(e) => error_reply(
                h,
                MANAGER_ID,
                epoch,
                ErrorCode::Internal,
                format!("the manager cannot save this change, so it did not make it: {e}"),
            ),
        }
    }

    fn release(&mut self, released: Vec<Released>) {
        for r in released {
            let epoch = self.epoch();
            for (node, req) in self.waiters.remove(&(r.group, r.name)).unwrap_or_default() {
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
    let members = match cfg.state_file.as_deref().map(load_state).transpose()? {
        Some(Some(saved)) => {
            tracing::info!(epoch = saved.map.epoch, "manager state restored");
            Membership::restore(cfg.membership, saved, 0)?
        }
        _ => {
            let mut m = Membership::new(cfg.membership)?;
            // Clients that ask before a rebuild get ids from a range where
            // this start differs from the last one's.
            let salt = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            m.salt_fresh_clients(salt);
            m
        }
    };
    let (listener, addr) = bind(&cfg.net, &cfg.listen).await?;
    let cancel = CancellationToken::new();
    let shown = members.map().clone();
    let state = Arc::new(Mutex::new(State {
        members,
        conns: BTreeMap::new(),
        waiters: BTreeMap::new(),
        start: Instant::now(),
        state_file: cfg.state_file.clone(),
        fs: cfg.fs.clone(),
        shown,
        unsaved: false,
        save_error: None,
        strangers: BTreeMap::new(),
    }));
    // The state as it starts (fresh or restored) is on disk before any node
    // hears of it.
    if let Some(path) = &cfg.state_file {
        save_state(&*cfg.fs, path, &lock(&state).members.persisted())?;
    }
    tokio::spawn(lease_ticker(
        state.clone(),
        cfg.membership.lease_ms,
        cancel.clone(),
    ));
    let limits = cfg.limits;
    let stopping = cancel.clone();
    let kept = Arc::downgrade(&state);
    accept_loop(listener, cancel.clone(), limits, move |stream, peer| {
        serve(stream, peer, state.clone(), limits, stopping.clone())
    });
    tracing::info!(%addr, "manager listening");
    Ok(ManagerHandle {
        addr,
        cancel,
        state: kept,
    })
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
        // Clients that left: the servers may forget their clocks.
        let published = st.members.publish_departures(now);
        // A failed save is logged inside and retried at the next tick.
        if !dead.is_empty() {
            tracing::warn!(?dead, epoch = st.members.map().epoch, "lease expired");
            let _ = st.broadcast();
            let released = st.members.release_ready();
            st.release(released);
        } else if published || st.unsaved {
            let _ = st.broadcast();
        }
    }
}

async fn serve<S>(
    stream: S,
    peer: String,
    state: Arc<Mutex<State>>,
    limits: Limits,
    stopping: CancellationToken,
) where
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
        let reply = handle(&state, &out, &mut me, &frame, &limits);
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
        // A connection another one replaced (the node rejoined on a new
        // one, or a new process came back under its id) says nothing about
        // the node when it closes.
        if !st.conns.get(&id).is_some_and(|o| o.same(&out)) {
            return;
        }
        st.conns.remove(&id);
        let role = st.members.map().node(id).map(|n| n.role);
        if st.members.disconnected(id) {
            let epoch = st.members.map().epoch;
            // A worker closing its connection is how a job ends; a server
            // doing so is news.
            // Nor is a server's when the manager is stopping too (a local
            // cluster stops all its nodes at once).
            if role == Some(Role::Server) && !stopping.is_cancelled() {
                tracing::warn!(node = id, epoch, "server disconnected");
            } else {
                tracing::info!(node = id, epoch, "worker disconnected");
            }
            // A failure is logged inside and retried by the ticker.
            let _ = st.broadcast();
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
    limits: &Limits,
) -> Option<Frame> {
    let h = &frame.header;
    let mut st = lock(state);
    let epoch = st.epoch();
    let err = |code, msg: String| Some(error_reply(h, MANAGER_ID, epoch, code, msg));
    let unsaved = |e: NodeError| {
        Some(error_reply(
            h,
            MANAGER_ID,
            epoch,
            ErrorCode::Internal,
            format!("the manager cannot save this change, so it did not make it: {e}"),
        ))
    };
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
        let now = st.now_ms();
        if let Control::Rejoin { id, role, addr } = msg {
            return Some(match st.members.rejoin(id, role, &addr, now) {
                Ok(()) => {
                    tracing::info!(node = id, %role, "rejoined");
                    st.welcome(h, id, out, me)
                }
                Err(e) => st.refuse(h, id, role, &addr, e),
            });
        }
        if let Control::Recover {
            id,
            addr,
            map,
            senders,
        } = msg
        {
            let their_epoch = map.epoch;
            let report = Report {
                id,
                addr: addr.clone(),
                map,
                senders,
            };
            return Some(match st.members.recover(report, now) {
                Ok(Recovered::Rejoined) => {
                    tracing::info!(node = id, "rejoined");
                    st.welcome(h, id, out, me)
                }
                Ok(Recovered::Waiting(missing)) => {
                    let e = MembershipError::Rebuilding { missing };
                    if st.note_stranger(id, Role::Server, &addr, now) {
                        tracing::warn!(node = id, %addr, their_epoch, "a server reported its map: {e}");
                    }
                    error_reply(h, MANAGER_ID, epoch, ErrorCode::Stranger, e.to_string())
                }
                Ok(Recovered::Rebuilt {
                    from,
                    reported,
                    epoch: rebuilt,
                    servers,
                    rejoined,
                }) => {
                    tracing::warn!(
                        from,
                        reported,
                        epoch = rebuilt,
                        servers,
                        "this manager had no state: it rebuilt the cluster's map from what its \
                         {servers} servers reported (the latest map, server {from}'s, at epoch \
                         {reported}); every node of it may rejoin"
                    );
                    st.strangers.clear();
                    // Nodes hear of it only once it is saved (a failure is
                    // logged inside; the ticker saves and sends it later,
                    // and the server asks again meanwhile).
                    match (st.broadcast(), rejoined) {
                        (Ok(()), Ok(())) => st.welcome(h, id, out, me),
                        (Err(e), _) => error_reply(
                            h,
                            MANAGER_ID,
                            epoch,
                            ErrorCode::Stranger,
                            format!("the rebuilt map cannot be saved yet: {e}"),
                        ),
                        (Ok(()), Err(e)) => st.refuse(h, id, Role::Server, &addr, e),
                    }
                }
                Err(e) => st.refuse(h, id, Role::Server, &addr, e),
            });
        }
        let Control::Register {
            role,
            addr,
            group,
            id: want,
        } = msg
        else {
            return err(ErrorCode::Invalid, "register first".into());
        };
        // A first server would start a new, empty cluster while the servers
        // of the one this manager lost the state of wait with their data.
        // (While it rebuilds their map, the refusal says that instead.)
        if role == Role::Server
            && !st.members.rebuilding()
            && st.members.map().live(Role::Server).next().is_none()
        {
            let waiting = st.strangers.iter().find(|(_, s)| {
                s.role == Role::Server && now.saturating_sub(s.asked_ms) <= STRANGER_GONE_MS
            });
            if let Some((id, Stranger { addr: at, .. })) = waiting {
                let why = format!(
                    "this manager will not start a new cluster over a running one: server {id} \
                     at {at}, registered by another manager, is waiting for it with its data; \
                     restart this manager with the --state FILE of the one that registered it, \
                     or stop that cluster's servers first"
                );
                tracing::error!(%addr, "refused a server: {why}");
                return err(ErrorCode::Invalid, why);
            }
        }
        if let Some(want) = want {
            return Some(st.register_as(h, out, me, want, role, &addr, now));
        }
        // Clients do not enter the map, so there is nothing to save.
        return match st.change(|m| Ok((m.register(role, &addr, group, now)?, role != Role::Client)))
        {
            Ok(Ok(id)) => {
                tracing::info!(node = id, %role, %addr, epoch = st.epoch(), "registered");
                Some(st.welcome(h, id, out, me))
            }
            Ok(Err(e)) => err(ErrorCode::Invalid, e.to_string()),
            Err(e) => unsaved(e),
        };
    };
    // This connection was replaced by another of the same id: nothing on
    // it counts for the node (an earlier process of a server that came
    // back under its id must not renew the new one's lease).
    if !st.conns.get(&id).is_some_and(|o| o.same(out)) {
        *me = None;
        let why = match st.members.map().node(id) {
            Some(n) => format!(
                "node {id} is on another connection now ({} at {:?}); this one is closed",
                n.state, n.addr
            ),
            None => format!("node {id} is on another connection now; this one is closed"),
        };
        return err(ErrorCode::Invalid, why);
    }
    match msg {
        Control::Heartbeat => {
            let now = st.now_ms();
            match st.members.heartbeat(id, now) {
                // Answered when asked (a request id): servers time their
                // own lease by these answers (see `server::core`).
                Ok(()) => {
                    (h.request_id != 0).then(|| control_reply(h, MANAGER_ID, epoch, &Control::Ok))
                }
                Err(e) => err(ErrorCode::Invalid, e.to_string()),
            }
        }
        Control::GetMap => Some(control_reply(
            h,
            MANAGER_ID,
            epoch,
            &Control::Map(st.shown.clone()),
        )),
        Control::Status => Some(control_reply(
            h,
            MANAGER_ID,
            epoch,
            &Control::StatusReply(Status {
                map: st.shown.clone(),
                servers: Vec::new(),
                jobs: st
                    .members
                    .jobs()
                    .map(|(j, by)| (j.to_string(), by))
                    .collect(),
            }),
        )),
        Control::CreateTable(spec) if spec.dim as usize > limits.max_dim => err(
            ErrorCode::Limit,
            format!(
                "table {:?}: dim {} is over this cluster's limit of {} (the manager's --max-dim)",
                spec.name, spec.dim, limits.max_dim
            ),
        ),
        Control::CreateTable(spec)
            if st.members.map().tables.len() >= limits.max_tables
                && st.members.map().table(&spec.name).is_none() =>
        {
            err(
                ErrorCode::Limit,
                format!(
                    "the cluster holds {} tables, its limit (the manager's --max-tables)",
                    limits.max_tables
                ),
            )
        }
        Control::CreateTable(spec) => match st.change(|m| {
            let (spec, new) = m.create_table(spec)?;
            Ok(((spec, new), new))
        }) {
            Ok(Ok((spec, new))) => {
                if new {
                    tracing::info!(table = %spec.name, id = spec.id, dim = spec.dim, "table created");
                }
                Some(control_reply(
                    h,
                    MANAGER_ID,
                    st.epoch(),
                    &Control::TableCreated(spec),
                ))
            }
            Ok(Err(e @ MembershipError::TooManyTables)) => err(ErrorCode::Limit, e.to_string()),
            Ok(Err(e)) => err(ErrorCode::Invalid, e.to_string()),
            Err(e) => unsaved(e),
        },
        Control::Synced { epoch: e } => {
            if st.members.synced(id, e) {
                tracing::info!(epoch = st.members.map().epoch, "hand-off complete");
                // The switch cannot be refused to anyone; a failed save
                // is logged inside and retried by the ticker.
                let _ = st.broadcast();
            }
            None
        }
        Control::Drain { node } => match st.change(|m| {
            let changed = m.drain(node)?;
            Ok((changed, changed))
        }) {
            Ok(Ok(changed)) => {
                if changed {
                    tracing::info!(node, epoch = st.epoch(), "draining");
                }
                Some(control_reply(h, MANAGER_ID, st.epoch(), &Control::Ok))
            }
            Ok(Err(e)) => err(ErrorCode::Invalid, e.to_string()),
            Err(e) => unsaved(e),
        },
        Control::Barrier { name } => {
            let group = st
                .members
                .map()
                .node(id)
                .map(|n| n.group.clone())
                .unwrap_or_default();
            match st.members.barrier_enter(&name, id) {
                Ok(released) => {
                    st.waiters
                        .entry((group, name))
                        .or_default()
                        .push((id, h.request_id));
                    st.release(released.into_iter().collect());
                    None
                }
                Err(e) => err(ErrorCode::Invalid, e.to_string()),
            }
        }
        Control::Join { group, task } => match st.change(|m| {
            let changed = m.join(id, group.clone(), &task)?;
            Ok((changed, changed))
        }) {
            Ok(Ok(changed)) => {
                if changed {
                    tracing::info!(node = id, %group, %task, epoch = st.epoch(), "worker joined");
                }
                // A worker leaving a group may complete its barriers.
                let released = st.members.release_ready();
                st.release(released);
                Some(control_reply(
                    h,
                    MANAGER_ID,
                    st.epoch(),
                    &Control::Map(st.shown.clone()),
                ))
            }
            Ok(Err(e)) => err(ErrorCode::Invalid, e.to_string()),
            Err(e) => unsaved(e),
        },
        Control::ClaimJob { job } => match st.members.claim_job(&job, id) {
            Ok(()) => {
                tracing::info!(node = id, %job, "job claimed");
                Some(control_reply(h, MANAGER_ID, epoch, &Control::Ok))
            }
            Err(e) => err(ErrorCode::Invalid, e.to_string()),
        },
        Control::Goodbye => {
            if st.members.goodbye(id) {
                tracing::info!(node = id, epoch = st.members.map().epoch, "worker left");
                // As for a disconnection: a failed save is logged inside
                // and retried by the ticker.
                let _ = st.broadcast();
                let released = st.members.release_ready();
                st.release(released);
            }
            Some(control_reply(h, MANAGER_ID, epoch, &Control::Ok))
        }
        other => err(
            ErrorCode::Invalid,
            format!("the manager does not take {other:?}"),
        ),
    }
}

/// First bytes of a manager state file.
const STATE_MAGIC: &[u8; 8] = b"PSMGRST1";

/// Writes the manager's state: magic, CRC32 of the body, body length, body
/// (postcard), through `fs` (atomically: a crash leaves the old state or
/// the new one, never half of one).
fn save_state(fs: &dyn FileSystem, path: &std::path::Path, p: &Persisted) -> Result<(), NodeError> {
    let body = postcard::to_allocvec(p).map_err(|e| NodeError::State {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    let mut bytes = Vec::with_capacity(20 + body.len());
    bytes.extend_from_slice(STATE_MAGIC);
    bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    fs.write_atomic(path, &bytes).map_err(|e| NodeError::State {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Reads a state file written by [`save_state`]; `None` when there is none.
/// A file that is truncated, corrupt or of another format is an error,
/// never a silently empty cluster.
fn load_state(path: &std::path::Path) -> Result<Option<Persisted>, NodeError> {
    let bad = |why: String| NodeError::State {
        path: path.display().to_string(),
        why,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let Some((head, body)) = bytes.split_at_checked(20) else {
        return Err(bad(format!(
            "{} bytes is shorter than the header",
            bytes.len()
        )));
    };
    if &head[..8] != STATE_MAGIC {
        return Err(bad("not a pserver manager state file".into()));
    }
    let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let len = u64::from_le_bytes(head[12..20].try_into().unwrap_or([0; 8]));
    if len != body.len() as u64 {
        return Err(bad(format!("declares {len} bytes, holds {}", body.len())));
    }
    if crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch: the file is corrupt".into()));
    }
    postcard::from_bytes(body)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests;
