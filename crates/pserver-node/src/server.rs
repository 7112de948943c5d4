//! The server node: holds its key ranges of every table, applies pushes
//! through the table's updater, answers pulls once the consistency model
//! allows, and redirects requests sent under a stale map.
//!
//! Key caching: a data frame flagged `FLAG_CACHE_KEYS` leaves its key list
//! in a bounded [`KeyCache`]; a later frame of the same sender and table may
//! then carry only `[hash, count]` (`FLAG_KEYREF`), which is resolved to the
//! list before any other check, or refused with `KeyCacheMiss`.

use crate::conn::{Outbox, Peer, accept_loop, bind, lock, split};
use crate::error::NodeError;
use crate::net::Net;
use crate::proto::{control_reply, control_request, error_reply, register, rejoin, reply_header};
use crate::replica::{Delivery, Forwarder};
use futures_util::StreamExt;
use pserver_core::clock::RangeClock;
use pserver_core::keycache::KeyCache;
use pserver_core::store::{Store, StoreError};
use pserver_core::updater::Registry;
use pserver_core::{ClusterMap, Consistency, KeyRange, NodeId, NodeState, Role, TableSpec};
use pserver_wire::header::{
    FLAG_CACHE_KEYS, FLAG_DENSE, FLAG_KEYREF, FLAG_PACK_REPLY, FLAG_RETRY, FLAG_SCAN,
};
use pserver_wire::message::Replica;
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind, Limits, Packing};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How to run a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The manager's address.
    pub manager: String,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Frame and request limits.
    pub limits: Limits,
    /// User updaters this server can build.
    pub registry: Registry,
    /// Most keys the key cache holds, over every sender's lists (8 bytes
    /// each plus a little bookkeeping per list); least recently used lists
    /// are evicted first. 0 turns key caching off: no list is kept, and
    /// replies never say one was, so workers keep sending keys in full.
    pub key_cache_keys: usize,
    /// For aggregating tables with replicas: hold each worker's push
    /// acknowledgement until its clock's sum is applied, and replicate the
    /// result once per clock (replication after aggregation) instead of
    /// forwarding every worker's push down the chain. On by default.
    pub replicate_after_aggregation: bool,
    /// How to listen and dial (TCP unless a test simulates the network).
    pub net: Net,
    /// Threads one large push or pull may use on this server (see
    /// [`Store::with_threads`]); the machine's cores by default.
    pub apply_threads: usize,
}

/// Default of [`ServerConfig::key_cache_keys`]: 16 Mi keys, 128 MiB of keys.
pub const DEFAULT_KEY_CACHE_KEYS: usize = 16 << 20;

