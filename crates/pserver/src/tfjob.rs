//! `pserver tfjob`: starts the role Kubeflow's `TF_CONFIG` gives this
//! process, so a stock TFJob (Chief, PS and Worker replicas) runs a
//! pserver job with no operator of ours.
//!
//! The decision is plain data: [`plan`] turns the parsed TF_CONFIG
//! ([`crate::tf_config`]) into the command line of the role (`pserver
//! server ...`, `pserver worker ...`, `pserver manager ...`), which `main`
//! parses like any other, so every other setting of the role comes from
//! its `PSERVER_*` variables. The chief runs the manager in this process
//! and the job's scheduler (`pserver train --manager ... --remote-workers
//! N --wait-servers S`) as a child; the chief's exit
//! status is the job's, which is what the TFJob's success policy reads.

use crate::tf_config::{Role, TfConfig};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::future::Future;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `pserver tfjob` flags.
#[derive(Args, Debug, Clone)]
pub struct TfjobArgs {
    /// The TFJob's cluster and this process's task, as the Kubeflow
    /// training operator writes it (JSON).
    #[arg(long, env = "TF_CONFIG", hide_env_values = true, value_name = "JSON")]
    pub tf_config: String,
    /// The host to listen on; the port is the one of this task's own
    /// TF_CONFIG entry.
    #[arg(long, env = "PSERVER_LISTEN_HOST", default_value = "0.0.0.0")]
    pub listen_host: String,
    /// The address a server or worker gives the cluster (default: its
    /// TF_CONFIG entry); say, `$(POD_IP):2222`.
    #[arg(long, env = "PSERVER_ADVERTISE")]
    pub advertise: Option<String>,
    /// How long a ps or worker waits for the chief's manager to answer
    /// before it starts (a cluster engine starts replicas in any order).
    #[arg(long, env = "PSERVER_WAIT_MANAGER_SECS", default_value_t = 300)]
    pub wait_manager_secs: u64,
}

/// What this process does, as command lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The role run in this process (`argv` without the program name).
    pub role: Vec<String>,
    /// The chief's job scheduler, run as a child once the manager answers.
    pub scheduler: Option<SchedulerPlan>,
}

/// The chief's second half.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerPlan {
    /// `pserver train ...` (without the program name).
    pub argv: Vec<String>,
    /// The manager's address from this process.
    pub manager: String,
}

/// The command lines of the role `cfg` gives this process.
pub fn plan(cfg: &TfConfig, args: &TfjobArgs) -> Plan {
    let port = cfg.port();
    let listen = host_port(&args.listen_host, port);
    let advertise = args.advertise.clone().unwrap_or_else(|| cfg.own().into());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match cfg.role {
        Role::Ps => Plan {
            role: s(&[
                "server",
                "--manager",
                &cfg.chief,
                "--listen",
                &listen,
                "--advertise",
                &advertise,
            ]),
            scheduler: None,
        },
        Role::Worker => Plan {
            role: s(&[
                "worker",
                "--manager",
                &cfg.chief,
                "--listen",
                &listen,
                "--advertise",
                &advertise,
            ]),
            scheduler: None,
        },
        Role::Chief => {
            // The scheduler shares the manager's machine: it dials it
            // there, not through the chief's Service name (which, under
            // a readiness probe, resolves only once the pod is ready).
            let manager = host_port(local_host(&args.listen_host), port);
            let servers = cfg.ps.len().to_string();
            let mut argv = s(&[
                "train",
                "--manager",
                &manager,
                "--servers",
                &servers,
                "--wait-servers",
                &servers,
            ]);
            if !cfg.workers.is_empty() {
                argv.extend(s(&["--remote-workers", &cfg.workers.len().to_string()]));
            }
            Plan {
                role: s(&["manager", "--listen", &listen]),
                scheduler: Some(SchedulerPlan { argv, manager }),
            }
        }
    }
}

