//! A parallel map whose results are consumed in job order, with a bounded
//! number of results held: the generator's threads make chunks of rows,
//! one thread writes them to the files in order.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, mpsc};

/// Which jobs may start.
struct Gate {
    /// The next job to hand out.
    next: usize,
    /// Jobs consumed so far (all below this index).
    consumed: usize,
    /// Set when the sink failed or a worker panicked: hand out nothing more.
    stop: bool,
}

/// Runs `work` on every job with `threads` threads and feeds the results
/// to `sink` in job order, on the calling thread. A job starts only when it
/// is fewer than `window` jobs ahead of the last one consumed, so at most
/// `window` results wait in memory. The first error of `sink` stops the
/// run (jobs under way finish, their results are dropped) and is returned.
pub(crate) fn ordered<J, R, E>(
    jobs: &[J],
    threads: usize,
    window: usize,
    work: impl Fn(&J) -> R + Sync,
    mut sink: impl FnMut(usize, R) -> Result<(), E>,
) -> Result<(), E>
where
    J: Sync,
    R: Send,
{
    let window = window.max(1);
    let gate = Mutex::new(Gate {
        next: 0,
        consumed: 0,
        stop: false,
    });
    let wake = Condvar::new();
    let stop = || {
        if let Ok(mut g) = gate.lock() {
            g.stop = true;
        }
        wake.notify_all();
    };
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, R)>();
        for _ in 0..threads.max(1) {
            let tx = tx.clone();
            let (gate, wake, work) = (&gate, &wake, &work);
            s.spawn(move || {
                // If `work` panics, the job's result never comes: stop the
                // others instead of leaving them waiting for it.
                let _guard = StopOnPanic(&stop);
                loop {
                    let job = {
                        let Ok(mut g) = gate.lock() else { return };
                        loop {
                            if g.stop || g.next >= jobs.len() {
                                return;
                            }
                            if g.next < g.consumed + window {
                                break;
                            }
                            g = match wake.wait(g) {
                                Ok(g) => g,
                                Err(_) => return,
                            };
                        }
                        g.next += 1;
                        g.next - 1
                    };
                    if tx.send((job, work(&jobs[job]))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut waiting = BTreeMap::new();
        let mut want = 0;
        for (job, result) in rx {
            waiting.insert(job, result);
            while let Some(result) = waiting.remove(&want) {
                if let Err(e) = sink(want, result) {
                    stop();
                    return Err(e);
                }
                want += 1;
                if let Ok(mut g) = gate.lock() {
                    g.consumed = want;
                }
                wake.notify_all();
            }
        }
        Ok(())
    })
}

struct StopOnPanic<'a, F: Fn()>(&'a F);

impl<F: Fn()> Drop for StopOnPanic<'_, F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn results_arrive_in_order_with_at_most_window_ahead() {
        let jobs: Vec<usize> = (0..200).collect();
        let started = AtomicUsize::new(0);
        let mut got = Vec::new();
        let mut consumed = 0;
        let r: Result<(), ()> = ordered(
            &jobs,
            4,
            3,
            |&j| {
                started.fetch_add(1, Ordering::SeqCst);
                // Later jobs finish first now and then.
                if j % 7 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                j * 2
            },
            |i, v| {
                assert!(started.load(Ordering::SeqCst) <= consumed + 3);
                consumed += 1;
                got.push((i, v));
                Ok(())
            },
        );
        assert!(r.is_ok());
        assert_eq!(got, (0..200).map(|j| (j, j * 2)).collect::<Vec<_>>());
    }

    #[test]
    fn a_sink_error_stops_the_run() {
        let jobs: Vec<usize> = (0..1000).collect();
        let done = AtomicUsize::new(0);
        let r = ordered(
            &jobs,
            2,
            4,
            |&j| {
                done.fetch_add(1, Ordering::SeqCst);
                j
            },
            |i, _| if i == 10 { Err("disk full") } else { Ok(()) },
        );
        assert_eq!(r, Err("disk full"));
        assert!(done.load(Ordering::SeqCst) <= 11 + 4);
    }

    #[test]
    fn a_panicking_job_ends_the_run_instead_of_hanging() {
        let jobs: Vec<usize> = (0..100).collect();
        let r = std::panic::catch_unwind(|| {
            ordered(
                &jobs,
                2,
                2,
                |&j| {
                    assert!(j != 5, "job 5 fails");
                    j
                },
                |_, _| Ok::<(), ()>(()),
            )
        });
        assert!(r.is_err());
    }
}
