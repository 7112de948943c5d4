//! `pserver experiment filters`: bytes on the wire with each filter.

use super::{BLOCKS, KKT, flights, one_run};
use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_apps::report::format_bytes;
use pserver_apps::train::TrainConfig;
use pserver_node::worker::Packing;

/// `pserver experiment filters` flags.
#[derive(Args, Debug)]
pub(super) struct FiltersArgs {
    /// Servers of each run's local cluster.
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Bounded delay of every run.
    #[arg(long, default_value_t = 1)]
    tau: u64,
}

/// Bytes on the wire with each filter, against none: the paper's
/// communication experiment, for the filters built so far.
pub(super) async fn run(args: FiltersArgs) -> Result<()> {
    if args.servers == 0 {
        bail!("--servers must be at least 1");
    }
    let base = TrainConfig {
        tau: args.tau,
        ..flights(args.workers, args.epochs, false)?
    };
    base.validate()?;
    println!(
        "filters experiment: dbpg on {}, {} servers, {} workers, {} epochs x {} blocks, tau {}",
        base.train.display(),
        args.servers,
        args.workers,
        args.epochs,
        BLOCKS,
        args.tau
    );
    let cases: [(&str, Option<f32>, bool, Option<Packing>); 7] = [
        ("none", None, false, None),
        ("key caching", None, true, None),
        (
            "compression (lossless)",
            None,
            false,
            Some(Packing::Lossless),
        ),
        ("compression (fixed16)", None, false, Some(Packing::Fixed16)),
        ("KKT", Some(KKT), false, None),
        ("KKT + key caching", Some(KKT), true, None),
        (
            "all: KKT + key caching + fixed16",
            Some(KKT),
            true,
            Some(Packing::Fixed16),
        ),
    ];
    println!(
        "| filters | worker bytes sent | server bytes sent | workers vs none | servers vs none | test AUC | nnz |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut none = None;
    for (name, kkt, key_caching, compression) in cases {
        let cfg = TrainConfig {
            kkt,
            key_caching,
            compression,
            ..base.clone()
        };
        let r = one_run(&cfg, args.servers)
            .await
            .with_context(|| format!("filters {name}"))?;
        // Servers send what workers receive (these runs have no replicas).
        let (w, s) = (r.bytes_sent, r.bytes_received);
        let (w0, s0) = *none.get_or_insert((w, s));
        println!(
            "| {name} | {} | {} | {:.2}x | {:.2}x | {:.4} | {} |",
            format_bytes(w),
            format_bytes(s),
            w0 as f64 / w.max(1) as f64,
            s0 as f64 / s.max(1) as f64,
            r.test.auc,
            r.nnz
        );
    }
    Ok(())
}