/// What the chief's scheduler child sees of the environment: `PSERVER_*`
/// as this process has it, except that `PSERVER_SCHEDULER_NAME` stands
/// for `PSERVER_NAME` where both are meant for one process, and the
/// manager's own endpoints (`PSERVER_METRICS_LISTEN`) are not inherited
/// (two processes cannot listen on one port). The changes to make:
/// variables to remove, then variables to set.
pub fn scheduler_env(vars: &[(String, String)]) -> (Vec<String>, Vec<(String, String)>) {
    const MANAGER_ONLY: &[&str] = &["PSERVER_METRICS_LISTEN"];
    let mut remove: Vec<String> = MANAGER_ONLY
        .iter()
        .filter(|k| vars.iter().any(|(n, _)| n == *k))
        .map(|k| k.to_string())
        .collect();
    let mut set = Vec::new();
    for (name, value) in vars {
        if let Some(rest) = name.strip_prefix("PSERVER_SCHEDULER_") {
            let target = format!("PSERVER_{rest}");
            remove.retain(|r| *r != target);
            set.push((target, value.clone()));
        }
    }
    (remove, set)
}

/// `host:port`, with an IPv6 host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Where this machine's own listener is reached from itself: loopback for
/// an unspecified address, else the address itself.
fn local_host(listen_host: &str) -> &str {
    match listen_host.trim_start_matches('[').trim_end_matches(']') {
        "0.0.0.0" => "127.0.0.1",
        "::" => "::1",
        other => other,
    }
}

