//! The cases: sparse requests against one server (with the preload before
//! the large ones), the small and zipf key sets, a dense range, and several
//! servers and workers at once. Each runs every operation `--reps` times
//! and reports medians; each sparse case of one server has the store
//! alone's figure on the same keys beside it.

use super::alone::{self, Mirror};
use super::keys::{self, KeyStream, PRELOAD_CHUNK, Pool};
use super::load::{self, Case, OPS, Source, op_name};
use super::procs::{Ceilings, Procs};
use super::report::{
    CaseReport, CaseSpec, ClusterReport, DenseReport, KeysetReport, PreloadReport, StoreReport,
    thousands,
};
use super::{Keyset, Settings, Shape, connect, create_table, progress, stats, wait_for_servers};
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
    let store = match (&c.store, c.vs_store) {
        (Some(st), Some(r)) => {
            format!("; store alone {:.2}M keys/s ({r:.2}x)", st.keys_per_s / 1e6)
        }
        _ => String::new(),
    };
    progress(&format!(
        "{label} {} of {} key{} at depth {}: {:.0} req/s, {:.2}M keys/s, p50 {:.1} us{store}",
        c.op,
        thousands(c.keys as u64),
        if c.keys == 1 { "" } else { "s" },
        c.depth,
        c.figures.req_per_s,
        c.figures.keys_per_s / 1e6,
        c.figures.p50_us
    ));
}

/// The sizes of the requests of a preload of `total` keys.
fn chunk_sizes(total: u64) -> impl Iterator<Item = usize> + Send + 'static {
    (0..total)
        .step_by(PRELOAD_CHUNK as usize)
        .map(move |first| (total - first).min(PRELOAD_CHUNK) as usize)
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
    preload_chunks(w, table, dim, chunk_sizes(total).map(|n| stream.sorted(n))).await
}

