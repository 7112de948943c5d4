//! The server's runtime: carries out what [`ServerCore`] decides.
//!
//! One lock holds the core and the queues to the next servers of chains.
//! Under it the runtime only steps the core and queues its `Forward`s and
//! `Abandon`s (cheap, and it keeps each queue in the order the changes were
//! made); replies, packing, `Synced` reports, checkpoint files and work on
//! lent tables happen after the lock is released. The lock is tokio's:
//! a task waiting for it yields its thread, so a long step (a map that
//! copies millions of keys to new replicas) never stops the heartbeats.

use super::core::request::Op;
use super::core::{
    ConnId, CoreConfig, Delivery, Effect, Input, LEND_FROM, ServerCore, Ticket, Work,
};
use super::stats::{Figured, LinkFigures, ServerStats};
use super::{ServerConfig, ServerHandle};
use crate::conn::{Cork, Outbox, Peer, Reader, accept_loop, bind, lock, split};
use crate::error::NodeError;
use crate::metrics::{BoxFuture, Exporter, Scrape};
use crate::net::Net;
use crate::proto::{Rejoining, control_reply, control_request, error_reply, register, rejoin};
use crate::replica::Forwarder;
use futures_util::StreamExt;
use pserver_core::map::Group;
use pserver_core::store::Threads;
use pserver_core::{NodeId, NodeState, Role};
use pserver_wire::header::{FLAG_PACK_REPLY, FLAG_SCAN};
use pserver_wire::{CodecError, Control, ErrorCode, Frame, Header, Kind, Limits, Packing};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The core and the queues its `Forward` effects fill.
struct Node {
    core: ServerCore,
    forwarders: HashMap<NodeId, Forwarder>,
    /// Data requests whose replies were not made in their own step (they
    /// wait for the chain, for slower workers, or for a lent table), by
    /// connection and request id: when each was read, and its operation,
    /// for its latency once the reply is made. Kept under the lock the
    /// steps take anyway, so timing a request takes no lock of its own.
    pending: HashMap<(ConnId, u64), (Instant, Op)>,
}

/// Most requests [`Node::pending`] times at once; past it a request's
/// latency is not observed (its reply still goes).
const MAX_TIMED: usize = 1 << 20;

/// A data request being stepped, to time.
#[derive(Clone, Copy)]
struct Timed {
    conn: ConnId,
    request: u64,
    op: Op,
    at: Instant,
}

/// What every task of one server shares.
struct Shared {
    id: NodeId,
    node: tokio::sync::Mutex<Node>,
    /// The core's map epoch after the latest step, for errors sent without
    /// the lock.
    map_epoch: AtomicU64,
    /// Open connections by the ids the core knows them by.
    conns: Mutex<HashMap<ConnId, Outbox>>,
    next_conn: AtomicU64,
    /// Where forwarders report the fate of each change.
    done: mpsc::UnboundedSender<(Ticket, Delivery)>,
    /// The current link to the manager (replaced on rejoin).
    manager: Mutex<Peer>,
    net: Net,
    limits: Limits,
    /// Bytes of every frame queued to the next servers of chains.
    replicated: Arc<AtomicU64>,
    /// The core's clock starts here (tokio's clock, so simulations control it).
    epoch: tokio::time::Instant,
    /// The highest sender id of any request this server took, for a
    /// manager that rebuilds the map from servers' reports (it must hand
    /// out no id a node or client still pushes with).
    senders: std::sync::atomic::AtomicU32,
    /// When the manager last answered (ms on the core's clock): a
    /// heartbeat's answer or a map. Kept outside the lock, so heartbeats
    /// never wait for it.
    contact_ms: AtomicU64,
    /// What the runtime counts, for the metrics listener.
    stats: Arc<ServerStats>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Steps the core and queues its changes for the chains, under the
    /// lock; returns the effects to carry out after it. A `long` step (a
    /// map, a big request) lets the runtime move this thread's other tasks
    /// elsewhere meanwhile.
    async fn step(&self, inputs: impl IntoIterator<Item = Input>, long: bool) -> Vec<Effect> {
        self.step_timed(inputs, long, None).await
    }

