//! A whole cluster in this process: one manager and `S` servers on loopback.

use crate::error::NodeError;
use crate::manager::{ManagerConfig, ManagerHandle, start_manager};
use crate::server::{ServerConfig, ServerHandle, start_server};
use pserver_core::membership::MembershipConfig;
use pserver_core::updater::Registry;
use std::net::SocketAddr;

/// How big a local cluster to start.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// Number of servers.
    pub servers: usize,
    /// Manager settings (listen address, replicas, vnodes, lease).
    pub manager: ManagerConfig,
    /// User updaters every server can build.
    pub registry: Registry,
    /// See [`ServerConfig::replicate_after_aggregation`].
    pub replicate_after_aggregation: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            servers: 2,
            manager: ManagerConfig {
                membership: MembershipConfig::default(),
                ..ManagerConfig::default()
            },
            registry: Registry::new(),
            replicate_after_aggregation: true,
        }
    }
}

/// A running local cluster.
pub struct LocalCluster {
    /// The manager.
    pub manager: ManagerHandle,
    /// The servers, in start order.
    pub servers: Vec<ServerHandle>,
}

impl LocalCluster {
    /// Starts the manager, then the servers; returns once every server is registered.
    pub async fn start(cfg: LocalConfig) -> Result<LocalCluster, NodeError> {
        if cfg.servers == 0 {
            return Err(NodeError::BadRequest(
                "a cluster needs at least one server".into(),
            ));
        }
        let manager = start_manager(cfg.manager.clone()).await?;
        let mut servers = Vec::new();
        for _ in 0..cfg.servers {
            let mut sc = ServerConfig::new(manager.addr().to_string());
            sc.limits = cfg.manager.limits;
            sc.registry = cfg.registry.clone();
            sc.replicate_after_aggregation = cfg.replicate_after_aggregation;
            sc.net = cfg.manager.net.clone();
            servers.push(start_server(sc).await?);
        }
        Ok(LocalCluster { manager, servers })
    }

    /// The manager's address.
    pub fn manager_addr(&self) -> SocketAddr {
        self.manager.addr()
    }

    /// Bytes every server has sent down replica chains.
    pub fn replicated_bytes(&self) -> u64 {
        self.servers
            .iter()
            .map(ServerHandle::replicated_bytes)
            .sum()
    }

    /// Stops every node and gives their tasks a moment to end while the
    /// runtime still runs: a program that returns right after a
    /// [`LocalCluster::shutdown`] may drop the runtime under a task still
    /// winding down (one back from `block_in_place` then finds no timer).
    pub async fn stop(&self) {
        self.shutdown();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    /// Stops every node (each, stopping, takes the others' going quietly).
    pub fn shutdown(&self) {
        for s in &self.servers {
            s.shutdown();
        }
        self.manager.shutdown();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
