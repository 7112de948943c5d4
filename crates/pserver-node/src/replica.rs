//! Chain replication's sending side: one ordered queue per next server in a
//! chain.
//!
//! A replica stores whole slots, so the order in which changes to one key
//! arrive is the order in which they must be applied. Each target server has
//! one [`Forwarder`]: a queue filled under the server's state lock (so in
//! the order the changes were made) and drained by one task over one
//! connection, which the target serves in order. Frames go out in batches,
//! all in flight at once; when one is refused for a passing reason (the
//! target has not yet installed the map the change was made under) or the
//! connection fails, the batch is resent from that frame on, in order.
//! Resending is safe: slots are absolute values and clock records only rise.
//!
//! A change counts as replicated when the target answers `Ok`, which it does
//! after forwarding to its own successor: the ack flows back up the chain.
//! A target that cannot be reached for [`GIVE_UP`], or that the map no
//! longer lists as alive ([`Forwarder::abandon`]), is treated as gone: its
//! changes complete as [`Delivery::Abandoned`], which the server's core
//! takes as stored where it is still the range's primary (it fills the
//! replicas after the gone one) and as refused anywhere else (the worker
//! resends to the current primary), so a dead replica never blocks the
//! primary's acknowledgements for longer than the first of the two. A forwarder
//! merely dropped (its own server is stopping) completes nothing: the
//! waiting acknowledgements are never sent, and the workers retry elsewhere.

use crate::conn::Peer;
use crate::net::Net;
pub use crate::server::core::{Delivery, Ticket};
use pserver_core::NodeId;
use pserver_wire::{Control, ErrorCode, Frame, Kind, Limits};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most frames in flight to one target at once.
const BATCH: usize = 256;
/// How long a target may stay unreachable before its changes are given up.
pub const GIVE_UP: Duration = Duration::from_secs(3);
/// Pause before resending after a refusal or a failed connection.
const BACKOFF: Duration = Duration::from_millis(10);

/// One queued change and its ticket.
struct Item {
    frame: Frame,
    ticket: Ticket,
    /// How it went, once known.
    result: Delivery,
    /// Its share of [`Queued`]: its frame's bytes on the wire.
    bytes: u64,
}

/// What a forwarder holds that the target has not answered yet: the
/// chain link's lag, for the server's metrics. Counted once per change
/// (queued, then settled), never per key.
#[derive(Debug, Default)]
pub struct Queued {
    /// Bytes of the changes' frames.
    pub bytes: AtomicU64,
    /// How many changes.
    pub changes: AtomicU64,
}

