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
//!
//! [`ValueFilters`] (`filters`) add the paper's value filters: the
//! significantly-modified filter on pull replies and on pushes, and random
//! skip on pushes.

mod checkpoint;
mod filters;
mod order;
mod send;

pub use filters::{FilterError, ValueFilters};

use crate::conn::{Peer, lock};
use crate::error::NodeError;
use crate::net::Net;
use crate::proto::{Rejoining, control_request, register, rejoin, reply_control};
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use pserver_core::keycache::key_list_hash;
pub use pserver_core::map::Group;
use pserver_core::{
    ClusterMap, Consistency, Init, KEY_END, KeyRange, NodeId, Role, TableSpec, UpdaterSpec,
};
/// How values are packed on the wire (see [`WorkerConfig::compression`]).
pub use pserver_wire::Packing;
use pserver_wire::header::{
    FLAG_CACHE_KEYS, FLAG_DENSE, FLAG_KEYREF, FLAG_PACK_REPLY, FLAG_RETRY, FLAG_SCAN,
    FLAG_SIGNIFICANT,
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
    /// The value filters (significantly-modified, random skip); all off by
    /// default. [`Worker::connect`] refuses settings that
    /// [`ValueFilters::validate`] does.
    pub value_filters: ValueFilters,
    /// How to dial (TCP unless a test simulates the network).
    pub net: Net,
    /// The worker group it starts in (a worker process waiting for tasks
    /// starts [`Group::Idle`]; see [`Worker::join`]).
    pub group: Group,
    /// The address it takes tasks on, as the map shows it to schedulers
    /// (empty: it takes none).
    pub addr: String,
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
            value_filters: ValueFilters::default(),
            net: Net::tcp(),
            group: Group::Default,
            addr: String::new(),
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
    /// The job whose workers the table counts; `None` takes the creating
    /// worker's job, if it is in one.
    pub job: Option<String>,
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
            job: None,
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

    /// Makes the table count the workers of job `job` only.
    pub fn job(mut self, job: impl Into<String>) -> TableOptions {
        self.job = Some(job.into());
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
    /// A push's (or push-pull's) own array of values, given back for the
    /// caller to fill and push again (its pages stay mapped: a fresh array
    /// of 64 MB costs a page fault and a zeroed page every 4 KiB). Empty
    /// when a frame carrying it was still held when the request completed
    /// (a resend), and for a pull.
    pub pushed: Vec<f32>,
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
    /// Value bytes the servers did not send because of the
    /// significantly-modified filter: the values left out, less the
    /// presence bits and stamp that replaced them (0 when those cost more).
    pub significant_saved_received: AtomicU64,
    /// Bytes (key and values) of the push entries the significantly-modified
    /// filter carried instead of sending (each is counted every time it is
    /// carried over a push; it goes later, in a sum).
    pub significant_saved_sent: AtomicU64,
    /// Bytes (key and values) of the push entries random skip dropped.
    pub skip_saved_sent: AtomicU64,
}

impl Traffic {
    /// Every byte the filters saved, both ways.
    pub fn saved(&self) -> u64 {
        [
            &self.bytes_saved,
            &self.bytes_saved_received,
            &self.significant_saved_received,
            &self.significant_saved_sent,
            &self.skip_saved_sent,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
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

/// Which filters a worker's requests go through.
#[derive(Clone, Copy, Debug)]
struct Filters {
    /// Key caching on, and the shortest list it applies to (at least 3).
    cache_keys_from: Option<usize>,
    /// Value compression, when on.
    compression: Option<Packing>,
    /// The value filters.
    values: ValueFilters,
}

/// A connection to a server and what that server holds of this worker's
/// key lists. The two live and die together: a new connection may be to a
/// restarted server with an empty cache, so it starts knowing nothing.
#[derive(Clone, Debug)]
struct Link {
    peer: Peer,
    known: Arc<Mutex<KnownLists>>,
    /// What this connection's server sent of each table under the
    /// significantly-modified filter (its shadows are per connection too).
    mirrors: filters::Mirrors,
    /// The process it was dialed to: the address and
    /// [`joined`](pserver_core::map::NodeInfo::joined) the map gave the
    /// server's id. A server that came back under its id is another
    /// process, maybe at another address, and gets a link of its own.
    addr: String,
    joined: u64,
}

impl Link {
    /// Whether this link goes to the live process the map describes as `n`.
    fn is_to(&self, n: &pserver_core::map::NodeInfo) -> bool {
        n.state != pserver_core::NodeState::Dead && n.addr == self.addr && n.joined == self.joined
    }
}

struct Inner {
    id: NodeId,
    /// The link to the manager; replaced when it is rejoined.
    manager: Mutex<Peer>,
    map: Mutex<Arc<ClusterMap>>,
    servers: Mutex<HashMap<NodeId, Link>>,
    clock: AtomicU64,
    limits: Limits,
    /// The filters on this worker's requests (a worker process changes
    /// them per job).
    filters: Mutex<Filters>,
    /// The shortest key list key caching applies to (at least 3).
    min_cached_keys: usize,
    /// What the push filter carries, per table name.
    residuals: Mutex<HashMap<String, pserver_core::push_filter::Residuals>>,
    /// The order pushes queue their frames in (see [`order`]).
    push_order: order::Order,
    /// The clocks of the pushes in flight, kept within the servers' window.
    in_flight: Arc<crate::window::ClockWindow>,
    net: Net,
    timeout: Duration,
    cancel: CancellationToken,
    /// Cancelled once this worker has lost the manager for good (a manager
    /// that knows it declared it dead): its lease is gone, so nothing it
    /// does counts any more.
    lost: CancellationToken,
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
        cfg.value_filters
            .validate()
            .map_err(|e| NodeError::BadRequest(e.to_string()))?;
        let (manager, mut notices) = Peer::connect_via(&cfg.net, &cfg.manager, cfg.limits).await?;
        let (id, map) = register(&manager, cfg.role, &cfg.addr, cfg.group.clone(), None).await?;
        let heartbeat = map.heartbeat_interval();
        let inner = Arc::new(Inner {
            id,
            manager: Mutex::new(manager.clone()),
            map: Mutex::new(Arc::new(map)),
            servers: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(1),
            limits: cfg.limits,
            timeout: cfg.timeout,
            filters: Mutex::new(Filters {
                cache_keys_from: cfg.key_caching.then_some(cfg.min_cached_keys.max(3)),
                compression: cfg.compression,
                values: cfg.value_filters,
            }),
            min_cached_keys: cfg.min_cached_keys.max(3),
            residuals: Mutex::new(HashMap::new()),
            push_order: order::Order::default(),
            in_flight: Arc::default(),
            net: cfg.net.clone(),
            cancel: CancellationToken::new(),
            lost: CancellationToken::new(),
            traffic: Traffic::default(),
            rt: tokio::runtime::Handle::current(),
        });
        // Heartbeats out, maps in; holds only a weak reference so dropping
        // the last Worker ends it.
        let weak = Arc::downgrade(&inner);
        let cancel = inner.cancel.clone();
        let gone = inner.lost.clone();
        let mut peer = manager;
        let (net, addr, limits, role, my_addr) = (
            cfg.net.clone(),
            cfg.manager.clone(),
            cfg.limits,
            cfg.role,
            cfg.addr.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                let mut lost = false;
                tokio::select! {
                    // Shut down: `shutdown` cancels before it closes the
                    // manager's link, so a closed link is then no loss to
                    // rejoin after (a rejoin's dial, cut off by the process
                    // ending, was logged by the manager as a refused
                    // handshake after a failed command's one line).
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        // Asked, not just sent: a manager that declared this
                        // node dead (it was frozen, or cut off) says so, and
                        // a worker that goes on as if nothing happened would
                        // count for nothing.
                        let ask = peer.request(control_request(id, 0, &Control::Heartbeat));
                        match tokio::time::timeout(heartbeat * 4, ask).await {
                            Ok(Ok(reply)) => {
                                if let Err(NodeError::Remote { code: ErrorCode::Invalid, message, .. }) =
                                    reply_control(&reply, peer.label())
                                {
                                    tracing::warn!(node = id, %message, "the manager no longer counts this worker");
                                    gone.cancel();
                                    break;
                                }
                            }
                            Ok(Err(_)) => lost = true,
                            // A slow answer is not a lost manager.
                            Err(_) => {}
                        }
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
                    // worker, for as long as the manager is away. Requests
                    // in flight to servers go on meanwhile.
                    let Some(who) = weak.upgrade().map(|inner| {
                        let map = lock(&inner.map).clone();
                        Rejoining {
                            id,
                            role,
                            addr: my_addr.clone(),
                            epoch: map.epoch,
                            lease_ms: map.lease_ms,
                            report: None,
                        }
                    }) else {
                        break;
                    };
                    let rejoined = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => break,
                        r = rejoin(&net, &addr, limits, &who) => r,
                    };
                    match rejoined {
                        Ok((p, rx, map)) => {
                            let Some(inner) = weak.upgrade() else { break };
                            *lock(&inner.manager) = p.clone();
                            inner.install(map);
                            peer = p;
                            notices = rx;
                        }
                        Err(e) => {
                            tracing::warn!(node = id, error = %e, "the manager refused this worker");
                            gone.cancel();
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

    /// Turns key caching and value compression on or off for later
    /// requests (see [`WorkerConfig::key_caching`] and
    /// [`WorkerConfig::compression`]).
    pub fn set_filters(&self, key_caching: bool, compression: Option<Packing>) {
        let mut f = lock(&self.inner.filters);
        f.cache_keys_from = key_caching.then_some(self.inner.min_cached_keys);
        f.compression = compression;
    }

    /// Sets the value filters of later requests (see [`ValueFilters`]);
    /// refused, changing nothing, when a setting is out of range. What the
    /// push filter carries stays carried.
    pub fn set_value_filters(&self, values: ValueFilters) -> Result<(), FilterError> {
        values.validate()?;
        lock(&self.inner.filters).values = values;
        Ok(())
    }

    /// The value filters of later requests.
    pub fn value_filters(&self) -> ValueFilters {
        lock(&self.inner.filters).values
    }

    /// Pushes, at `clock`, everything the significantly-modified push
    /// filter still carries for `table` (sums below its threshold): what
    /// was held back is then applied, so nothing pushed is lost. A push
    /// with no keys when nothing is carried.
    pub fn flush_residuals(&self, table: &str, clock: u64) -> Handle<Outcome> {
        let (keys, vals) = self.inner.take_residuals(table);
        let req = Request {
            table: table.into(),
            op: Op::Push,
            keys: Keys::List(keys),
            vals,
            clock: Some(clock),
            consistency: None,
        };
        // Not through the push filters again: this is what they held.
        self.dispatch(req)
    }

    /// This worker's group as the map last seen shows it.
    pub fn group(&self) -> Group {
        self.map()
            .node(self.inner.id)
            .map(|n| n.group.clone())
            .unwrap_or_default()
    }

    /// Moves this worker to `group` (a job's, or back to idle) and tells
    /// the map what it works on (`task`, shown by `pserver status`).
    /// Returns once this worker has the map that says so, so its next
    /// requests carry an epoch at which servers count it in the group. A
    /// worker in one job cannot join another before going idle.
    pub async fn join(&self, group: Group, task: &str) -> Result<Arc<ClusterMap>, NodeError> {
        let msg = Control::Join {
            group,
            task: task.to_string(),
        };
        match self.ask_manager(&msg).await? {
            Control::Map(map) => {
                self.inner.install(map);
                Ok(self.map())
            }
            other => Err(self.unexpected("Map", &other)),
        }
    }

    /// Sends `msg` to the manager and returns its answer (an error reply
    /// becomes the error).
    async fn ask_manager(&self, msg: &Control) -> Result<Control, NodeError> {
        let manager = self.inner.manager();
        let reply = manager
            .request(control_request(self.inner.id, 0, msg))
            .await?;
        reply_control(&reply, manager.label())
    }

    /// The error for an answer of the manager that is not the one expected.
    fn unexpected(&self, expected: &str, got: &Control) -> NodeError {
        NodeError::Protocol {
            peer: self.inner.manager().label().to_string(),
            what: format!("expected {expected}, got {got:?}"),
        }
    }

    /// Claims job `job` for this node, its scheduler: refused while another
    /// node that is still here holds it. The claim ends when this node
    /// leaves the cluster.
    pub async fn claim_job(&self, job: &str) -> Result<(), NodeError> {
        let msg = Control::ClaimJob {
            job: job.to_string(),
        };
        match self.ask_manager(&msg).await? {
            Control::Ok => Ok(()),
            other => Err(self.unexpected("Ok", &other)),
        }
    }

    /// Creates a table (or returns the existing one if it has the same spec).
    pub async fn create_table(
        &self,
        name: &str,
        opts: TableOptions,
    ) -> Result<TableSpec, NodeError> {
        let job = opts.job.or_else(|| match self.group() {
            Group::Job(j) => Some(j),
            _ => None,
        });
        let msg = Control::CreateTable(TableSpec {
            id: 0,
            name: name.to_string(),
            dim: opts.dim,
            init: opts.init,
            updater: opts.updater,
            consistency: opts.consistency,
            aggregate: opts.aggregate,
            job,
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
            let _ = tx.send(inner.execute(req, order, Vec::new()).await.map(|o| o.vals));
        });
        Handle { rx }
    }

    /// For a request that pushes: its place in the push chain ([`order`]).
    /// Pushes thus leave in the order they were made: a server keeps the
    /// highest clock each worker pushed to a range, so a later clock
    /// arriving first would make the earlier look like a duplicate.
    fn push_order(&self, req: &Request) -> Option<order::Place> {
        (req.op != Op::Pull).then(|| self.inner.push_order.enter())
    }

    /// Sends any request.
    pub fn send(&self, mut req: Request) -> Handle<Outcome> {
        let clock = *req.clock.get_or_insert_with(|| self.clock());
        // The push filters run here, in call order, so what they carry adds
        // up in the order the pushes were made.
        let req = self.inner.filter_push(req, clock);
        self.dispatch(req)
    }

    /// [`Worker::send`], writing the answer of a pull or push-pull into
    /// `spare`'s memory (an answer it returned before, say): a program that
    /// pulls the same large range again and again (dense weights at every
    /// step) then reuses one vector, where a fresh one of 64 MB costs the
    /// kernel a page fault and a zeroed page every 4 KiB (as much time as
    /// the transfer itself, measured). A `spare` shorter than the answer
    /// is not used; its contents never matter.
    pub fn send_into(&self, mut req: Request, spare: Vec<f32>) -> Handle<Outcome> {
        let clock = *req.clock.get_or_insert_with(|| self.clock());
        let req = self.inner.filter_push(req, clock);
        self.dispatch_into(req, spare)
    }

    /// Sends a request as it is.
    fn dispatch(&self, req: Request) -> Handle<Outcome> {
        self.dispatch_into(req, Vec::new())
    }

    /// Sends a request as it is, its answer into `spare` if it fits.
    fn dispatch_into(&self, mut req: Request, spare: Vec<f32>) -> Handle<Outcome> {
        req.clock.get_or_insert_with(|| self.clock());
        let order = self.push_order(&req);
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        self.inner.rt.spawn(async move {
            let _ = tx.send(inner.execute(req, order, spare).await);
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

    /// Leaves the cluster: closes the links to the manager (which then
    /// declares a worker dead at once, not by its lease) and to servers.
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.manager().shutdown();
        for link in lock(&self.inner.servers).values() {
            link.peer.shutdown();
        }
    }

    /// Says goodbye to the manager, then [`Worker::shutdown`]s: for a
    /// program that is done (`pserver kv`, say), so the manager counts its
    /// id gone at once and the servers forget its clocks, rather than
    /// after its lease. Call it once its requests are done: a push of it
    /// that a server meets after the map says it left is refused, not
    /// applied. Waits at most a heartbeat interval for the manager's
    /// answer; a manager that does not answer learns it from the lease.
    pub async fn leave(&self) {
        let peer = self.inner.manager();
        let wait = lock(&self.inner.map).heartbeat_interval();
        let bye = peer.request(control_request(self.inner.id, 0, &Control::Goodbye));
        let _ = tokio::time::timeout(wait, bye).await;
        self.shutdown();
    }

    /// Completes once this worker has lost the manager for good: the
    /// manager declared it dead (it was frozen or cut off past its lease,
    /// or did not rejoin a restarted manager in time). A manager that is
    /// away, however long, or one that does not know this worker, is not
    /// that: the worker keeps trying to rejoin. A long-running worker
    /// process should then stop.
    pub async fn lost(&self) {
        self.inner.lost.cancelled().await;
    }
}
