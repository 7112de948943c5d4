//! Learning applications on pserver. They use only the public worker API
//! (`pserver_node::worker`), to show it is enough.
//!
//! - [`metrics`]: log-loss, AUC, accuracy.
//! - [`plot`]: the convergence curve as SVG.
//! - [`report`]: the figures of a training run, as a table and as JSON.
//! - [`model`]: trained weights on disk, with checksums.

pub mod metrics;
pub mod model;
pub mod plot;
pub mod report;