    /// [`Shared::step`], timing the data request `timed` (the input).
    async fn step_timed(
        &self,
        inputs: impl IntoIterator<Item = Input>,
        long: bool,
        timed: Option<Timed>,
    ) -> Vec<Effect> {
        let mut node = self.node.lock().await;
        if long && multi_thread() {
            tokio::task::block_in_place(|| self.step_locked(&mut node, inputs, timed))
        } else {
            self.step_locked(&mut node, inputs, timed)
        }
    }

    fn step_locked(
        &self,
        node: &mut Node,
        inputs: impl IntoIterator<Item = Input>,
        timed: Option<Timed>,
    ) -> Vec<Effect> {
        let now = self.now_ms();
        node.core
            .manager_seen(self.contact_ms.load(Ordering::Relaxed));
        let mut rest = Vec::new();
        for input in inputs {
            if let Input::Closed(c) = &input {
                if !node.pending.is_empty() {
                    node.pending.retain(|(conn, _), _| conn != c);
                }
            }
            for effect in node.core.step(now, input) {
                match effect {
                    Effect::Forward {
                        to,
                        addr,
                        ticket,
                        frame,
                    } => {
                        self.replicated
                            .fetch_add(frame.encoded_len() as u64 + 4, Ordering::Relaxed);
                        let fwd = node.forwarders.entry(to).or_insert_with(|| {
                            Forwarder::start(
                                self.id,
                                to,
                                addr,
                                self.limits,
                                self.net.clone(),
                                self.done.clone(),
                            )
                        });
                        fwd.send(ticket, frame);
                    }
                    Effect::Abandon { to } => {
                        if let Some(f) = node.forwarders.remove(&to) {
                            f.abandon();
                        }
                    }
                    Effect::Report {
                        conn,
                        request,
                        figures,
                    } => {
                        let fig = self.figured(node, *figures);
                        let report = self.stats.report(&fig);
                        let epoch = node.core.map().epoch;
                        let frame =
                            control_reply(&request, self.id, epoch, &Control::ServerReport(report));
                        rest.push(Effect::Send { conn, frame });
                    }
                    other => rest.push(other),
                }
            }
        }
        // Replies made in this step: errors by code, and the latency of
        // the requests they answer.
        for e in &rest {
            let Effect::Send { conn, frame } = e else {
                continue;
            };
            if frame.header.kind == Kind::Error {
                if let Ok(Control::Error { code, .. }) = frame.control_msg() {
                    self.stats.error(code);
                }
            }
            if !node.pending.is_empty() {
                if let Some((at, op)) = node.pending.remove(&(*conn, frame.header.request_id)) {
                    self.stats.latency(op, at.elapsed().as_micros() as u64);
                }
            }
        }
        if let Some(t) = timed {
            let answered = rest.iter().any(|e| {
                matches!(e, Effect::Send { conn, frame }
                    if *conn == t.conn && frame.header.request_id == t.request)
            });
            if answered {
                self.stats.latency(t.op, t.at.elapsed().as_micros() as u64);
            } else if node.pending.len() < MAX_TIMED {
                node.pending.insert((t.conn, t.request), (t.at, t.op));
            }
        }
        self.map_epoch
            .store(node.core.map().epoch, Ordering::Relaxed);
        rest
    }

    /// The figures of a scrape besides the counters: the core's (taken
    /// under the lock), the chain links' queues, the manager's silence.
    fn figured(&self, node: &Node, core: super::core::CoreFigures) -> Figured {
        let mut links: Vec<LinkFigures> = node
            .forwarders
            .iter()
            .map(|(&to, f)| {
                let (bytes, changes) = f.queued();
                LinkFigures { to, bytes, changes }
            })
            .collect();
        links.sort_by_key(|l| l.to);
        Figured {
            core,
            links,
            replicated_bytes: self.replicated.load(Ordering::Relaxed),
            manager_silence_ms: self
                .now_ms()
                .saturating_sub(self.contact_ms.load(Ordering::Relaxed)),
        }
    }

