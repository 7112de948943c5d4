//! The cases: sparse requests against one server (with the preload before
//! the large ones), a dense range, and several servers and workers at once.
//! Each runs every operation `--reps` times and reports medians.

use super::keys::{KeyStream, Pool};
use super::load::{self, Case, OPS, Source, op_name};
use super::procs::{Ceilings, Procs};
use super::report::{CaseReport, CaseSpec, ClusterReport, DenseReport, PreloadReport, thousands};
use super::{Settings, Shape, connect, create_table, progress, stats, wait_for_servers};
use anyhow::{Context, Result};
use pserver_core::KeyRange;
use pserver_node::worker::{Op, Worker};
use std::time::Instant;

/// Runs every repetition of one case on one worker.
pub async fn repeat(
    w: &Worker,
    case: &Case<'_>,
    source: &mut Source<'_>,
    s: &Settings,
) -> Result<Vec<stats::Run>> {
    let mut runs = Vec::with_capacity(s.reps);
    for _ in 0..s.reps {
        runs.push(load::run(w, case, source, s.duration).await?);
    }
    Ok(runs)
}

/// Progress line of a finished case.
fn case_done(label: &str, c: &CaseReport) {
    progress(&format!(
        "{label} {} of {} key{} at depth {}: {:.0} req/s, {:.2}M keys/s, p50 {:.1} us",
        c.op,
        thousands(c.keys as u64),
        if c.keys == 1 { "" } else { "s" },
        c.depth,
        c.figures.req_per_s,
        c.figures.keys_per_s / 1e6,
        c.figures.p50_us
    ));
}

