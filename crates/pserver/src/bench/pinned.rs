//! The pinned figures: the raw TCP round trip and 1-key requests with every
//! process on one core. This process re-runs itself under `taskset -c 0`
//! with a hidden flag; the child's manager, server and peer inherit its CPU
//! mask, and it prints its report as one JSON line.

use super::Settings;
use super::cases::repeat;
use super::keys::{KeyStream, Pool};
use super::load::{Case, OPS, Source, op_name};
use super::procs::{self, Procs, addr_of, cpus_allowed};
use super::report::{CaseReport, CaseSpec, PinnedReport};
use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};

/// The CPU every pinned process runs on.
const CPU: &str = "0";

/// Whether `taskset -c 0` works here; the reason when it does not.
fn taskset_works() -> Result<(), String> {
    match Command::new("taskset")
        .args(["-c", CPU, "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`taskset -c {CPU} true` failed ({s})")),
        Err(e) => Err(format!(
            "taskset not found ({e}); install util-linux for the pinned figures"
        )),
    }
}

/// Runs the pinned part in a child under `taskset -c 0`. `Ok(Err(why))`
/// when pinning is not possible here (then the report says why).
pub fn run(s: &Settings) -> Result<Result<PinnedReport, String>> {
    if let Err(why) = taskset_works() {
        return Ok(Err(why));
    }
    let exe = std::env::current_exe().context("finding the pserver binary")?;
    let out = Command::new("taskset")
        .args(["-c", CPU])
        .arg(exe)
        .args([
            "bench",
            "--pinned-only",
            "--reps",
            &s.reps.to_string(),
            "--duration-ms",
            &s.duration.as_millis().to_string(),
            "--dim",
            &s.dim.to_string(),
        ])
        .args(&s.child_args)
        .env("RUST_LOG", "off")
        .stderr(Stdio::piped())
        .output()
        .context("starting the pinned run")?;
    if !out.status.success() {
        bail!(
            "it exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let report: PinnedReport = serde_json::from_str(line)
        .with_context(|| format!("reading the pinned run's report {line:?}"))?;
    Ok(Ok(report))
}

/// The child's side (`--pinned-only`): starts its own peer, manager and
/// server (pinned like itself), measures, prints one JSON line.
pub async fn child(s: &Settings) -> Result<()> {
    let mut procs = Procs::new(&s.child_args);
    let result = measure(s, &mut procs).await;
    let report = result.map_err(|e| procs.explain(e))?;
    drop(procs);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The pinned measurements, on processes started into `procs`.
async fn measure(s: &Settings, procs: &mut Procs) -> Result<PinnedReport> {
    let peer = addr_of(&procs.start(&["bench-peer"])?)?;
    let manager = procs.start_cluster(1)?;
    let mut cpus = vec![cpus_allowed(None).unwrap_or_else(|| "?".into())];
    for pid in procs.pids() {
        cpus.push(cpus_allowed(Some(pid)).unwrap_or_else(|| "?".into()));
    }
    let w = super::connect(&manager, &s.net).await?;
    let table = super::create_table(&w, "pinned", s.dim).await?;
    let ceilings = procs::ceilings(&peer, s.duration, s.reps, false).await?;
    let mut stream = KeyStream::new(0x7069_6e6e_6564);
    let mut pool = Pool::new(&mut stream, 1);
    let mut cases = Vec::new();
    for op in OPS {
        let case = Case {
            table: &table,
            op,
            dim: s.dim,
            depth: 1,
        };
        let runs = repeat(&w, &case, &mut Source::Lists(&mut pool), s).await?;
        let spec = CaseSpec {
            op: op_name(op),
            keys: 1,
            depth: 1,
            workers: 1,
            table_keys: None,
            dense: false,
        };
        cases.push(CaseReport::new(spec, runs, &ceilings));
    }
    w.shutdown();
    Ok(PinnedReport {
        cpus_allowed: cpus,
        rtt_p50_us: ceilings.rtt_p50_us,
        rtt_p99_us: ceilings.rtt_p99_us,
        cases,
    })
}
