//! `pserver experiment filters`: bytes on the wire with each filter.

use super::{BLOCKS, KKT, flights, one_run};
use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_apps::report::format_bytes;
use pserver_apps::train::TrainConfig;
use pserver_node::worker::{Packing, ValueFilters};

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
    /// Threshold of the significantly-modified filter on servers' replies
    /// in its rows.
    #[arg(long, default_value_t = 0.001, value_parser = crate::parse::threshold)]
    significant: f32,
    /// Threshold of the significantly-modified filter on workers' pushes
    /// (DBPG's gradient) in its rows.
    #[arg(long, default_value_t = 0.1, value_parser = crate::parse::threshold)]
    significant_push: f32,
    /// Probability of random skip in its rows.
    #[arg(long, default_value_t = 0.2, value_parser = crate::parse::probability)]
    random_skip: f64,
}

/// One row: its name, the KKT margin, key caching, compression and the
/// value filters.
type Case = (String, Option<f32>, bool, Option<Packing>, ValueFilters);

/// Bytes on the wire with each filter, against none: the paper's
/// communication experiment.
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
    let none = ValueFilters::default();
    let pull = ValueFilters {
        significant_pull: Some(args.significant),
        ..none
    };
    let push = ValueFilters {
        significant_push: Some(args.significant_push),
        ..none
    };
    let skip = ValueFilters {
        random_skip: Some(args.random_skip),
        ..none
    };
    let every = ValueFilters {
        significant_pull: Some(args.significant),
        significant_push: Some(args.significant_push),
        random_skip: Some(args.random_skip),
        ..none
    };
    let (t, tp, p) = (args.significant, args.significant_push, args.random_skip);
    let cases: Vec<Case> = vec![
        ("none".into(), None, false, None, none),
        ("key caching".into(), None, true, None, none),
        (
            "compression (lossless)".into(),
            None,
            false,
            Some(Packing::Lossless),
            none,
        ),
        (
            "compression (fixed16)".into(),
            None,
            false,
            Some(Packing::Fixed16),
            none,
        ),
        ("KKT".into(), Some(KKT), false, None, none),
        (
            format!("significantly-modified, servers' replies ({t})"),
            None,
            false,
            None,
            pull,
        ),
        (
            format!("significantly-modified, workers' pushes ({tp})"),
            None,
            false,
            None,
            push,
        ),
        (format!("random skip ({p})"), None, false, None, skip),
        ("KKT + key caching".into(), Some(KKT), true, None, none),
        (
            format!("KKT + key caching + significantly-modified replies ({t})"),
            Some(KKT),
            true,
            None,
            pull,
        ),
        (
            "all before: KKT + key caching + fixed16".into(),
            Some(KKT),
            true,
            Some(Packing::Fixed16),
            none,
        ),
        (
            format!(
                "all: KKT + key caching + fixed16 + significantly-modified both ways ({t}, {tp}) + random skip ({p})"
            ),
            Some(KKT),
            true,
            Some(Packing::Fixed16),
            every,
        ),
    ];
    println!(
        "| filters | worker bytes sent | server bytes sent | workers vs none | servers vs none | test AUC | test log-loss | nnz | saved by filters | seconds (noisy) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut first = None;
    for (name, kkt, key_caching, compression, value_filters) in cases {
        let cfg = TrainConfig {
            kkt,
            key_caching,
            compression,
            value_filters,
            ..base.clone()
        };
        cfg.validate()?;
        let r = one_run(&cfg, args.servers)
            .await
            .with_context(|| format!("filters {name}"))?;
        // Servers send what workers receive (these runs have no replicas).
        let (w, s) = (r.bytes_sent, r.bytes_received);
        let (w0, s0) = *first.get_or_insert((w, s));
        println!(
            "| {name} | {} | {} | {:.2}x | {:.2}x | {:.4} | {:.4} | {} | {} | {:.2} |",
            format_bytes(w),
            format_bytes(s),
            w0 as f64 / w.max(1) as f64,
            s0 as f64 / s.max(1) as f64,
            r.test.auc,
            r.test.logloss,
            r.nnz,
            format_bytes(r.bytes_saved),
            r.train_seconds,
        );
    }
    Ok(())
}
