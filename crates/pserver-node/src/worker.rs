//! The worker client library: push, pull and push-pull on named tables, by key
//! list or key range. Each call returns a [`Handle`] at once; `wait()` (or
//! `.await`) gives the result. Requests are sliced by partition, sent to the
//! owning servers concurrently, and the replies merged in key order. A
//! redirect refreshes the map and resends only the affected slices; resent
//! pushes carry a retry flag so the servers' range clocks apply them once.
//!
//! With [`WorkerConfig::key_caching`] on, a slice whose key list the server
//! is believed to hold goes out as `[hash, count]` (`FLAG_KEYREF`) instead of
//! the keys; a slice sent in full asks the server to keep its list
//! (`FLAG_CACHE_KEYS`). A server that no longer holds the list refuses the
//! frame without doing anything (`KeyCacheMiss`) and the slice is resent in
//! full, so caching never changes what a request does, only its bytes.

use crate::conn::{Peer, lock};
use crate::error::NodeError;
use crate::net::Net;
use crate::proto::{control_request, register, rejoin, reply_control};
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use pserver_core::keycache::key_list_hash;
use pserver_core::{
    ClusterMap, Consistency, Init, KEY_END, KeyRange, NodeId, Role, TableSpec, UpdaterSpec,
};
/// How values are packed on the wire (see [`WorkerConfig::compression`]).
pub use pserver_wire::Packing;
use pserver_wire::header::{
    FLAG_CACHE_KEYS, FLAG_DENSE, FLAG_KEYREF, FLAG_PACK_REPLY, FLAG_RETRY, FLAG_SCAN,
};
use pserver_wire::{Control, ErrorCode, Frame, Header, Kind, Limits};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How to connect a worker (or an ad-hoc client).
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The manager's address.
    pub manager: String,
    /// `Worker` (counted by consistency and barriers) or `Client` (never waited for).
    pub role: Role,
    /// Frame limits.
    pub limits: Limits,
    /// How long one request may take, retries and consistency waits included.
    pub timeout: Duration,
    /// Send a key list a server already holds as a 16-byte reference (the
    /// paper's key caching). Off by default: servers of an older build
    /// refuse the flags it uses.
    pub key_caching: bool,
    /// Slices with fewer keys than this are always sent in full: a short
    /// list costs little and would only take room in the servers' caches.
    /// (Lists of two keys or fewer are never cached: the reference is as long.)
    pub min_cached_keys: usize,
    /// Pack the values this worker sends (lossless, or fixed point with
    /// random rounding) and ask servers to pack their replies losslessly.
    /// Off by default, like key caching.
    pub compression: Option<Packing>,
    /// How to dial (TCP unless a test simulates the network).
    pub net: Net,
}

/// Default of [`WorkerConfig::min_cached_keys`].
pub const DEFAULT_MIN_CACHED_KEYS: usize = 16;

/// Key lists remembered as held per server connection: past this many, the
/// oldest is forgotten (and sent in full, so cached again, next time).
const KNOWN_LISTS_PER_SERVER: usize = 1 << 16;

impl WorkerConfig {
    /// A worker of the manager at `manager`.
    pub fn new(manager: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            manager: manager.into(),
            role: Role::Worker,
            limits: Limits::default(),
            timeout: Duration::from_secs(120),
            key_caching: false,
            min_cached_keys: DEFAULT_MIN_CACHED_KEYS,
            compression: None,
            net: Net::tcp(),
        }
    }

    /// The same, as an ad-hoc client.
    pub fn client(manager: impl Into<String>) -> WorkerConfig {
        WorkerConfig {
            role: Role::Client,
            ..WorkerConfig::new(manager)
        }
    }
}

/// What a table is created with; see [`TableSpec`].
#[derive(Clone, Debug, PartialEq)]
pub struct TableOptions {
    /// Floats per key.
    pub dim: u32,
    /// How unpushed keys read.
    pub init: Init,
    /// What servers do with a push.
    pub updater: UpdaterSpec,
    /// Default consistency of pulls.
    pub consistency: Consistency,
    /// Sum each clock's pushes from every live worker, then apply once.
    pub aggregate: bool,
}

impl TableOptions {
    /// A table of width `dim` with `updater`, zero-initialized, eventual consistency.
    pub fn new(dim: u32, updater: UpdaterSpec) -> TableOptions {
        TableOptions {
            dim,
            init: Init::Zero,
            updater,
            consistency: Consistency::Eventual,
            aggregate: false,
        }
    }

    /// Sums each clock's pushes from every live worker before the updater runs.
    pub fn aggregate(mut self, on: bool) -> TableOptions {
        self.aggregate = on;
        self
    }

    /// Sets the default consistency.
    pub fn consistency(mut self, c: Consistency) -> TableOptions {
        self.consistency = c;
        self
    }

    /// Sets the initializer.
    pub fn init(mut self, init: Init) -> TableOptions {
        self.init = init;
        self
    }
}

/// Which keys a request covers.
#[derive(Clone, Debug, PartialEq)]
pub enum Keys {
    /// Sorted, unique keys.
    List(Vec<u64>),
    /// Every key of a range (dense: no key list on the wire).
    Range(KeyRange),
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Apply values through the table's updater.
    Push,
    /// Read values.
    Pull,
    /// Push, then read the same keys.
    PushPull,
}

/// A fully described request; the `push`/`pull` methods build these.
#[derive(Clone, Debug)]
pub struct Request {
    /// Table name.
    pub table: String,
    /// What to do.
    pub op: Op,
    /// Which keys.
    pub keys: Keys,
    /// Pushed values, `keys x dim x push width` (empty for a pull).
    pub vals: Vec<f32>,
    /// Clock to send; `None` uses the worker's current clock.
    pub clock: Option<u64>,
    /// Overrides the table's consistency for this pull.
    pub consistency: Option<Consistency>,
}

