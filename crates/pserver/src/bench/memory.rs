//! Bytes per key of a server's table, measured in this process: a `Store`
//! of AdaGrad keys of dim 1, filled by pushes as a server would, weighed by
//! its own account and by the growth of this process's resident set.

use super::keys::KeyStream;
use super::stats::ratio;
use anyhow::{Context, Result, bail};
use pserver_core::store::Store;
use pserver_core::updater::Registry;
use pserver_core::{Consistency, Init, TableSpec, UpdaterSpec};
use serde::Serialize;
use std::time::Instant;

/// Keys per push while filling the table (a large request's worth).
const CHUNK: usize = 1 << 20;

/// Bytes per key to have free before starting: generous for a hash index
/// and a slab that both double as they grow.
const NEEDED_BYTES_PER_KEY: u64 = 64;

/// What the memory case measured.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// Keys stored.
    pub keys: u64,
    /// Floats per key.
    pub dim: u32,
    /// The updater (its state is stored beside each weight).
    pub updater: String,
    /// The raw content per key: an 8-byte key and 4 bytes per stored float.
    pub raw_bytes_per_key: f64,
    /// `Store::memory_bytes` / keys.
    pub store_bytes_per_key: f64,
    /// That over the raw content.
    pub store_vs_raw: f64,
    /// Growth of this process's resident set / keys (`None` without `/proc`).
    pub rss_bytes_per_key: Option<f64>,
    /// That over the raw content.
    pub rss_vs_raw: Option<f64>,
    /// Seconds taken to fill the table.
    pub fill_seconds: f64,
}

/// This process's resident set in bytes (`VmRSS`), if `/proc` says.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:")
}

/// A `NAME: <n> kB` field of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix(name))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses to start a fill of `keys` keys (asked for by `flag`; `skip` says
/// how to do without it) the machine cannot hold (better than being killed
/// halfway by the kernel).
pub fn check_room(flag: &str, keys: u64, skip: &str) -> Result<()> {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(());
    };
    let Some(available) = kib_field(&meminfo, "MemAvailable:") else {
        return Ok(());
    };
    let needed = keys.saturating_mul(NEEDED_BYTES_PER_KEY);
    if needed > available {
        bail!(
            "{flag} {keys} needs about {:.1} GB free, the machine has {:.1} GB available; \
             lower it (or {skip})",
            needed as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// An empty AdaGrad table of dim 1, as a server would hold it.
fn adagrad_store() -> Result<Store> {
    let updater = UpdaterSpec::AdaGrad { lr: 0.1, eps: 1e-6 };
    let built = Registry::new()
        .build(&updater)
        .context("building the AdaGrad updater")?;
    let spec = TableSpec {
        id: 1,
        name: "bench-memory".into(),
        dim: 1,
        init: Init::Zero,
        updater,
        consistency: Consistency::Eventual,
        aggregate: false,
        job: None,
    };
    Ok(Store::new(spec, built))
}

/// Fills a table with `keys` distinct random keys, pushed in sorted chunks
/// like a server receives them, and weighs it. The table is freed before
/// this returns. Blocking: call it off the async runtime's threads.
pub fn measure(keys: u64) -> Result<MemoryReport> {
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut store = adagrad_store()?;
    let mut stream = KeyStream::new(0x6d65_6d6f_7279);
    let grads = vec![0.5f32; CHUNK * store.push_width()];
    let mut left = keys;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        let chunk = stream.sorted(n);
        store
            .push(&chunk, &grads[..n * store.push_width()], |_| true)
            .context("filling the memory table")?;
        left -= n as u64;
    }
    let fill_seconds = started.elapsed().as_secs_f64();
    // The chunk buffers are freed or reused by now; what grew is the table.
    let rss_after = rss_bytes();
    let stored = store.len() as u64;
    if stored != keys {
        bail!("the memory table holds {stored} keys, {keys} were pushed");
    }
    let raw = 8.0 + 4.0 * store.slot_width() as f64;
    let store_per_key = store.memory_bytes() as f64 / keys as f64;
    let rss_per_key = rss_before
        .zip(rss_after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / keys as f64);
    drop(store);
    Ok(MemoryReport {
        keys,
        dim: 1,
        updater: "adagrad".into(),
        raw_bytes_per_key: raw,
        store_bytes_per_key: store_per_key,
        store_vs_raw: store_per_key / raw,
        rss_bytes_per_key: rss_per_key,
        rss_vs_raw: rss_per_key.and_then(|r| ratio(r, raw)),
        fill_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_read_in_bytes() {
        let text = "Name:\tx\nVmRSS:\t  1234 kB\nMemAvailable:   10 kB\n";
        assert_eq!(kib_field(text, "VmRSS:"), Some(1234 * 1024));
        assert_eq!(kib_field(text, "MemAvailable:"), Some(10 * 1024));
        assert_eq!(kib_field(text, "VmSwap:"), None);
    }

    #[test]
    fn a_small_table_weighs_at_least_its_content() {
        let r = measure(10_000).unwrap();
        assert_eq!(r.keys, 10_000);
        // AdaGrad of dim 1: a weight and an accumulator per key.
        assert_eq!(r.raw_bytes_per_key, 16.0);
        assert!(r.store_bytes_per_key >= 12.0, "{r:?}");
        assert!((r.store_vs_raw - r.store_bytes_per_key / 16.0).abs() < 1e-12);
    }
}
