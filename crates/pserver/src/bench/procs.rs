//! The processes a benchmark starts, and the loopback ceilings measured
//! against a peer process: a raw TCP request with an 8-byte answer, and one
//! TCP stream's throughput.

use super::stats::{median, quantile};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Started processes; killed when dropped, so an error anywhere leaves
/// nothing behind. Each one's stderr goes to a log file (removed with it)
/// so that when one dies mid-run the error can say how.
#[derive(Default)]
pub struct Procs {
    started: Vec<Proc>,
    /// Flags every child gets after its own (the security flags).
    extra: Vec<String>,
}

/// One started process.
struct Proc {
    child: Child,
    /// `manager`, `server`, `bench-peer`.
    role: String,
    log: PathBuf,
}

impl Procs {
    /// No processes yet; each one started gets `extra` after its own flags.
    pub fn new(extra: &[String]) -> Procs {
        Procs {
            started: Vec::new(),
            extra: extra.to_vec(),
        }
    }

    /// Replaces the flags every process started from now on gets.
    pub fn set_extra(&mut self, extra: &[String]) {
        self.extra = extra.to_vec();
    }

    /// The flags every process started gets after its own.
    pub fn extra(&self) -> &[String] {
        &self.extra
    }

    /// Starts `pserver ARGS`, keeps it, and returns its first line of output.
    pub fn start(&mut self, args: &[&str]) -> Result<String> {
        self.start_in(None, args)
    }

    /// Starts `pserver ARGS` in network namespace `netns` (`ip netns exec`,
    /// which runs it in place, so the pid kept is pserver's own), or here
    /// for `None`; keeps it and returns its first line of output.
    pub fn start_in(&mut self, netns: Option<&str>, args: &[&str]) -> Result<String> {
        let role = args.first().copied().unwrap_or("pserver").to_string();
        let log = std::env::temp_dir().join(format!(
            "pserver-bench-{}-{}-{role}.log",
            std::process::id(),
            self.started.len()
        ));
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.extra.iter().map(String::as_str));
        let (child, line) = spawn(netns, &all, &log)?;
        self.started.push(Proc { child, role, log });
        Ok(line)
    }

    /// Starts a manager (default lease: a server busy with a 16M-key push
    /// still heartbeats) and `servers` servers; returns the manager's address.
    pub fn start_cluster(&mut self, servers: usize) -> Result<String> {
        let line = self.start(&["manager", "--listen", "127.0.0.1:0"])?;
        let manager = addr_of(&line)?;
        for _ in 0..servers {
            self.start(&["server", "--manager", &manager])?;
        }
        Ok(manager)
    }

    /// The process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.started.iter().map(|p| p.child.id()).collect()
    }

    /// Adds to `err` which of these processes has exited, how, and the end
    /// of its log: a case that fails because a node died says so.
    pub fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        let mut dead = Vec::new();
        for p in &mut self.started {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                dead.push(format!(
                    "the {} process (pid {}) exited: {status}{}{}",
                    p.role,
                    p.child.id(),
                    if tail.is_empty() {
                        ""
                    } else {
                        "; its last words: "
                    },
                    tail.join(" / ")
                ));
            }
        }
        if dead.is_empty() {
            err
        } else {
            err.context(dead.join("; "))
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.started {
            let _ = p.child.kill();
            let _ = p.child.wait();
            if child_log().is_none() {
                let _ = std::fs::remove_file(&p.log);
            }
        }
    }
}

/// `PSERVER_CHILD_LOG`: the log filter (`RUST_LOG`) of every child
/// process; when set, their logs are kept in the temporary directory
/// (`pserver-bench-PID-N-ROLE.log`) to read after the run.
pub fn child_log() -> Option<String> {
    std::env::var("PSERVER_CHILD_LOG").ok()
}

/// Starts `pserver ARGS` (this same binary; in network namespace `netns`
/// if given), its stderr to `log`, and returns it with its first line of
/// output, which says where it listens.
fn spawn(netns: Option<&str>, args: &[&str], log: &Path) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("finding the pserver binary")?;
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut child = cmd
        .args(args)
        .env("RUST_LOG", child_log().unwrap_or_else(|| "error".into()))
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting pserver {}", args.join(" ")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let line = line.trim().to_string();
    if line.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("pserver {} printed nothing", args.join(" "));
    }
    Ok((child, line))
}