/// The outcome of a request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Pulled values, `dim` per key in key order (empty for a push).
    pub vals: Vec<f32>,
    /// Keys the servers applied.
    pub applied: u64,
    /// Keys skipped as already applied at this clock (retries).
    pub duplicate: u64,
}

/// The pending result of a request. `wait()` blocks the calling thread (do not
/// call it from async code; `.await` the handle there instead).
#[must_use = "a handle does nothing unless waited for"]
pub struct Handle<T> {
    rx: oneshot::Receiver<Result<T, NodeError>>,
}

impl<T> Handle<T> {
    /// Blocks until the request completes.
    pub fn wait(self) -> Result<T, NodeError> {
        self.rx.blocking_recv().map_err(|_| NodeError::Abandoned)?
    }
}

impl<T: Send + 'static> IntoFuture for Handle<T> {
    type Output = Result<T, NodeError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.rx.await.map_err(|_| NodeError::Abandoned)? })
    }
}

/// Bytes and requests this worker moved.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes of frames sent.
    pub bytes_sent: AtomicU64,
    /// Bytes of frames received.
    pub bytes_received: AtomicU64,
    /// Frames sent to servers.
    pub requests: AtomicU64,
    /// Slices resent after a redirect, a failure or a key-cache miss.
    pub retries: AtomicU64,
    /// Key bytes not sent because a key list went as a reference:
    /// `count * 8 - 16` per `FLAG_KEYREF` frame the server answered other
    /// than with a miss (a miss is resent in full and saves nothing); plus
    /// value bytes saved by packing what this worker sent.
    pub bytes_saved: AtomicU64,
    /// Value bytes the servers did not send because they packed their replies.
    pub bytes_saved_received: AtomicU64,
}

/// Key lists (table, hash) a server is believed to hold, oldest first.
/// Bounded; a wrong belief costs one refused frame and a resend.
#[derive(Debug, Default)]
struct KnownLists {
    set: HashSet<(u32, u64)>,
    order: VecDeque<(u32, u64)>,
}

impl KnownLists {
    fn contains(&self, table: u32, hash: u64) -> bool {
        self.set.contains(&(table, hash))
    }

