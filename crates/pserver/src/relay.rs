//! `pserver relay` (hidden): a TCP relay that makes a link slow and lossy,
//! for tests of real processes where the kernel has no `tc netem`.
//!
//! It accepts connections on `--listen` and opens one to `--to` for each,
//! then copies bytes both ways, read by read ("chunks"). Every chunk is
//! held for `--delay-ms` plus or minus up to `--jitter-ms` before it is
//! written on; chunks of one direction never overtake each other, so a
//! held chunk holds back those behind it, as on a real link. TCP never
//! loses bytes, so loss is modelled as what a lost segment does to a TCP
//! stream: with probability `--stall-prob` a chunk waits `--stall-ms` more
//! (a retransmission), and with probability `--reset-prob` the connection
//! is reset on both sides (`SO_LINGER` 0: the peers see a reset, bytes
//! still queued are dropped). The random choices come from `--seed`, so a
//! run's faults depend only on it and the chunking.
//!
//! Bounded: it stops after `--for-secs`, on SIGTERM or Ctrl-C, and serves
//! at most `--max-connections` at once. It prints one line when listening
//! (`relay to TARGET listening on ADDR`, the address last as other
//! roles print it) and one summary line when it stops.

use anyhow::{Context, Result, bail};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// Flags of `pserver relay`.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayArgs {
    /// Address to accept connections on (port 0 picks a free one).
    #[arg(long)]
    listen: String,
    /// Address to relay each connection to.
    #[arg(long)]
    to: String,
    /// Delay added to every chunk, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Up to this much more or less delay per chunk, uniformly drawn.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Probability per chunk of a retransmission-like pause.
    #[arg(long, default_value_t = 0.0)]
    stall_prob: f64,
    /// Length of that pause, in milliseconds.
    #[arg(long, default_value_t = 200)]
    stall_ms: u64,
    /// Probability per chunk that the connection is reset (both sides).
    #[arg(long, default_value_t = 0.0)]
    reset_prob: f64,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 300)]
    for_secs: u64,
    /// Most connections relayed at once; more wait to be accepted.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

/// What one relay did, printed when it stops.
#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    stalls: AtomicU64,
    resets: AtomicU64,
}

/// The fault model, shared by every connection.
#[derive(Clone, Copy, Debug)]
struct Faults {
    delay_ms: u64,
    jitter_ms: u64,
    stall_prob: f64,
    stall_ms: u64,
    reset_prob: f64,
}

/// What happens to one chunk.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Written on after this long.
    After(Duration, bool),
    /// The connection is reset instead.
    Reset,
}

impl Faults {
    fn fate(&self, rng: &mut Rng) -> Fate {
        if self.reset_prob > 0.0 && rng.unit() < self.reset_prob {
            return Fate::Reset;
        }
        let mut ms = self.delay_ms as f64;
        if self.jitter_ms > 0 {
            ms += (rng.unit() * 2.0 - 1.0) * self.jitter_ms as f64;
        }
        let stalled = self.stall_prob > 0.0 && rng.unit() < self.stall_prob;
        if stalled {
            ms += self.stall_ms as f64;
        }
        Fate::After(
            Duration::from_micros((ms.max(0.0) * 1000.0) as u64),
            stalled,
        )
    }
}

/// splitmix64: small, seeded, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `pserver relay`.
pub async fn run(args: RelayArgs) -> Result<()> {
    for (name, p) in [
        ("--stall-prob", args.stall_prob),
        ("--reset-prob", args.reset_prob),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} must be in 0..=1, got {p}");
        }
    }
    if args.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let faults = Faults {
        delay_ms: args.delay_ms,
        jitter_ms: args.jitter_ms,
        stall_prob: args.stall_prob,
        stall_ms: args.stall_ms,
        reset_prob: args.reset_prob,
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    // The test reading this line may close the pipe afterwards: a failed
    // write of either line is ignored.
    say(&format!("relay to {} listening on {local}", args.to));
    let stats = Arc::new(Stats::default());
    let permits = Arc::new(Semaphore::new(args.max_connections));
    let stop = wait_for_stop(Duration::from_secs(args.for_secs));
    tokio::pin!(stop);
    let mut n = 0u64;
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            // A failed accept (e.g. out of descriptors): pause, go on.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        n += 1;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let seed = args.seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407);
        let (to, stats) = (args.to.clone(), Arc::clone(&stats));
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(&to).await {
                relay(client, server, faults, seed, &stats).await;
            }
            drop(permit);
        });
    }
    say(&format!(
        "relay stopped: {} connections, {} chunks, {} bytes, {} stalls, {} resets",
        stats.connections.load(Ordering::Relaxed),
        stats.chunks.load(Ordering::Relaxed),
        stats.bytes.load(Ordering::Relaxed),
        stats.stalls.load(Ordering::Relaxed),
        stats.resets.load(Ordering::Relaxed),
    ));
    Ok(())
}

