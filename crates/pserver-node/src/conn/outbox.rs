//! A connection's sending side: the [`Outbox`] its senders share, which
//! writes a frame at once when the line is idle and otherwise queues it for
//! the connection's writer task; and [`split`], which makes one.

use super::writer::Writer;
use super::*;

/// Frames queued per connection before senders wait: each frame takes at
/// least `OUTBOX_BYTES / OUTBOX_DEPTH` of the byte budget.
pub(super) const OUTBOX_DEPTH: usize = 1024;

/// Bytes of frames queued per connection before senders wait (a frame
/// larger than this waits until the queue is empty). Bounds by size what
/// `OUTBOX_DEPTH` bounds by count: a peer that sends requests for large
/// replies and never reads them holds at most this much of a node's memory.
pub const OUTBOX_BYTES: usize = 64 << 20;

/// Frames a cork holds back at most: past this many queued, the writer
/// task writes them (one write) though the cork lives, so a long run of
/// small replies is not held until its end.
pub(super) const CORKED_MAX: usize = 64;

/// A frame in the queue, with its share of the byte budget (given back once
/// it is written).
pub(super) type Queued = (Frame, tokio::sync::OwnedSemaphorePermit);

/// What the senders of one connection and its writer task share.
pub(super) struct Line<W> {
    pub(super) state: Mutex<LineState<W>>,
    /// Wakes the writer task: frames are queued, a sender handed back a
    /// writer with bytes left to write, or the connection is to close.
    pub(super) wake: tokio::sync::Notify,
}

/// A connection's sending side, under its lock.
pub(super) struct LineState<W> {
    /// Frames waiting for the writer, in the order they were sent.
    pub(super) queue: std::collections::VecDeque<Queued>,
    /// The stream's writer, while nobody writes with it: the writer task
    /// and senders that find the line idle take it out to write.
    pub(super) writer: Option<Writer<W>>,
    /// The stream failed, or the connection is closing: nothing more is
    /// sent.
    pub(super) done: bool,
    /// The stream failed (so it is not shut down, only dropped).
    pub(super) failed: bool,
    /// Live [`Cork`]s: while any is held, frames wait in the queue, to go
    /// out together when the last is dropped.
    pub(super) corks: usize,
}

impl<W> Line<W> {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, LineState<W>> {
        lock(&self.state)
    }
}

/// The sending side of a connection as its [`Outbox`] sees it, whatever the
/// stream.
pub(super) trait Sending: Send + Sync {
    /// Sends `frame` with its budget `permit`: written at once from the
    /// caller if the line is idle (no task hop for a lone request or reply),
    /// else queued for the writer task. Fails once the line is done.
    fn put(&self, frame: Frame, permit: tokio::sync::OwnedSemaphorePermit) -> bool;
    /// Wakes the writer task to close the connection.
    fn close(&self);
    /// Wakes the writer task to write what is queued, corks or not: a
    /// sender is about to wait for room in the budget, which frames held
    /// by a cork would otherwise never give back.
    fn flush(&self);
    /// Holds frames back until [`Sending::uncork`].
    fn cork(&self);
    /// Ends one `cork`; after the last, writes what was held back at once
    /// from the caller if the line is idle, else wakes the writer task.
    fn uncork(&self);
}