    fn learn(&mut self, table: u32, hash: u64) {
        if !self.set.insert((table, hash)) {
            return;
        }
        self.order.push_back((table, hash));
        while self.order.len() > KNOWN_LISTS_PER_SERVER {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn forget(&mut self, table: u32, hash: u64) {
        if self.set.remove(&(table, hash)) {
            // Linear, but only after a miss, which a working cache makes rare.
            self.order.retain(|&e| e != (table, hash));
        }
    }
}

/// A connection to a server and what that server holds of this worker's
/// key lists. The two live and die together: a new connection may be to a
/// restarted server with an empty cache, so it starts knowing nothing.
#[derive(Clone, Debug)]
struct Link {
    peer: Peer,
    known: Arc<Mutex<KnownLists>>,
}

struct Inner {
    id: NodeId,
    /// The link to the manager; replaced when it is rejoined.
    manager: Mutex<Peer>,
    map: Mutex<Arc<ClusterMap>>,
    servers: Mutex<HashMap<NodeId, Link>>,
    clock: AtomicU64,
    limits: Limits,
    /// Key caching on, and the shortest list it applies to (at least 3).
    cache_keys_from: Option<usize>,
    /// Value compression, when on.
    compression: Option<Packing>,
    /// Fires when the latest push has queued its first frames (see `send`).
    push_gate: Mutex<Option<oneshot::Receiver<()>>>,
    /// The clocks of the pushes in flight, kept within the servers' window.
    in_flight: Arc<crate::window::ClockWindow>,
    net: Net,
    timeout: Duration,
    cancel: CancellationToken,
    traffic: Traffic,
    rt: tokio::runtime::Handle,
}

/// A connection of the user's program to the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl Inner {
    /// The current link to the manager.
    fn manager(&self) -> Peer {
        lock(&self.manager).clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Worker {
    /// Registers with the manager and fetches the map.
    pub async fn connect(cfg: WorkerConfig) -> Result<Worker, NodeError> {
        let (manager, mut notices) = Peer::connect_via(&cfg.net, &cfg.manager, cfg.limits).await?;
        let (id, map) = register(&manager, cfg.role, "").await?;
        let heartbeat = map.heartbeat_interval();
        let inner = Arc::new(Inner {
            id,
            manager: Mutex::new(manager.clone()),
            map: Mutex::new(Arc::new(map)),
            servers: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(1),
            limits: cfg.limits,
            timeout: cfg.timeout,
            cache_keys_from: cfg.key_caching.then_some(cfg.min_cached_keys.max(3)),
            compression: cfg.compression,
            push_gate: Mutex::new(None),
            in_flight: Arc::default(),
            net: cfg.net.clone(),
            cancel: CancellationToken::new(),
            traffic: Traffic::default(),
            rt: tokio::runtime::Handle::current(),
        });
        // Heartbeats out, maps in; holds only a weak reference so dropping
        // the last Worker ends it.
        let weak = Arc::downgrade(&inner);
        let cancel = inner.cancel.clone();
        let mut peer = manager;
        let (net, addr, limits, role) =
            (cfg.net.clone(), cfg.manager.clone(), cfg.limits, cfg.role);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                let mut lost = false;
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        lost = peer.notify(control_request(id, 0, &Control::Heartbeat)).await.is_err();
                    }
                    n = notices.recv() => match n {
                        None => lost = true,
                        Some(frame) => {
                            if let (Ok(Control::Map(map)), Some(inner)) = (frame.control_msg(), weak.upgrade()) {
                                inner.install(map);
                            }
                        }
                    }
                }
                if lost {
                    // The manager restarted, or the link broke: rejoin with
                    // the same id, so clocks and barriers still count this
                    // worker. Requests in flight to servers go on meanwhile.
                    match rejoin(&net, &addr, limits, id, role, "").await {
                        Ok((p, rx, map)) => {
                            let Some(inner) = weak.upgrade() else { break };
                            *lock(&inner.manager) = p.clone();
                            inner.install(map);
                            peer = p;
                            notices = rx;
                        }
                        Err(e) => {
                            tracing::warn!(node = id, error = %e, "cannot rejoin the manager");
                            break;
                        }
                    }
                }
            }
        });
        Ok(Worker { inner })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The cluster map as last seen.
    pub fn map(&self) -> Arc<ClusterMap> {
        lock(&self.inner.map).clone()
    }

    /// Bytes and requests moved so far.
    pub fn traffic(&self) -> &Traffic {
        &self.inner.traffic
    }

    /// The clock sent with the next request.
    pub fn clock(&self) -> u64 {
        self.inner.clock.load(Ordering::SeqCst)
    }

    /// Sets the clock sent with later requests.
    pub fn set_clock(&self, clock: u64) {
        self.inner.clock.store(clock, Ordering::SeqCst);
    }

    /// Moves to the next clock (iteration) and returns it.
    pub fn advance(&self) -> u64 {
        self.inner.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Fetches the current map from the manager.
    pub async fn refresh(&self) -> Result<Arc<ClusterMap>, NodeError> {
        self.inner.refresh().await
    }

    /// Creates a table (or returns the existing one if it has the same spec).
    pub async fn create_table(
        &self,
        name: &str,
        opts: TableOptions,
    ) -> Result<TableSpec, NodeError> {
        let msg = Control::CreateTable(TableSpec {
            id: 0,
            name: name.to_string(),
            dim: opts.dim,
            init: opts.init,
            updater: opts.updater,
            consistency: opts.consistency,
            aggregate: opts.aggregate,
        });
        let reply = self
            .inner
            .manager()
            .request(control_request(self.inner.id, 0, &msg))
            .await?;
        match reply_control(&reply, self.inner.manager().label())? {
            Control::TableCreated(spec) => {
                self.inner.refresh().await?;
                Ok(spec)
            }
            other => Err(NodeError::Protocol {
                peer: self.inner.manager().label().to_string(),
                what: format!("expected TableCreated, got {other:?}"),
            }),
        }
    }

    /// The spec of a table, refreshing the map once if it is not known yet.
    pub async fn table(&self, name: &str) -> Result<TableSpec, NodeError> {
        self.inner.table(name).await
    }

    /// Writes a checkpoint of every table into `dir`: each server writes the
    /// ranges it is primary of (so `dir` must be on a file system every
    /// server sees, as on one machine), then the manifest is written last.
    /// Consistent when no pushes are in flight (between training runs, or
    /// at a barrier); the map must not change meanwhile, else it fails and
    /// should be retried. Returns the manifest.
    pub async fn checkpoint(
        &self,
        dir: &std::path::Path,
    ) -> Result<crate::snapshot::Manifest, NodeError> {
        let map = self.refresh().await?;
        let mut primaries: Vec<NodeId> = map.partitions.iter().map(|p| p.primary).collect();
        primaries.sort_unstable();
        primaries.dedup();
        let mut files = Vec::new();
        let msg = Control::Snapshot {
            dir: dir.display().to_string(),
        };
        for server in primaries {
            let link = self.inner.link(server, &map).await?;
            let reply = link
                .peer
                .request(control_request(self.inner.id, map.epoch, &msg))
                .await?;
            match reply_control(&reply, link.peer.label())? {
                Control::Snapshotted { files: f } => files.extend(f),
                other => {
                    return Err(NodeError::Protocol {
                        peer: link.peer.label().to_string(),
                        what: format!("expected Snapshotted, got {other:?}"),
                    });
                }
            }
        }
        let after = self.refresh().await?;
        if after.partitions != map.partitions {
            return Err(NodeError::BadRequest(
                "the cluster's ranges changed during the checkpoint; take it again".into(),
            ));
        }
        let manifest = crate::snapshot::Manifest {
            version: 1,
            epoch: map.epoch,
            tables: map.tables.clone(),
            files,
        };
        crate::snapshot::write_manifest(dir, &manifest)
            .map_err(|e| NodeError::BadRequest(e.to_string()))?;
        Ok(manifest)
    }

    /// Loads the checkpoint in `dir` into this cluster, whatever its number
    /// of servers: creates its tables (same names and specs; a table that
    /// exists already and holds keys is refused, before anything changes) and sends each range's slots to the range's
    /// primary (`Control::Restore`), which stores them and copies them down
    /// its chain. The whole checkpoint is read and checked first; a damaged
    /// or partial one is refused before anything changes. Returns the
    /// tables restored.
    pub async fn restore(
        &self,
        dir: &std::path::Path,
        registry: &pserver_core::updater::Registry,
    ) -> Result<Vec<TableSpec>, NodeError> {
        let width = |spec: &TableSpec| {
            registry
                .build(&spec.updater)
                .map(|u| pserver_core::store::Store::new(spec.clone(), u).slot_width())
                .unwrap_or(usize::MAX)
        };
        let ckpt =
            crate::snapshot::load(dir, width).map_err(|e| NodeError::BadRequest(e.to_string()))?;
        // A table that exists already must be empty: restoring into it
        // would merge the checkpoint with what it holds. Checked for every
        // table before anything changes.
        let map = self.refresh().await?;
        for old in &ckpt.manifest.tables {
            if map.table(&old.name).is_none() {
                continue;
            }
            let held = match self.scan(&old.name, KeyRange::ALL).await {
                Ok((keys, _)) if keys.is_empty() => continue,
                Ok((keys, _)) => keys.len().to_string(),
                // Too many keys to list in one reply: certainly not empty.
                Err(NodeError::Remote {
                    code: ErrorCode::Limit,
                    ..
                }) => "too many".to_string(),
                Err(e) => return Err(e),
            };
            return Err(NodeError::BadRequest(format!(
                "table {:?} already holds {held} keys; a checkpoint is restored into empty \
                 tables only (restore into a fresh cluster, or under other names)",
                old.name
            )));
        }
        let mut restored = Vec::new();
        for old in &ckpt.manifest.tables {
            let opts = TableOptions {
                dim: old.dim,
                init: old.init.clone(),
                updater: old.updater.clone(),
                consistency: old.consistency,
                aggregate: old.aggregate,
            };
            let spec = self.create_table(&old.name, opts).await?;
            for part in ckpt.parts.iter().filter(|p| p.table == old.id) {
                self.restore_part(&spec, part).await?;
            }
            restored.push(spec);
        }
        Ok(restored)
    }

    /// Sends one checkpoint part to the primaries of its pieces under the
    /// current map. A piece refused for a passing reason (the map moved on,
    /// a hand-off holds the range back) sends the whole part again under
    /// the newer map, until the timeout: slots are absolute, so a piece
    /// stored twice is stored once.
    async fn restore_part(
        &self,
        spec: &TableSpec,
        part: &crate::snapshot::RangePart,
    ) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            match self.restore_part_once(spec, part).await {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                done => return done,
            }
        }
    }

    async fn restore_part_once(
        &self,
        spec: &TableSpec,
        part: &crate::snapshot::RangePart,
    ) -> Result<(), NodeError> {
        let map = self.refresh().await?;
        let w = part.slot_width;
        for i in map.partitions_overlapping(part.range) {
            let p = &map.partitions[i];
            let Some(piece) = p.range.intersect(&part.range) else {
                continue;
            };
            let lo = part.keys.partition_point(|k| *k < piece.begin);
            let hi = part.keys.partition_point(|k| *k < piece.end);
            // Bounded frames; an empty piece still goes, once.
            let step = (self.inner.limits.max_frame / 2 / (8 + 4 * w.max(1))).max(1);
            let mut at = lo;
            loop {
                let end = (at + step).min(hi);
                let mut f = Frame::new(Header {
                    kind: Kind::Control,
                    sender: self.inner.id,
                    table: spec.id,
                    epoch: map.epoch,
                    range: piece,
                    ..Header::new(Kind::Control)
                });
                f.keys = part.keys[at..end].to_vec();
                f.vals = part.slots[at * w..end * w].to_vec();
                // The primary copies them down its own chain. Clock records
                // name the old cluster's workers: they mean nothing here
                // and are not carried over.
                f.ctrl = Control::Restore { spec: spec.clone() }.to_bytes().into();
                let link = self.inner.link(p.primary, &map).await?;
                let reply = link.peer.request(f).await?;
                reply_control(&reply, link.peer.label())?;
                at = end;
                if at >= hi {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Asks the manager to drain server `node`: its ranges move to the other
    /// servers (bulk copy, then the changes made meanwhile, then the map
    /// switch), after which it exits. Returns once the drain has started.
    pub async fn drain(&self, node: NodeId) -> Result<(), NodeError> {
        let reply = self
            .inner
            .manager()
            .request(control_request(self.inner.id, 0, &Control::Drain { node }))
            .await?;
        reply_control(&reply, self.inner.manager().label()).map(|_| ())
    }

    /// Waits until every live worker has entered barrier `name`.
    pub async fn barrier(&self, name: &str) -> Result<(), NodeError> {
        let reply = self
            .inner
            .manager()
            .request(control_request(
                self.inner.id,
                0,
                &Control::Barrier {
                    name: name.to_string(),
                },
            ))
            .await?;
        reply_control(&reply, self.inner.manager().label()).map(|_| ())
    }

    /// Pushes `vals` for sorted, unique `keys` at the current clock.
    pub fn push(&self, table: &str, keys: Vec<u64>, vals: Vec<f32>) -> Handle<Outcome> {
        self.send(Request {
            table: table.into(),
            op: Op::Push,
            keys: Keys::List(keys),
            vals,
            clock: None,
            consistency: None,
        })
    }

    /// Pulls the values of sorted, unique `keys` (`dim` floats per key).
    pub fn pull(&self, table: &str, keys: Vec<u64>) -> Handle<Vec<f32>> {
        self.values(Request {
            table: table.into(),
            op: Op::Pull,
            keys: Keys::List(keys),
            vals: Vec::new(),
            clock: None,
            consistency: None,
        })
    }

    /// Pushes, then pulls the same keys once the push is applied.
    pub fn push_pull(&self, table: &str, keys: Vec<u64>, vals: Vec<f32>) -> Handle<Vec<f32>> {
        self.values(Request {
            table: table.into(),
            op: Op::PushPull,
            keys: Keys::List(keys),
            vals,
            clock: None,
            consistency: None,
        })
    }

    /// Pushes values for every key of `range`.
    pub fn push_range(&self, table: &str, range: KeyRange, vals: Vec<f32>) -> Handle<Outcome> {
        self.send(Request {
            table: table.into(),
            op: Op::Push,
            keys: Keys::Range(range),
            vals,
            clock: None,
            consistency: None,
        })
    }

    /// Pulls every key of `range`.
    pub fn pull_range(&self, table: &str, range: KeyRange) -> Handle<Vec<f32>> {
        self.values(Request {
            table: table.into(),
            op: Op::Pull,
            keys: Keys::Range(range),
            vals: Vec::new(),
            clock: None,
            consistency: None,
        })
    }

    fn values(&self, mut req: Request) -> Handle<Vec<f32>> {
        // The clock is the one current now, not when the task first runs:
        // the caller may advance it before then.
        req.clock.get_or_insert_with(|| self.clock());
        let order = self.push_order(&req);
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            let _ = tx.send(inner.execute(req, order).await.map(|o| o.vals));
        });
        Handle { rx }
    }

    /// For a request that pushes: the signal of the push before it, and the
    /// one this request gives the next once its frames are queued. Pushes
    /// thus leave in the order they were made: a server keeps the highest
    /// clock each worker pushed to a range, so a later clock arriving first
    /// would make the earlier look like a duplicate.
    #[allow(clippy::type_complexity)]
    fn push_order(
        &self,
        req: &Request,
    ) -> Option<(Option<oneshot::Receiver<()>>, oneshot::Sender<()>)> {
        (req.op != Op::Pull).then(|| {
            let (queued, next) = oneshot::channel();
            let before = lock(&self.inner.push_gate).replace(next);
            (before, queued)
        })
    }

    /// Sends any request.
    pub fn send(&self, mut req: Request) -> Handle<Outcome> {
        req.clock.get_or_insert_with(|| self.clock());
        let order = self.push_order(&req);
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            let _ = tx.send(inner.execute(req, order).await);
        });
        Handle { rx }
    }

    /// Reads every stored key of `range` with its weights (`dim` per key),
    /// in key order. Keys never pushed are not stored and not returned.
    pub fn scan(&self, table: &str, range: KeyRange) -> Handle<(Vec<u64>, Vec<f32>)> {
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        let table = table.to_string();
        self.inner.rt.spawn(async move {
            let _ = tx.send(inner.scan(table, range).await);
        });
        Handle { rx }
    }

    /// Leaves the cluster: closes the link to the manager.
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }
}

