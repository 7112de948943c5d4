//! The demo job of `pserver local --workers W`: every worker pushes +1 to the
//! same hashed keys at each iteration under bounded delay, pulls, and checks
//! what the consistency model promises. It exercises the whole path (slicing,
//! range clocks, waiting pulls, barriers) and prints progress and a result.

use anyhow::{Result, bail};
use pserver_core::{Consistency, UpdaterSpec};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::time::Instant;

/// Keys every worker pushes each iteration.
const KEYS: usize = 10_000;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Hashed keys spread over the ring, sorted.
fn demo_keys() -> Vec<u64> {
    let mut keys: Vec<u64> = (0..KEYS as u64).map(|i| splitmix64(i) >> 1).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Runs the demo with `workers` in-process workers (connecting over `net`)
/// for `iterations` at delay `tau`.
pub async fn run(
    manager: &str,
    net: &pserver_node::net::Net,
    workers: usize,
    iterations: u64,
    tau: u64,
) -> Result<()> {
    let consistency = if tau == 0 {
        Consistency::Sequential
    } else {
        Consistency::Bounded(tau)
    };
    println!(
        "demo: {workers} workers push +1 to {KEYS} keys for {iterations} iterations, {consistency}"
    );
    let mut ws = Vec::new();
    for _ in 0..workers {
        ws.push(
            Worker::connect(WorkerConfig {
                net: net.clone(),
                ..WorkerConfig::new(manager)
            })
            .await?,
        );
    }
    ws[0]
        .create_table(
            "demo",
            TableOptions::new(1, UpdaterSpec::Add).consistency(consistency),
        )
        .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, w) in ws.iter().cloned().enumerate() {
        tasks.push(tokio::spawn(async move {
            worker_loop(w, i == 0, workers as u64, iterations, tau).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let keys = demo_keys();
    let final_vals = ws[0].pull("demo", keys.clone()).await?;
    let want = (workers as u64 * iterations) as f32;
    let wrong = final_vals.iter().filter(|&&v| v != want).count();
    let moved = 2.0 * (workers as f64) * (iterations as f64) * keys.len() as f64;
    println!(
        "result: {} keys, every value {} = {workers} workers x {iterations} iterations: {}",
        keys.len(),
        want,
        if wrong == 0 { "ok" } else { "WRONG" }
    );
    println!(
        "        {:.2} s, {:.1}M keys/s pushed+pulled, {} bytes sent by worker 0",
        secs,
        moved / secs / 1e6,
        ws[0]
            .traffic()
            .bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    for w in &ws {
        w.shutdown();
    }
    if wrong > 0 {
        bail!("{wrong} keys hold a value other than {want}");
    }
    Ok(())
}

async fn worker_loop(
    w: Worker,
    report: bool,
    workers: u64,
    iterations: u64,
    tau: u64,
) -> Result<()> {
    let keys = demo_keys();
    let ones = vec![1.0f32; keys.len()];
    w.barrier("demo-start").await?;
    let step = (iterations / 10).max(1);
    for t in 1..=iterations {
        w.set_clock(t);
        w.push("demo", keys.clone(), ones.clone()).await?;
        let vals = w.pull("demo", keys.clone()).await?;
        // Every live worker has pushed at least t - tau by now.
        let floor = (workers * t.saturating_sub(tau)) as f32;
        if let Some(v) = vals.iter().find(|&&v| v < floor) {
            bail!("iteration {t}: pulled {v} < {floor}: the delay bound was broken");
        }
        if report && t.is_multiple_of(step) {
            println!("  iteration {t}/{iterations}");
        }
    }
    w.barrier("demo-end").await?;
    Ok(())
}
