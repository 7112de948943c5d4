//! The server node: holds its key ranges of every table, applies pushes
//! through the table's updater, answers pulls once the consistency model
//! allows, replicates down chains, and redirects requests sent under a
//! stale map.
//!
//! Two halves: [`core`] decides (a state machine without I/O: inputs in,
//! effects out), and `runtime` carries the effects out over tokio: it reads
//! frames from connections, keeps the queues to the next servers of chains
//! ([`Forwarder`](crate::replica::Forwarder)), talks to the manager, writes
//! checkpoint files and sends replies.

pub mod core;
mod runtime;
pub mod stats;

use crate::net::Net;
use pserver_core::NodeId;
use pserver_core::updater::Registry;
use pserver_wire::Limits;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use runtime::start_server;

/// How to run a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The manager's address.
    pub manager: String,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// The address the map gives for this server, if not the one bound:
    /// a name or address others can reach when listening on `0.0.0.0`,
    /// or a relay in front of it.
    pub advertise: Option<String>,
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
    /// [`Threads::new`](pserver_core::store::Threads::new): rounded down
    /// to a power of two, at most 8); the machine's cores by default. The
    /// server starts all but one of them once, for all its tables.
    pub apply_threads: usize,
    /// Most entries the significantly-modified filter's shadows hold, over
    /// every connection and table (each a key, a sequence number and the
    /// table's `dim` floats, about 40 bytes at `dim` 1); past it the least
    /// recently used shadow is dropped (its connection's next pull comes in
    /// full), and when none is left new entries are sent every time. 0
    /// turns the filter off: filtered pulls are answered in full.
    pub significant_entries: usize,
    /// How long to keep trying to reach the manager at start (it may start
    /// after this server); zero: one attempt, an unreachable manager is an
    /// error at once.
    pub manager_wait: std::time::Duration,
    /// The id to come back under (`pserver server --id`): that of a server
    /// the manager declared dead, whose ring positions and ranges this one
    /// takes over, starting empty like any joining server (the ranges are
    /// copied to it). `None`: the manager gives a new id.
    pub id: Option<NodeId>,
}

/// Default of [`ServerConfig::key_cache_keys`]: 16 Mi keys, 128 MiB of keys.
pub const DEFAULT_KEY_CACHE_KEYS: usize = 16 << 20;

/// Default of [`ServerConfig::significant_entries`]: 4 Mi entries, about
/// 160 MiB at `dim` 1.
pub const DEFAULT_SIGNIFICANT_ENTRIES: usize = 4 << 20;

impl ServerConfig {
    /// A server of the manager at `manager`, on a free loopback port.
    pub fn new(manager: impl Into<String>) -> ServerConfig {
        ServerConfig {
            manager: manager.into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            limits: Limits::default(),
            registry: Registry::new(),
            key_cache_keys: DEFAULT_KEY_CACHE_KEYS,
            replicate_after_aggregation: true,
            net: Net::tcp(),
            apply_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            significant_entries: DEFAULT_SIGNIFICANT_ENTRIES,
            manager_wait: std::time::Duration::ZERO,
            id: None,
        }
    }
}

/// A running server.
pub struct ServerHandle {
    id: NodeId,
    addr: SocketAddr,
    cancel: CancellationToken,
    replicated: Arc<std::sync::atomic::AtomicU64>,
    exporter: Arc<dyn crate::metrics::Exporter>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// What this server tells a metrics listener
    /// ([`metrics::serve`](crate::metrics::serve)): its counters and
    /// figures, and whether it serves its ranges.
    pub fn exporter(&self) -> Arc<dyn crate::metrics::Exporter> {
        Arc::clone(&self.exporter)
    }

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