/// A piece of a request still to be done.
#[derive(Clone, Debug)]
struct Item {
    range: KeyRange,
    /// Offset of the item's first key in the request (key list index, or
    /// key minus the request range's begin for dense requests).
    first: usize,
    /// Keys in the item.
    count: usize,
    /// Sent before: it may have been applied, so a resend is a retry.
    sent: bool,
    /// Transient failures so far (sets the pause before the next try).
    tries: u32,
}

/// A signal for the next push, shared by the parts of a request's first
/// round: once the last part is dropped (its frame queued, or failed), the
/// sender is dropped, which completes the next push's wait.
#[derive(Clone)]
struct Queued(#[allow(dead_code)] Arc<oneshot::Sender<()>>);

/// A slice on its way: it ends with its result, or with none after a
/// pause (then it is sliced again with the current map).
type SliceFuture<'a> =
    Pin<Box<dyn Future<Output = (Item, Option<Result<SliceResult, NodeError>>)> + Send + 'a>>;

/// Waits before a slice goes again (2 ms doubling to 200 ms), then hands it
/// back with no result: the caller refreshes the map and resends it.
async fn pause<E>(item: Item) -> (Item, Option<Result<SliceResult, E>>) {
    let ms = (2u64 << item.tries.min(7)).min(200);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    (item, None)
}

enum SliceResult {
    Done {
        keys: Vec<u64>,
        vals: Vec<f32>,
        applied: u64,
        duplicate: u64,
    },
    Redirect(ClusterMap),
    /// Not done, nothing changed: send again after a pause.
    Again,
    /// The connection failed, or the server refused it after it may have
    /// applied it: resent as a retry.
    Lost,
    /// The server no longer holds the key list a reference named; it did
    /// nothing, and the slice goes again at once with its keys.
    Miss,
}

impl Inner {
    fn install(&self, map: ClusterMap) {
        let mut cur = lock(&self.map);
        if map.epoch > cur.epoch {
            // Requests in flight to a server now declared dead fail at once
            // and are resent to the range's new primary, even when the dead
            // server's socket stays open (frozen, or cut off) and would
            // never answer.
            let mut servers = lock(&self.servers);
            servers.retain(|id, link| {
                let alive = map
                    .node(*id)
                    .is_some_and(|n| n.state != pserver_core::NodeState::Dead);
                if !alive {
                    link.peer.close();
                }
                alive
            });
            drop(servers);
            *cur = Arc::new(map);
        }
    }

    async fn refresh(&self) -> Result<Arc<ClusterMap>, NodeError> {
        let reply = self
            .manager()
            .request(control_request(self.id, 0, &Control::GetMap))
            .await?;
        match reply_control(&reply, self.manager().label())? {
            Control::Map(map) => {
                self.install(map);
                Ok(lock(&self.map).clone())
            }
            other => Err(NodeError::Protocol {
                peer: self.manager().label().to_string(),
                what: format!("expected Map, got {other:?}"),
            }),
        }
    }

    async fn table(&self, name: &str) -> Result<TableSpec, NodeError> {
        if let Some(t) = lock(&self.map).table(name) {
            return Ok(t.clone());
        }
        let map = self.refresh().await?;
        map.table(name)
            .cloned()
            .ok_or_else(|| NodeError::UnknownTable(name.to_string()))
    }

    async fn link(&self, node: NodeId, map: &ClusterMap) -> Result<Link, NodeError> {
        if let Some(l) = lock(&self.servers).get(&node) {
            if !l.peer.is_closed() {
                return Ok(l.clone());
            }
        }
        let addr = map
            .node(node)
            .map(|n| n.addr.clone())
            .ok_or_else(|| NodeError::Protocol {
                peer: "map".into(),
                what: format!("partition names unknown node {node}"),
            })?;
        let (peer, _notices) = Peer::connect_via(&self.net, &addr, self.limits).await?;
        let mut servers = lock(&self.servers);
        match servers.get(&node) {
            // Slices sent at once race to connect; the first link stays, so
            // that what each slice learns about the server's key cache lands
            // in the one set every later slice reads.
            Some(l) if !l.peer.is_closed() => Ok(l.clone()),
            _ => {
                let link = Link {
                    peer,
                    known: Arc::default(),
                };
                servers.insert(node, link.clone());
                Ok(link)
            }
        }
    }

    async fn execute(
        self: Arc<Self>,
        req: Request,
        order: Option<(Option<oneshot::Receiver<()>>, oneshot::Sender<()>)>,
    ) -> Result<Outcome, NodeError> {
        // Wait for the push before this one to have queued its frames; hold
        // the signal for the next until this one has queued its own (a
        // failure before that drops it, which also lets the next go).
        let mut queued_signal = None;
        if let Some((before, queued)) = order {
            if let Some(before) = before {
                let _ = before.await;
            }
            queued_signal = Some(queued);
        }
        // Pushes complete out of order: keep the clocks in flight within
        // the window the servers remember, so that a slice resent late is
        // still recognised as applied or not.
        let _in_flight = if req.op != Op::Pull {
            let clock = req
                .clock
                .unwrap_or_else(|| self.clock.load(Ordering::SeqCst));
            match tokio::time::timeout(self.timeout, self.in_flight.enter(clock)).await {
                Ok(place) => Some(place),
                Err(_) => {
                    return Err(NodeError::Timeout {
                        what: format!("room for clock {clock} among the pushes in flight"),
                        secs: self.timeout.as_secs(),
                    });
                }
            }
        } else {
            None
        };
        let spec = self.table(&req.table).await?;
        let dim = spec.dim as usize;
        let clock = req
            .clock
            .unwrap_or_else(|| self.clock.load(Ordering::SeqCst));
        let (range, n, dense) = match &req.keys {
            Keys::List(keys) => {
                if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
                    return Err(NodeError::BadRequest(format!(
                        "keys must be sorted and unique; position {} is not",
                        i + 1
                    )));
                }
                if keys.last() == Some(&KEY_END) {
                    return Err(NodeError::BadRequest(format!("key {KEY_END} is reserved")));
                }
                (KeyRange::ALL, keys.len(), false)
            }
            Keys::Range(r) => {
                if r.is_empty() {
                    return Err(NodeError::BadRequest(format!("range {r} is empty")));
                }
                if r.len() > self.limits.max_keys as u64 {
                    return Err(NodeError::BadRequest(format!(
                        "range {r} has more than {} keys",
                        self.limits.max_keys
                    )));
                }
                (*r, r.len() as usize, true)
            }
        };
        let pushes = req.op != Op::Pull;
        let width = if !pushes || n == 0 {
            0
        } else if !req.vals.len().is_multiple_of(n) || req.vals.is_empty() {
            return Err(NodeError::BadRequest(format!(
                "{} values do not divide evenly over {n} keys",
                req.vals.len()
            )));
        } else {
            req.vals.len() / n
        };
        if !pushes && !req.vals.is_empty() {
            return Err(NodeError::BadRequest("a pull carries no values".into()));
        }
        let keys: &[u64] = match &req.keys {
            Keys::List(k) => k,
            Keys::Range(_) => &[],
        };
        let kind = match req.op {
            Op::Push => Kind::Push,
            Op::Pull => Kind::Pull,
            Op::PushPull => Kind::PushPull,
        };
        let ctrl = match (req.op, req.consistency) {
            (Op::Pull, Some(c)) => Control::Consistency(c).to_bytes().into(),
            _ => bytes::Bytes::new(),
        };
        let mut out = Outcome {
            vals: if req.op == Op::Push {
                Vec::new()
            } else {
                vec![0.0; n * dim]
            },
            ..Outcome::default()
        };
        // Every slice goes and retries on its own: a slice held by a server
        // (an aggregating table acknowledges a push once every worker's push
        // of the clock is in) must not hold back the resend of another slice
        // of the same request, which that very sum may be waiting for.
        let mut queue = vec![Item {
            range,
            first: 0,
            count: n,
            sent: false,
            tries: 0,
        }];
        let deadline = Instant::now() + self.timeout;
        let mut in_flight: FuturesUnordered<SliceFuture<'_>> = FuturesUnordered::new();
        loop {
            if !queue.is_empty() {
                let map = lock(&self.map).clone();
                // The first round's frames count down to the signal.
                let countdown = queued_signal.take().map(|tx| Queued(Arc::new(tx)));
                for item in std::mem::take(&mut queue) {
                    let item_keys = if dense {
                        &[][..]
                    } else {
                        &keys[item.first..item.first + item.count]
                    };
                    let slices = map.slice(item.range, item_keys);
                    if slices.is_empty() {
                        // The map names no live server; fail now unless the
                        // manager already knows better.
                        if self.refresh().await?.partitions.is_empty() {
                            return Err(NodeError::NoServer(item.range));
                        }
                        in_flight.push(Box::pin(pause(item)));
                        continue;
                    }
                    for s in slices {
                        // A pull needs no message where it has no keys (a
                        // push does: its empty slices advance range clocks).
                        if req.op == Op::Pull && !dense && s.keys.is_empty() {
                            continue;
                        }
                        let (first, count) = if dense {
                            (
                                (s.range.begin - range.begin) as usize,
                                s.range.len() as usize,
                            )
                        } else {
                            (item.first + s.keys.start, s.keys.len())
                        };
                        let sub = Item {
                            range: s.range,
                            first,
                            count,
                            sent: item.sent,
                            tries: item.tries,
                        };
                        let server = map.partitions[s.partition].primary;
                        let mut h = Header::new(kind);
                        h.flags = if dense { FLAG_DENSE } else { 0 }
                            | if sub.sent { FLAG_RETRY } else { 0 };
                        h.sender = self.id;
                        h.table = spec.id;
                        h.epoch = map.epoch;
                        h.clock = clock;
                        h.range = sub.range;
                        let frame = Frame {
                            header: h,
                            keys: if dense {
                                Vec::new()
                            } else {
                                keys[sub.first..sub.first + sub.count].to_vec()
                            },
                            vals: req.vals[sub.first * width..(sub.first + sub.count) * width]
                                .to_vec(),
                            ctrl: ctrl.clone(),
                            packed: None,
                        };
                        let this = self.clone();
                        let map = map.clone();
                        let queued = countdown.clone();
                        in_flight.push(Box::pin(async move {
                            let r = this.send_slice(server, &map, frame, queued).await;
                            (sub, Some(r))
                        }));
                    }
                }
            }
            let Some((mut item, step)) = in_flight.next().await else {
                return Ok(out);
            };
            let Some(res) = step else {
                // Back from a pause: the map may have moved on without
                // telling us (a server died).
                let _ = self.refresh().await;
                queue.push(item);
                continue;
            };
            let again = |mut item: Item, in_flight: &mut FuturesUnordered<_>| {
                self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                item.tries += 1;
                in_flight.push(Box::pin(pause(item)) as Pin<Box<dyn Future<Output = _> + Send>>);
            };
            match res? {
                SliceResult::Done {
                    vals,
                    keys: _,
                    applied,
                    duplicate,
                } => {
                    out.applied += applied;
                    out.duplicate += duplicate;
                    if req.op != Op::Push {
                        if vals.len() != item.count * dim {
                            return Err(NodeError::Protocol {
                                peer: format!("server for {}", item.range),
                                what: format!(
                                    "{} values for {} keys of dim {dim}",
                                    vals.len(),
                                    item.count
                                ),
                            });
                        }
                        out.vals[item.first * dim..(item.first + item.count) * dim]
                            .copy_from_slice(&vals);
                    }
                    continue;
                }
                SliceResult::Redirect(map) => {
                    self.install(map);
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                    queue.push(item);
                }
                SliceResult::Again => again(item, &mut in_flight),
                // Not a retry: the refused reference changed nothing, so
                // `item.sent` stays as it was.
                SliceResult::Miss => {
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                    queue.push(item);
                }
                SliceResult::Lost => {
                    item.sent = true;
                    again(item, &mut in_flight);
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout {
                    what: format!("{:?} on table {:?}", req.op, req.table),
                    secs: self.timeout.as_secs(),
                });
            }
        }
    }

    async fn scan(
        self: Arc<Self>,
        table: String,
        range: KeyRange,
    ) -> Result<(Vec<u64>, Vec<f32>), NodeError> {
        let spec = self.table(&table).await?;
        let mut todo = vec![range];
        let mut parts: Vec<(u64, Vec<u64>, Vec<f32>)> = Vec::new();
        let deadline = Instant::now() + self.timeout;
        while !todo.is_empty() {
            let map = lock(&self.map).clone();
            let mut subs = Vec::new();
            for r in &todo {
                let slices = map.slice(*r, &[]);
                if slices.is_empty() && self.refresh().await?.partitions.is_empty() {
                    return Err(NodeError::NoServer(*r));
                }
                for s in slices {
                    subs.push((s.range, map.partitions[s.partition].primary));
                }
            }
            let sends = subs.iter().map(|&(r, server)| {
                let mut h = Header::new(Kind::Pull);
                h.flags = FLAG_SCAN;
                h.sender = self.id;
                h.table = spec.id;
                h.epoch = map.epoch;
                h.range = r;
                let map = map.clone();
                let this = self.clone();
                async move { this.send_slice(server, &map, Frame::new(h), None).await }
            });
            let results = join_all(sends).await;
            todo = Vec::new();
            for ((r, _), res) in subs.into_iter().zip(results) {
                match res? {
                    SliceResult::Done { keys, vals, .. } => {
                        if vals.len() != keys.len() * spec.dim as usize
                            || keys.iter().any(|k| !r.contains(*k))
                        {
                            return Err(NodeError::Protocol {
                                peer: format!("server for {r}"),
                                what: "scan reply does not match its range".into(),
                            });
                        }
                        parts.push((r.begin, keys, vals));
                    }
                    SliceResult::Redirect(m) => {
                        self.install(m);
                        todo.push(r);
                    }
                    SliceResult::Again | SliceResult::Lost | SliceResult::Miss => todo.push(r),
                }
            }
            if !todo.is_empty() {
                if Instant::now() >= deadline {
                    return Err(NodeError::Timeout {
                        what: format!("scan of table {table:?}"),
                        secs: self.timeout.as_secs(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = self.refresh().await;
            }
        }
        parts.sort_unstable_by_key(|p| p.0);
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for (_, k, v) in parts {
            keys.extend(k);
            vals.extend(v);
        }
        Ok((keys, vals))
    }

    /// True when `frame`'s key list should be cached: caching is on and the
    /// frame is a data request with a long enough key list.
    fn caches(&self, frame: &Frame) -> bool {
        let h = &frame.header;
        self.cache_keys_from
            .is_some_and(|min| frame.keys.len() >= min)
            && matches!(h.kind, Kind::Push | Kind::Pull | Kind::PushPull)
            && h.flags & (FLAG_DENSE | FLAG_SCAN | FLAG_KEYREF) == 0
    }

    /// Sends one slice and reads its reply. `queued` is dropped once the
    /// frame is queued on its connection (or could not be), which is what
    /// the next push waits for.
    async fn send_slice(
        &self,
        server: NodeId,
        map: &ClusterMap,
        frame: Frame,
        queued: Option<Queued>,
    ) -> Result<SliceResult, NodeError> {
        let link = match self.link(server, map).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => return Ok(SliceResult::Again),
            Err(e) => return Err(e),
        };
        let peer = &link.peer;
        let table = frame.header.table;
        let mut frame = frame;
        // Key caching: the list's hash, and whether a reference replaced it.
        let mut cached = None;
        if self.caches(&frame) {
            let hash = key_list_hash(&frame.keys);
            let count = frame.keys.len() as u64;
            if lock(&link.known).contains(table, hash) {
                frame.keys = vec![hash, count];
                frame.header.flags |= FLAG_KEYREF;
                cached = Some((hash, Some(count)));
            } else {
                frame.header.flags |= FLAG_CACHE_KEYS;
                cached = Some((hash, None));
            }
        }
        if let Some(packing) = self.compression {
            if matches!(frame.header.kind, Kind::Pull | Kind::PushPull) {
                frame.header.flags |= FLAG_PACK_REPLY;
            }
            let saved = frame.pack(packing);
            self.traffic.bytes_saved.fetch_add(saved, Ordering::Relaxed);
        }
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        self.traffic
            .bytes_sent
            .fetch_add(frame.encoded_len() as u64 + 4, Ordering::Relaxed);
        let reply = match peer.send_request(frame).await {
            Ok(pending) => {
                drop(queued);
                pending.await.ok()
            }
            Err(_) => None,
        };
        let Some(reply) = reply else {
            lock(&self.servers).remove(&server);
            return Ok(SliceResult::Lost);
        };
        self.traffic
            .bytes_received
            .fetch_add(reply.encoded_len() as u64 + 4, Ordering::Relaxed);
        let mut reply = reply;
        if let Some(p) = &reply.packed {
            let saved = (p.count as usize * 4).saturating_sub(p.bytes.len());
            self.traffic
                .bytes_saved_received
                .fetch_add(saved as u64, Ordering::Relaxed);
        }
        reply.unpack().map_err(|e| NodeError::Protocol {
            peer: peer.label().to_string(),
            what: e.to_string(),
        })?;
        match cached {
            Some((hash, Some(_))) if is_key_cache_miss(&reply) => {
                // Evicted, or the server restarted. It did nothing, so the
                // slice is resent, in full now that the hash is forgotten.
                lock(&link.known).forget(table, hash);
                return Ok(SliceResult::Miss);
            }
            Some((_, Some(count))) => {
                let saved = (count * 8).saturating_sub(16);
                self.traffic.bytes_saved.fetch_add(saved, Ordering::Relaxed);
            }
            Some((hash, None))
                if reply.header.kind == Kind::Reply
                    && reply.header.flags & FLAG_CACHE_KEYS != 0 =>
            {
                // The server says it kept the list.
                lock(&link.known).learn(table, hash);
            }
            _ => {}
        }
        match reply.header.kind {
            Kind::Redirect => match reply.control_msg() {
                Ok(Control::Map(m)) => Ok(SliceResult::Redirect(m)),
                _ => Err(NodeError::Protocol {
                    peer: peer.label().to_string(),
                    what: "redirect without a map".into(),
                }),
            },
            Kind::Error => match reply_control(&reply, peer.label()) {
                Err(NodeError::Remote {
                    code: ErrorCode::EpochAhead,
                    ..
                }) => Ok(SliceResult::Again),
                // Possibly applied there before its chain refused it (the
                // server lost the range meanwhile): resent as a retry, so a
                // new primary that has it counts it as done.
                Err(NodeError::Remote {
                    code: ErrorCode::NotOwner,
                    ..
                }) => Ok(SliceResult::Lost),
                Err(e) => Err(e),
                Ok(_) => Err(NodeError::Protocol {
                    peer: peer.label().to_string(),
                    what: "error frame without an error".into(),
                }),
            },
            Kind::Reply => {
                let (applied, duplicate) = if reply.ctrl.is_empty() {
                    (0, 0)
                } else {
                    match reply.control_msg() {
                        Ok(Control::PushAck { applied, duplicate }) => (applied, duplicate),
                        _ => (0, 0),
                    }
                };
                Ok(SliceResult::Done {
                    keys: reply.keys,
                    vals: reply.vals,
                    applied,
                    duplicate,
                })
            }
            other => Err(NodeError::Protocol {
                peer: peer.label().to_string(),
                what: format!("{other:?} frame as a reply"),
            }),
        }
    }
}

/// True when `reply` refuses a key reference the server does not hold.
fn is_key_cache_miss(reply: &Frame) -> bool {
    reply.header.kind == Kind::Error
        && matches!(
            reply.control_msg(),
            Ok(Control::Error {
                code: ErrorCode::KeyCacheMiss,
                ..
            })
        )
}