/// Pushes each list of `chunks` (sorted, unique) into `table`, two in
/// flight, and returns the seconds it took.
async fn preload_chunks(
    w: &Worker,
    table: &str,
    dim: usize,
    chunks: impl Iterator<Item = Vec<u64>>,
) -> Result<f64> {
    let started = Instant::now();
    let mut pending = None;
    for keys in chunks {
        let n = keys.len();
        w.advance();
        let h = w.push(table, keys, vec![1.0; n * dim]);
        if let Some(before) = pending.replace(h) {
            before.await.context("preloading the table")?;
        }
    }
    if let Some(last) = pending {
        last.await.context("preloading the table")?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The store alone's repetitions of `op` on `mirror`'s lists (none
/// without a mirror: `--no-store`).
async fn store_alone(
    mirror: &mut Option<Mirror>,
    op: Op,
    s: &Settings,
) -> Result<Option<StoreReport>> {
    let Some(m) = mirror.take() else {
        return Ok(None);
    };
    let (m, report) = alone::measure(m, op, s.reps, s.store_duration).await?;
    *mirror = Some(m);
    Ok(Some(report))
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
    let mut mirror = s.store.then(|| Mirror::new(s.dim)).transpose()?;
    let mut table_keys = 0u64;
    let mut preloaded = None;
    let mut cases = Vec::new();
    for &n in &s.keys {
        if preloaded.is_none() && s.preload > 0 && n >= s.preload_from {
            progress(&format!("preloading {} keys", thousands(s.preload)));
            // The store alone gets the very same keys: a copy of the stream
            // replays them (and the stream itself moves on as before).
            let mut replay = stream.clone();
            let seconds = preload(w, &table, s.dim, s.preload, stream).await?;
            if let Some(m) = mirror.take() {
                progress("store alone: the same preload in this process");
                let chunks = chunk_sizes(s.preload).map(move |n| replay.sorted(n));
                mirror = Some(alone::preload(m, chunks).await?);
            }
            table_keys += s.preload;
            preloaded = Some(PreloadReport {
                keys: s.preload,
                seconds,
                before_keys: n,
            });
        }
        let mut pool = Pool::new(stream, n);
        if let Some(m) = &mut mirror {
            m.use_lists(pool.lists());
        }
        let depths = if n == 1 { s.depths.clone() } else { vec![1] };
        for op in OPS {
            // Measured once per operation, after its first depth, and shown
            // beside every depth (the store has no requests in flight).
            let mut store = None;
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
                if store.is_none() {
                    store = store_alone(&mut mirror, op, s).await?;
                }
                let c = CaseReport::new(spec, runs, ceilings).with_store(store.clone());
                case_done("sparse", &c);
                cases.push(c);
            }
        }
    }
    Ok((cases, preloaded))
}

/// The small and zipf key sets of `--keyset`, in that order, against one
/// server process started here (or the cluster at `--manager`).
pub async fn keyset_cases(
    s: &Settings,
    ceilings: &Ceilings,
    procs: &mut Procs,
) -> Result<Vec<KeysetReport>> {
    let manager = match &s.manager {
        Some(m) => m.clone(),
        None => procs.start_cluster(1)?,
    };
    let w = connect(&manager, &s.net).await?;
    let mut reports = Vec::new();
    for &set in &s.keysets {
        let report = match set {
            Keyset::Random => continue,
            Keyset::Small => small_set(&w, s, ceilings).await?,
            Keyset::Zipf => zipf_set(&w, s, ceilings).await?,
        };
        reports.push(report);
    }
    w.shutdown();
    Ok(reports)
}

/// One fixed list of `--keyset-keys` keys, every request the same: a table
/// of just these keys, which stays in the cache.
async fn small_set(w: &Worker, s: &Settings, ceilings: &Ceilings) -> Result<KeysetReport> {
    let table = create_table(w, "small", s.dim).await?;
    let list = keys::small_list(s.keyset_keys);
    let distinct = list.len() as f64;
    let mirror = s.store.then(|| Mirror::new(s.dim)).transpose()?;
    let set = KeySet {
        pool: Pool::from_lists(vec![list]),
        table_keys: 0,
        grows: true,
        label: "1x1 small".into(),
    };
    let cases = keyset_ops(w, s, ceilings, &table, set, mirror).await?;
    Ok(KeysetReport {
        keyset: "small".into(),
        draws: s.keyset_keys,
        zipf_s: None,
        universe: None,
        lists: 1,
        distinct_keys_mean: distinct,
        preload: None,
        cases,
    })
}

/// `--keyset-keys` Zipf draws per request from `--universe` keys, all of
/// which the table (and the store alone) holds before the first case.
async fn zipf_set(w: &Worker, s: &Settings, ceilings: &Ceilings) -> Result<KeysetReport> {
    let table = create_table(w, "zipf", s.dim).await?;
    let universe = s.zipf.universe;
    progress(&format!(
        "zipf: preloading the universe of {} keys",
        thousands(universe)
    ));
    let seconds = preload_chunks(w, &table, s.dim, keys::universe_chunks(universe)).await?;
    let mirror = match s.store {
        true => {
            progress("store alone: the same preload in this process");
            let m = Mirror::new(s.dim)?;
            Some(alone::preload(m, keys::universe_chunks(universe)).await?)
        }
        false => None,
    };
    let lists = s.zipf.lists()?;
    let (count, distinct) = (lists.len(), keys::mean_len(&lists));
    // Every key drawn is in the preloaded universe: pushes store no new one.
    let set = KeySet {
        pool: Pool::from_lists(lists),
        table_keys: universe,
        grows: false,
        label: format!("1x1 zipf s={}", s.zipf.s),
    };
    let cases = keyset_ops(w, s, ceilings, &table, set, mirror).await?;
    Ok(KeysetReport {
        keyset: "zipf".into(),
        draws: s.keyset_keys,
        zipf_s: Some(s.zipf.s),
        universe: Some(universe),
        lists: count,
        distinct_keys_mean: distinct,
        preload: Some(PreloadReport {
            keys: universe,
            seconds,
            before_keys: s.keyset_keys,
        }),
        cases,
    })
}

/// A key set's requests, as its cases take them.
struct KeySet {
    /// The lists, in turn.
    pool: Pool,
    /// Keys the table holds at the start.
    table_keys: u64,
    /// Whether pushes store new keys (counted by the pool: lists that share
    /// no key, nor any with the table).
    grows: bool,
    /// The progress lines' label.
    label: String,
}

/// Push, pull and push-pull of a key set on `table`, each beside the store
/// alone (`mirror`, holding what the table holds) on the same lists.
async fn keyset_ops(
    w: &Worker,
    s: &Settings,
    ceilings: &Ceilings,
    table: &str,
    mut set: KeySet,
    mut mirror: Option<Mirror>,
) -> Result<Vec<CaseReport>> {
    if let Some(m) = &mut mirror {
        m.use_lists(set.pool.lists());
    }
    let mut cases = Vec::new();
    for op in OPS {
        let case = Case {
            table,
            op,
            dim: s.dim,
            depth: 1,
        };
        let runs = repeat(w, &case, &mut Source::Lists(&mut set.pool), s).await?;
        let spec = CaseSpec {
            op: op_name(op),
            keys: s.keyset_keys,
            depth: 1,
            workers: 1,
            table_keys: Some(set.table_keys),
            dense: false,
        };
        let stored = set.pool.take_stored();
        if set.grows {
            set.table_keys += stored;
        }
        let store = store_alone(&mut mirror, op, s).await?;
        let c = CaseReport::new(spec, runs, ceilings).with_store(store);
        case_done(&set.label, &c);
        cases.push(c);
    }
    Ok(cases)
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
