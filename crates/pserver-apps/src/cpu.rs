//! Long computations inside async code.
//!
//! A worker's iteration over millions of rows is plain computation in an
//! async function. Run on a runtime thread as it is, it holds that thread
//! for its whole length, and with it the tasks queued there and, when every
//! thread is so held, the timers: the worker library's heartbeats stop and
//! the manager declares the worker dead (a loaded 2-core machine, 4 worker
//! processes of 2.5M rows each: iterations of over a second each, and 3 of
//! the 4 declared dead at the first). [`heavy`] runs such a computation in
//! place but first hands the thread's other tasks to another thread.

/// Runs `f` on this thread, telling the runtime first (on a multi-thread
/// runtime, `tokio::task::block_in_place`: its other tasks move to another
/// thread meanwhile), or just runs it (outside a runtime, or on a
/// current-thread runtime, which cannot hand its tasks on).
pub fn heavy<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// One runtime thread: a ticking task goes on while another task
    /// computes for 300 ms inside `heavy`, as heartbeats must.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn other_tasks_run_while_a_heavy_computation_holds_the_thread() {
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(10));
            loop {
                every.tick().await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = ticks.load(Ordering::Relaxed);
        let during = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                heavy(|| {
                    let start = Instant::now();
                    while start.elapsed() < Duration::from_millis(300) {
                        std::hint::spin_loop();
                    }
                    ticks.load(Ordering::Relaxed)
                })
            }
        })
        .await
        .unwrap();
        ticker.abort();
        // Ten-millisecond ticks over 300 ms: at least a few, however busy
        // the machine (without `heavy` the one thread is held: none).
        assert!(during >= before + 3, "{before} -> {during}");
    }

    #[test]
    fn outside_a_runtime_it_just_runs() {
        assert_eq!(heavy(|| 7), 7);
    }

    #[tokio::test]
    async fn on_a_current_thread_runtime_it_just_runs() {
        assert_eq!(heavy(|| 8), 8);
    }
}
