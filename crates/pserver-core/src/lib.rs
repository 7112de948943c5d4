//! The core of pserver: plain data and functions, no sockets, no files, no clocks
//! of its own. The runtime (`pserver-node`) drives these types; tests drive them
//! directly.
//!
//! - [`key`]: keys and half-open key ranges.
//! - [`ring`]: consistent-hashing placement of servers on the key ring.
//! - [`map`]: the cluster map (nodes, partitions, tables, epoch) and key slicing.
//! - [`spec`]: what a table is (dim, initializer, updater, consistency).
//! - [`updater`]: the user-defined functions a server runs on a push.
//! - [`store`]: a server's storage for one table.
//! - [`rows`]: the inline hash table of key rows a store keeps.
//! - [`table`]: one table on one server: store, range clock and unapplied sums, one push path.
//! - [`clock`]: range vector clocks (consistency and duplicate rejection).
//! - [`membership`]: the manager's state machine (registration, leases, barriers).
//! - [`keycache`]: key caching: the key-list hash and a server's bounded cache of lists.
//! - [`push_filter`]: filters on a worker's pushes: residuals of the significantly-modified filter, random skip.
//! - [`significant`]: the significantly-modified filter: a server's shadows of what it sent, a worker's mirror of what it received.
//! - [`transition`]: the intermediate map that hands ranges to new primaries without losing writes.

pub mod clock;
pub mod key;
pub mod keycache;
pub mod map;
pub mod membership;
pub mod push_filter;
pub mod ring;
pub mod rows;
pub mod significant;
pub mod spec;
pub mod store;
pub mod table;
pub mod transition;
pub mod updater;

pub use key::{KEY_END, Key, KeyRange};
pub use map::{ClusterMap, NodeId, NodeInfo, NodeState, Partition, Role};
pub use spec::{Consistency, Init, TableSpec, UpdaterSpec};
