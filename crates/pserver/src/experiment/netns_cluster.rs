//! A training cluster of processes on emulated hosts (hosts.rs): the
//! manager on host 0, each server and each `pserver worker` on a host of
//! its own, and every job's scheduler (`pserver train --manager ...
//! --remote-workers N`) run as a process on host 0, its figures read back
//! from its `--report`. The cluster lives for the whole experiment; each
//! run is a job of its own name, so its table, group and workers are its
//! own, and the worker processes go back to idle between runs.

use super::hosts::{Hosts, Link};
use anyhow::{Context, Result, bail};
use pserver_apps::report::Report;
use pserver_apps::train::TrainConfig;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// The port every node listens on inside its own host.
const PORT: u16 = 7070;

/// The running cluster.
pub(super) struct NetnsCluster {
    hosts: Hosts,
    manager: String,
    workers: usize,
    /// The cluster secret every process proves (the nodes listen on
    /// addresses that are not loopback); removed on drop.
    secret: PathBuf,
    /// Where each run's scheduler writes its report.
    report: PathBuf,
}

impl NetnsCluster {
    /// Makes `1 + servers + workers` hosts with `link` and starts the
    /// manager, the servers and the worker processes on them.
    pub fn start(servers: usize, workers: usize, link: Link) -> Result<NetnsCluster> {
        if servers == 0 || workers == 0 {
            bail!("--netns needs at least one server and one worker");
        }
        let tmp = std::env::temp_dir();
        let pid = std::process::id();
        let secret = tmp.join(format!("pserver-netns-{pid}.secret"));
        write_secret(&secret)?;
        let mut c = NetnsCluster {
            hosts: Hosts::create(1 + servers + workers, link)?,
            manager: String::new(),
            workers,
            secret: secret.clone(),
            report: tmp.join(format!("pserver-netns-{pid}-report.json")),
        };
        c.hosts
            .set_child_args(&["--secret-file".to_string(), secret.display().to_string()]);
        c.manager = c.hosts.start_behind_relay(0, PORT, "manager", &[], false)?;
        let manager = c.manager.clone();
        for i in 0..servers {
            c.hosts
                .start_behind_relay(1 + i, PORT, "server", &["--manager", &manager], true)?;
        }
        for i in 0..workers {
            c.hosts.start_behind_relay(
                1 + servers + i,
                PORT,
                "worker",
                &["--manager", &manager],
                true,
            )?;
        }
        Ok(c)
    }

    /// Runs job `job` (DBPG with `cfg`'s delay, epochs, blocks,
    /// regularization, KKT filter and key caching) on every worker
    /// process, its scheduler on host 0, and returns its report.
    pub fn train(&mut self, job: &str, cfg: &TrainConfig) -> Result<Report> {
        let _ = std::fs::remove_file(&self.report);
        let mut args: Vec<String> = [
            "train",
            "--manager",
            &self.manager,
            "--remote-workers",
            &self.workers.to_string(),
            "--wait-workers-secs",
            "60",
            "--job",
            job,
            "--algo",
            "dbpg",
            "--tau",
            &cfg.tau.to_string(),
            "--epochs",
            &cfg.epochs.to_string(),
            "--blocks",
            &cfg.blocks.to_string(),
            "--l1",
            &cfg.l1.to_string(),
            "--l2",
            &cfg.l2.to_string(),
            "--kkt",
            &cfg.kkt.map_or(-1.0, |k| k).to_string(),
            // Scoring during training would steal the cores the workers
            // are timed on; the final score is taken after the clock stops.
            "--eval-every-ms",
            "0",
            "--report",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.report.display().to_string());
        if !cfg.key_caching {
            args.push("--no-key-caching".into());
        }
        if let Err(e) = self.hosts.run(0, &args) {
            return Err(self.hosts.explain(e));
        }
        Report::read_json(&self.report).with_context(|| format!("reading job {job}'s report"))
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.secret);
        let _ = std::fs::remove_file(&self.report);
    }
}

/// Writes a fresh random secret to `path`, readable by its owner only.
fn write_secret(path: &std::path::Path) -> Result<()> {
    let mut bytes = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes).context("reading /dev/urandom")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(out, "{hex}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