impl ServerConfig {
    /// A server of the manager at `manager`, on a free loopback port.
    pub fn new(manager: impl Into<String>) -> ServerConfig {
        ServerConfig {
            manager: manager.into(),
            listen: "127.0.0.1:0".into(),
            limits: Limits::default(),
            registry: Registry::new(),
            key_cache_keys: DEFAULT_KEY_CACHE_KEYS,
            replicate_after_aggregation: true,
            net: Net::tcp(),
            apply_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    id: NodeId,
    addr: SocketAddr,
    cancel: CancellationToken,
    replicated: Arc<std::sync::atomic::AtomicU64>,
}

impl ServerHandle {
    /// Bytes this server has sent down replica chains (changes, copies,
    /// markers): what replication costs it.
    pub fn replicated_bytes(&self) -> u64 {
        self.replicated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Its node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server: closes its listener and every connection, and its
    /// link to the manager (which then declares it dead).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// A token cancelled when the server stops (for example when the manager
    /// declares it dead or goes away).
    pub fn cancelled(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// One table on this server.
struct TableState {
    /// `Err` holds why the updater could not be built; requests get that error.
    store: Result<Store, String>,
    /// The range vector clock over every key: records of the pushes this
    /// server applied, as primary or as replica, so that a replica promoted
    /// to primary refuses the same duplicates its primary would have.
    clock: RangeClock,
    /// Pushes of an aggregating table not yet applied: clock -> sums.
    pending: BTreeMap<u64, Aggregate>,
}

/// The sum of one clock's pushes to an aggregating table on this server.
struct Aggregate {
    /// The ranges pushed (each slice's range, once): the clock is complete
    /// when every live worker has pushed all of them. Not a hull: a table's
    /// partitions on one server are not contiguous.
    ranges: Vec<KeyRange>,
    /// Key -> position in `keys`.
    index: FxHashMap<u64, usize>,
    keys: Vec<u64>,
    /// `width` floats per key, in `keys` order.
    sums: Vec<f32>,
    width: usize,
    /// Acknowledgements held until the sum is applied and replicated.
    acks: Vec<(Outbox, Frame, Frame)>,
}

/// A sum that was just applied, to be replicated and its acks released.
struct Applied {
    table: u32,
    clock: u64,
    keys: Vec<u64>,
    ranges: Vec<KeyRange>,
    acks: Vec<(Outbox, Frame, Frame)>,
}

impl Aggregate {
    fn new(range: KeyRange, width: usize) -> Aggregate {
        Aggregate {
            ranges: vec![range],
            acks: Vec::new(),
            index: FxHashMap::default(),
            keys: Vec::new(),
            sums: Vec::new(),
            width,
        }
    }

    fn add(&mut self, key: u64, vals: &[f32]) {
        let w = self.width;
        let i = *self.index.entry(key).or_insert_with(|| {
            self.keys.push(key);
            self.sums.resize(self.sums.len() + w, 0.0);
            self.keys.len() - 1
        });
        for (s, v) in self.sums[i * w..(i + 1) * w].iter_mut().zip(vals) {
            *s += v;
        }
    }

    /// Forgets the sums of keys in `range`.
    fn drop_keys_in(&mut self, range: KeyRange) {
        if !self.keys.iter().any(|k| range.contains(*k)) {
            return;
        }
        let w = self.width;
        let old_keys = std::mem::take(&mut self.keys);
        let old_sums = std::mem::take(&mut self.sums);
        self.index.clear();
        for (i, k) in old_keys.into_iter().enumerate() {
            if !range.contains(k) {
                self.index.insert(k, self.keys.len());
                self.keys.push(k);
                self.sums.extend_from_slice(&old_sums[i * w..(i + 1) * w]);
            }
        }
    }

    /// Sets `key`'s sum (a copy of another server's sum for it).
    fn set(&mut self, key: u64, vals: &[f32]) {
        let w = self.width;
        let i = *self.index.entry(key).or_insert_with(|| {
            self.keys.push(key);
            self.sums.resize(self.sums.len() + w, 0.0);
            self.keys.len() - 1
        });
        self.sums[i * w..(i + 1) * w].copy_from_slice(&vals[..w]);
    }

    /// Keys sorted, with their sums.
    fn sorted(&self) -> (Vec<u64>, Vec<f32>) {
        let w = self.width;
        let mut order: Vec<usize> = (0..self.keys.len()).collect();
        order.sort_unstable_by_key(|&i| self.keys[i]);
        let keys = order.iter().map(|&i| self.keys[i]).collect();
        let mut sums = Vec::with_capacity(self.sums.len());
        for &i in &order {
            sums.extend_from_slice(&self.sums[i * w..(i + 1) * w]);
        }
        (keys, sums)
    }
}

/// A pull waiting for slower workers.
struct Waiting {
    frame: Frame,
    out: Outbox,
    consistency: Consistency,
    /// Replication its push part waits for (a push-pull's reply is its ack).
    after: Vec<oneshot::Receiver<Delivery>>,
}

/// A reply held back until the replicas have the change it acknowledges.
struct Deferred {
    after: Vec<oneshot::Receiver<Delivery>>,
    to: Outbox,
    frame: Frame,
    /// Sent instead when the chain refused the change as stale: this server
    /// is no longer the range's primary, and the sender must retry there.
    stale: Frame,
}

struct State {
    id: NodeId,
    map: Arc<ClusterMap>,
    tables: BTreeMap<u32, TableState>,
    waiting: Vec<Waiting>,
    registry: Registry,
    /// [`ServerConfig::apply_threads`].
    apply_threads: usize,
    limits: Limits,
    /// Key lists senders asked this server to remember.
    key_cache: KeyCache,
    /// Chain replication: the ordered queue to each next server.
    forwarders: HashMap<NodeId, Forwarder>,
    /// Replies waiting for replication, taken by the connection task after
    /// each frame (see `serve`).
    deferred: Vec<Deferred>,
    /// After a map change: markers queued behind its copies on every
    /// forwarder; once all are answered the manager hears `Synced`.
    sync_waits: Vec<oneshot::Receiver<Delivery>>,
    /// Ranges this server is primary of but holds back, until their old
    /// primary's `Fence` arrives or [`FENCE_TIMEOUT`] passes: (range, old
    /// primary, since).
    fence_waits: Vec<(KeyRange, NodeId, tokio::time::Instant)>,
    /// Fences that arrived before the map that needs them: (range, from).
    fences_seen: Vec<(KeyRange, NodeId)>,
    /// Sums just applied, to replicate and release (`release_applied`).
    applied: Vec<Applied>,
    /// See [`ServerConfig::replicate_after_aggregation`].
    after_aggregation: bool,
    /// How forwarders dial the next servers of chains.
    net: Net,
    /// Bytes of every frame queued to the next servers of chains.
    replicated: Arc<std::sync::atomic::AtomicU64>,
}

/// Longest a new primary holds a range back waiting for its old primary's
/// fence. The fence travels behind the old primary's last changes, which
/// normally takes milliseconds; past this the old primary is presumed
/// stuck, and the manager will declare it dead within its lease anyway.
const FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Replies to send once the state lock is released.
type Outgoing = Vec<(Outbox, Frame)>;

/// Starts a server: listens, registers with the manager and serves until
/// shut down or dropped by the manager.
pub async fn start_server(cfg: ServerConfig) -> Result<ServerHandle, NodeError> {
    let (listener, addr) = bind(&cfg.net, &cfg.listen).await?;
    let (manager, notices) = Peer::connect_via(&cfg.net, &cfg.manager, cfg.limits).await?;
    let (id, map) = register(&manager, Role::Server, &addr.to_string()).await?;
    let replicated = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let state = Arc::new(Mutex::new(State {
        id,
        map: Arc::new(ClusterMap::empty(0, 1)),
        tables: BTreeMap::new(),
        waiting: Vec::new(),
        registry: cfg.registry.clone(),
        apply_threads: cfg.apply_threads,
        limits: cfg.limits,
        key_cache: KeyCache::new(cfg.key_cache_keys),
        forwarders: HashMap::new(),
        deferred: Vec::new(),
        sync_waits: Vec::new(),
        fence_waits: Vec::new(),
        fences_seen: Vec::new(),
        applied: Vec::new(),
        after_aggregation: cfg.replicate_after_aggregation,
        net: cfg.net.clone(),
        replicated: replicated.clone(),
    }));
    let heartbeat = map.heartbeat_interval();
    let out = lock(&state).apply_map(map);
    send_all(out).await;
    spawn_released(&state);
    report_synced(&state, &manager);
    let cancel = CancellationToken::new();

    // The link to the manager: heartbeats out, maps in. A lost link is
    // rejoined (the manager may have restarted); a manager that refuses this
    // server, or stays away, ends it.
    let st = state.clone();
    let token = cancel.clone();
    let (net, manager_addr, limits, my_addr) = (
        cfg.net.clone(),
        cfg.manager.clone(),
        cfg.limits,
        addr.to_string(),
    );
    // Heartbeats go from their own task, which never waits for the state
    // lock: a long request (a 16M-key push takes seconds) or a map being
    // installed must not silence the server into being declared dead.
    let link = Arc::new(Mutex::new(manager.clone()));
    {
        let (link, token) = (Arc::clone(&link), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let peer = lock(&link).clone();
                        // A failed send is noticed by the loop below, which
                        // owns rejoining; the next tick uses the new link.
                        let _ = peer.notify(control_request(id, 0, &Control::Heartbeat)).await;
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        let (mut manager, mut notices) = (manager, notices);
        loop {
            let mut lost = false;
            tokio::select! {
                _ = token.cancelled() => break,
                notice = notices.recv() => match notice {
                    None => lost = true,
                    Some(frame) => match frame.control_msg() {
                        Ok(Control::Map(map)) => {
                            let gone = map.node(id).is_none_or(|n| n.state == NodeState::Dead);
                            let out = lock(&st).apply_map(map);
                            send_all(out).await;
                            // Replies this map released (acks of sums this
                            // server no longer applies go back as NotOwner,
                            // so their workers retry elsewhere) go out even
                            // when the server is leaving.
                            spawn_released(&st);
                            if gone {
                                // Drained (or declared dead while alive):
                                // another server holds its ranges now.
                                tracing::info!(node = id, "no longer in the map");
                                break;
                            }
                            spawn_released(&st);
                            report_synced(&st, &manager);
                        }
                        Ok(Control::Error { message, .. }) => {
                            tracing::error!(node = id, %message, "manager refused this server");
                            break;
                        }
                        _ => tracing::debug!(node = id, "ignored notice from manager"),
                    },
                },
            }
            if lost {
                tracing::warn!(node = id, "lost the manager; rejoining");
                match rejoin(&net, &manager_addr, limits, id, Role::Server, &my_addr).await {
                    Ok((peer, rx, map)) => {
                        tracing::info!(node = id, epoch = map.epoch, "rejoined the manager");
                        *lock(&link) = peer.clone();
                        manager = peer;
                        notices = rx;
                        let out = lock(&st).apply_map(map);
                        send_all(out).await;
                        spawn_released(&st);
                        report_synced(&st, &manager);
                    }
                    Err(e) => {
                        tracing::error!(node = id, error = %e, "cannot rejoin the manager");
                        break;
                    }
                }
            }
        }
        tracing::info!(node = id, "server stopping");
        token.cancel();
        // Drop every reply still held (and with them the connections they
        // would go out on), so that clients see the connections close and
        // resend elsewhere instead of waiting for answers that never come.
        let mut g = lock(&st);
        g.deferred.clear();
        g.waiting.clear();
        g.forwarders.clear();
        for t in g.tables.values_mut() {
            for agg in t.pending.values_mut() {
                agg.acks.clear();
            }
        }
    });

    let limits = cfg.limits;
    accept_loop(listener, cancel.clone(), limits, move |stream, peer| {
        serve(stream, peer, state.clone(), limits)
    });
    tracing::info!(node = id, %addr, "server listening");
    Ok(ServerHandle {
        id,
        addr,
        cancel,
        replicated,
    })
}

/// Sends replies, packing the values of those whose request asked for it
/// (`FLAG_PACK_REPLY`). Runs after the state lock is released, so
/// compression does not hold up other connections.
async fn send_all(out: Outgoing) {
    for (to, mut frame) in out {
        if frame.header.flags & FLAG_PACK_REPLY != 0 {
            frame.header.flags &= !FLAG_PACK_REPLY;
            frame.pack(Packing::Lossless);
        }
        let _ = to.send(frame).await;
    }
}

/// Sends the replies a map change released (acknowledgements held for
/// sums that a worker's death completed).
fn spawn_released(state: &Arc<Mutex<State>>) {
    let deferred = std::mem::take(&mut lock(state).deferred);
    spawn_deferred(deferred);
}

/// Tells the manager, once the copies queued by the latest map change have
/// reached their chains, that this server is synced at that map's epoch.
fn report_synced(state: &Arc<Mutex<State>>, manager: &Peer) {
    let (epoch, me, waits) = {
        let mut st = lock(state);
        (st.map.epoch, st.id, std::mem::take(&mut st.sync_waits))
    };
    let manager = manager.clone();
    tokio::spawn(async move {
        for w in waits {
            if w.await.is_err() {
                // This server is stopping: it is synced at nothing.
                return;
            }
        }
        let _ = manager
            .notify(control_request(me, epoch, &Control::Synced { epoch }))
            .await;
    });
}

/// Sends each held-back reply once its replication completes.
fn spawn_deferred(deferred: Vec<Deferred>) {
    for d in deferred {
        tokio::spawn(async move {
            let mut reply = d.frame;
            for r in d.after {
                match r.await {
                    Ok(Delivery::Stored) => {}
                    Ok(Delivery::Stale) => reply = d.stale.clone(),
                    // This server is stopping before the replica had the
                    // change: no acknowledgement, the sender retries.
                    Err(_) => return,
                }
            }
            send_all(vec![(d.to, reply)]).await;
        });
    }
}

async fn serve<S>(stream: S, peer: String, state: Arc<Mutex<State>>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, out) = split(stream, limits);
    while let Some(item) = reader.next().await {
        match item {
            Ok(mut frame) => {
                // Unpacked before taking the lock; a section that does not
                // unpack is refused like any malformed request.
                let replies = match frame.unpack() {
                    Ok(_) => {
                        let big = frame.keys.len().max(frame.vals.len()) >= BIG_REQUEST;
                        let work = || {
                            let mut st = lock(&state);
                            let r = st.handle(frame, &out);
                            (r, std::mem::take(&mut st.deferred))
                        };
                        // A big request holds the state for a long time:
                        // let the runtime hand this thread's other tasks
                        // (heartbeats, writers) to another thread meanwhile.
                        let (replies, deferred) = if big && multi_thread() {
                            tokio::task::block_in_place(work)
                        } else {
                            work()
                        };
                        spawn_deferred(deferred);
                        replies
                    }
                    Err(e) => {
                        let st = lock(&state);
                        vec![(
                            out.clone(),
                            error_reply(
                                &frame.header,
                                st.id,
                                st.map.epoch,
                                ErrorCode::Malformed,
                                e.to_string(),
                            ),
                        )]
                    }
                };
                send_all(replies).await;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad frame; closing");
                let (me, epoch) = {
                    let st = lock(&state);
                    (st.id, st.map.epoch)
                };
                let h = Header::new(Kind::Error);
                let _ = out
                    .send(error_reply(
                        &h,
                        me,
                        epoch,
                        ErrorCode::Malformed,
                        e.to_string(),
                    ))
                    .await;
                break;
            }
        }
    }
}

/// A refused request: code and message.
type Refusal = (ErrorCode, String);

/// Keys or values from which a request counts as big (see `serve`).
const BIG_REQUEST: usize = 1 << 16;

/// Whether this task runs on a multi-threaded runtime, where
/// `block_in_place` is allowed (it panics on a current-thread one).
fn multi_thread() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn store_refusal(e: StoreError) -> Refusal {
    let code = match e {
        StoreError::WrongWidth { .. } => ErrorCode::WrongWidth,
        StoreError::NotFinite { .. } => ErrorCode::NotFinite,
        StoreError::Unsorted { .. } => ErrorCode::BadKeys,
    };
    (code, e.to_string())
}

impl State {
    /// Installs a newer map: creates stores for new tables, clocks for newly
    /// owned ranges, and re-examines waiting pulls.
    fn apply_map(&mut self, map: ClusterMap) -> Outgoing {
        if map.epoch <= self.map.epoch && !self.map.partitions.is_empty() {
            return Vec::new();
        }
        for spec in &map.tables {
            self.ensure_table(spec);
        }
        // A dead node's lists would only take room: its id is never reused.
        for sender in self.key_cache.senders() {
            if map.node(sender).is_some_and(|n| n.state == NodeState::Dead) {
                self.key_cache.forget(sender);
            }
        }
        let old = std::mem::replace(&mut self.map, Arc::new(map));
        let gone: Vec<NodeId> = self
            .forwarders
            .iter()
            .filter(|(id, f)| {
                f.is_closed()
                    || self
                        .map
                        .node(**id)
                        .is_none_or(|n| n.state == NodeState::Dead)
            })
            .map(|(id, _)| *id)
            .collect();
        for &id in &gone {
            if let Some(f) = self.forwarders.remove(&id) {
                f.abandon();
            }
        }
        self.fill_new_replicas(&old, &gone);
        self.fence(&old);
        // A marker behind everything queued so far on each forwarder: when
        // all are answered, every copy this map called for has arrived.
        let epoch = self.map.epoch;
        let targets: Vec<NodeId> = self.forwarders.keys().copied().collect();
        for to in targets {
            let marker = control_request(self.id, epoch, &Control::Synced { epoch });
            if let Some(r) = self.forward(to, marker) {
                self.sync_waits.push(r);
            }
        }
        self.prune_pending();
        // Fewer live workers may complete waiting aggregates.
        let workers = self.map.live_workers();
        let gate = self.gate();
        for t in self.tables.values_mut() {
            let done = flush(t, &workers, gate.as_deref());
            self.applied.extend(done);
        }
        self.release_applied();
        self.recheck(None)
    }

    /// Copies each range this server is now primary of to the chain of
    /// replicas, when one of them did not hold all of it under `old` (a
    /// replica replaced after a failure, or a range that grew). The copy is
    /// queued before any later change, on the same ordered queue, so the
    /// replica ends with the primary's state. Whole slots and clock records
    /// travel, so the copy refuses the same duplicates.
    fn fill_new_replicas(&mut self, old: &ClusterMap, abandoned: &[NodeId]) {
        if old.partitions.is_empty() {
            return;
        }
        // A replica downstream of an abandoned one may have missed changes
        // that were queued to it: it counts as not holding the range.
        let holds = |node: NodeId, r: KeyRange| {
            old.partitions_overlapping(r)
                .map(|i| &old.partitions[i])
                .all(|p| {
                    let at = std::iter::once(p.primary)
                        .chain(p.replicas.iter().copied())
                        .position(|n| n == node);
                    at.is_some_and(|at| {
                        !p.replicas
                            .iter()
                            .take(at.saturating_sub(1))
                            .any(|n| abandoned.contains(n))
                    })
                })
        };
        let mut copies = Vec::new();
        for p in self.map.partitions.iter().filter(|p| p.primary == self.id) {
            let Some((&next, rest)) = p.replicas.split_first() else {
                continue;
            };
            if p.replicas.iter().all(|&r| holds(r, p.range)) {
                continue;
            }
            for t in self.tables.values() {
                let Ok(store) = &t.store else { continue };
                let entries = store.entries_in(p.range);
                let records = t.clock.records_in(p.range);
                if entries.is_empty() && records.is_empty() {
                    continue;
                }
                let spec = store.spec().clone();
                // Bounded frames: a large range goes in several copies,
                // the clock records with the first.
                let per_frame = (self.limits.max_frame / 2 / (8 + 4 * store.slot_width()))
                    .clamp(1, self.limits.max_keys.max(1));
                let mut chunks: Vec<&[(u64, &[f32])]> = entries.chunks(per_frame).collect();
                if chunks.is_empty() {
                    chunks.push(&[]);
                }
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let mut f = Frame::new(Header {
                        table: spec.id,
                        sender: self.id,
                        epoch: self.map.epoch,
                        range: p.range,
                        ..Header::new(Kind::Control)
                    });
                    f.keys = chunk.iter().map(|(k, _)| *k).collect();
                    f.vals = chunk.iter().flat_map(|(_, s)| s.iter().copied()).collect();
                    f.ctrl = Control::Replicate {
                        spec: spec.clone(),
                        what: Replica::Copy { reset: i == 0 },
                        records: if i == 0 { records.clone() } else { Vec::new() },
                        chain: rest.to_vec(),
                    }
                    .to_bytes()
                    .into();
                    copies.push((next, f));
                }
                // Sums not yet applied, so that the range's new holders
                // apply the same sums when the clock completes.
                for (&clock, agg) in &t.pending {
                    // The sums go with the first piece; the other pieces
                    // only tell which ranges the clock must complete over.
                    let mut keys_sent = false;
                    for r in &agg.ranges {
                        let Some(piece) = r.intersect(&p.range) else {
                            continue;
                        };
                        let mut f = Frame::new(Header {
                            table: spec.id,
                            sender: self.id,
                            epoch: self.map.epoch,
                            range: piece,
                            ..Header::new(Kind::Control)
                        });
                        if !keys_sent {
                            keys_sent = true;
                            let mut held: Vec<(u64, usize)> = agg
                                .keys
                                .iter()
                                .enumerate()
                                .filter(|(_, k)| p.range.contains(**k))
                                .map(|(i, &k)| (k, i))
                                .collect();
                            held.sort_unstable();
                            for (k, i) in held {
                                f.keys.push(k);
                                f.vals.extend_from_slice(
                                    &agg.sums[i * agg.width..(i + 1) * agg.width],
                                );
                            }
                        }
                        f.ctrl = Control::Replicate {
                            spec: spec.clone(),
                            what: Replica::Pending { clock },
                            records: Vec::new(),
                            chain: rest.to_vec(),
                        }
                        .to_bytes()
                        .into();
                        copies.push((next, f));
                    }
                }
            }
        }
        for (to, f) in copies {
            tracing::debug!(
                node = self.id,
                to,
                keys = f.keys.len(),
                "copying a range to a new replica"
            );
            // Nobody waits for a copy; the queue's order is what matters.
            drop(self.forward(to, f));
        }
    }

    /// Drops the parts of unapplied sums over ranges this server no longer
    /// holds (as primary or replica): nobody will complete them here, and
    /// as the oldest clocks they would hold back every later clock of the
    /// ranges it keeps.
    fn prune_pending(&mut self) {
        let me = self.id;
        let held: Vec<KeyRange> = self
            .map
            .partitions
            .iter()
            .filter(|p| p.primary == me || p.replicas.contains(&me))
            .map(|p| p.range)
            .collect();
        let map = self.map.clone();
        let primary_of_all = |r: &KeyRange| {
            map.partitions_overlapping(*r)
                .all(|i| map.partitions[i].primary == me)
        };
        let mut orphans = Vec::new();
        for t in self.tables.values_mut() {
            t.pending.retain(|_, agg| {
                if !agg.acks.is_empty() && !agg.ranges.iter().all(primary_of_all) {
                    // Held acks of a sum this server no longer applies as
                    // primary: the workers resend, as retries, to the
                    // range's primary, which has their pushes from its copy.
                    orphans.append(&mut agg.acks);
                }
                let before = agg.ranges.clone();
                agg.ranges = agg
                    .ranges
                    .iter()
                    .flat_map(|r| held.iter().filter_map(|h| h.intersect(r)))
                    .collect();
                agg.ranges.sort_unstable_by_key(|r| (r.begin, r.end));
                agg.ranges.dedup();
                if agg.ranges != before {
                    orphans.append(&mut agg.acks);
                }
                for gap in gaps(&held) {
                    agg.drop_keys_in(gap);
                }
                !agg.ranges.is_empty()
            });
        }
        for (to, _, stale) in orphans {
            self.deferred.push(Deferred {
                after: Vec::new(),
                to,
                frame: stale.clone(),
                stale,
            });
        }
    }

    /// Hand-off fences, both ways, after installing a map (`old` is the one
    /// before). Ranges this server was primary of and no longer is: a
    /// `Fence` goes down their old chain, behind this server's last changes
    /// there (the new primary is on that chain). Ranges this server is newly
    /// primary of, taken from a primary still alive: held back until that
    /// server's fence arrives, so two primaries never serve a range at once.
    fn fence(&mut self, old: &ClusterMap) {
        let me = self.id;
        let map = self.map.clone();
        let alive = |id: NodeId| map.node(id).is_some_and(|n| n.state == NodeState::Alive);
        let mut sends = Vec::new();
        for p in old.partitions.iter().filter(|p| p.primary == me) {
            let Some((&next, rest)) = p.replicas.split_first() else {
                continue;
            };
            for i in self.map.partitions_overlapping(p.range) {
                let q = &self.map.partitions[i];
                if q.primary == me {
                    continue;
                }
                let Some(piece) = q.range.intersect(&p.range) else {
                    continue;
                };
                let mut f = control_request(
                    me,
                    self.map.epoch,
                    &Control::Fence {
                        from: me,
                        chain: rest.to_vec(),
                    },
                );
                f.header.range = piece;
                sends.push((next, f));
            }
        }
        for (to, f) in sends {
            drop(self.forward(to, f));
        }
        // Waits: drop those for ranges no longer ours, add new ones.
        self.fence_waits.retain(|(r, from, _)| {
            alive(*from)
                && map
                    .partitions_overlapping(*r)
                    .all(|i| map.partitions[i].primary == me)
        });
        let mut waits = Vec::new();
        for q in map.partitions.iter().filter(|q| q.primary == me) {
            for i in old.partitions_overlapping(q.range) {
                let p = &old.partitions[i];
                if p.primary == me || !alive(p.primary) {
                    continue;
                }
                if let Some(piece) = q.range.intersect(&p.range) {
                    waits.push((piece, p.primary));
                }
            }
        }
        for w in waits {
            self.add_fence_wait(w);
        }
    }

    /// Holds `range` back until `from` fences it, unless it already has.
    fn add_fence_wait(&mut self, (range, from): (KeyRange, NodeId)) {
        let mut left = vec![range];
        for (seen, by) in &self.fences_seen {
            if *by == from {
                left = left.iter().flat_map(|r| subtract(*r, *seen)).collect();
            }
        }
        let now = tokio::time::Instant::now();
        self.fence_waits
            .extend(left.into_iter().map(|r| (r, from, now)));
    }

    /// The rest of a chain a change must be forwarded along, as this server
    /// can reach it. A server this map does not know, named by a sender
    /// with a newer map, means this server is behind: the change is refused
    /// for now (`EpochAhead`, nothing applied) and its forwarder resends it
    /// once the map has arrived. Servers this map knows to be dead are
    /// skipped: the primary fills whoever replaces them.
    fn reachable_chain(&self, h: &Header, chain: Vec<NodeId>) -> Result<Vec<NodeId>, Refusal> {
        let mut out = Vec::with_capacity(chain.len());
        for n in chain {
            match self.map.node(n) {
                Some(info) if info.state == NodeState::Dead => {}
                Some(_) => out.push(n),
                None if h.epoch > self.map.epoch => {
                    return Err((
                        ErrorCode::EpochAhead,
                        format!(
                            "server {n} is not in this server's map (epoch {} < {})",
                            self.map.epoch, h.epoch
                        ),
                    ));
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// A `Fence` arrived: forward it down its chain, release what it covers.
    fn fenced(&mut self, frame: Frame, out: &Outbox) -> Result<Option<Frame>, Refusal> {
        let Ok(Control::Fence { from, chain }) = frame.control_msg() else {
            return Err((ErrorCode::Malformed, "not a Fence frame".into()));
        };
        let h = frame.header;
        let chain = self.reachable_chain(&h, chain)?;
        let r = h.range;
        let before = self.fence_waits.len();
        self.fence_waits = std::mem::take(&mut self.fence_waits)
            .into_iter()
            .flat_map(|(w, by, since)| {
                let left = if by == from { subtract(w, r) } else { vec![w] };
                left.into_iter().map(move |l| (l, by, since))
            })
            .collect();
        if self.fence_waits.len() == before {
            // Not awaited yet: the map that needs it has not arrived.
            self.fences_seen.push((r, from));
            let excess = self.fences_seen.len().saturating_sub(1024);
            self.fences_seen.drain(..excess);
        }
        let ok = control_reply(&h, self.id, self.map.epoch, &Control::Ok);
        let Some((&next, rest)) = chain.split_first() else {
            return Ok(Some(ok));
        };
        let mut f = control_request(
            self.id,
            self.map.epoch,
            &Control::Fence {
                from,
                chain: rest.to_vec(),
            },
        );
        f.header.range = r;
        Ok(self.pass_on(next, f, &h, out, ok))
    }

    /// Forwards `frame` to `next` (the rest of a chain) and holds `ok`, the
    /// answer to the request `h` that arrived on `out`, until the chain has
    /// it; answers at once when `next` is not a live server.
    fn pass_on(
        &mut self,
        next: NodeId,
        frame: Frame,
        h: &Header,
        out: &Outbox,
        ok: Frame,
    ) -> Option<Frame> {
        match self.forward(next, frame) {
            Some(rx) => {
                let stale = self.stale_reply(h);
                self.deferred.push(Deferred {
                    after: vec![rx],
                    to: out.clone(),
                    frame: ok,
                    stale,
                });
                None
            }
            None => Some(ok),
        }
    }

    /// Writes every range this server is primary of, for every table, into
    /// checkpoint directory `dir`, and answers with the files written.
    /// Blocking file I/O under the state lock: pushes wait meanwhile, which
    /// is also what keeps each range file consistent.
    fn snapshot(&mut self, h: &Header, dir: &str) -> Result<Frame, Refusal> {
        let me = self.id;
        let dir = std::path::Path::new(dir);
        let mut files = Vec::new();
        let ranges: Vec<KeyRange> = self.map.primary_ranges(me);
        for t in self.tables.values() {
            let Ok(store) = &t.store else { continue };
            for r in &ranges {
                let entries = store.entries_in(*r);
                let part = crate::snapshot::RangePart {
                    table: store.spec().id,
                    range: *r,
                    slot_width: store.slot_width(),
                    keys: entries.iter().map(|(k, _)| *k).collect(),
                    slots: entries
                        .iter()
                        .flat_map(|(_, s)| s.iter().copied())
                        .collect(),
                    records: t.clock.records_in(*r),
                };
                let f = crate::snapshot::write_part(dir, &part)
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                files.push(f);
            }
        }
        Ok(control_reply(
            h,
            me,
            self.map.epoch,
            &Control::Snapshotted { files },
        ))
    }

    /// The state of the table `spec` names, created (empty) if new here.
    fn ensure_table(&mut self, spec: &TableSpec) -> &mut TableState {
        let registry = &self.registry;
        let threads = self.apply_threads;
        self.tables.entry(spec.id).or_insert_with(|| TableState {
            store: registry
                .build(&spec.updater)
                .map(|u| Store::new(spec.clone(), u).with_threads(threads))
                .map_err(|e| e.to_string()),
            clock: RangeClock::new(KeyRange::ALL),
            pending: BTreeMap::new(),
        })
    }

    fn handle(&mut self, frame: Frame, out: &Outbox) -> Outgoing {
        let h = frame.header;
        let reply = match h.kind {
            Kind::Push | Kind::Pull | Kind::PushPull => self.data(frame, out),
            Kind::Control => match frame.control_msg() {
                Ok(Control::GetMap) => Ok(Some(control_reply(
                    &h,
                    self.id,
                    self.map.epoch,
                    &Control::Map((*self.map).clone()),
                ))),
                Ok(Control::Replicate { .. }) => self.replicate(frame, out),
                Ok(Control::Fence { .. }) => self.fenced(frame, out),
                Ok(Control::Snapshot { dir }) => self.snapshot(&h, &dir).map(Some),
                // A forwarder's marker: everything before it has arrived.
                Ok(Control::Synced { .. }) => Ok(Some(control_reply(
                    &h,
                    self.id,
                    self.map.epoch,
                    &Control::Ok,
                ))),
                Ok(other) => Err((
                    ErrorCode::Invalid,
                    format!("a server does not take {other:?}"),
                )),
                Err(e) => Err((ErrorCode::Malformed, e.to_string())),
            },
            other => Err((
                ErrorCode::Invalid,
                format!("a server does not take {other:?} frames"),
            )),
        };
        let mut outgoing = match reply {
            Ok(Some(f)) => vec![(out.clone(), f)],
            Ok(None) => Vec::new(),
            Err((code, msg)) => vec![(
                out.clone(),
                error_reply(&h, self.id, self.map.epoch, code, msg),
            )],
        };
        self.release_applied();
        if matches!(h.kind, Kind::Push | Kind::PushPull) && !self.waiting.is_empty() {
            outgoing.extend(self.recheck(Some(h.table)));
        }
        outgoing
    }

    /// Checks epoch, table, ownership and keys of a data request.
    fn admit(&self, h: &Header, keys: &[u64]) -> Result<(), Refusal> {
        if h.epoch < self.map.epoch {
            return Err((ErrorCode::NotOwner, "stale epoch".into()));
        }
        if h.epoch > self.map.epoch {
            return Err((
                ErrorCode::EpochAhead,
                format!(
                    "request epoch {} is ahead of this server's {}",
                    h.epoch, self.map.epoch
                ),
            ));
        }
        if !self.tables.contains_key(&h.table) {
            return Err((
                ErrorCode::UnknownTable,
                format!("no table with id {}", h.table),
            ));
        }
        let owned = self
            .map
            .partition_of(h.range.begin)
            .map(|i| &self.map.partitions[i])
            .is_some_and(|p| p.primary == self.id && p.range.covers(&h.range));
        if h.range.is_empty() || !owned {
            return Err((
                ErrorCode::NotOwner,
                format!("server {} is not primary for all of {}", self.id, h.range),
            ));
        }
        if let Some((r, from, _)) = self.fence_waits.iter().find(|(r, _, since)| {
            r.intersect(&h.range).is_some() && since.elapsed() < FENCE_TIMEOUT
        }) {
            return Err((
                ErrorCode::EpochAhead,
                format!("{r} is still being handed over from server {from}; retry"),
            ));
        }
        if h.dense() {
            if h.range.len() > self.limits.max_keys as u64 {
                return Err((
                    ErrorCode::Limit,
                    format!(
                        "dense range {} has more than {} keys",
                        h.range, self.limits.max_keys
                    ),
                ));
            }
        } else {
            if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
                return Err((
                    ErrorCode::BadKeys,
                    format!("keys are not sorted and unique at position {}", i + 1),
                ));
            }
            if let (Some(&first), Some(&last)) = (keys.first(), keys.last()) {
                if !h.range.contains(first) || !h.range.contains(last) {
                    return Err((
                        ErrorCode::BadKeys,
                        format!("keys fall outside the request range {}", h.range),
                    ));
                }
            }
        }
        Ok(())
    }

    fn data(&mut self, frame: Frame, out: &Outbox) -> Result<Option<Frame>, Refusal> {
        let h = frame.header;
        if h.epoch < self.map.epoch {
            let mut r = Frame::control(
                reply_header(&h, Kind::Redirect, self.id, self.map.epoch),
                &Control::Map((*self.map).clone()),
            );
            r.header.flags = 0;
            return Ok(Some(r));
        }
        // Pulls that cannot be answered yet wait in memory: bound them per
        // connection, refusing before anything (a push-pull's push) applies.
        if matches!(h.kind, Kind::Pull | Kind::PushPull) {
            let waiting = self.waiting.iter().filter(|w| w.out.same(out)).count();
            if waiting >= self.limits.max_waiting {
                return Err((
                    ErrorCode::Limit,
                    format!(
                        "{waiting} pulls already wait on this connection (the limit); \
                         wait for their answers before sending more"
                    ),
                ));
            }
        }
        // From here on the frame carries its key list, whichever way it came,
        // and every check below applies to that list.
        let mut frame = self.resolve_keys(frame)?;
        self.admit(&frame.header, &frame.keys)?;
        // Only after admission: a refused request changes nothing, and only
        // lists this server would accept are worth naming later. The cache
        // hashes the list itself; the sender never says how. The flag stays
        // on the frame only if the list was kept, and is echoed on the
        // reply so the sender refers to lists this server really holds.
        let fh = frame.header;
        let kept = fh.flags & FLAG_CACHE_KEYS != 0
            && fh.flags & FLAG_SCAN == 0
            && self
                .key_cache
                .insert(fh.sender, fh.table, &frame.keys)
                .is_some();
        if !kept {
            frame.header.flags &= !FLAG_CACHE_KEYS;
        }
        let h = frame.header;
        if h.flags & FLAG_SCAN != 0 {
            return self.scan(&h).map(Some);
        }
        let mut ack = None;
        let mut after = Vec::new();
        // Replication after aggregation: a worker's push into an aggregating
        // table with replicas is acknowledged once its clock's sum is
        // applied and replicated, which is one message per clock.
        let aggregated = self.aggregates(&h);
        let hold = aggregated
            && h.kind == Kind::Push
            && self.after_aggregation
            && self.has_replicas(h.range);
        if matches!(h.kind, Kind::Push | Kind::PushPull) {
            ack = Some(self.push(&frame)?);
            if !hold {
                after.extend(self.replicate_push(&frame, aggregated));
            }
        }
        if h.kind == Kind::Push {
            let (applied, duplicate) = ack.unwrap_or((0, 0));
            let mut reply = control_reply(
                &h,
                self.id,
                self.map.epoch,
                &Control::PushAck { applied, duplicate },
            );
            reply.header.flags = h.flags & FLAG_CACHE_KEYS;
            if hold {
                let stale = self.stale_reply(&h);
                return Ok(self.hold_ack(&h, out, reply, stale));
            }
            if after.is_empty() {
                return Ok(Some(reply));
            }
            self.deferred.push(Deferred {
                after,
                to: out.clone(),
                frame: reply,
                stale: self.stale_reply(&h),
            });
            return Ok(None);
        }
        let consistency = match h.kind {
            Kind::Pull if !frame.ctrl.is_empty() => match frame.control_msg() {
                Ok(Control::Consistency(c)) => Some(c),
                Ok(other) => {
                    return Err((
                        ErrorCode::Invalid,
                        format!("a pull carries Consistency, not {other:?}"),
                    ));
                }
                Err(e) => return Err((ErrorCode::Malformed, e.to_string())),
            },
            _ => None,
        };
        let consistency = consistency.unwrap_or_else(|| {
            self.map
                .table_by_id(h.table)
                .map(|t| t.consistency)
                .unwrap_or(Consistency::Eventual)
        });
        frame.vals = Vec::new();
        if let Some((applied, duplicate)) = ack {
            frame.ctrl = Control::PushAck { applied, duplicate }.to_bytes().into();
        } else {
            frame.ctrl = bytes::Bytes::new();
        }
        if self.ready(&frame.header, consistency) {
            let reply = self.answer_pull(&frame);
            if after.is_empty() {
                return Ok(Some(reply));
            }
            self.deferred.push(Deferred {
                after,
                to: out.clone(),
                frame: reply,
                stale: self.stale_reply(&h),
            });
            Ok(None)
        } else {
            self.waiting.push(Waiting {
                frame,
                out: out.clone(),
                consistency,
                after,
            });
            Ok(None)
        }
    }

    /// The answer to a request whose change the chain refused as coming
    /// from a server that is no longer the range's primary.
    fn stale_reply(&self, h: &Header) -> Frame {
        error_reply(
            h,
            self.id,
            self.map.epoch,
            ErrorCode::NotOwner,
            format!(
                "server {} is no longer the primary of {}; retry at the current one",
                self.id, h.range
            ),
        )
    }

    /// Which ranges decide when a sum is complete here: with replication
    /// after aggregation, only those this server is primary of (`Some`):
    /// the rest are copies a primary's `Flushed` will settle, and waiting
    /// on them could wait on a primary that waits on this server. Without
    /// it (`None`), every range: replicas sum forwarded pushes themselves.
    fn gate(&self) -> Option<Vec<KeyRange>> {
        self.after_aggregation
            .then(|| self.map.primary_ranges(self.id))
    }

    /// True when the partition holding `range` has replicas in this map.
    fn has_replicas(&self, range: KeyRange) -> bool {
        self.map
            .partition_of(range.begin)
            .is_some_and(|i| !self.map.partitions[i].replicas.is_empty())
    }

    /// Keeps a push's acknowledgement with its clock's sum, to go out once
    /// the sum is applied and replicated; returns it to send now when the
    /// clock has nothing pending (a retry of a push applied long ago).
    fn hold_ack(&mut self, h: &Header, out: &Outbox, reply: Frame, stale: Frame) -> Option<Frame> {
        let held = (out.clone(), reply, stale);
        if let Some(agg) = self
            .tables
            .get_mut(&h.table)
            .and_then(|t| t.pending.get_mut(&h.clock))
        {
            agg.acks.push(held);
            return None;
        }
        if let Some(a) = self
            .applied
            .iter_mut()
            .find(|a| a.table == h.table && a.clock == h.clock)
        {
            a.acks.push(held);
            return None;
        }
        Some(held.1)
    }

    /// Replicates the sums just applied where this server is the primary
    /// and the range has replicas (with the range's clock records, so a
    /// promoted replica knows every clock is complete), and releases their
    /// held acknowledgements once the chains have the result.
    fn release_applied(&mut self) {
        let me = self.id;
        for a in std::mem::take(&mut self.applied) {
            let mut after = Vec::new();
            if self.after_aggregation {
                let Some(table) = self.tables.get(&a.table) else {
                    continue;
                };
                let Ok(store) = &table.store else {
                    continue;
                };
                let spec = store.spec().clone();
                let mut frames = Vec::new();
                for p in self.map.partitions.iter().filter(|p| {
                    p.primary == me
                        && !p.replicas.is_empty()
                        && a.ranges.iter().any(|r| r.intersect(&p.range).is_some())
                }) {
                    let mut f = Frame::new(Header {
                        table: a.table,
                        sender: me,
                        epoch: self.map.epoch,
                        clock: a.clock,
                        range: p.range,
                        ..Header::new(Kind::Control)
                    });
                    f.keys = a
                        .keys
                        .iter()
                        .copied()
                        .filter(|k| p.range.contains(*k))
                        .collect();
                    f.vals = store.slots_of(&f.keys);
                    // Capped at this clock: a later push already recorded
                    // here is in a later sum, which the replica must not
                    // count as applied yet.
                    let records = table
                        .clock
                        .records_in(p.range)
                        .into_iter()
                        .map(|(n, r, c)| (n, r, c.min(a.clock)))
                        .collect();
                    f.ctrl = Control::Replicate {
                        spec: spec.clone(),
                        what: Replica::Flushed { clock: a.clock },
                        records,
                        chain: p.replicas[1..].to_vec(),
                    }
                    .to_bytes()
                    .into();
                    frames.push((p.replicas[0], f));
                }
                for (to, f) in frames {
                    after.extend(self.forward(to, f));
                }
            }
            let waits = fan_out(after, a.acks.len());
            for ((to, frame, stale), rx) in a.acks.into_iter().zip(waits) {
                self.deferred.push(Deferred {
                    after: vec![rx],
                    to,
                    frame,
                    stale,
                });
            }
        }
    }

    /// True when a push with header `h` goes into an aggregate rather than
    /// straight through the updater.
    fn aggregates(&self, h: &Header) -> bool {
        let aggregate = self.map.table_by_id(h.table).is_some_and(|t| t.aggregate);
        aggregate && self.map.live_workers().contains(&h.sender)
    }

    /// Sends an applied push down the chain of its partition: the keys'
    /// resulting slots, or (for an aggregating table) the push itself, which
    /// replicas sum as the primary does. Returns what the acknowledgement
    /// must wait for (nothing without replicas). A push found to be a
    /// duplicate is sent too, as an empty change: it queues behind the
    /// original's replication, so its ack cannot overtake it.
    fn replicate_push(
        &mut self,
        frame: &Frame,
        aggregated: bool,
    ) -> Option<oneshot::Receiver<Delivery>> {
        let h = frame.header;
        let chain = self
            .map
            .partition_of(h.range.begin)
            .map(|i| self.map.partitions[i].replicas.clone())
            .unwrap_or_default();
        let (&next, rest) = chain.split_first()?;
        let table = self.tables.get(&h.table)?;
        let store = table.store.as_ref().ok()?;
        let spec = store.spec().clone();
        let mut f = Frame::new(Header {
            kind: Kind::Control,
            flags: h.flags & FLAG_DENSE,
            sender: self.id,
            ..h
        });
        let what = if aggregated {
            f.keys = frame.keys.clone();
            f.vals = frame.vals.clone();
            Replica::Push { worker: h.sender }
        } else {
            f.header.flags = 0;
            f.keys = if h.dense() {
                (h.range.begin..h.range.end).collect()
            } else {
                frame.keys.clone()
            };
            f.vals = store.slots_of(&f.keys);
            Replica::Slots
        };
        let records = if aggregated {
            Vec::new()
        } else {
            vec![(h.sender, h.range, h.clock)]
        };
        f.ctrl = Control::Replicate {
            spec,
            what,
            records,
            chain: rest.to_vec(),
        }
        .to_bytes()
        .into();
        self.forward(next, f)
    }

    /// Queues `frame` for server `to`; `None` when `to` is not a live
    /// server of the map.
    fn forward(&mut self, to: NodeId, frame: Frame) -> Option<oneshot::Receiver<Delivery>> {
        if self.forwarders.get(&to).is_some_and(Forwarder::is_closed) {
            self.forwarders.remove(&to);
        }
        if !self.forwarders.contains_key(&to) {
            let node = self.map.node(to).filter(|n| n.state != NodeState::Dead)?;
            let fwd = Forwarder::start(
                self.id,
                to,
                node.addr.clone(),
                self.limits,
                self.net.clone(),
            );
            self.forwarders.insert(to, fwd);
        }
        self.replicated.fetch_add(
            frame.encoded_len() as u64 + 4,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.forwarders.get(&to).map(|f| f.send(frame))
    }

    /// Takes a change from the previous server of a chain: stores it,
    /// forwards it along the rest of the chain, and answers once that is done.
    fn replicate(&mut self, frame: Frame, out: &Outbox) -> Result<Option<Frame>, Refusal> {
        let Ok(Control::Replicate {
            spec,
            what,
            records,
            chain,
        }) = frame.control_msg()
        else {
            return Err((ErrorCode::Malformed, "not a Replicate frame".into()));
        };
        let h = frame.header;
        if spec.id != h.table {
            return Err((
                ErrorCode::Invalid,
                format!(
                    "replicated table {} is not the frame's {}",
                    spec.id, h.table
                ),
            ));
        }
        // A server declared dead may still run (frozen, then resumed): its
        // changes are refused, so it cannot acknowledge them, and its
        // workers retry at the range's current primary.
        if self
            .map
            .node(h.sender)
            .is_some_and(|n| n.state == NodeState::Dead)
        {
            return Err((
                ErrorCode::NotOwner,
                format!("server {} was declared dead", h.sender),
            ));
        }
        // A change for a range this server no longer holds, from a sender
        // whose map is not newer: the sender is behind (the range has moved
        // on); refusing makes it send its client to the current primary.
        // From a newer map, this server is the one behind, and takes it.
        let me = self.id;
        let holds = self.map.partitions_overlapping(h.range).any(|i| {
            let p = &self.map.partitions[i];
            p.primary == me || p.replicas.contains(&me)
        });
        if h.epoch <= self.map.epoch && !holds {
            return Err((
                ErrorCode::NotOwner,
                format!(
                    "server {me} does not hold {} at epoch {}",
                    h.range, self.map.epoch
                ),
            ));
        }
        let chain = self.reachable_chain(&h, chain)?;
        let onward = records.clone();
        let table = self.ensure_table(&spec);
        let store = table
            .store
            .as_mut()
            .map_err(|e| (ErrorCode::Invalid, e.clone()))?;
        match what {
            Replica::Slots | Replica::Copy { .. } | Replica::Flushed { .. } => {
                if let Replica::Flushed { clock } = what {
                    // The applied sum includes whatever part of it came here
                    // raw: drop that part, over this frame's range.
                    if let Some(agg) = table.pending.get_mut(&clock) {
                        agg.drop_keys_in(h.range);
                        agg.ranges = agg
                            .ranges
                            .iter()
                            .flat_map(|r| subtract(*r, h.range))
                            .collect();
                        if agg.ranges.is_empty() && agg.keys.is_empty() {
                            table.pending.remove(&clock);
                        }
                    }
                }
                if let Replica::Copy { reset: true } = what {
                    for agg in table.pending.values_mut() {
                        agg.drop_keys_in(h.range);
                    }
                }
                let width = store.slot_width();
                if Some(frame.vals.len()) != frame.keys.len().checked_mul(width) {
                    return Err((
                        ErrorCode::WrongWidth,
                        format!(
                            "{} slot values for {} keys of width {width}",
                            frame.vals.len(),
                            frame.keys.len()
                        ),
                    ));
                }
                if let Some(i) = frame.vals.iter().position(|v| !v.is_finite()) {
                    return Err((
                        ErrorCode::NotFinite,
                        format!("slot value {i} is not finite"),
                    ));
                }
                for (k, slot) in frame.keys.iter().zip(frame.vals.chunks_exact(width.max(1))) {
                    store.restore(*k, slot).map_err(store_refusal)?;
                }
                for (node, r, clock) in records {
                    table.clock.record(node, r, clock);
                }
            }
            Replica::Pending { clock } => {
                let width = store.push_width();
                if Some(frame.vals.len()) != frame.keys.len().checked_mul(width) {
                    return Err((
                        ErrorCode::WrongWidth,
                        format!(
                            "{} pending values for {} keys of width {width}",
                            frame.vals.len(),
                            frame.keys.len()
                        ),
                    ));
                }
                let agg = table
                    .pending
                    .entry(clock)
                    .or_insert_with(|| Aggregate::new(h.range, width));
                if !agg.ranges.contains(&h.range) {
                    agg.ranges.push(h.range);
                }
                // Set, not added: a chain member that already holds the
                // range has the same sums from the forwarded pushes, and a
                // copy must leave it as it was.
                for (k, v) in frame.keys.iter().zip(frame.vals.chunks_exact(width.max(1))) {
                    agg.set(*k, v);
                }
                for (node, r, c) in records {
                    table.clock.record(node, r, c);
                }
            }
            Replica::Push { worker } => {
                let mut push = Frame {
                    header: Header {
                        kind: Kind::Push,
                        sender: worker,
                        ..h
                    },
                    keys: frame.keys.clone(),
                    vals: frame.vals.clone(),
                    ctrl: bytes::Bytes::new(),
                    packed: None,
                };
                push.header.flags = h.flags & FLAG_DENSE;
                match self.push(&push) {
                    // Sent twice by a forwarder's resend: already summed.
                    Ok(_) | Err((ErrorCode::Duplicate, _)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Replayed clock records may complete sums waiting here: apply them
        // now, as a push completing them would, before anyone reads.
        let workers = self.map.live_workers();
        let gate = self.gate();
        if let Some(t) = self.tables.get_mut(&h.table) {
            let done = flush(t, &workers, gate.as_deref());
            self.applied.extend(done);
        }
        let ok = control_reply(&h, self.id, self.map.epoch, &Control::Ok);
        let Some((&next, rest)) = chain.split_first() else {
            return Ok(Some(ok));
        };
        let mut f = frame;
        f.header.sender = self.id;
        f.ctrl = Control::Replicate {
            spec,
            what,
            records: onward,
            chain: rest.to_vec(),
        }
        .to_bytes()
        .into();
        Ok(self.pass_on(next, f, &h, out, ok))
    }

    /// Replaces the `[hash, count]` of a key-reference frame by the list it
    /// names; other frames pass through. A miss is refused with
    /// `KeyCacheMiss` before anything else happens, so the sender can resend
    /// the keys and nothing is applied twice.
    fn resolve_keys(&mut self, mut frame: Frame) -> Result<Frame, Refusal> {
        if !frame.header.key_ref() {
            return Ok(frame);
        }
        let h = frame.header;
        // The decoder has checked the shape; refuse rather than trust it.
        let (hash, count) = frame.key_ref().ok_or_else(|| {
            (
                ErrorCode::Malformed,
                "a key reference carries exactly [hash, count]".to_string(),
            )
        })?;
        let keys = self
            .key_cache
            .get(h.sender, h.table, hash, count)
            .ok_or_else(|| {
                (
                    ErrorCode::KeyCacheMiss,
                    format!(
                        "no cached list {hash:#018x} of {count} keys from node {} in table {}",
                        h.sender, h.table
                    ),
                )
            })?;
        frame.keys = keys.to_vec();
        frame.header.flags &= !FLAG_KEYREF;
        Ok(frame)
    }

    /// Applies a push (already admitted). Returns (applied, duplicate) key counts.
    fn push(&mut self, frame: &Frame) -> Result<(u64, u64), Refusal> {
        let h = &frame.header;
        if h.clock == 0 {
            return Err((
                ErrorCode::Invalid,
                "a push needs a clock of 1 or more".into(),
            ));
        }
        let gate = self.gate();
        let workers = self.map.live_workers();
        let table = self.tables.get_mut(&h.table).ok_or((
            ErrorCode::UnknownTable,
            format!("no table with id {}", h.table),
        ))?;
        let store = table
            .store
            .as_mut()
            .map_err(|e| (ErrorCode::Invalid, e.clone()))?;
        // Recorded only once the store accepts: a refused push must not
        // advance the clock.
        let fresh = table.clock.fresh(h.sender, h.range, h.clock);
        let total = if h.dense() {
            h.range.len()
        } else {
            frame.keys.len() as u64
        };
        if fresh.is_empty() {
            if h.flags & FLAG_RETRY != 0 {
                return Ok((0, total));
            }
            return Err((
                ErrorCode::Duplicate,
                format!(
                    "node {} already pushed clock {} to {}",
                    h.sender, h.clock, h.range
                ),
            ));
        }
        let whole = fresh.len() == 1 && fresh[0] == h.range;
        let in_fresh = |k: u64| whole || fresh.iter().any(|r| r.contains(k));
        let aggregate = store.spec().aggregate && workers.contains(&h.sender);
        let applied = if aggregate {
            // Validate now (nothing applied), sum into the clock's aggregate,
            // apply once every live worker has pushed this clock.
            if h.dense() {
                store.push_dense(h.range, &frame.vals, |_| false)
            } else {
                store.push(&frame.keys, &frame.vals, |_| false)
            }
            .map_err(store_refusal)?;
            let width = store.push_width();
            let agg = table
                .pending
                .entry(h.clock)
                .or_insert_with(|| Aggregate::new(h.range, width));
            if !agg.ranges.contains(&h.range) {
                agg.ranges.push(h.range);
            }
            let mut n = 0;
            let mut add = |i: usize, k: u64| {
                if in_fresh(k) {
                    agg.add(k, &frame.vals[i * width..(i + 1) * width]);
                    n += 1;
                }
            };
            if h.dense() {
                (h.range.begin..h.range.end)
                    .enumerate()
                    .for_each(|(i, k)| add(i, k));
            } else {
                frame.keys.iter().enumerate().for_each(|(i, &k)| add(i, k));
            }
            n
        } else if h.dense() {
            store
                .push_dense(h.range, &frame.vals, in_fresh)
                .map_err(store_refusal)?
        } else {
            store
                .push(&frame.keys, &frame.vals, in_fresh)
                .map_err(store_refusal)?
        };
        table.clock.record(h.sender, h.range, h.clock);
        if aggregate {
            let done = flush(table, &workers, gate.as_deref());
            self.applied.extend(done);
        }
        Ok((applied as u64, total - applied as u64))
    }

    /// Answers a scan: every stored key of the range with its weights.
    fn scan(&self, h: &Header) -> Result<Frame, Refusal> {
        let store = match self.tables.get(&h.table).map(|t| &t.store) {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err((ErrorCode::Invalid, e.clone())),
            None => {
                return Err((
                    ErrorCode::UnknownTable,
                    format!("no table with id {}", h.table),
                ));
            }
        };
        let entries = store.entries_in(h.range);
        if entries.len() > self.limits.max_keys {
            return Err((
                ErrorCode::Limit,
                format!(
                    "{} holds {} keys, over the {} a reply may carry; scan smaller ranges",
                    h.range,
                    entries.len(),
                    self.limits.max_keys
                ),
            ));
        }
        let dim = store.spec().dim as usize;
        let mut reply = Frame::new(reply_header(h, Kind::Reply, self.id, self.map.epoch));
        reply.keys.reserve(entries.len());
        reply.vals.reserve(entries.len() * dim);
        for (k, slot) in entries {
            reply.keys.push(k);
            reply.vals.extend_from_slice(&slot[..dim]);
        }
        reply.header.flags = h.flags & FLAG_PACK_REPLY;
        Ok(reply)
    }

    /// True when a pull at the header's clock may be answered now.
    fn ready(&self, h: &Header, consistency: Consistency) -> bool {
        let Some(need) = consistency.required_clock(h.clock) else {
            return true;
        };
        let Some(table) = self.tables.get(&h.table) else {
            return true;
        };
        let workers = self.map.live_workers();
        // Every live worker has pushed far enough, and the sums of those
        // clocks over this range are applied: a clock's sum covers every
        // range pushed at it on this server and is applied as a whole, so a
        // range can be complete before its sum is.
        table.clock.min_clock(h.range, &workers) >= need
            && !table
                .pending
                .range(..=need)
                .any(|(_, agg)| agg.ranges.iter().any(|r| r.intersect(&h.range).is_some()))
    }

    fn answer_pull(&self, frame: &Frame) -> Frame {
        let h = &frame.header;
        let mut reply = Frame::new(reply_header(h, Kind::Reply, self.id, self.map.epoch));
        // Set only when this server kept the pull's key list (see `data`);
        // `FLAG_PACK_REPLY` is taken off by `send_all`, which packs.
        reply.header.flags = h.flags & (FLAG_CACHE_KEYS | FLAG_PACK_REPLY);
        reply.ctrl = frame.ctrl.clone();
        match self.tables.get(&h.table).map(|t| &t.store) {
            Some(Ok(store)) => {
                let dim = store.spec().dim as usize;
                if h.dense() {
                    reply.vals.reserve(h.range.len() as usize * dim);
                    store.pull_dense(h.range, &mut reply.vals);
                } else {
                    reply.vals.reserve(frame.keys.len() * dim);
                    store.pull(&frame.keys, &mut reply.vals);
                }
                reply
            }
            Some(Err(e)) => error_reply(h, self.id, self.map.epoch, ErrorCode::Invalid, e.clone()),
            None => error_reply(
                h,
                self.id,
                self.map.epoch,
                ErrorCode::UnknownTable,
                format!("no table with id {}", h.table),
            ),
        }
    }

    /// Answers the waiting pulls (of `table`, or all) that may now be
    /// answered; redirects those whose range this server no longer owns.
    fn recheck(&mut self, table: Option<u32>) -> Outgoing {
        let mut out = Vec::new();
        let waiting = std::mem::take(&mut self.waiting);
        for w in waiting {
            let h = w.frame.header;
            if table.is_some_and(|t| t != h.table) {
                self.waiting.push(w);
                continue;
            }
            if h.epoch < self.map.epoch
                && self
                    .admit(
                        &Header {
                            epoch: self.map.epoch,
                            ..h
                        },
                        &w.frame.keys,
                    )
                    .is_err()
            {
                let r = Frame::control(
                    reply_header(&h, Kind::Redirect, self.id, self.map.epoch),
                    &Control::Map((*self.map).clone()),
                );
                out.push((w.out, r));
            } else if self.ready(&h, w.consistency) {
                let reply = self.answer_pull(&w.frame);
                if w.after.is_empty() {
                    out.push((w.out.clone(), reply));
                } else {
                    let stale = self.stale_reply(&h);
                    self.deferred.push(Deferred {
                        after: w.after,
                        to: w.out,
                        frame: reply,
                        stale,
                    });
                }
            } else {
                self.waiting.push(w);
            }
        }
        out
    }
}

/// Applies, in clock order, the aggregates that every live worker has now
/// pushed over their whole range.
fn flush(table: &mut TableState, workers: &[NodeId], gate: Option<&[KeyRange]>) -> Vec<Applied> {
    let mut applied = Vec::new();
    let (clock, bufs, Ok(store)) = (&table.clock, &mut table.pending, table.store.as_mut()) else {
        return applied;
    };
    let clocks: Vec<u64> = bufs.keys().copied().collect();
    for at in clocks {
        let Some(agg) = bufs.get(&at) else { continue };
        // The parts that decide: all ranges, or those this server is
        // primary of. A sum with no deciding part waits for its primary.
        let deciding: Vec<KeyRange> = match gate {
            None => agg.ranges.clone(),
            Some(mine) => agg
                .ranges
                .iter()
                .flat_map(|r| mine.iter().filter_map(|m| m.intersect(r)))
                .collect(),
        };
        if deciding.is_empty() {
            continue;
        }
        if deciding.iter().any(|r| clock.min_clock(*r, workers) < at) {
            // Sums are applied in clock order.
            break;
        }
        let Some(agg) = bufs.remove(&at) else {
            continue;
        };
        let (keys, sums) = agg.sorted();
        // Every part was validated when it arrived; sums of finite values
        // can still overflow to infinity, which the store refuses whole.
        if let Err(e) = store.push(&keys, &sums, |_| true) {
            tracing::error!(error = %e, "aggregated push refused");
        }
        applied.push(Applied {
            table: store.spec().id,
            clock: at,
            keys,
            ranges: agg.ranges,
            acks: agg.acks,
        });
    }
    applied
}

/// A receiver per waiter for one set of replication receivers: each gets
/// `Stale` if any was refused as stale, and fails if any failed.
fn fan_out(after: Vec<oneshot::Receiver<Delivery>>, n: usize) -> Vec<oneshot::Receiver<Delivery>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| oneshot::channel()).unzip();
    tokio::spawn(async move {
        let mut result = Delivery::Stored;
        for r in after {
            match r.await {
                Ok(Delivery::Stored) => {}
                Ok(Delivery::Stale) => result = Delivery::Stale,
                // Dropping the senders fails every waiter.
                Err(_) => return,
            }
        }
        for tx in txs {
            let _ = tx.send(result);
        }
    });
    rxs
}

/// The parts of `r` outside `cut` (zero, one or two ranges).
fn subtract(r: KeyRange, cut: KeyRange) -> Vec<KeyRange> {
    if r.intersect(&cut).is_none() {
        return vec![r];
    }
    let mut out = Vec::new();
    if r.begin < cut.begin {
        out.push(KeyRange {
            begin: r.begin,
            end: cut.begin,
        });
    }
    if cut.end < r.end {
        out.push(KeyRange {
            begin: cut.end,
            end: r.end,
        });
    }
    out
}

/// The ranges of `[0, KEY_END)` not covered by `held` (sorted, disjoint).
fn gaps(held: &[KeyRange]) -> Vec<KeyRange> {
    let mut out = Vec::new();
    let mut at = 0;
    for h in held {
        if h.begin > at {
            out.push(KeyRange {
                begin: at,
                end: h.begin,
            });
        }
        at = at.max(h.end);
    }
    if at < pserver_core::KEY_END {
        out.push(KeyRange {
            begin: at,
            end: pserver_core::KEY_END,
        });
    }
    out
}