    /// Sends `frame` on connection `conn`, if it is still open, packing its
    /// values when its request asked (`FLAG_PACK_REPLY`): here, outside the
    /// lock, so compression does not hold up other connections.
    async fn send(&self, conn: ConnId, mut frame: Frame) {
        let Some(out) = lock(&self.conns).get(&conn).cloned() else {
            return;
        };
        if frame.header.flags & FLAG_PACK_REPLY != 0 {
            frame.header.flags &= !FLAG_PACK_REPLY;
            frame.pack(Packing::Lossless);
        }
        let header = frame.header;
        self.stats.sent(frame.encoded_len() as u64 + 4);
        if let Err(NodeError::Unsendable { why, .. }) = out.send(frame).await {
            // A reply over the frame limit (a pull of too many keys for its
            // width): the request is answered with why, instead of never.
            let epoch = self.map_epoch.load(Ordering::Relaxed);
            let refusal = error_reply(
                &header,
                self.id,
                epoch,
                ErrorCode::Limit,
                format!("its reply cannot be sent: {why}; split the request into smaller ones"),
            );
            self.stats.error(ErrorCode::Limit);
            let _ = out.send(refusal).await;
        }
    }

    /// Carries out the effects a step left for after the lock; work on lent
    /// tables runs on a blocking thread (this task's thread stays free), and
    /// what the core does once it returns is carried out in turn.
    async fn carry_out(self: &Arc<Self>, effects: Vec<Effect>) {
        self.carry_out_on(effects, Run::Aside).await;
    }

    /// [`Shared::carry_out`], with work on lent tables run as `run` says.
    async fn carry_out_on(self: &Arc<Self>, effects: Vec<Effect>, run: Run) {
        let mut effects = effects;
        loop {
            let mut works = Vec::new();
            self.carry_out_once(effects, &mut works).await;
            if works.is_empty() {
                return;
            }
            let mut back = Vec::new();
            for work in works {
                match run_work(work, run).await {
                    Some(w) => back.push(Input::Applied(Box::new(w))),
                    None => tracing::error!(node = self.id, "work on a lent table failed"),
                }
            }
            effects = self.step(back, false).await;
        }
    }

    async fn carry_out_once(self: &Arc<Self>, effects: Vec<Effect>, works: &mut Vec<Work>) {
        for effect in effects {
            match effect {
                Effect::Send { conn, frame } => self.send(conn, frame).await,
                Effect::Synced { epoch } => {
                    let peer = lock(&self.manager).clone();
                    let _ = peer
                        .notify(control_request(self.id, epoch, &Control::Synced { epoch }))
                        .await;
                }
                Effect::Checkpoint {
                    conn,
                    request,
                    dir,
                    parts,
                } => {
                    let shared = Arc::clone(self);
                    // File I/O off the runtime's threads and outside the
                    // lock: pushes and pulls go on while the files are
                    // written (the parts were copied consistently).
                    tokio::spawn(async move {
                        let written = tokio::task::spawn_blocking(move || {
                            let dir = std::path::Path::new(&dir);
                            parts
                                .iter()
                                .map(|p| crate::snapshot::write_part(dir, p))
                                .collect::<Result<Vec<_>, _>>()
                        })
                        .await;
                        let epoch = shared.map_epoch.load(Ordering::Relaxed);
                        let reply = match written {
                            Ok(Ok(files)) => control_reply(
                                &request,
                                shared.id,
                                epoch,
                                &Control::Snapshotted { files },
                            ),
                            Ok(Err(e)) => {
                                shared.stats.error(ErrorCode::Internal);
                                error_reply(
                                    &request,
                                    shared.id,
                                    epoch,
                                    ErrorCode::Internal,
                                    e.to_string(),
                                )
                            }
                            Err(e) => error_reply(
                                &request,
                                shared.id,
                                epoch,
                                ErrorCode::Internal,
                                format!("checkpoint writer failed: {e}"),
                            ),
                        };
                        shared.send(conn, reply).await;
                    });
                }
                Effect::Apply(work) => works.push(*work),
                // Carried out under the lock by `step`.
                Effect::Forward { .. } | Effect::Abandon { .. } | Effect::Report { .. } => {}
            }
        }
    }

    /// The server is stopping: every reply it still owes is forgotten, the
    /// queues are dropped without settling anything, and connections close,
    /// so that clients resend elsewhere instead of waiting for answers that
    /// never come.
    async fn stop(&self) {
        let mut node = self.node.lock().await;
        node.core.stop();
        node.forwarders.clear();
        node.pending.clear();
        drop(node);
        lock(&self.conns).clear();
    }
}

