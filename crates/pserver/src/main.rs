//! `pserver`: one binary for every role of the parameter server.

mod bench;
mod demo;
mod experiment;
mod r#gen;
mod kv;
mod parse;
mod relay;
mod security;
mod soak;
mod status;
mod tf_config;
mod tfjob;
mod train;
mod watch;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use pserver_apps::job::agent::{Agent, AgentConfig};
use pserver_core::membership::MembershipConfig;
use pserver_node::local::{LocalCluster, LocalConfig};
use pserver_node::manager::{ManagerConfig, start_manager};
use pserver_node::metrics::{self, Endpoint, Exporter, Slot};
use pserver_node::server::{ServerConfig, start_server};
use pserver_wire::Limits;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Default address of the manager.
const DEFAULT_MANAGER: &str = "127.0.0.1:7070";

#[derive(Parser, Debug)]
#[command(
    name = "pserver",
    version,
    about = "A parameter server: sharded model weights, push/pull over TCP."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    security: security::SecurityArgs,
}

/// The metrics listener of a node.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct MetricsArgs {
    /// Serve GET /metrics (Prometheus text format), /healthz and /readyz
    /// on this address (HTTP; port 0 picks one, printed first as
    /// `metrics on ADDR`).
    #[arg(long, value_name = "ADDR", env = "PSERVER_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<String>,
}

impl MetricsArgs {
    /// Starts the listener, if asked, answering from a [`Slot`] that says
    /// `waiting` until the node is put in it; prints its address first.
    pub(crate) async fn start(&self, waiting: &str) -> Result<Option<(Endpoint, Arc<Slot>)>> {
        let Some(listen) = &self.metrics_listen else {
            return Ok(None);
        };
        let slot = Slot::new(waiting);
        let exporter: Arc<dyn Exporter> = slot.clone();
        let ep = metrics::serve(listen, exporter, metrics::HttpLimits::default())
            .await
            .context("starting the metrics listener (--metrics-listen)")?;
        println!("metrics on {}", ep.addr());
        Ok(Some((ep, slot)))
    }
}

/// Puts `node` in the metrics listener's slot, if there is one.
fn fill(metrics: &Option<(Endpoint, Arc<Slot>)>, node: Arc<dyn Exporter>) {
    if let Some((_, slot)) = metrics {
        slot.set(node);
    }
}

/// Placement and failure-detection settings of a manager.
#[derive(clap::Args, Debug, Clone)]
struct ManagerOpts {
    /// Replicas per key range (chain replication).
    #[arg(long, env = "PSERVER_REPLICAS", default_value_t = 0)]
    replicas: usize,
    /// Virtual nodes per server on the ring.
    #[arg(long, env = "PSERVER_VNODES", default_value_t = 16)]
    vnodes: u32,
    /// A node silent this long (ms) is declared dead.
    #[arg(long, env = "PSERVER_LEASE_MS", default_value_t = 2000)]
    lease_ms: u64,
    /// Largest frame accepted, in MiB.
    #[arg(long, env = "PSERVER_MAX_FRAME_MIB", default_value_t = 256)]
    max_frame_mib: usize,
    /// Most connections each node serves at once.
    #[arg(long, env = "PSERVER_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Most pulls one connection may have waiting on a server.
    #[arg(long, env = "PSERVER_MAX_WAITING", default_value_t = 4096)]
    max_waiting: usize,
    /// Most tables the cluster holds.
    #[arg(long, env = "PSERVER_MAX_TABLES", default_value_t = pserver_core::membership::MAX_TABLES)]
    max_tables: usize,
    /// Widest table (floats per key) the cluster creates.
    #[arg(long, env = "PSERVER_MAX_DIM", default_value_t = pserver_core::spec::MAX_DIM as usize)]
    max_dim: usize,
}