/// A child process killed when this value is dropped (the chief stopping
/// for any reason takes its scheduler with it).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the chief: `manager` (the manager role, running until it stops),
/// and, once it answers, the scheduler as a child of this process with
/// `security` flags (it waits for the servers itself); returns when the
/// job ends (its exit status is the result) or the manager stops.
pub async fn chief(
    manager: impl Future<Output = Result<()>>,
    sched: SchedulerPlan,
    net: pserver_node::net::Net,
    security: Vec<String>,
) -> Result<()> {
    tokio::pin!(manager);
    tokio::select! {
        r = &mut manager => {
            r?;
            bail!("the manager stopped before the job started");
        }
        r = answers(&sched.manager, &net, Duration::from_secs(30)) => r?,
    }
    let exe = std::env::current_exe().context("finding this program to run the scheduler")?;
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let (remove, set) = scheduler_env(&vars);
    let mut cmd = Command::new(exe);
    cmd.args(&security).args(&sched.argv);
    for k in remove {
        cmd.env_remove(k);
    }
    cmd.envs(set);
    println!(
        "tfjob chief: starting the job: pserver {}",
        sched.argv.join(" ")
    );
    let mut child = ChildGuard(
        cmd.spawn()
            .context("starting the job's scheduler (pserver train)")?,
    );
    loop {
        tokio::select! {
            r = &mut manager => {
                r?;
                bail!("stopped before the job ended");
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if let Some(status) = child.0.try_wait().context("waiting for the scheduler")? {
            if status.success() {
                return Ok(());
            }
            bail!("the job's scheduler failed ({status})");
        }
    }
}

/// Waits until the manager at `addr` takes a client, at most `limit`
/// (its name may not even resolve yet); the error is the last attempt's.
pub async fn answers(addr: &str, net: &pserver_node::net::Net, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match crate::client(addr, net).await {
            Ok(w) => {
                w.leave().await;
                return Ok(());
            }
            Err(e) if start.elapsed() > limit => {
                return Err(e.context(format!(
                    "the manager did not answer within {} s",
                    limit.as_secs()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What TF_CONFIG makes this process, in a few words (`ps 1 of 2
/// (j-ps-1.ns.svc:2222)`).
pub fn describe(cfg: &TfConfig) -> String {
    let n = match cfg.role {
        Role::Chief => 1,
        Role::Ps => cfg.ps.len(),
        Role::Worker => cfg.workers.len(),
    };
    format!("{} {} of {n} ({})", cfg.role.name(), cfg.index, cfg.own())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tf_config::parse;

    fn args() -> TfjobArgs {
        TfjobArgs {
            tf_config: String::new(),
            listen_host: "0.0.0.0".into(),
            advertise: None,
            wait_manager_secs: 300,
        }
    }

    fn cfg(task: &str, index: usize, workers: &str) -> TfConfig {
        parse(&format!(
            r#"{{"cluster":{{"chief":["j-chief-0.ns.svc:2222"],"ps":["j-ps-0.ns.svc:2223","j-ps-1.ns.svc:2224"],
                "worker":[{workers}]}},"task":{{"type":"{task}","index":{index}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_ps_is_a_server_of_the_chief_on_its_own_port() {
        let p = plan(&cfg("ps", 1, r#""w:1""#), &args());
        assert_eq!(
            p.role,
            [
                "server",
                "--manager",
                "j-chief-0.ns.svc:2222",
                "--listen",
                "0.0.0.0:2224",
                "--advertise",
                "j-ps-1.ns.svc:2224"
            ]
        );
        assert_eq!(p.scheduler, None);
        // PSERVER_ADVERTISE / --advertise replaces the entry (a pod IP).
        let mut a = args();
        a.advertise = Some("10.1.2.3:2224".into());
        a.listen_host = "::".into();
        let p = plan(&cfg("ps", 1, r#""w:1""#), &a);
        assert_eq!(&p.role[4..], ["[::]:2224", "--advertise", "10.1.2.3:2224"]);
    }

    #[test]
    fn a_worker_is_a_worker_process_of_the_chief() {
        let p = plan(&cfg("worker", 0, r#""j-worker-0.ns.svc:2225""#), &args());
        assert_eq!(
            p.role,
            [
                "worker",
                "--manager",
                "j-chief-0.ns.svc:2222",
                "--listen",
                "0.0.0.0:2225",
                "--advertise",
                "j-worker-0.ns.svc:2225"
            ]
        );
    }

    #[test]
    fn the_chief_is_the_manager_and_the_scheduler_of_every_worker() {
        let p = plan(&cfg("chief", 0, r#""w0:1","w1:1","w2:1""#), &args());
        assert_eq!(p.role, ["manager", "--listen", "0.0.0.0:2222"]);
        let s = p.scheduler.unwrap();
        assert_eq!(s.manager, "127.0.0.1:2222");
        assert_eq!(
            s.argv,
            [
                "train",
                "--manager",
                "127.0.0.1:2222",
                "--servers",
                "2",
                "--wait-servers",
                "2",
                "--remote-workers",
                "3"
            ]
        );
        // No workers in TF_CONFIG: the scheduler runs the job's workers.
        let p = plan(&cfg("chief", 0, ""), &args());
        assert_eq!(
            p.scheduler.unwrap().argv,
            [
                "train",
                "--manager",
                "127.0.0.1:2222",
                "--servers",
                "2",
                "--wait-servers",
                "2"
            ]
        );
        // A given listen host is dialled as it is.
        let mut a = args();
        a.listen_host = "127.0.0.5".into();
        let p = plan(&cfg("chief", 0, ""), &a);
        assert_eq!(p.scheduler.unwrap().manager, "127.0.0.5:2222");
    }

    #[test]
    fn the_scheduler_takes_its_own_variables_and_not_the_managers_endpoints() {
        let v = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let (remove, set) = scheduler_env(&v(&[
            ("PSERVER_METRICS_LISTEN", "0.0.0.0:9090"),
            ("PSERVER_EPOCHS", "3"),
            ("PSERVER_SCHEDULER_REPLICAS", "0"),
        ]));
        assert_eq!(remove, ["PSERVER_METRICS_LISTEN"]);
        assert_eq!(set, v(&[("PSERVER_REPLICAS", "0")]));
        let (remove, set) = scheduler_env(&v(&[
            ("PSERVER_METRICS_LISTEN", "0.0.0.0:9090"),
            ("PSERVER_SCHEDULER_METRICS_LISTEN", "0.0.0.0:9091"),
        ]));
        assert!(remove.is_empty(), "{remove:?}");
        assert_eq!(set, v(&[("PSERVER_METRICS_LISTEN", "0.0.0.0:9091")]));
        assert_eq!(scheduler_env(&[]), (vec![], vec![]));
    }
}
