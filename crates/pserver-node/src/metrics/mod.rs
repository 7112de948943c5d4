//! Metrics, health and readiness of a node, served over HTTP.
//!
//! Every node value can give an [`Exporter`]: what it counts, as a
//! [`Scrape`] (plain data, rendered in the Prometheus text format by the
//! `prometheus-client` crate), and whether it is ready to serve. There is
//! no global registry: each node owns its counters, so a test can run a
//! whole cluster in one process and scrape each node apart.
//! [`http::serve`] answers `GET /metrics`, `/healthz` and `/readyz` from
//! one exporter, within bounds ([`http::HttpLimits`]).
//!
//! A process that must answer before its node exists (a server waiting
//! for its manager) serves a [`Slot`], which says why it is not ready until
//! the node is put in it.

pub mod histogram;
pub mod http;
pub mod manager;
pub mod scrape;

pub use http::{Endpoint, HttpLimits, serve};
pub use scrape::{Family, MetricKind, MetricUnit, Sample, Scrape, Value};

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

/// A boxed future, as [`Exporter`]'s methods return (the trait is used
/// as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a node tells the metrics listener.
pub trait Exporter: Send + Sync + 'static {
    /// Its figures now.
    fn scrape(&self) -> BoxFuture<'_, Scrape>;
    /// `Ok` when it serves what it is for; otherwise why not, in one line.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// An exporter to be filled in later: until [`Slot::set`], it scrapes as
/// nothing and is not ready, saying `waiting`.
pub struct Slot {
    waiting: String,
    node: OnceLock<Arc<dyn Exporter>>,
}

impl Slot {
    /// An empty slot, not ready because of `waiting`.
    pub fn new(waiting: impl Into<String>) -> Arc<Slot> {
        Arc::new(Slot {
            waiting: waiting.into(),
            node: OnceLock::new(),
        })
    }

    /// Puts the node in (once; later calls are ignored).
    pub fn set(&self, node: Arc<dyn Exporter>) {
        let _ = self.node.set(node);
    }
}

impl Exporter for Slot {
    fn scrape(&self) -> BoxFuture<'_, Scrape> {
        Box::pin(async move {
            match self.node.get() {
                Some(n) => n.scrape().await,
                None => Scrape::default(),
            }
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match self.node.get() {
                Some(n) => n.ready().await,
                None => Err(self.waiting.clone()),
            }
        })
    }
}

/// Several nodes of one process behind one listener (`pserver train`'s
/// scheduler and its local cluster): their scrapes merged under a `node`
/// label ([`Scrape::merge`]); ready when every one is, else the first
/// reason, naming its node.
pub struct Merged(pub Vec<(String, Arc<dyn Exporter>)>);

impl Exporter for Merged {
    fn scrape(&self) -> BoxFuture<'_, Scrape> {
        Box::pin(async move {
            let mut parts = Vec::with_capacity(self.0.len());
            for (name, e) in &self.0 {
                parts.push((name.clone(), e.scrape().await));
            }
            Scrape::merge(parts)
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for (name, e) in &self.0 {
                e.ready().await.map_err(|why| format!("{name}: {why}"))?;
            }
            Ok(())
        })
    }
}