/// One line on stdout, flushed; errors (a closed pipe) are ignored.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Returns after `limit`, on SIGTERM or on Ctrl-C.
async fn wait_for_stop(limit: Duration) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::time::sleep(limit) => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(limit) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Chunks in flight per direction; a full queue stops reading, so a slow
/// link pushes back on its sender as TCP would.
const QUEUED_CHUNKS: usize = 256;

/// Relays one connection until both directions end, or resets it.
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    faults: Faults,
    seed: u64,
    stats: &Stats,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let mut up = Rng(seed);
        let mut down = Rng(seed.rotate_left(17) ^ 0x5851_F42D_4C95_7F2D);
        let a = pump(client_read, server_write, faults, &mut up, stats);
        let b = pump(server_read, client_write, faults, &mut down, stats);
        tokio::pin!(a, b);
        let (mut a_done, mut b_done) = (false, false);
        let mut reset = false;
        // A reset drawn in either direction ends both at once.
        while !(reset || (a_done && b_done)) {
            tokio::select! {
                r = &mut a, if !a_done => { a_done = true; reset = r; }
                r = &mut b, if !b_done => { b_done = true; reset = r; }
            }
        }
        reset
    };
    if reset {
        // SO_LINGER 0, then close: each peer sees a reset and bytes still
        // queued are dropped.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies one direction chunk by chunk with the drawn delays. Returns
/// whether a reset was drawn; otherwise, once the reader sees the end of
/// the stream (or an error), what is queued is written and the other side
/// is shut down for writing.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    to: tokio::net::tcp::WriteHalf<'_>,
    faults: Faults,
    rng: &mut Rng,
    stats: &Stats,
) -> bool {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    // The writer: each chunk at its due time, in order.
    let writer = async move {
        let mut to = to;
        let mut ok = true;
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            let _ = to.shutdown().await;
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 << 10];
        let mut last = Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            match faults.fate(rng) {
                Fate::Reset => {
                    stats.resets.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Fate::After(d, stalled) => {
                    if stalled {
                        stats.stalls.fetch_add(1, Ordering::Relaxed);
                    }
                    // Never before the chunk ahead of it.
                    let due = (Instant::now() + d).max(last);
                    last = due;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return false;
                    }
                }
            }
        }
    };
    tokio::pin!(writer);
    tokio::select! {
        reset = reader => {
            if reset {
                return true;
            }
            // The sender is gone with the reader: the writer drains.
            writer.await;
            false
        }
        // The writer failed (the other side is gone): this direction ends.
        _ = &mut writer => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fates_follow_the_flags() {
        let mut rng = Rng(7);
        let plain = Faults {
            delay_ms: 20,
            jitter_ms: 10,
            stall_prob: 0.0,
            stall_ms: 200,
            reset_prob: 0.0,
        };
        for _ in 0..1000 {
            match plain.fate(&mut rng) {
                Fate::After(d, false) => {
                    assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(30))
                }
                other => panic!("{other:?}"),
            }
        }
        let lossy = Faults {
            stall_prob: 0.1,
            reset_prob: 0.01,
            ..plain
        };
        let (mut stalls, mut resets) = (0, 0);
        for _ in 0..100_000 {
            match lossy.fate(&mut rng) {
                Fate::Reset => resets += 1,
                Fate::After(d, true) => {
                    assert!(d >= Duration::from_millis(210));
                    stalls += 1
                }
                Fate::After(..) => {}
            }
        }
        assert!((800..1200).contains(&resets), "{resets}");
        assert!((9000..11000).contains(&stalls), "{stalls}");
    }
}