impl<W: AsyncWrite + Unpin + Send + 'static> Sending for Line<W> {
    fn put(&self, frame: Frame, permit: tokio::sync::OwnedSemaphorePermit) -> bool {
        let mut st = self.state();
        if st.done {
            return false;
        }
        if st.corks > 0 {
            // Goes with the others when the last cork is dropped, or now
            // with them when the cork holds enough.
            st.queue.push_back((frame, permit));
            if st.queue.len() >= CORKED_MAX {
                drop(st);
                self.flush();
            }
            return true;
        }
        if st.queue.is_empty() {
            if let Some(mut w) = st.writer.take_if(|w| w.idle()) {
                // Ours until handed back: senders behind us queue, and
                // the task waits for it.
                drop(st);
                w.queue(frame, permit);
                return self.write_now(w);
            }
        }
        st.queue.push_back((frame, permit));
        drop(st);
        self.wake.notify_one();
        true
    }

    fn close(&self) {
        self.wake.notify_one();
    }

    fn flush(&self) {
        self.wake.notify_one();
    }

    fn cork(&self) {
        self.state().corks += 1;
    }

    fn uncork(&self) {
        let mut st = self.state();
        st.corks = st.corks.saturating_sub(1);
        if st.corks > 0 || st.queue.is_empty() || st.done {
            return;
        }
        let LineState { queue, writer, .. } = &mut *st;
        let Some(mut w) = writer.take_if(|w| w.idle()) else {
            drop(st);
            self.wake.notify_one();
            return;
        };
        let held: Vec<Queued> = queue.drain(..).collect();
        drop(st);
        for (frame, permit) in held {
            w.queue(frame, permit);
        }
        self.write_now(w);
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Line<W> {
    /// Writes what `w` holds without waiting, then hands it back, waking
    /// the writer task if anything is left (or the line failed). Whether
    /// the write went without error.
    fn write_now(&self, mut w: Writer<W>) -> bool {
        let written = w.try_write_out();
        let mut st = self.state();
        let ok = written.is_ok();
        if let Err(e) = written {
            tracing::debug!(error = %e, "connection failed while writing");
            st.done = true;
            st.failed = true;
        }
        let more = !w.idle() || !st.queue.is_empty() || st.done;
        st.writer = Some(w);
        drop(st);
        if more {
            // The task writes the rest (or closes the line).
            self.wake.notify_one();
        }
        ok
    }
}

/// A cloneable handle that sends frames on one connection: written at once
/// when the connection is idle, else queued for its writer task.
#[derive(Clone)]
pub struct Outbox {
    line: Arc<dyn Sending>,
    budget: Arc<tokio::sync::Semaphore>,
    /// What the peer accepts: a frame beyond it is refused here, before it
    /// is queued, so its sender hears why at once.
    limits: Limits,
    /// Cancelled when the writer task ends (the stream failed, or every
    /// sender is gone), so a reader of the same connection stops waiting
    /// for replies to frames that will never leave.
    pub(super) writer_gone: CancellationToken,
    /// Cancelled to close the connection now, whoever still holds a sender.
    closing: CancellationToken,
    /// Dropped with the last outbox clone: the writer task then closes the
    /// connection.
    _senders: Arc<Senders>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("limits", &self.limits)
            .field("closed", &self.writer_gone.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// Holds a connection's frames back until dropped ([`Outbox::cork`]).
#[must_use = "frames are held back only while the cork lives"]
pub struct Cork {
    line: Arc<dyn Sending>,
}

impl Drop for Cork {
    fn drop(&mut self) {
        self.line.uncork();
    }
}

/// Tells the writer task, when the last sender is dropped, that nothing
/// more will come.
struct Senders {
    gone: CancellationToken,
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

impl Outbox {
    /// The budget share of `frame`: its encoded size, at least a
    /// `OUTBOX_DEPTH`th of the whole (so small frames are bounded by
    /// count), at most the whole.
    fn share(frame: &Frame) -> u32 {
        frame
            .encoded_len()
            .clamp(OUTBOX_BYTES / OUTBOX_DEPTH, OUTBOX_BYTES) as u32
    }

    /// Sends a frame, waiting while the queue is full. A frame the peer
    /// would refuse (over the frame limit, say) is not queued: the error
    /// says why ([`NodeError::Unsendable`]) and the connection goes on.
    pub async fn send(&self, frame: Frame) -> Result<(), NodeError> {
        frame.check(&self.limits).map_err(unsendable)?;
        let closed = || NodeError::Closed("peer".into());
        let share = Outbox::share(&frame);
        let permit = match Arc::clone(&self.budget).try_acquire_many_owned(share) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(closed()),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.line.flush();
                Arc::clone(&self.budget)
                    .acquire_many_owned(share)
                    .await
                    .map_err(|_| closed())?
            }
        };
        if self.line.put(frame, permit) {
            Ok(())
        } else {
            Err(closed())
        }
    }

    /// Whether `other` feeds the same connection.
    pub fn same(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.budget, &other.budget)
    }

    /// Sends a frame unless the queue is full or closed, or the peer would
    /// refuse the frame; returns whether it was sent.
    pub fn try_send(&self, frame: Frame) -> bool {
        if let Err(e) = frame.check(&self.limits) {
            tracing::warn!(error = %e, "a frame was not sent: the peer would refuse it");
            return false;
        }
        let Ok(permit) = Arc::clone(&self.budget).try_acquire_many_owned(Outbox::share(&frame))
        else {
            return false;
        };
        self.line.put(frame, permit)
    }

    /// Holds this connection's frames back while the guard lives, to go
    /// out together (one write) when the last guard is dropped: for a
    /// sender about to send a burst (a request's slices), which would
    /// otherwise write each at once, a syscall apiece.
    pub fn cork(&self) -> Cork {
        self.line.cork();
        Cork {
            line: Arc::clone(&self.line),
        }
    }

    /// Completes once the writer task has ended: nothing queued from then
    /// on is sent.
    pub async fn writer_gone(&self) {
        self.writer_gone.cancelled().await
    }

    /// Closes this side of the connection now (frames still queued are
    /// dropped): the peer sees it end, as if every sender were gone.
    pub fn shutdown(&self) {
        self.closing.cancel();
        self.line.close();
    }
}

/// The error for a frame `Frame::check` refuses.
fn unsendable(why: pserver_wire::WireError) -> NodeError {
    NodeError::Unsendable {
        peer: "peer".into(),
        why,
    }
}

/// The reading half of a connection, yielding frames. It goes on after a
/// [`CodecError::Oversized`] (the codec skips that frame's body), so the
/// reader may answer the refused frame and read the next one; after any
/// other error it ends.
pub struct Reader<S> {
    inner: FramedRead<tokio::io::ReadHalf<S>, FrameCodec>,
    /// An oversized frame was just reported: `FramedRead` ends its stream
    /// once after any decoder error, which here is no end.
    resume: bool,
}

impl<S> Reader<S> {
    /// Bytes read from the stream that are not yet part of a frame given
    /// out: the start of the next frame, when one is arriving.
    pub fn partial_bytes(&self) -> usize {
        self.inner.read_buffer().len()
    }

    /// Whether the next frame has arrived whole, so reading it does not
    /// wait on the stream.
    pub fn frame_buffered(&self) -> bool {
        self.inner.decoder().has_frame(self.inner.read_buffer())
    }
}

impl<S: AsyncRead> futures_util::Stream for Reader<S> {
    type Item = Result<Frame, CodecError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Err(e @ CodecError::Oversized { .. }))) => {
                    this.resume = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) if this.resume => this.resume = false,
                other => {
                    this.resume = false;
                    return other;
                }
            }
        }
    }
}