/// Starts a server: listens, registers with the manager and serves until
/// shut down or dropped by the manager.
pub async fn start_server(cfg: ServerConfig) -> Result<ServerHandle, NodeError> {
    let (listener, addr) = bind(&cfg.net, &cfg.listen).await?;
    let my_addr = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
    // A manager not up yet (its pod starting beside this one) is waited
    // for, up to `manager_wait`.
    let deadline = tokio::time::Instant::now() + cfg.manager_wait;
    let (manager, notices, id, map) = loop {
        let attempt = async {
            let (manager, notices) = Peer::connect_via(&cfg.net, &cfg.manager, cfg.limits).await?;
            let (id, map) =
                register(&manager, Role::Server, &my_addr, Group::Default, cfg.id).await?;
            Ok::<_, NodeError>((manager, notices, id, map))
        };
        match attempt.await {
            Ok(joined) => break joined,
            Err(e @ (NodeError::Connect { .. } | NodeError::Closed(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "the manager is not answering yet; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let replicated = Arc::new(AtomicU64::new(0));
    // One pool for all of this server's tables, alive as long as it is.
    let apply_threads = Threads::new(cfg.apply_threads).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "applying every request on one thread");
        Threads::one()
    });
    let core = ServerCore::new(
        id,
        CoreConfig {
            limits: cfg.limits,
            registry: cfg.registry.clone(),
            key_cache_keys: cfg.key_cache_keys,
            replicate_after_aggregation: cfg.replicate_after_aggregation,
            apply_threads,
            lend_from: LEND_FROM,
            significant_entries: cfg.significant_entries,
        },
    );
    let (done, mut done_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        id,
        node: tokio::sync::Mutex::new(Node {
            core,
            forwarders: HashMap::new(),
            pending: HashMap::new(),
        }),
        map_epoch: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        done,
        manager: Mutex::new(manager.clone()),
        net: cfg.net.clone(),
        limits: cfg.limits,
        replicated: replicated.clone(),
        epoch: tokio::time::Instant::now(),
        contact_ms: AtomicU64::new(0),
        senders: std::sync::atomic::AtomicU32::new(0),
        stats: Arc::new(ServerStats::default()),
    });
    let heartbeat = map.heartbeat_interval();
    // Which process of this id this one is: a map that gives the id
    // another `joined` took it back for a newer process (`--id`).
    let joined = map.node(id).map_or(0, |n| n.joined);
    let effects = shared.step([Input::Map(map)], true).await;
    shared.carry_out(effects).await;
    let cancel = CancellationToken::new();

    // Answers from the chains, in batches: each settles its ticket.
    {
        let (shared, token) = (Arc::clone(&shared), cancel.clone());
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = token.cancelled() => break,
                    d = done_rx.recv() => match d {
                        Some(d) => d,
                        None => break,
                    },
                };
                let mut batch = vec![first];
                while let Ok(d) = done_rx.try_recv() {
                    batch.push(d);
                }
                let inputs = batch
                    .into_iter()
                    .map(|(ticket, delivery)| Input::Delivered { ticket, delivery });
                let effects = shared.step(inputs, false).await;
                shared.carry_out(effects).await;
            }
        });
    }

    // Heartbeats go from their own task, which never waits for the state
    // lock: a long request (a 16M-key push takes seconds) or a map being
    // installed must not silence the server into being declared dead.
    {
        let (shared, token) = (Arc::clone(&shared), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let peer = lock(&shared.manager).clone();
                        let sent = shared.now_ms();
                        // Asked as a request: the answer renews this
                        // server's own view of its lease. A failed link is
                        // noticed by the link task, which owns rejoining;
                        // the next tick uses the new link.
                        let beat = control_request(id, 0, &Control::Heartbeat);
                        if let Ok(answer) = peer.send_request(beat).await {
                            // Awaited aside, so a slow answer never delays
                            // the next heartbeat; a late one (a busy
                            // manager) still counts, for when it was sent.
                            let shared = Arc::clone(&shared);
                            tokio::spawn(async move {
                                let answer = tokio::time::timeout(heartbeat * 8, answer).await;
                                if let Ok(Ok(reply)) = answer {
                                    if reply.header.kind == Kind::Reply {
                                        shared.contact_ms.fetch_max(sent, Ordering::Relaxed);
                                    }
                                }
                            });
                        }
                    }
                }
            }
        });
    }

    // The link to the manager: maps in. A lost link is rejoined (the
    // manager may have restarted) for as long as it takes: the server
    // keeps its data meanwhile, refusing requests once its lease lapses.
    // It stops only when a manager that knows it says it is dead (or a map
    // no longer holds it), or on shutdown.
    {
        let (shared, token) = (Arc::clone(&shared), cancel.clone());
        let (net, manager_addr, limits, my_addr) = (
            cfg.net.clone(),
            cfg.manager.clone(),
            cfg.limits,
            my_addr.clone(),
        );
        tokio::spawn(async move {
            let mut notices = notices;
            loop {
                let mut lost = false;
                tokio::select! {
                    _ = token.cancelled() => break,
                    notice = notices.recv() => match notice {
                        None => lost = true,
                        Some(frame) => match frame.control_msg() {
                            // A map renews nothing: it says the manager held
                            // this server alive when it made the map, not
                            // when it arrived, and the manager may declare it
                            // dead a moment later. Only answered heartbeats,
                            // timed by when they were sent, do (so this
                            // server stops serving before the manager gives
                            // its ranges away).
                            Ok(Control::Map(map)) => {
                                if map.node(id).is_some_and(|n| n.joined != joined) {
                                    // A newer process came back under this
                                    // id: the map is its, not this one's to
                                    // act on (what it would copy is stale).
                                    tracing::warn!(node = id, "a newer process took this server's id");
                                    break;
                                }
                                let gone = map.node(id).is_none_or(|n| n.state == NodeState::Dead);
                                // Replies this map released (acks of sums this
                                // server no longer applies go back as NotOwner,
                                // so their workers retry elsewhere) go out even
                                // when the server is leaving.
                                let effects = shared.step([Input::Map(map)], true).await;
                                shared.carry_out(effects).await;
                                if gone {
                                    // Drained (or declared dead while alive):
                                    // another server holds its ranges now.
                                    tracing::info!(node = id, "no longer in the map");
                                    break;
                                }
                            }
                            // Only maps (or a refused rejoin) end a server;
                            // an unasked error is no verdict on its data.
                            Ok(Control::Error { message, .. }) => {
                                tracing::warn!(node = id, %message, "the manager sent an error");
                            }
                            _ => tracing::debug!(node = id, "ignored notice from manager"),
                        },
                    },
                }
                // Stopping (a local cluster stops all its nodes at once): the
                // manager's going is no news.
                if lost && token.is_cancelled() {
                    break;
                }
                if lost {
                    tracing::warn!(node = id, "lost the manager; rejoining");
                    let map = shared.node.lock().await.core.map().clone();
                    let who = Rejoining {
                        id,
                        role: Role::Server,
                        addr: my_addr.clone(),
                        epoch: map.epoch,
                        lease_ms: map.lease_ms,
                        report: Some((map, shared.senders.load(Ordering::Relaxed))),
                    };
                    let rejoined = tokio::select! {
                        _ = token.cancelled() => break,
                        r = rejoin(&net, &manager_addr, limits, &who) => r,
                    };
                    match rejoined {
                        Ok((_, _, map)) if map.node(id).is_some_and(|n| n.joined != joined) => {
                            tracing::warn!(node = id, "a newer process took this server's id");
                            break;
                        }
                        Ok((peer, rx, map)) => {
                            tracing::info!(node = id, epoch = map.epoch, "rejoined the manager");
                            // Nor does the rejoin: its attempts may have
                            // taken a while; the next heartbeat's answer (on
                            // the new link, within a heartbeat) renews it.
                            *lock(&shared.manager) = peer;
                            notices = rx;
                            let effects = shared.step([Input::Map(map)], true).await;
                            shared.carry_out(effects).await;
                        }
                        Err(e) => {
                            // A manager that knows this server declared it
                            // dead: its ranges went to others, so what it
                            // holds is stale.
                            tracing::error!(node = id, error = %e, "the manager refused this server");
                            break;
                        }
                    }
                }
            }
            tracing::info!(node = id, "server stopping");
            token.cancel();
            shared.stop().await;
        });
    }

    let limits = cfg.limits;
    let exporter: Arc<dyn Exporter> = Arc::new(ServerExporter(Arc::clone(&shared)));
    accept_loop(listener, cancel.clone(), limits, move |stream, peer| {
        serve(stream, peer, Arc::clone(&shared))
    });
    tracing::info!(node = id, %addr, "server listening");
    Ok(ServerHandle {
        id,
        addr,
        cancel,
        replicated,
        exporter,
    })
}

