//! pserver's runtime: manager, server and worker nodes over TCP, driving the
//! I/O-free core in `pserver-core` with the wire format of `pserver-wire`.
//!
//! - [`net`]: the transport nodes dial and listen through (TCP by default).
//! - [`auth`]: the cluster secret and the handshake every connection opens with.
//! - [`tls`]: mutually authenticated TLS with a cluster CA, and test certificates.
//! - [`conn`]: framed connections, request/reply matching.
//! - [`durable`]: atomic, durable file replacement, used by every writer.
//! - [`manager`]: the manager node.
//! - [`server`]: the server node.
//! - [`worker`]: the client library the user's program (and the learning
//!   applications) call: push, pull, wait.
//! - [`local`]: a whole cluster in this process.
//! - [`metrics`]: every node's figures, health and readiness over HTTP.
//!
//! Every node is a value: a test can start many in one process.
//!
//! # Example
//!
//! ```no_run
//! use pserver_core::UpdaterSpec;
//! use pserver_node::local::{LocalCluster, LocalConfig};
//! use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
//!
//! # async fn demo() -> Result<(), pserver_node::NodeError> {
//! let cluster = LocalCluster::start(LocalConfig::default()).await?;
//! let w = Worker::connect(WorkerConfig::new(cluster.manager_addr().to_string())).await?;
//! w.create_table("weights", TableOptions::new(1, UpdaterSpec::Add)).await?;
//! w.push("weights", vec![1, 5, 9], vec![0.5, 1.0, 2.0]).await?;
//! let vals = w.pull("weights", vec![1, 5, 9]).await?;
//! assert_eq!(vals, vec![0.5, 1.0, 2.0]);
//! # Ok(()) }
//! ```

pub mod auth;
pub mod conn;
pub mod durable;
pub mod error;
pub mod local;
pub mod manager;
pub mod metrics;
pub mod net;
pub mod proto;
pub mod replica;
pub mod server;
pub mod snapshot;
pub mod tls;
mod window;
pub mod worker;

pub use error::NodeError;
pub use tokio_util::sync::CancellationToken;