/// Splits a stream into a frame reader and an [`Outbox`] whose writer task
/// runs until every outbox clone is dropped or the stream fails.
pub fn split<S>(stream: S, limits: Limits) -> (Reader<S>, Outbox)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let reader = Reader {
        inner: FramedRead::new(rd, FrameCodec::new(limits)),
        resume: false,
    };
    let line = Arc::new(Line {
        state: Mutex::new(LineState {
            queue: std::collections::VecDeque::new(),
            writer: Some(Writer::new(wr, limits)),
            done: false,
            failed: false,
            corks: 0,
        }),
        wake: tokio::sync::Notify::new(),
    });
    let budget = Arc::new(tokio::sync::Semaphore::new(OUTBOX_BYTES));
    let writer_gone = CancellationToken::new();
    let closing = CancellationToken::new();
    let senders = Arc::new(Senders {
        gone: CancellationToken::new(),
    });
    tokio::spawn(write_task(
        Arc::clone(&line),
        closing.clone(),
        senders.gone.clone(),
        writer_gone.clone().drop_guard(),
    ));
    (
        reader,
        Outbox {
            line,
            budget,
            limits,
            writer_gone,
            closing,
            _senders: senders,
        },
    )
}

/// A connection's writer task: writes what senders queue (a burst at once)
/// and what a sender's own write left, until the stream fails, the owner
/// closes it, or every sender is gone and all they sent is written.
async fn write_task<W>(
    line: Arc<Line<W>>,
    closing: CancellationToken,
    senders_gone: CancellationToken,
    // Whatever ends this task tells the reader side.
    _gone: tokio_util::sync::DropGuard,
) where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut batch = Vec::new();
    'run: loop {
        tokio::select! {
            biased;
            _ = closing.cancelled() => break 'run,
            _ = line.wake.notified() => {}
            // What they sent still goes, below, before the end.
            _ = senders_gone.cancelled() => {}
        }
        loop {
            let mut w = {
                let mut st = line.state();
                if st.done {
                    break 'run;
                }
                let LineState { queue, writer, .. } = &mut *st;
                // None while a sender writes: it wakes us when it is done.
                let Some(w) = writer.take_if(|w| !w.idle() || !queue.is_empty()) else {
                    break;
                };
                batch.extend(queue.drain(..));
                w
            };
            // Encode everything queued, then write it at once: one syscall
            // for a burst of small replies.
            for (frame, permit) in batch.drain(..) {
                w.queue(frame, permit);
            }
            let written = tokio::select! {
                biased;
                _ = closing.cancelled() => None,
                written = w.write_out() => Some(written),
            };
            let mut st = line.state();
            st.writer = Some(w);
            let Some(written) = written else { break 'run };
            if let Err(e) = written {
                tracing::debug!(error = %e, "connection failed while writing");
                st.failed = true;
                break 'run;
            }
        }
        if senders_gone.is_cancelled() {
            break 'run;
        }
    }
    // Nothing more is sent; frames still queued are dropped.
    let mut w = loop {
        {
            let mut st = line.state();
            st.done = true;
            st.queue.clear();
            if st.failed {
                return;
            }
            if let Some(w) = st.writer.take() {
                break w;
            }
        }
        // A sender is writing: it hands the writer back and wakes us.
        line.wake.notified().await;
    };
    // Close our side properly (a FIN on TCP; on TLS a close_notify,
    // without which the peer sees a truncation).
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w.inner).await;
}