/// The last word of a line (the address the child listens on).
pub fn addr_of(line: &str) -> Result<String> {
    line.rsplit(' ')
        .next()
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .with_context(|| format!("no address in {line:?}"))
}

/// The CPUs process `pid` may run on (`Cpus_allowed_list`, e.g. `0` or
/// `0-1`), or `None` without `/proc`.
pub fn cpus_allowed(pid: Option<u32>) -> Option<String> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// Requests this long or shorter are answered with 8 bytes; longer ones are
/// stream chunks, counted and answered only at the end of the stream.
const SHORT_REQUEST: usize = 64;

/// Runs the peer: answers each length-prefixed request of at most
/// `SHORT_REQUEST` bytes with 8 bytes, and after a stream (a zero-length
/// marker) answers with the bytes it read.
pub async fn peer() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("bench peer listening on {}", listener.local_addr()?);
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(serve_peer(s));
    }
}

/// One connection of the peer; ends when the other side does.
async fn serve_peer(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut streamed: u64 = 0;
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            // End of a stream: report what arrived.
            s.write_all(&streamed.to_le_bytes()).await?;
            streamed = 0;
            continue;
        }
        let mut left = n;
        while left > 0 {
            let take = left.min(buf.len());
            s.read_exact(&mut buf[..take]).await?;
            left -= take;
        }
        if n > SHORT_REQUEST {
            streamed += n as u64;
        } else {
            s.write_all(&[0u8; 8]).await?;
        }
    }
}

/// The raw TCP round trip of one repetition.
#[derive(Clone, Debug)]
pub struct Rtt {
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

/// Round trips for `duration`: a 16-byte request, an 8-byte answer.
pub async fn rtt(addr: &str, duration: Duration) -> Result<Rtt> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the bench peer at {addr}"))?;
    s.set_nodelay(true)?;
    let mut msg = Vec::from(16u32.to_le_bytes());
    msg.extend_from_slice(&[1u8; 16]);
    let mut ack = [0u8; 8];
    let mut samples = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut ack).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok(Rtt {
        p50_us: quantile(&samples, 0.5),
        p99_us: quantile(&samples, 0.99),
    })
}

/// One stream of 1 MiB writes for `duration`, then a marker; the peer says
/// how much it read, so the figure is what arrived, in GB/s.
pub async fn stream(addr: &str, duration: Duration) -> Result<f64> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the bench peer at {addr}"))?;
    s.set_nodelay(true)?;
    let chunk = vec![7u8; 1 << 20];
    let len = (chunk.len() as u32).to_le_bytes();
    let t = Instant::now();
    let end = t + duration;
    while Instant::now() < end {
        s.write_all(&len).await?;
        s.write_all(&chunk).await?;
    }
    s.write_all(&0u32.to_le_bytes()).await?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got).await?;
    Ok(u64::from_le_bytes(got) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// The loopback ceilings of a run (medians over repetitions).
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    /// Raw TCP request + 8-byte answer between two processes, p50 µs.
    pub rtt_p50_us: f64,
    /// Its p99.
    pub rtt_p99_us: f64,
    /// One TCP stream between two processes, 1 MiB writes, GB/s; `None`
    /// when not measured (the pinned run measures round trips only).
    pub stream_gb_per_s: Option<f64>,
}

/// Measures the ceilings `reps` times against the peer at `addr`; the
/// stream only when `with_stream`.
pub async fn ceilings(
    addr: &str,
    duration: Duration,
    reps: usize,
    with_stream: bool,
) -> Result<Ceilings> {
    let mut rtts = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..reps {
        rtts.push(rtt(addr, duration).await?);
        if with_stream {
            streams.push(stream(addr, duration).await?);
        }
    }
    Ok(Ceilings {
        rtt_p50_us: median(rtts.iter().map(|r| r.p50_us).collect()),
        rtt_p99_us: median(rtts.iter().map(|r| r.p99_us).collect()),
        stream_gb_per_s: with_stream.then(|| median(streams)),
    })
}
