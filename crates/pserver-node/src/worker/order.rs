//! The order pushes leave in, and the corks they hand down it.
//!
//! A worker's pushes queue their frames one after another, in the order
//! they were made ([`Order::enter`]): a server keeps the highest clock each
//! worker pushed to a range, so a later clock arriving first would make the
//! earlier look like a duplicate. A push whose frames are queued while the
//! next one is already on its way holds its connections corked and hands
//! the corks to that next push, which queues its own frames behind them: a
//! run of pushes made together (32 in flight, refilled as replies come in
//! batches) leaves in one write per connection, not one syscall (and one
//! wake-up of the server) a push. A cork is held only by a push that is
//! about to queue: one that would wait for anything (room among the clocks
//! in flight, the manager, a connection, room in an outbox) lets the corks
//! go first ([`ready_or_release`]), so no frame waits on what may take long.

use crate::conn::Cork;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use tokio::sync::oneshot;

/// The push chain of one worker.
#[derive(Default)]
pub(super) struct Order {
    /// Completes once the latest push has queued its frames, with the
    /// corks it hands on.
    gate: Mutex<Option<oneshot::Receiver<Vec<Cork>>>>,
    /// Pushes made whose frames are not all queued yet.
    coming: Arc<AtomicUsize>,
}

/// A push's place in the chain: what it waits for, and what it gives the
/// next push.
pub(super) struct Place {
    /// The push before this one (none for the first).
    pub before: Option<oneshot::Receiver<Vec<Cork>>>,
    /// Given to the next once this push's frames are queued.
    pub ticket: Ticket,
}

impl Order {
    /// Takes the next place in the chain (in call order).
    pub fn enter(&self) -> Place {
        let (tx, rx) = oneshot::channel();
        self.coming.fetch_add(1, Ordering::SeqCst);
        let before = crate::conn::lock(&self.gate).replace(rx);
        Place {
            before,
            ticket: Ticket {
                next: Some(tx),
                corks: Vec::new(),
                coming: Arc::clone(&self.coming),
            },
        }
    }
}

/// What one push owes the next: its signal, sent (with the corks it
/// holds) when the ticket is dropped, which is once the push's frames are
/// queued or it failed. Dropped unused (a push that never ran), it still
/// lets the next go.
pub(super) struct Ticket {
    next: Option<oneshot::Sender<Vec<Cork>>>,
    /// Corks held for the next push.
    corks: Vec<Cork>,
    coming: Arc<AtomicUsize>,
}

impl Ticket {
    /// Whether a later push is on its way (made, its frames not queued):
    /// then corks are worth holding for it. Asked once the push before
    /// has let this one go (its ticket, like every earlier one, is gone
    /// and no longer counted).
    pub fn followed(&self) -> bool {
        self.coming.load(Ordering::SeqCst) > 1
    }

    /// Holds `cork` until the ticket is dropped (then handed on, or let go).
    pub fn hold(&mut self, cork: Cork) {
        self.corks.push(cork);
    }

    /// Holds the corks a push before handed on.
    pub fn inherit(&mut self, corks: Vec<Cork>) {
        self.corks.extend(corks);
    }

    /// Lets every held cork go (their frames are written).
    pub fn release(&mut self) {
        self.corks.clear();
    }

    /// [`ready_or_release`] for the corks of this ticket.
    pub async fn ready<F: Future>(&mut self, f: F) -> F::Output {
        ready_or_release(f, || self.release()).await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let left = self.coming.fetch_sub(1, Ordering::SeqCst) - 1;
        let corks = std::mem::take(&mut self.corks);
        let Some(next) = self.next.take() else {
            return;
        };
        if left > 0 && !corks.is_empty() {
            // Refused (the next push is gone), the corks come back and go
            // with the error: their frames are written.
            let _ = next.send(corks);
        } else {
            // Let go here, before the signal (a dropped sender is one too).
            drop(corks);
            drop(next);
        }
    }
}

/// Awaits `f`; unless it is ready at its first poll, calls `release`
/// first: corks held for the next push must not wait on what may take
/// long.
pub(super) async fn ready_or_release<F: Future>(f: F, release: impl FnOnce()) -> F::Output {
    let mut f = pin!(f);
    let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(v) => v,
        Poll::Pending => {
            release();
            f.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_next_push_gets_the_corks_only_when_one_is_coming() {
        let order = Order::default();
        let (end, _peer) = tokio::io::duplex(1024);
        let (_reader, out) = crate::conn::split(end, pserver_wire::Limits::default());
        let mut a = order.enter();
        let b = order.enter();
        assert!(a.ticket.followed(), "b was made after a");
        a.ticket.hold(out.cork());
        drop(a.ticket);
        assert!(!b.ticket.followed(), "nothing after b");
        let got = b.before.expect("b waits for a").await.expect("a sent");
        assert_eq!(got.len(), 1, "b was coming: a handed its cork on");
        // Last in the chain: the corks are let go, the signal still comes.
        let mut b_ticket = b.ticket;
        b_ticket.inherit(got);
        let c = order.enter();
        drop(c.ticket);
        drop(b_ticket);
        assert!(c.before.expect("c waits for b").await.is_err());
    }

    #[tokio::test]
    async fn a_push_that_never_ran_still_lets_the_next_go() {
        let order = Order::default();
        let a = order.enter();
        let b = order.enter();
        drop(a);
        assert!(b.before.expect("b waits for a").await.is_err());
        assert!(!b.ticket.followed());
    }

    #[tokio::test]
    async fn a_wait_that_is_not_ready_at_once_releases_first() {
        let mut released = false;
        let v = ready_or_release(async { 7 }, || released = true).await;
        assert_eq!((v, released), (7, false));
        let mut released = false;
        let v = ready_or_release(
            async {
                tokio::task::yield_now().await;
                8
            },
            || released = true,
        )
        .await;
        assert_eq!((v, released), (8, true));
    }
}
