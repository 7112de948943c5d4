//! Learning applications on pserver. They use only the public worker API
//! (`pserver_node::worker`), to show it is enough.
//!
//! - [`dataset`]: a worker's rows in memory, by row or by column.
//! - [`cpu`]: long computations in async code, off the runtime's way.
//! - [`dbpg`]: delayed block proximal gradient, a worker's side.
//! - [`ftrl`]: asynchronous SGD with FTRL-Proximal, a worker's side.
//! - [`train`]: a whole run: load shards, run workers, score, collect.
//! - [`tune`]: `--tune`: `l1`/`l2` chosen on a validation split by a warm-started path.
//! - [`progress`]: what a run reports while it goes.
//! - [`gauges`]: a job's figures for the metrics listener (`--metrics-listen`).
//! - [`metrics`]: log-loss, AUC, accuracy.
//! - [`plot`]: the convergence curve as SVG.
//! - [`report`]: the figures of a training run, as a table and as JSON.
//! - [`model`]: trained weights on disk, with checksums.

pub mod cpu;
pub mod dataset;
pub mod dbpg;
pub mod ftrl;
pub mod gauges;
pub mod job;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod progress;
pub mod report;
pub mod train;
pub mod tune;