/// Serves one connection: each frame is a step of the core.
async fn serve<S>(stream: S, peer: String, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, out) = split(stream, shared.limits);
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    lock(&shared.conns).insert(conn, out.clone());
    shared.stats.opened();
    let malformed = |h: &Header, why: String| {
        let epoch = shared.map_epoch.load(Ordering::Relaxed);
        error_reply(h, shared.id, epoch, ErrorCode::Malformed, why)
    };
    // Held while the frame being served is followed by another already
    // here whole (see `read_next`).
    let mut corked: Option<Cork> = None;
    let mut next = read_next(&mut reader, &out, &mut corked).await;
    while let Some(item) = next {
        let (effects, ahead) = match item {
            Ok(mut frame) => {
                let at = Instant::now();
                shared
                    .senders
                    .fetch_max(frame.header.sender, Ordering::Relaxed);
                // Counted once, as it came (before unpacking), whatever
                // becomes of it.
                let timed = data_op(&frame.header).map(|op| {
                    let h = &frame.header;
                    let keys = match frame.key_ref() {
                        Some((_, count)) => count,
                        None if h.dense() => h.range.len(),
                        None => frame.keys.len() as u64,
                    };
                    let bytes = frame.encoded_len() as u64 + 4;
                    shared.stats.request(h.table, op, keys, bytes);
                    Timed {
                        conn,
                        request: h.request_id,
                        op,
                        at,
                    }
                });
                // Unpacked before the lock; a section that does not unpack
                // is refused like any malformed request.
                if let Err(e) = frame.unpack() {
                    shared.stats.error(ErrorCode::Malformed);
                    let _ = out.send(malformed(&frame.header, e.to_string())).await;
                    next = read_next(&mut reader, &out, &mut corked).await;
                    continue;
                }
                let big = frame.keys.len().max(frame.vals.len()) >= LEND_FROM;
                let push = frame.header.kind == Kind::Push;
                let input = Input::Request { conn, frame };
                // A big request's admission (checking millions of keys)
                // takes a while even though its table is lent for the rest.
                (shared.step_timed([input], big, timed).await, push)
            }
            Err(CodecError::Oversized { header, bytes, max }) => {
                // Refused whole, nothing done; the codec skips its body, so
                // the connection goes on.
                let epoch = shared.map_epoch.load(Ordering::Relaxed);
                let why = format!(
                    "a frame of {bytes} bytes is over this server's frame limit of {max} bytes \
                     (--max-frame-mib); split the request into smaller ones (the worker \
                     library does when its WorkerConfig::limits are the cluster's)"
                );
                tracing::warn!(%peer, "{why}");
                shared.stats.error(ErrorCode::Limit);
                let _ = out
                    .send(error_reply(
                        &header,
                        shared.id,
                        epoch,
                        ErrorCode::Limit,
                        why,
                    ))
                    .await;
                next = read_next(&mut reader, &out, &mut corked).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad frame; closing");
                shared.stats.error(ErrorCode::Malformed);
                let _ = out
                    .send(malformed(&Header::new(Kind::Error), e.to_string()))
                    .await;
                break;
            }
        };
        // After a push whose sender is still sending (the start of another
        // frame is here), the next frame is read while the push's effects
        // are carried out (a lent table's work runs on a blocking thread for
        // milliseconds), so the socket goes on draining and the sender on
        // sending the rest of a big request. The frame read ahead is stepped
        // only once they are done, so a connection's requests still reach
        // the core one at a time and in order; at most one is read ahead.
        // Not after a pull or push-pull: the reply is as big as the request,
        // and its write and the read ahead then compete for the same cores
        // (a dense push-pull of 64 MiB was 10% slower with it, 2 cores).
        // With nothing arriving, there is nothing to read meanwhile, and the
        // work runs on this task's thread (see `Run::Here`).
        next = if ahead && reader.partial_bytes() > 0 {
            let read = read_next(&mut reader, &out, &mut corked);
            let (_, read) = tokio::join!(shared.carry_out_on(effects, Run::Aside), read);
            read
        } else {
            shared.carry_out_on(effects, Run::Here).await;
            read_next(&mut reader, &out, &mut corked).await
        };
    }
    drop(corked);
    lock(&shared.conns).remove(&conn);
    shared.stats.closed();
    let effects = shared.step([Input::Closed(conn)], false).await;
    shared.carry_out(effects).await;
}

