//! The threads a store may use for one large request: a pool that lives as
//! long as the server, shared by all its tables.
//!
//! A push or pull of many keys is split by shard over these threads (see
//! [`Store::with_threads`](super::Store::with_threads)). The pool's threads
//! stay alive between requests: a thread started for each push took 45 to
//! 280 us to begin on a 2-vCPU VM (the idle vCPU must be woken), against
//! about 0.5 ms of work per thread for a cache-resident 65,536-key push.

use std::sync::Arc;

/// Why the threads could not be started (the OS refused one). A server
/// then applies every request on one thread, which is slower but correct.
#[derive(Debug, thiserror::Error)]
#[error("could not start {threads} apply threads: {source}")]
pub struct ThreadsError {
    /// Threads asked for, beside the caller's own.
    pub threads: usize,
    /// What the thread pool reported.
    #[source]
    pub source: rayon_core::ThreadPoolBuildError,
}

/// How many threads one request may use, and the pool that runs all but
/// the caller's share. Cloning shares the pool. The default is one thread:
/// everything on the caller's thread, no pool.
#[derive(Clone, Default)]
pub struct Threads {
    /// `count - 1` threads; `None` when `count` is 1.
    pool: Option<Arc<rayon_core::ThreadPool>>,
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads")
            .field("count", &self.count())
            .finish()
    }
}

impl Threads {
    /// One thread: every request runs on its caller's thread.
    pub fn one() -> Threads {
        Threads::default()
    }

    /// Up to `threads` threads a request, rounded down to a power of two
    /// and capped at [`SHARDS`](super::SHARDS) (each thread owns whole
    /// shards); 0 counts as 1. Starts `count - 1` threads now, which wait
    /// for requests; the caller's thread does the rest of each.
    pub fn new(threads: usize) -> Result<Threads, ThreadsError> {
        let t = threads.clamp(1, super::SHARDS);
        let count = 1usize << t.ilog2();
        if count == 1 {
            return Ok(Threads::one());
        }
        let pool = rayon_core::ThreadPoolBuilder::new()
            .num_threads(count - 1)
            .thread_name(|i| format!("pserver-apply-{i}"))
            .build()
            .map_err(|source| ThreadsError {
                threads: count - 1,
                source,
            })?;
        Ok(Threads {
            pool: Some(Arc::new(pool)),
        })
    }

    /// Threads a request may use, the caller's included: a power of two.
    pub fn count(&self) -> usize {
        self.pool
            .as_ref()
            .map_or(1, |p| p.current_num_threads() + 1)
    }

    /// The pool of the threads beside the caller's, if any.
    pub(super) fn pool(&self) -> Option<&rayon_core::ThreadPool> {
        self.pool.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_down_to_a_power_of_two_within_the_shards() {
        let count = |n| Threads::new(n).expect("threads").count();
        assert_eq!(count(0), 1);
        assert_eq!(count(1), 1);
        assert_eq!(count(2), 2);
        assert_eq!(count(3), 2);
        assert_eq!(count(7), 4);
        assert_eq!(count(1000), super::super::SHARDS);
        assert_eq!(Threads::one().count(), 1);
        assert!(Threads::one().pool().is_none());
    }

    #[test]
    fn clones_share_one_pool() {
        let a = Threads::new(2).expect("threads");
        let b = a.clone();
        let (pa, pb) = (a.pool().expect("pool"), b.pool().expect("pool"));
        assert!(std::ptr::eq(pa, pb));
    }
}
