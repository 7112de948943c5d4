//! The span of clocks a worker keeps in flight.
//!
//! A server remembers, per worker and key range, the highest clock pushed
//! and which of the [`WINDOW`] clocks below it were applied
//! ([`RangeClock`](pserver_core::clock::RangeClock)). A slice resent after a
//! map change is applied exactly once as long as its clock is within that
//! window of the worker's highest. Pushes complete out of order (a slice
//! backing off while later pushes go through), so counting pushes in flight
//! does not bound the span; this does: a push waits to start until every
//! push in flight, itself included, lies within `WINDOW - 1` clocks.

use pserver_core::clock::WINDOW;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The clocks of the pushes in flight. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct ClockWindow {
    /// Clock -> pushes in flight at it.
    clocks: Mutex<BTreeMap<u64, usize>>,
    freed: Notify,
}

/// A push's place in the window, given back when dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    window: Arc<ClockWindow>,
    clock: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut clocks = crate::conn::lock(&self.window.clocks);
        if let Some(n) = clocks.get_mut(&self.clock) {
            *n -= 1;
            if *n == 0 {
                clocks.remove(&self.clock);
            }
        }
        drop(clocks);
        self.window.freed.notify_waiters();
    }
}

impl ClockWindow {
    /// Waits until a push at `clock` keeps every push in flight within
    /// the window, and takes its place.
    pub(crate) async fn enter(self: &Arc<Self>, clock: u64) -> InFlight {
        loop {
            // Registered before checking, so a place freed in between wakes us.
            let freed = self.freed.notified();
            if self.try_enter(clock) {
                return InFlight {
                    window: Arc::clone(self),
                    clock,
                };
            }
            freed.await;
        }
    }

    fn try_enter(&self, clock: u64) -> bool {
        let mut clocks = crate::conn::lock(&self.clocks);
        let lo = clocks.keys().next().map_or(clock, |&c| c.min(clock));
        let hi = clocks.keys().next_back().map_or(clock, |&c| c.max(clock));
        if hi - lo >= WINDOW {
            return false;
        }
        *clocks.entry(clock).or_default() += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_push_waits_until_the_oldest_in_flight_is_near_enough() {
        let w = Arc::new(ClockWindow::default());
        let first = w.enter(1).await;
        let mut rest = Vec::new();
        for c in 2..=WINDOW {
            rest.push(w.enter(c).await);
        }
        let w2 = Arc::clone(&w);
        let late = tokio::spawn(async move { w2.enter(WINDOW + 1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished(), "65 clocks would be in flight");
        // Later pushes finishing do not help; the oldest does.
        drop(rest.pop());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished());
        drop(first);
        let _in = tokio::time::timeout(Duration::from_secs(1), late)
            .await
            .expect("admitted once clock 1 is done")
            .unwrap();
        // Going far back waits too, and several pushes may share a clock.
        let w3 = Arc::clone(&w);
        let back = tokio::spawn(async move { w3.enter(1).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!back.is_finished());
        let _again = w.enter(WINDOW).await;
        drop(rest);
        drop(_in);
        drop(_again);
        tokio::time::timeout(Duration::from_secs(1), back)
            .await
            .expect("admitted once the window is empty")
            .unwrap();
    }
}