impl Queued {
    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    fn settle(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.changes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a forwarder reports each change's fate: `(ticket, delivery)`.
pub type Done = mpsc::UnboundedSender<(Ticket, Delivery)>;

/// The ordered queue of changes to one target server.
#[derive(Debug)]
pub struct Forwarder {
    tx: mpsc::UnboundedSender<Item>,
    /// Fired on drop: stop.
    cancel: CancellationToken,
    /// Set (before `cancel` fires) when the target is known dead: what is
    /// queued counts as done.
    abandoned: Arc<AtomicBool>,
    /// What is queued and not yet answered.
    queued: Arc<Queued>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Forwarder {
    /// Starts the task that sends to `target` at `addr`, reporting each
    /// change's fate on `done`. It ends when the forwarder is dropped and
    /// its queue is drained.
    pub fn start(
        me: NodeId,
        target: NodeId,
        addr: String,
        limits: Limits,
        net: Net,
        done: Done,
    ) -> Forwarder {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let abandoned = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(Queued::default());
        tokio::spawn(run(
            me,
            target,
            addr,
            limits,
            net,
            rx,
            done,
            cancel.clone(),
            abandoned.clone(),
            queued.clone(),
        ));
        Forwarder {
            tx,
            cancel,
            abandoned,
            queued,
        }
    }

    /// Gives up on the target, which the map says is dead: everything
    /// queued and not yet answered completes as [`Delivery::Abandoned`],
    /// and the task ends.
    pub fn abandon(self) {
        self.abandoned.store(true, Ordering::SeqCst);
        drop(self);
    }

    /// Queues `frame` as `ticket`. Its fate is reported on the forwarder's
    /// `done` channel once the target (and the rest of the chain) has it or
    /// refused it as stale ([`Delivery`]), or once the target is given up
    /// on; never if the forwarder was dropped without being abandoned (the
    /// server is stopping), and then the change must not be acknowledged.
    pub fn send(&self, ticket: Ticket, frame: Frame) {
        let bytes = frame.encoded_len() as u64 + 4;
        self.queued.add(bytes);
        if let Err(e) = self.tx.send(Item {
            frame,
            ticket,
            result: Delivery::Stored,
            bytes,
        }) {
            self.queued.settle(e.0.bytes);
        }
    }

    /// Bytes and changes queued to the target and not yet answered.
    pub fn queued(&self) -> (u64, u64) {
        (
            self.queued.bytes.load(Ordering::Relaxed),
            self.queued.changes.load(Ordering::Relaxed),
        )
    }

    /// True when the sending task has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// What became of one frame of a batch.
enum Outcome {
    Done,
    /// Refused: the sender is no longer the range's primary.
    Stale,
    /// Resend from here after a pause.
    Again,
}

#[allow(clippy::too_many_arguments)] // the task's whole context, passed once
async fn run(
    me: NodeId,
    target: NodeId,
    addr: String,
    limits: Limits,
    net: Net,
    mut rx: mpsc::UnboundedReceiver<Item>,
    done: Done,
    cancel: CancellationToken,
    abandoned: Arc<AtomicBool>,
    queued: Arc<Queued>,
) {
    let mut peer: Option<Peer> = None;
    let mut lost = Lost::default();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let mut from = 0;
        let mut unreachable_since: Option<Instant> = None;
        while from < batch.len() {
            if cancel.is_cancelled() && !abandoned.load(Ordering::SeqCst) {
                // This server is stopping: nothing is acknowledged.
                return;
            }
            if cancel.is_cancelled() || unreachable_since.is_some_and(|t| t.elapsed() > GIVE_UP) {
                let now = Instant::now();
                if let Some(n) = lost.give_up(batch.len() - from, cancel.is_cancelled(), now) {
                    warn_lost(me, target, n);
                }
                // Unknown whether the rest of the chain has them: the core
                // decides what that means for their acknowledgements.
                for item in &mut batch[from..] {
                    item.result = Delivery::Abandoned;
                }
                break;
            }
            let p = match &peer {
                Some(p) if !p.is_closed() => p.clone(),
                _ => match Peer::connect_via(&net, &addr, limits).await {
                    Ok((p, _notices)) => {
                        peer = Some(p.clone());
                        p
                    }
                    Err(_) => {
                        peer = None;
                        unreachable_since.get_or_insert_with(Instant::now);
                        pause(&cancel).await;
                        continue;
                    }
                },
            };
            // Queue every frame first (in order), then collect the replies.
            let mut replies = Vec::new();
            for item in &batch[from..] {
                match p.send_request(item.frame.clone()).await {
                    Ok(r) => replies.push(r),
                    Err(_) => break,
                }
            }
            let mut advanced = 0;
            let mut again = replies.len() < batch.len() - from;
            for (i, r) in replies.into_iter().enumerate() {
                let reply = tokio::select! {
                    r = r => r,
                    _ = cancel.cancelled() => {
                        again = true;
                        break;
                    }
                };
                match reply.map(|f| outcome(&f)) {
                    Ok(Outcome::Done) => advanced += 1,
                    Ok(Outcome::Stale) => {
                        batch[from + i].result = Delivery::Stale;
                        advanced += 1;
                    }
                    Ok(Outcome::Again) | Err(_) => {
                        again = true;
                        break;
                    }
                }
            }
            from += advanced;
            if again && from < batch.len() {
                if p.is_closed() {
                    peer = None;
                    unreachable_since.get_or_insert_with(Instant::now);
                } else {
                    unreachable_since = None;
                }
                pause(&cancel).await;
            }
        }
        // Reports every change: replicated, refused as stale, or given up on.
        for item in batch {
            queued.settle(item.bytes);
            let _ = done.send((item.ticket, item.result));
        }
    }
    if let Some(n) = lost.finish() {
        warn_lost(me, target, n);
    }
}

fn warn_lost(me: NodeId, target: NodeId, n: usize) {
    tracing::warn!(
        node = me,
        target,
        lost = n,
        "replica unreachable; changes left unreplicated"
    );
}

/// The changes a forwarder gave up on, logged as a few lines rather than
/// one per batch: a target given up on drops every batch still queued, one
/// after another (a healed cut-off server's peers logged 32 identical lines;
/// issue #16, 9). Abandoned (the map says the target is dead), the count is
/// said once, when the queue is done; unreachable, at most once a second.
#[derive(Debug, Default)]
struct Lost {
    /// Given up on and not yet logged.
    unlogged: usize,
    /// When a count was last logged.
    logged: Option<Instant>,
}

impl Lost {
    /// `n` changes given up on at `now` (`abandoned`: because the map says
    /// the target is dead); returns a count to log now, if it is time.
    fn give_up(&mut self, n: usize, abandoned: bool, now: Instant) -> Option<usize> {
        self.unlogged += n;
        let due = self
            .logged
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if abandoned || !due {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged)).filter(|&n| n > 0)
    }

    /// The queue is done: what is left to log.
    fn finish(&mut self) -> Option<usize> {
        Some(std::mem::take(&mut self.unlogged)).filter(|&n| n > 0)
    }
}

/// Waits [`BACKOFF`], or less if the forwarder is dropped.
async fn pause(cancel: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(BACKOFF) => {}
        _ = cancel.cancelled() => {}
    }
}

/// Reads a replica's answer.
fn outcome(reply: &Frame) -> Outcome {
    match reply.header.kind {
        Kind::Reply => Outcome::Done,
        Kind::Error => match reply.control_msg() {
            Ok(Control::Error {
                code: ErrorCode::EpochAhead | ErrorCode::UnknownTable | ErrorCode::Internal,
                ..
            }) => Outcome::Again,
            Ok(Control::Error {
                code: ErrorCode::NotOwner,
                ..
            }) => Outcome::Stale,
            Ok(Control::Error { code, message }) => {
                // Refused for good (it cannot take this change): resending
                // would not help, and blocking the queue would stop the rest.
                tracing::error!(?code, %message, "replica refused a change");
                Outcome::Done
            }
            _ => Outcome::Done,
        },
        _ => Outcome::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_given_up_on_are_logged_as_one_line() {
        let t = Instant::now();
        // Abandoned: 32 batches one after another, then the queue ends.
        let mut l = Lost::default();
        for _ in 0..32 {
            assert_eq!(l.give_up(BATCH, true, t), None);
        }
        assert_eq!(l.finish(), Some(32 * BATCH));
        assert_eq!(l.finish(), None);
        // Unreachable: the first at once, then at most once a second.
        let mut l = Lost::default();
        assert_eq!(l.give_up(5, false, t), Some(5));
        assert_eq!(l.give_up(7, false, t + Duration::from_millis(500)), None);
        assert_eq!(
            l.give_up(1, false, t + Duration::from_millis(1100)),
            Some(8)
        );
        assert_eq!(l.give_up(2, false, t + Duration::from_millis(1200)), None);
        assert_eq!(l.finish(), Some(2));
    }
}
