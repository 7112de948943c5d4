//! `pserver kv`: create tables, push and pull from a shell.

use crate::parse;
use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use pserver_core::UpdaterSpec;
use pserver_node::worker::{Keys, Op, Request, TableOptions, Worker, WorkerConfig};

/// The updaters a table can be created with from the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdaterName {
    /// w = v
    Assign,
    /// w += v
    Add,
    /// w -= lr * g
    Sgd,
    /// AdaGrad with --lr and --eps
    Adagrad,
    /// FTRL-Proximal with --alpha --beta --l1 --l2
    Ftrl,
    /// Proximal L1/L2 step with --eta --l1 --l2 --eps; pushes carry (g, h) pairs
    Prox,
}

/// `pserver kv` subcommands.
#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Create a table (idempotent when the spec is the same).
    CreateTable {
        /// Table name.
        name: String,
        /// Floats per key.
        #[arg(long, default_value_t = 1)]
        dim: u32,
        /// What servers do with a push.
        #[arg(long, value_enum, default_value_t = UpdaterName::Add)]
        updater: UpdaterName,
        /// Learning rate (sgd, adagrad).
        #[arg(long, default_value_t = 0.1)]
        lr: f32,
        /// Stability term (adagrad, prox).
        #[arg(long, default_value_t = 1e-6)]
        eps: f32,
        /// FTRL alpha.
        #[arg(long, default_value_t = 0.1)]
        alpha: f32,
        /// FTRL beta.
        #[arg(long, default_value_t = 1.0)]
        beta: f32,
        /// Proximal step size.
        #[arg(long, default_value_t = 1.0)]
        eta: f32,
        /// L1 strength (ftrl, prox).
        #[arg(long, default_value_t = 0.0)]
        l1: f32,
        /// L2 strength (ftrl, prox).
        #[arg(long, default_value_t = 0.0)]
        l2: f32,
        /// sequential | eventual | bounded:N
        #[arg(long, default_value = "eventual")]
        consistency: String,
        /// zero | uniform:SCALE[:SEED]
        #[arg(long, default_value = "zero")]
        init: String,
        /// Sum each clock's pushes from all workers, then apply once.
        #[arg(long)]
        aggregate: bool,
    },
    /// Push values; exits 0 only once every server acknowledged.
    Push {
        /// Table name.
        name: String,
        /// Comma-separated keys (any order; sorted here).
        #[arg(long, conflicts_with = "range", required_unless_present = "range")]
        keys: Option<String>,
        /// Every key of A..B (end exclusive).
        #[arg(long)]
        range: Option<String>,
        /// Comma-separated values, dim (x push width) per key.
        #[arg(long)]
        values: String,
        /// Clock to push at.
        #[arg(long, default_value_t = 1)]
        clock: u64,
    },
    /// Pull values; prints `KEY V1 [V2 ...]` per key.
    Pull {
        /// Table name.
        name: String,
        /// Comma-separated keys.
        #[arg(long, conflicts_with = "range", required_unless_present = "range")]
        keys: Option<String>,
        /// Every key of A..B (end exclusive).
        #[arg(long)]
        range: Option<String>,
    },
}

#[allow(clippy::too_many_arguments)]
fn updater(
    u: UpdaterName,
    lr: f32,
    eps: f32,
    alpha: f32,
    beta: f32,
    eta: f32,
    l1: f32,
    l2: f32,
) -> UpdaterSpec {
    match u {
        UpdaterName::Assign => UpdaterSpec::Assign,
        UpdaterName::Add => UpdaterSpec::Add,
        UpdaterName::Sgd => UpdaterSpec::Sgd { lr },
        UpdaterName::Adagrad => UpdaterSpec::AdaGrad { lr, eps },
        UpdaterName::Ftrl => UpdaterSpec::Ftrl {
            alpha,
            beta,
            l1,
            l2,
        },
        UpdaterName::Prox => UpdaterSpec::Prox { eta, l1, l2, eps },
    }
}

/// Runs a `kv` subcommand against the manager at `manager`, over `net`.
pub async fn run(manager: &str, net: &pserver_node::net::Net, cmd: KvCmd) -> Result<()> {
    let w = Worker::connect(WorkerConfig {
        net: net.clone(),
        ..WorkerConfig::client(manager)
    })
    .await
    .with_context(|| format!("connecting to the manager at {manager}"))?;
    let result = run_with(&w, cmd).await;
    // A one-shot client: gone at once, so the servers need not keep its
    // clocks for its lease (issue #16, defect 8).
    w.leave().await;
    result
}