/// The connection's next frame, or `None` once it ended or its replies can
/// no longer leave (then it takes no more requests).
///
/// `corked` holds the outbox's replies back while the frame given out is
/// followed by another already here whole: the replies to a run of frames
/// that arrived together (a worker's slices of one request to this
/// server, pipelined requests) leave in one write, not one syscall (and
/// one wake-up of the peer) each. It is let go before waiting on the
/// socket, once the replies to the run are queued, so no reply waits for
/// a frame that has not come.
async fn read_next<S: AsyncRead>(
    reader: &mut Reader<S>,
    out: &Outbox,
    corked: &mut Option<Cork>,
) -> Option<Result<Frame, CodecError>> {
    if !reader.frame_buffered() {
        *corked = None;
    }
    let item = tokio::select! {
        item = reader.next() => item,
        _ = out.writer_gone() => None,
    };
    if item.is_some() && reader.frame_buffered() && corked.is_none() {
        *corked = Some(out.cork());
    }
    item
}

/// A data request's operation, from its header alone; `None` for the
/// rest (chain changes, control requests).
fn data_op(h: &Header) -> Option<Op> {
    match h.kind {
        Kind::Push => Some(Op::Push),
        Kind::PushPull => Some(Op::PushPull),
        Kind::Pull if h.flags & FLAG_SCAN != 0 => Some(Op::Scan),
        Kind::Pull => Some(Op::Pull),
        _ => None,
    }
}