/// Pushes `total` fresh keys into `table`, 1M per request, two in flight
/// (the next list is drawn while one is on its way).
pub async fn preload(
    w: &Worker,
    table: &str,
    dim: usize,
    total: u64,
    stream: &mut KeyStream,
) -> Result<f64> {
    const CHUNK: u64 = 1 << 20;
    let started = Instant::now();
    let mut pending = None;
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK) as usize;
        let keys = stream.sorted(n);
        w.advance();
        let h = w.push(table, keys, vec![1.0; n * dim]);
        if let Some(before) = pending.replace(h) {
            before.await.context("preloading the table")?;
        }
        left -= n as u64;
    }
    if let Some(last) = pending {
        last.await.context("preloading the table")?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The sparse cases on one worker: for each request size, each operation
/// (and each depth, for 1-key requests), `reps` repetitions.
pub async fn sparse_cases(
    w: &Worker,
    s: &Settings,
    ceilings: &Ceilings,
    stream: &mut KeyStream,
) -> Result<(Vec<CaseReport>, Option<PreloadReport>)> {
    let table = create_table(w, "sparse", s.dim).await?;
    let mut table_keys = 0u64;
    let mut preloaded = None;
    let mut cases = Vec::new();
    for &n in &s.keys {
        if preloaded.is_none() && s.preload > 0 && n >= s.preload_from {
            progress(&format!("preloading {} keys", thousands(s.preload)));
            let seconds = preload(w, &table, s.dim, s.preload, stream).await?;
            table_keys += s.preload;
            preloaded = Some(PreloadReport {
                keys: s.preload,
                seconds,
                before_keys: n,
            });
        }
        let mut pool = Pool::new(stream, n);
        let depths = if n == 1 { s.depths.clone() } else { vec![1] };
        for op in OPS {
            for &depth in &depths {
                let case = Case {
                    table: &table,
                    op,
                    dim: s.dim,
                    depth,
                };
                let runs = repeat(w, &case, &mut Source::Lists(&mut pool), s).await?;
                let spec = CaseSpec {
                    op: op_name(op),
                    keys: n,
                    depth,
                    workers: 1,
                    table_keys: Some(table_keys),
                    dense: false,
                };
                table_keys += pool.take_stored();
                let c = CaseReport::new(spec, runs, ceilings);
                case_done("sparse", &c);
                cases.push(c);
            }
        }
    }
    Ok((cases, preloaded))
}

/// Push, pull and push-pull of the dense range `[0, n)`, whole, in a table
/// of `--dense-dim` floats per key.
pub async fn dense_cases(
    w: &Worker,
    s: &Settings,
    ceilings: &Ceilings,
    n: usize,
) -> Result<DenseReport> {
    let table = create_table(w, "dense", s.dense_dim).await?;
    let range = KeyRange {
        begin: 0,
        end: n as u64,
    };
    let mut stored = 0;
    let mut cases = Vec::new();
    for op in OPS {
        let case = Case {
            table: &table,
            op,
            dim: s.dense_dim,
            depth: 1,
        };
        let runs = repeat(w, &case, &mut Source::Range(range), s).await?;
        let spec = CaseSpec {
            op: op_name(op),
            keys: n,
            depth: 1,
            workers: 1,
            table_keys: Some(stored),
            dense: true,
        };
        if op != Op::Pull {
            stored = n as u64;
        }
        let c = CaseReport::new(spec, runs, ceilings);
        case_done("dense", &c);
        cases.push(c);
    }
    Ok(DenseReport {
        keys: n,
        dim: s.dense_dim,
        cases,
    })
}

/// One repetition of the cluster case: every worker runs the same case at
/// once, each on its own task with its own keys; the counts add up.
async fn cluster_rep(
    workers: &[Worker],
    pools: &mut Vec<Pool>,
    table: &str,
    op: Op,
    s: &Settings,
) -> Result<stats::Run> {
    let mut tasks = Vec::new();
    for (w, mut pool) in workers.iter().cloned().zip(pools.drain(..)) {
        let (table, dim, duration) = (table.to_string(), s.dim, s.duration);
        tasks.push(tokio::spawn(async move {
            let case = Case {
                table: &table,
                op,
                dim,
                depth: 1,
            };
            let run = load::run(&w, &case, &mut Source::Lists(&mut pool), duration).await;
            (pool, run)
        }));
    }
    let mut total = stats::Run::default();
    for t in tasks {
        let (pool, run) = t.await.context("a cluster worker's task")?;
        pools.push(pool);
        total = total.merge(run?);
    }
    Ok(total)
}

/// `shape.servers` server processes and `shape.workers` workers in this
/// process sending `--cluster-keys` keys per request at once.
pub async fn cluster_cases(
    s: &Settings,
    shape: Shape,
    ceilings: &Ceilings,
    stream: &mut KeyStream,
) -> Result<ClusterReport> {
    let label = format!("{}x{}", shape.servers, shape.workers);
    progress(&format!("{label}: starting {} servers", shape.servers));
    let mut procs = Procs::new(&s.child_args);
    let result = cluster_run(s, shape, ceilings, stream, &mut procs).await;
    result.map_err(|e| procs.explain(e))
}

/// The cluster case on `procs`, started here.
async fn cluster_run(
    s: &Settings,
    shape: Shape,
    ceilings: &Ceilings,
    stream: &mut KeyStream,
    procs: &mut Procs,
) -> Result<ClusterReport> {
    let label = format!("{}x{}", shape.servers, shape.workers);
    let manager = procs.start_cluster(shape.servers)?;
    let mut workers = Vec::new();
    for _ in 0..shape.workers {
        workers.push(connect(&manager, &s.net).await?);
    }
    wait_for_servers(&workers[0], shape.servers).await?;
    let table = create_table(&workers[0], "cluster", s.dim).await?;
    // Every worker starts from the map with the table and all servers, so
    // no measured request is redirected (a redirect carries the whole map,
    // bytes the figures would count).
    for w in &workers {
        w.refresh().await?;
    }
    let mut pools: Vec<Pool> = (0..shape.workers)
        .map(|_| Pool::new(stream, s.cluster_keys))
        .collect();
    let mut table_keys = 0;
    let mut cases = Vec::new();
    for op in OPS {
        let mut runs = Vec::new();
        for _ in 0..s.reps {
            runs.push(cluster_rep(&workers, &mut pools, &table, op, s).await?);
        }
        let spec = CaseSpec {
            op: op_name(op),
            keys: s.cluster_keys,
            depth: 1,
            workers: shape.workers,
            table_keys: Some(table_keys),
            dense: false,
        };
        table_keys += pools.iter_mut().map(Pool::take_stored).sum::<u64>();
        let c = CaseReport::new(spec, runs, ceilings);
        case_done(&label, &c);
        cases.push(c);
    }
    for w in &workers {
        w.shutdown();
    }
    Ok(ClusterReport {
        servers: shape.servers,
        workers: shape.workers,
        keys: s.cluster_keys,
        cases,
    })
}