async fn run_with(w: &Worker, cmd: KvCmd) -> Result<()> {
    match cmd {
        KvCmd::CreateTable {
            name,
            dim,
            updater: u,
            lr,
            eps,
            alpha,
            beta,
            eta,
            l1,
            l2,
            consistency,
            init,
            aggregate,
        } => {
            let opts = TableOptions {
                dim,
                init: parse::init(&init)?,
                updater: updater(u, lr, eps, alpha, beta, eta, l1, l2),
                consistency: parse::consistency(&consistency)?,
                aggregate,
                job: None,
            };
            let spec = w.create_table(&name, opts).await?;
            println!(
                "table {} (id {}): dim {}, updater {}, {}",
                spec.name,
                spec.id,
                spec.dim,
                spec.updater.name(),
                spec.consistency
            );
            Ok(())
        }
        KvCmd::Push {
            name,
            keys,
            range,
            values,
            clock,
        } => {
            if clock == 0 {
                bail!("--clock must be 1 or more");
            }
            let vals = parse::values(&values)?;
            let (keys, vals) = match (keys, range) {
                (Some(k), _) => {
                    let keys = parse::keys(&k)?;
                    let (k, v) = sort_pairs(keys, vals)?;
                    (Keys::List(k), v)
                }
                (None, Some(r)) => (Keys::Range(parse::range(&r)?), vals),
                (None, None) => bail!("give --keys or --range"),
            };
            let out = w
                .send(Request {
                    table: name.clone(),
                    op: Op::Push,
                    keys,
                    vals,
                    clock: Some(clock),
                    consistency: None,
                })
                .await
                .with_context(|| format!("pushing to table {name:?}"))?;
            eprintln!("pushed: {} keys applied", out.applied);
            Ok(())
        }
        KvCmd::Pull { name, keys, range } => {
            let spec = w.table(&name).await?;
            let dim = spec.dim as usize;
            let rows: Vec<(u64, Vec<f32>)> = match (keys, range) {
                (Some(k), _) => {
                    let given = parse::keys(&k)?;
                    let mut sorted = given.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    let vals = w
                        .pull(&name, sorted.clone())
                        .await
                        .with_context(|| format!("pulling from table {name:?}"))?;
                    // Print in the order the keys were given.
                    given
                        .iter()
                        .map(|k| {
                            let i = sorted.binary_search(k).unwrap_or(0);
                            (*k, vals[i * dim..(i + 1) * dim].to_vec())
                        })
                        .collect()
                }
                (None, Some(r)) => {
                    let r = parse::range(&r)?;
                    let vals = w
                        .pull_range(&name, r)
                        .await
                        .with_context(|| format!("pulling from table {name:?}"))?;
                    (r.begin..r.end)
                        .zip(vals.chunks_exact(dim))
                        .map(|(k, v)| (k, v.to_vec()))
                        .collect()
                }
                (None, None) => bail!("give --keys or --range"),
            };
            let mut out = String::new();
            for (k, v) in rows {
                out.push_str(&k.to_string());
                for x in v {
                    out.push(' ');
                    out.push_str(&x.to_string());
                }
                out.push('\n');
            }
            print!("{out}");
            Ok(())
        }
    }
}

/// Sorts keys with their values (`vals.len() / keys.len()` floats each);
/// refuses repeated keys and values that do not divide evenly.
fn sort_pairs(keys: Vec<u64>, vals: Vec<f32>) -> Result<(Vec<u64>, Vec<f32>)> {
    if keys.is_empty() {
        bail!("--keys is empty");
    }
    if !vals.len().is_multiple_of(keys.len()) || vals.is_empty() {
        bail!(
            "{} values do not divide evenly over {} keys",
            vals.len(),
            keys.len()
        );
    }
    let w = vals.len() / keys.len();
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by_key(|&i| keys[i]);
    if let Some(p) = idx.windows(2).find(|p| keys[p[0]] == keys[p[1]]) {
        bail!("--keys: key {} is given twice", keys[p[0]]);
    }
    let k = idx.iter().map(|&i| keys[i]).collect();
    let v = idx
        .iter()
        .flat_map(|&i| vals[i * w..(i + 1) * w].iter().copied())
        .collect();
    Ok((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_sorted_together() {
        let (k, v) = sort_pairs(vec![9, 1, 5], vec![2.0, 0.5, 1.0]).unwrap();
        assert_eq!(k, vec![1, 5, 9]);
        assert_eq!(v, vec![0.5, 1.0, 2.0]);
        let (k, v) = sort_pairs(vec![2, 1], vec![2.0, 2.5, 1.0, 1.5]).unwrap();
        assert_eq!(k, vec![1, 2]);
        assert_eq!(v, vec![1.0, 1.5, 2.0, 2.5]);
        assert!(sort_pairs(vec![1, 1], vec![1.0, 2.0]).is_err());
        assert!(sort_pairs(vec![1, 2], vec![1.0, 2.0, 3.0]).is_err());
    }
}