impl ManagerOpts {
    fn limits(&self) -> Result<Limits> {
        if self.max_frame_mib == 0 || self.max_frame_mib > 4095 {
            anyhow::bail!(
                "--max-frame-mib must be in 1..=4095, got {}",
                self.max_frame_mib
            );
        }
        if self.max_connections == 0 || self.max_waiting == 0 {
            anyhow::bail!("--max-connections and --max-waiting must be at least 1");
        }
        let (tables, dim) = (
            pserver_core::membership::MAX_TABLES,
            pserver_core::spec::MAX_DIM as usize,
        );
        if !(1..=tables).contains(&self.max_tables) || !(1..=dim).contains(&self.max_dim) {
            anyhow::bail!(
                "--max-tables must be in 1..={tables} and --max-dim in 1..={dim}, got {} and {}",
                self.max_tables,
                self.max_dim
            );
        }
        let max_frame = self.max_frame_mib << 20;
        Ok(Limits {
            max_frame,
            max_keys: max_frame / 8,
            max_connections: self.max_connections,
            max_waiting: self.max_waiting,
            max_tables: self.max_tables,
            max_dim: self.max_dim,
        })
    }

    fn config(&self, listen: &str) -> Result<ManagerConfig> {
        Ok(ManagerConfig {
            listen: listen.to_string(),
            membership: MembershipConfig {
                replicas: self.replicas,
                vnodes: self.vnodes,
                lease_ms: self.lease_ms,
            },
            limits: self.limits()?,
            net: Default::default(),
            state_file: None,
            ..ManagerConfig::default()
        })
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the manager: cluster map, leases, tables, barriers.
    Manager {
        /// Address to listen on.
        #[arg(long, env = "PSERVER_LISTEN", default_value = DEFAULT_MANAGER)]
        listen: String,
        /// Keep the cluster's state (map, tables, epoch) in this file and
        /// recover it after a restart: servers and workers rejoin.
        #[arg(long, env = "PSERVER_STATE")]
        state: Option<std::path::PathBuf>,
        /// Load this checkpoint once the first server has registered (it is
        /// checked before the manager starts).
        #[arg(long, env = "PSERVER_RESTORE")]
        restore: Option<std::path::PathBuf>,
        #[command(flatten)]
        opts: ManagerOpts,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Run a server that holds key ranges of every table.
    Server {
        /// The manager's address.
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER)]
        manager: String,
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, env = "PSERVER_LISTEN", default_value = "127.0.0.1:0")]
        listen: String,
        /// The address the cluster map gives for this server, if not the
        /// one bound (say, when listening on 0.0.0.0, or behind a relay).
        #[arg(long, env = "PSERVER_ADVERTISE")]
        advertise: Option<String>,
        /// Threads one large push or pull may use (default: the machine's
        /// cores; 1 keeps each request on one thread).
        #[arg(long, env = "PSERVER_APPLY_THREADS")]
        apply_threads: Option<usize>,
        /// Most connections this server serves at once.
        #[arg(long, env = "PSERVER_MAX_CONNECTIONS", default_value_t = 1024)]
        max_connections: usize,
        /// Most pulls one connection may have waiting here.
        #[arg(long, env = "PSERVER_MAX_WAITING", default_value_t = 4096)]
        max_waiting: usize,
        /// Most entries the significantly-modified filter remembers of what
        /// this server sent, over every connection and table (about 40
        /// bytes each at dim 1); past it the least recently used
        /// connection's record goes and its next filtered pull comes in
        /// full. 0 turns the filter off (filtered pulls are answered in full).
        #[arg(long, env = "PSERVER_SIGNIFICANT_ENTRIES", default_value_t = pserver_node::server::DEFAULT_SIGNIFICANT_ENTRIES)]
        significant_entries: usize,
        /// Keep trying to reach the manager for this many seconds at start
        /// (it may start after this server); 0: fail at once.
        #[arg(long, default_value_t = 0, env = "PSERVER_WAIT_MANAGER_SECS")]
        wait_manager_secs: u64,
        /// Come back under this id: that of a server the manager declared
        /// dead (its process failed), such as a restarted Ray actor. It
        /// starts empty and takes back the ring positions, and then the
        /// ranges, it had. Refused while that server is alive, and for an
        /// id the manager's map has not got or gives a worker.
        #[arg(long, env = "PSERVER_ID")]
        id: Option<u32>,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Write a throwaway cluster CA and a node certificate for a test
    /// cluster (ca.pem, ca.key, node.pem, node.key); then run every node
    /// with --tls-cert DIR/node.pem --tls-key DIR/node.key --tls-ca DIR/ca.pem.
    Certs {
        /// Directory to write into (created if missing).
        dir: std::path::PathBuf,
        /// Names and addresses the node certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
    },
    /// Create tables, push and pull from the command line.
    Kv {
        /// The manager's address (before or after the subcommand).
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER, global = true)]
        manager: String,
        #[command(subcommand)]
        cmd: kv::KvCmd,
    },
    /// Run a worker process: join the cluster as an idle worker and run
    /// the tasks of whichever job's scheduler (`pserver train --manager
    /// ADDR --remote-workers N`) takes it, one job at a time, on data it
    /// reads from this machine.
    Worker {
        /// The manager's address.
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER)]
        manager: String,
        /// Address to take tasks on (port 0 picks a free one).
        #[arg(long, env = "PSERVER_LISTEN", default_value = "127.0.0.1:0")]
        listen: String,
        /// The address schedulers dial, if not the one bound (say, when
        /// listening on 0.0.0.0).
        #[arg(long, env = "PSERVER_ADVERTISE")]
        advertise: Option<String>,
        /// Files this worker reads (repeatable; globs such as
        /// 'part-*.gz' allowed); without it, the files the job names.
        #[arg(long, env = "PSERVER_DATA")]
        data: Vec<String>,
        /// Leave the cluster and exit (status 0) once this many jobs have
        /// finished on this worker; without it, serve jobs until stopped.
        #[arg(long, env = "PSERVER_EXIT_AFTER_JOBS", value_parser = clap::value_parser!(u64).range(1..))]
        exit_after_jobs: Option<u64>,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Show nodes, their state and ranges, tables and the epoch.
    Status {
        /// The manager's address.
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER)]
        manager: String,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every second: nodes, ranges, per-table request rates,
        /// replication lag and jobs (the servers are asked for their
        /// figures). On a terminal each frame replaces the last; otherwise
        /// frames follow each other, each after a `--- frame N ---` line.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many frames (default: until Ctrl-C).
        #[arg(long, requires = "watch")]
        frames: Option<u64>,
        /// With --watch: milliseconds between frames.
        #[arg(long, default_value_t = 1000, requires = "watch")]
        interval_ms: u64,
    },
    /// Measure push, pull and push-pull throughput and latency against a
    /// cluster of processes, beside the loopback TCP ceilings of the same run.
    Bench(bench::BenchArgs),
    /// A bounded load test: workers push and pull for a few minutes
    /// against server processes; fails on any error or on server memory
    /// that keeps growing once the key universe is stored.
    Soak(soak::SoakArgs),
    /// The other end of `pserver bench`'s ceiling measurements.
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
    /// A TCP relay that delays, stalls and resets the connections it
    /// carries (a slow, lossy link for tests; see relay.rs).
    #[command(hide = true)]
    Relay(relay::RelayArgs),
    /// Write a checkpoint of every table into DIR (each server writes its
    /// ranges there, so DIR must be on a file system they all see; the
    /// manifest is written last). Take it between training runs.
    Checkpoint {
        /// The manager's address.
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER)]
        manager: String,
        /// The checkpoint directory.
        dir: std::path::PathBuf,
    },
    /// Load a checkpoint into a running cluster of any size: its tables are
    /// created and filled. A damaged or partial checkpoint is refused whole.
    Restore {
        /// The manager's address.
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER)]
        manager: String,
        /// The checkpoint directory.
        dir: std::path::PathBuf,
    },
    /// Drain a server: hand its ranges to the other servers while pushes and
    /// pulls go on, then let it exit. Waits until it has left the map.
    Drain {
        /// The manager's address.
        #[arg(long, env = "PSERVER_MANAGER", default_value = DEFAULT_MANAGER)]
        manager: String,
        /// The server's node id (as `pserver status` shows it).
        node: u32,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Run the role Kubeflow's TF_CONFIG gives this process (a TFJob's
    /// replica): chief, the manager and the job's scheduler (`train
    /// --remote-workers` with one worker per worker entry); ps, a server;
    /// worker, a worker process. Every other setting of the role comes
    /// from its PSERVER_* variables.
    Tfjob(tfjob::TfjobArgs),
    /// Train sparse logistic regression (the main job): by default on the
    /// bundled flights data, on a local cluster of 2 servers and 2 workers.
    Train(Box<train::TrainArgs>),
    /// Score data with a model saved by `train --save`: one probability per line.
    Predict(train::PredictArgs),
    /// Re-run an experiment of the papers on this machine and print its table.
    Experiment(experiment::ExperimentArgs),
    /// Write a synthetic click data set with a known true model (gzip
    /// LIBSVM files and meta.json with the Bayes log-loss floor).
    Gen(r#gen::GenArgs),
    /// Start a whole cluster on this machine: a manager and servers, and
    /// optionally workers running a demo job.
    Local {
        /// Number of servers.
        #[arg(long, env = "PSERVER_SERVERS", default_value_t = 2)]
        servers: usize,
        /// Number of workers running the demo job (0: none).
        #[arg(long, env = "PSERVER_WORKERS", default_value_t = 0)]
        workers: usize,
        /// Manager address.
        #[arg(long, env = "PSERVER_LISTEN", default_value = DEFAULT_MANAGER)]
        listen: String,
        /// Iterations of the demo job.
        #[arg(long, env = "PSERVER_ITERATIONS", default_value_t = 200)]
        iterations: u64,
        /// Bounded delay of the demo job (0: sequential).
        #[arg(long, env = "PSERVER_TAU", default_value_t = 2)]
        tau: u64,
        /// Exit when the demo job is done instead of serving until Ctrl-C.
        #[arg(long, env = "PSERVER_EXIT")]
        exit: bool,
        #[command(flatten)]
        opts: ManagerOpts,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.cmd {
        Cmd::Manager { .. } | Cmd::Server { .. } | Cmd::Worker { .. } | Cmd::Tfjob(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Gen(args) = cli.cmd {
        // Local files only: no cluster, so no security flags apply.
        return r#gen::run(args);
    }
    if let Cmd::Relay(args) = cli.cmd {
        // Bytes only: no cluster security applies to a relay.
        return relay::run(args).await;
    }
    if let Cmd::Certs { dir, hosts } = &cli.cmd {
        let files = pserver_node::tls::generate(dir, hosts)
            .with_context(|| format!("writing certificates into {}", dir.display()))?;
        println!(
            "wrote a test CA and a node certificate for {} into {}; run each node with\n  \
             --tls-cert {} --tls-key {} --tls-ca {}",
            hosts.join(", "),
            dir.display(),
            files.cert.display(),
            files.key.display(),
            files.ca.display()
        );
        return Ok(());
    }
    let sec = cli.security.resolve()?;
    let net = sec.net.clone();
    match cli.cmd {
        Cmd::Certs { .. } | Cmd::Relay(_) | Cmd::Gen(_) => Ok(()),
        Cmd::Manager {
            listen,
            state,
            restore,
            opts,
            metrics,
        } => {
            sec.check_listen(&listen)?;
            let mut cfg = opts.config(&listen)?;
            cfg.net = net.clone();
            cfg.state_file = state;
            if let Some(dir) = &restore {
                check_checkpoint(dir)?;
            }
            let metrics = metrics
                .start("starting: loading the manager's state")
                .await?;
            let m = start_manager(cfg).await.context("starting the manager")?;
            fill(&metrics, m.exporter());
            println!("manager listening on {}", m.addr());
            if let Some(dir) = restore {
                let addr = m.addr().to_string();
                let token = m.cancelled();
                tokio::spawn(async move {
                    // Once a server holds the key space, load the checkpoint;
                    // servers that join later get their ranges by hand-off.
                    let result = async {
                        let w = client(&addr, &net).await?;
                        while w.refresh().await?.partitions.is_empty() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        crate::restore(&addr, &net, &dir).await
                    }
                    .await;
                    if let Err(e) = result {
                        eprintln!("error: restoring the checkpoint: {e:#}");
                        token.cancel();
                    }
                });
            }
            wait_for_stop(m.cancelled()).await;
            m.shutdown();
            Ok(())
        }
        Cmd::Server {
            manager,
            listen,
            advertise,
            apply_threads,
            max_connections,
            max_waiting,
            significant_entries,
            wait_manager_secs,
            id,
            metrics,
        } => {
            sec.check_listen(&listen)?;
            if max_connections == 0 || max_waiting == 0 {
                anyhow::bail!("--max-connections and --max-waiting must be at least 1");
            }
            let metrics = metrics
                .start(&format!(
                    "starting: not registered with the manager at {manager} yet"
                ))
                .await?;
            let mut cfg = ServerConfig::new(manager);
            cfg.manager_wait = Duration::from_secs(wait_manager_secs);
            cfg.id = id;
            cfg.listen = listen;
            cfg.advertise = advertise;
            cfg.net = net;
            cfg.limits.max_connections = max_connections;
            cfg.limits.max_waiting = max_waiting;
            cfg.significant_entries = significant_entries;
            if let Some(t) = apply_threads {
                cfg.apply_threads = t;
            }
            let s = start_server(cfg).await.context("starting the server")?;
            fill(&metrics, s.exporter());
            println!("server {} listening on {}", s.id(), s.addr());
            wait_for_stop(s.cancelled()).await;
            s.shutdown();
            Ok(())
        }
        Cmd::Kv { manager, cmd } => kv::run(&manager, &net, cmd).await,
        Cmd::Status {
            manager,
            watch: true,
            frames,
            interval_ms,
            ..
        } => {
            if interval_ms < 50 {
                anyhow::bail!("--interval-ms must be at least 50, got {interval_ms}");
            }
            if frames == Some(0) {
                anyhow::bail!("--frames must be at least 1");
            }
            watch::run(&manager, &net, frames, Duration::from_millis(interval_ms)).await
        }
        Cmd::Status { manager, json, .. } => status::run(&manager, &net, json).await,
        Cmd::Worker {
            manager,
            listen,
            advertise,
            data,
            exit_after_jobs,
            metrics,
        } => {
            sec.check_listen(&listen)?;
            let metrics = metrics
                .start(&format!(
                    "starting: not registered with the manager at {manager} yet"
                ))
                .await?;
            let mut agent = Agent::start(AgentConfig {
                manager: manager.clone(),
                listen,
                advertise,
                data,
                net,
                exit_after_jobs: exit_after_jobs.map(|n| n as usize),
            })
            .await
            .with_context(|| format!("starting a worker of the manager at {manager}"))?;
            fill(&metrics, agent.exporter());
            tracing::info!(
                node = agent.id(),
                addr = agent.addr(),
                "worker process ready; waiting for a job"
            );
            println!(
                "worker {} takes tasks on {}; waiting for a job",
                agent.id(),
                agent.addr()
            );
            tokio::select! {
                r = agent.wait() => r?,
                _ = tokio::signal::ctrl_c() => agent.kill(),
            }
            if exit_after_jobs.is_some() {
                println!(
                    "worker {} leaves after {} jobs",
                    agent.id(),
                    agent.jobs_finished()
                );
            }
            Ok(())
        }
        Cmd::Tfjob(args) => {
            let cfg = tf_config::parse(&args.tf_config)?;
            let plan = tfjob::plan(&cfg, &args);
            println!(
                "tfjob {}: pserver {}",
                tfjob::describe(&cfg),
                plan.role.join(" ")
            );
            // Parsed as if typed: the role's other flags come from its
            // PSERVER_* variables; security is what this command was given.
            let argv = std::iter::once("pserver".to_string()).chain(plan.role.iter().cloned());
            let mut role = Cli::try_parse_from(argv).map_err(|e| {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                anyhow!(
                    "{} (pserver {} as TF_CONFIG says, with its PSERVER_* variables)",
                    first.trim_start_matches("error: "),
                    plan.role[0]
                )
            })?;
            role.security = cli.security.clone();
            match plan.scheduler {
                None => {
                    let limit = Duration::from_secs(args.wait_manager_secs);
                    tfjob::answers(&cfg.chief, &net, limit).await?;
                    Box::pin(run(role)).await
                }
                Some(s) => tfjob::chief(Box::pin(run(role)), s, net, sec.child_args()).await,
            }
        }
        Cmd::Drain {
            manager,
            node,
            timeout_s,
        } => drain(&manager, &net, node, Duration::from_secs(timeout_s)).await,
        Cmd::Checkpoint { manager, dir } => {
            let w = client(&manager, &net).await?;
            let m = w
                .checkpoint(&dir)
                .await
                .with_context(|| format!("writing the checkpoint {}", dir.display()))?;
            println!(
                "checkpoint written to {}: {} tables, {} range files, epoch {}",
                dir.display(),
                m.tables.len(),
                m.files.len(),
                m.epoch
            );
            Ok(())
        }
        Cmd::Restore { manager, dir } => restore(&manager, &net, &dir).await,
        Cmd::Bench(args) => {
            // On a worker thread of the runtime, as a library user's tasks
            // run, not on this thread under `block_on`: there every reply
            // (and every timer a request sets) would cost a wake of this
            // thread from a worker, a cost of the CLI wrapper that no task
            // pays. The ceilings are measured on the same task.
            let sec = sec.clone();
            tokio::spawn(async move { bench::run(args, &sec).await })
                .await
                .context("the bench task")?
        }
        Cmd::BenchPeer(args) => bench::peer(args).await,
        Cmd::Soak(args) => soak::run(args, &sec).await,
        Cmd::Train(args) => train::run(*args, &sec).await,
        Cmd::Predict(args) => train::predict(args).await,
        Cmd::Experiment(args) => experiment::run(args).await,
        Cmd::Local {
            servers,
            workers,
            listen,
            iterations,
            tau,
            exit,
            opts,
        } => {
            // Other processes (pserver kv, status) may use this cluster:
            // it runs with the configured security, not a private secret.
            sec.check_listen(&listen)?;
            let mut manager = opts.config(&listen)?;
            manager.net = net.clone();
            let cluster = LocalCluster::start(LocalConfig {
                servers,
                manager,
                registry: Default::default(),
                replicate_after_aggregation: true,
            })
            .await
            .context("starting the local cluster")?;
            println!(
                "local cluster: manager on {}, {} servers",
                cluster.manager_addr(),
                cluster.servers.len()
            );
            if workers > 0 {
                demo::run(
                    &cluster.manager_addr().to_string(),
                    &net,
                    workers,
                    iterations,
                    tau,
                )
                .await?;
            }
            if !exit {
                println!("serving; press Ctrl-C to stop");
                wait_for_stop(cluster.manager.cancelled()).await;
            }
            cluster.shutdown();
            // Let the nodes' tasks see the cancellation before the runtime ends.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        }
    }
}

/// Returns on Ctrl-C, SIGTERM, or when `token` is cancelled.
async fn wait_for_stop(token: pserver_node::CancellationToken) {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = token.cancelled() => {}
                    }
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = token.cancelled() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = token.cancelled() => {}
    }
}

/// `pserver drain`: asks the manager to drain `node`, then waits until the
/// map no longer places it on any range.
async fn drain(
    manager: &str,
    net: &pserver_node::net::Net,
    node: u32,
    timeout: Duration,
) -> Result<()> {
    let w = client(manager, net).await?;
    w.drain(node)
        .await
        .with_context(|| format!("draining node {node}"))?;
    let start = std::time::Instant::now();
    loop {
        let map = w.refresh().await.context("reading the map")?;
        let gone = map
            .node(node)
            .is_none_or(|n| n.state == pserver_core::NodeState::Dead);
        if gone {
            println!(
                "node {node} drained: its ranges are on the other servers (epoch {})",
                map.epoch
            );
            return Ok(());
        }
        if start.elapsed() > timeout {
            anyhow::bail!("node {node} is still draining after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client of the manager at `manager`, over `net`.
async fn client(
    manager: &str,
    net: &pserver_node::net::Net,
) -> Result<pserver_node::worker::Worker> {
    pserver_node::worker::Worker::connect(pserver_node::worker::WorkerConfig {
        net: net.clone(),
        ..pserver_node::worker::WorkerConfig::client(manager)
    })
    .await
    .with_context(|| format!("connecting to the manager at {manager}"))
}

/// Reads and checks a whole checkpoint, refusing a damaged or partial one.
fn check_checkpoint(dir: &std::path::Path) -> Result<()> {
    let registry = pserver_core::updater::Registry::new();
    pserver_node::snapshot::load(dir, |spec| {
        registry
            .build(&spec.updater)
            .map(|u| pserver_core::store::Store::new(spec.clone(), u).slot_width())
            .unwrap_or(usize::MAX)
    })
    .with_context(|| format!("checking the checkpoint {}", dir.display()))?;
    Ok(())
}

/// `pserver restore`: loads a checkpoint into the cluster at `manager`.
async fn restore(manager: &str, net: &pserver_node::net::Net, dir: &std::path::Path) -> Result<()> {
    let w = client(manager, net).await?;
    let tables = w
        .restore(dir, &pserver_core::updater::Registry::new())
        .await
        .with_context(|| format!("restoring the checkpoint {}", dir.display()))?;
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    println!(
        "restored {} tables from {}: {}",
        tables.len(),
        dir.display(),
        names.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The commands whose every flag has a variable: the roles a cluster
    /// engine starts.
    const ROLES: &[&str] = &["manager", "server", "worker", "train", "local", "tfjob"];
    /// The clients of a running cluster: their `--manager` has one.
    const CLIENTS: &[&str] = &["kv", "status", "checkpoint", "restore", "drain"];

    /// The rule: `--lease-ms` is `PSERVER_LEASE_MS`. Kubeflow names the
    /// one exception.
    fn variable(long: &str) -> String {
        match long {
            "tf-config" => "TF_CONFIG".into(),
            _ => format!("PSERVER_{}", long.replace('-', "_").to_uppercase()),
        }
    }

    #[test]
    fn every_flag_of_a_role_reads_the_variable_the_rule_names() {
        let cli = Cli::command();
        let mut checked = 0;
        let subs = cli
            .get_subcommands()
            .map(|s| (s.get_name(), s.get_arguments()));
        let all = std::iter::once(("", cli.get_arguments())).chain(subs);
        for (name, args) in all {
            for a in args {
                let Some(long) = a.get_long() else { continue };
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                // The global (security) flags, every role's flags, and
                // the clients' --manager.
                let wanted = name.is_empty()
                    || ROLES.contains(&name)
                    || (CLIENTS.contains(&name) && long == "manager");
                if wanted {
                    assert_eq!(env, Some(variable(long)), "pserver {name} --{long}");
                    checked += 1;
                } else if let Some(e) = env {
                    // Where a variable is read, it is named by the rule.
                    assert_eq!(e, variable(long), "pserver {name} --{long}");
                }
            }
        }
        assert!(checked > 60, "only {checked} flags checked");
    }

    #[test]
    fn variables_naming_files_of_secrets_or_the_whole_tf_config_are_not_shown_in_help() {
        let cli = Cli::command();
        let hidden = |sub: Option<&str>, long: &str| {
            let cmd = match sub {
                Some(s) => cli.find_subcommand(s).unwrap(),
                None => &cli,
            };
            cmd.get_arguments()
                .find(|a| a.get_long() == Some(long))
                .unwrap()
                .is_hide_env_values_set()
        };
        for long in ["secret-file", "tls-key", "tls-cert", "tls-ca"] {
            assert!(hidden(None, long), "--{long}");
        }
        assert!(hidden(Some("tfjob"), "tf-config"));
    }
}