/// What a server tells its metrics listener.
struct ServerExporter(Arc<Shared>);

impl Exporter for ServerExporter {
    fn scrape(&self) -> BoxFuture<'_, Scrape> {
        Box::pin(async move {
            let shared = &self.0;
            let fig = {
                let node = shared.node.lock().await;
                shared.figured(&node, node.core.figures())
            };
            shared.stats.scrape(&fig)
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let shared = &self.0;
            let node = shared.node.lock().await;
            let silent = shared
                .now_ms()
                .saturating_sub(shared.contact_ms.load(Ordering::Relaxed));
            super::stats::ready(shared.id, node.core.map(), silent)
        })
    }
}

/// Where work on a lent table runs (it takes milliseconds).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Run {
    /// On a blocking thread, while the calling task's future may go on
    /// with something else (reading the connection's next frame).
    Aside,
    /// On the calling task's own thread (`block_in_place`: the runtime
    /// moves its other tasks to another thread), when the task has nothing
    /// else to do meanwhile. It saves two hand-offs between threads, each
    /// of which may wake an idle vCPU: 65,536-key requests at depth 1 went
    /// 6-16% faster (alternated runs, 2-vCPU VM).
    Here,
}

/// Runs work on a lent table off the runtime's scheduling, as `run` says
/// (on a current-thread runtime, as in simulations, in place). `None` if
/// it panicked, which loses the table: a bug, logged by the caller.
async fn run_work(work: Work, run: Run) -> Option<Work> {
    if !multi_thread() {
        return Some(work.run());
    }
    match run {
        Run::Aside => tokio::task::spawn_blocking(move || work.run()).await.ok(),
        Run::Here => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(move || work.run())
        }))
        .ok(),
    }
}

/// Whether this task runs on a multi-threaded runtime, where
/// `block_in_place` is allowed (it panics on a current-thread one).
fn multi_thread() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}
