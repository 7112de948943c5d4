//! Connections: a writer task fed by a channel ([`Outbox`]), and a requester
//! ([`Peer`]) that matches replies to requests by id.
//!
//! Generic over the byte stream so that simulations can run the same code on
//! simulated sockets.

use crate::error::NodeError;
use crate::net::{BoxStream, Listener, Net};
use futures_util::{SinkExt, StreamExt};
use pserver_wire::codec::CodecError;
use pserver_wire::{Control, ErrorCode, Frame, FrameCodec, Header, Kind, Limits};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// Frames queued per connection before senders wait: each frame takes at
/// least `OUTBOX_BYTES / OUTBOX_DEPTH` of the byte budget.
const OUTBOX_DEPTH: usize = 1024;

/// Bytes of frames queued per connection before senders wait (a frame
/// larger than this waits until the queue is empty). Bounds by size what
/// `OUTBOX_DEPTH` bounds by count: a peer that sends requests for large
/// replies and never reads them holds at most this much of a node's memory.
pub const OUTBOX_BYTES: usize = 64 << 20;

/// A frame in the queue, with its share of the byte budget (given back once
/// it is written).
type Queued = (Frame, tokio::sync::OwnedSemaphorePermit);

/// What the senders of one connection and its writer task share.
struct Line<W> {
    state: Mutex<LineState<W>>,
    /// Wakes the writer task: frames are queued, a sender handed back a
    /// writer with bytes left to write, or the connection is to close.
    wake: tokio::sync::Notify,
}

/// A connection's sending side, under its lock.
struct LineState<W> {
    /// Frames waiting for the writer, in the order they were sent.
    queue: std::collections::VecDeque<Queued>,
    /// The stream's writer, while nobody writes with it: the writer task
    /// and senders that find the line idle take it out to write.
    writer: Option<Writer<W>>,
    /// The stream failed, or the connection is closing: nothing more is
    /// sent.
    done: bool,
    /// The stream failed (so it is not shut down, only dropped).
    failed: bool,
    /// Live [`Cork`]s: while any is held, frames wait in the queue, to go
    /// out together when the last is dropped.
    corks: usize,
}

impl<W> Line<W> {
    fn state(&self) -> std::sync::MutexGuard<'_, LineState<W>> {
        lock(&self.state)
    }
}

/// The sending side of a connection as its [`Outbox`] sees it, whatever the
/// stream.
trait Sending: Send + Sync {
    /// Sends `frame` with its budget `permit`: written at once from the
    /// caller if the line is idle (no task hop for a lone request or reply),
    /// else queued for the writer task. Fails once the line is done.
    fn put(&self, frame: Frame, permit: tokio::sync::OwnedSemaphorePermit) -> bool;
    /// Wakes the writer task to close the connection.
    fn close(&self);
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
            // Goes with the others when the last cork is dropped.
            st.queue.push_back((frame, permit));
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
    writer_gone: CancellationToken,
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
            Err(tokio::sync::TryAcquireError::NoPermits) => Arc::clone(&self.budget)
                .acquire_many_owned(share)
                .await
                .map_err(|_| closed())?,
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

/// Values sections of at least this many bytes are written from where
/// they are (a vectored write), not copied into the write buffer: a pull's
/// reply from the vector the store filled, a push from the caller's array.
const WRITE_APART: usize = 64 << 10;

/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// The writing half of a connection: frames encoded into one buffer, with
/// large values sections kept apart as the bytes they are, and written in
/// order with vectored writes.
struct Writer<W> {
    inner: W,
    limits: Limits,
    /// Headers, keys, small sections, as encoded.
    buf: bytes::BytesMut,
    /// What goes out, in order: pieces of `buf` and large values sections.
    chunks: std::collections::VecDeque<bytes::Bytes>,
    /// The budget shares of the frames encoded here, given back once they
    /// are written.
    held: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Bytes went to the stream since its last flush.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    fn new(inner: W, limits: Limits) -> Writer<W> {
        Writer {
            inner,
            limits,
            buf: bytes::BytesMut::new(),
            chunks: std::collections::VecDeque::new(),
            held: Vec::new(),
            unflushed: false,
        }
    }

    /// Nothing is left to write or flush.
    fn idle(&self) -> bool {
        self.buf.is_empty() && self.chunks.is_empty() && self.held.is_empty() && !self.unflushed
    }

    /// Writes what it can of everything queued without waiting: what the
    /// stream does not take now stays queued (so `idle` is false) for a
    /// later `write_out`.
    fn try_write_out(&mut self) -> std::io::Result<()> {
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // `write_out` only advances past bytes the stream took, so
        // dropping it while it waits loses nothing.
        match std::pin::pin!(self.write_out()).poll(&mut cx) {
            std::task::Poll::Ready(done) => done,
            std::task::Poll::Pending => Ok(()),
        }
    }

    /// Encodes one frame behind those queued. A frame the peer would refuse
    /// (the outbox checks first, so only a bug gets here) is dropped with a
    /// log line: nothing of it is written, so the stream stays in step and
    /// the frames behind it still go.
    fn queue(&mut self, mut frame: Frame, permit: tokio::sync::OwnedSemaphorePermit) {
        self.held.push(permit);
        if let Err(e) = frame.check(&self.limits) {
            tracing::error!(error = %e, "a frame was dropped: it breaks the wire's limits");
            return;
        }
        // The length prefix is a u32, whatever `max_frame` allows.
        if u32::try_from(frame.encoded_len()).is_err() {
            tracing::error!(
                bytes = frame.encoded_len(),
                "a frame was dropped: it is too long for the length prefix"
            );
            return;
        }
        if let Some((vals, ctrl)) = frame.encode_split(&mut self.buf, WRITE_APART) {
            self.chunks.push_back(self.buf.split().freeze());
            self.chunks.push_back(vals);
            self.buf.extend_from_slice(&ctrl);
        }
        self.unflushed = true;
    }

    /// Writes everything queued, then flushes.
    async fn write_out(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if !self.buf.is_empty() {
            self.chunks.push_back(self.buf.split().freeze());
        }
        while !self.chunks.is_empty() {
            let slices: Vec<std::io::IoSlice<'_>> = self
                .chunks
                .iter()
                .take(MAX_IOVECS)
                .map(|c| std::io::IoSlice::new(c))
                .collect();
            let mut n = self.inner.write_vectored(&slices).await?;
            drop(slices);
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if n >= front.len() {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    bytes::Buf::advance(front, n);
                    n = 0;
                }
            }
        }
        self.inner.flush().await?;
        // Written: their bytes are free for the next frames.
        self.unflushed = false;
        self.held.clear();
        Ok(())
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// The requesting side of a connection: sends requests and awaits the reply
/// with the same id. Frames that answer no request (id 0: map broadcasts)
/// go to the notice channel returned by [`Peer::from_stream`].
#[derive(Clone, Debug)]
pub struct Peer {
    out: Outbox,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
    /// The error frame with which the peer refused this connection (a
    /// limit), if it did: what every request on it fails with.
    refusal: Arc<Mutex<Option<Frame>>>,
    label: Arc<str>,
}

impl Peer {
    /// Opens a TCP connection to `addr`.
    pub async fn connect(
        addr: &str,
        limits: Limits,
    ) -> Result<(Peer, mpsc::Receiver<Frame>), NodeError> {
        Peer::connect_via(&Net::tcp(), addr, limits).await
    }

    /// Opens a connection to `addr` over `net`.
    pub async fn connect_via(
        net: &Net,
        addr: &str,
        limits: Limits,
    ) -> Result<(Peer, mpsc::Receiver<Frame>), NodeError> {
        let stream = net.connect(addr).await.map_err(|os| NodeError::Connect {
            addr: addr.to_string(),
            os,
        })?;
        Ok(Peer::from_stream(stream, addr, limits))
    }

    /// Wraps an open stream; `label` names the peer in errors.
    pub fn from_stream<S>(stream: S, label: &str, limits: Limits) -> (Peer, mpsc::Receiver<Frame>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, out) = split(stream, limits);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let refusal: Arc<Mutex<Option<Frame>>> = Arc::default();
        let (notice_tx, notice_rx) = mpsc::channel(64);
        let peer = Peer {
            out,
            pending: pending.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
            closed: closed.clone(),
            refusal: refusal.clone(),
            label: label.into(),
        };
        let label = peer.label.clone();
        // The token, not an outbox clone: a clone here would keep the
        // writer (and so the connection) open after the last `Peer` is gone.
        let writer_gone = peer.out.writer_gone.clone();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = reader.next() => match item {
                        Some(item) => item,
                        None => break,
                    },
                    // The writer failed: requests queued behind the failure
                    // will never be answered.
                    _ = writer_gone.cancelled() => {
                        tracing::debug!(peer = %label, "connection failed while writing");
                        break;
                    }
                };
                match item {
                    Ok(frame) => {
                        let id = frame.header.request_id;
                        let waiter = lock(&pending).remove(&id);
                        match waiter {
                            Some(tx) => {
                                let _ = tx.send(frame);
                            }
                            None if id == 0 && frame.header.kind == Kind::Error => {
                                // Answers no request: the peer refused the
                                // connection itself (a limit, say) and
                                // closes it. Every request waiting fails
                                // with its reason, not as merely closed.
                                let why = match frame.control_msg() {
                                    Ok(Control::Error { message, .. }) => message,
                                    _ => "an error frame".to_string(),
                                };
                                tracing::warn!(peer = %label, "the peer refused this connection: {why}");
                                *lock(&refusal) = Some(frame.clone());
                                let waiting: Vec<_> = lock(&pending).drain().collect();
                                for (id, tx) in waiting {
                                    let mut refusal = frame.clone();
                                    refusal.header.request_id = id;
                                    let _ = tx.send(refusal);
                                }
                            }
                            None => {
                                if notice_tx.try_send(frame).is_err() {
                                    tracing::debug!(peer = %label, "notice dropped: receiver full or gone");
                                }
                            }
                        }
                    }
                    Err(CodecError::Oversized { header, bytes, max }) => {
                        // A reply bigger than this node takes: its request
                        // fails saying so, and the connection goes on (the
                        // codec skips the body).
                        let waiter = lock(&pending).remove(&header.request_id);
                        if let Some(tx) = waiter {
                            let _ = tx.send(crate::proto::error_reply(
                                &header,
                                header.sender,
                                header.epoch,
                                ErrorCode::Limit,
                                format!(
                                    "its reply of {bytes} bytes is over this node's frame \
                                     limit of {max} bytes; split the request into smaller ones"
                                ),
                            ));
                        }
                    }
                    Err(CodecError::Wire(e)) => {
                        tracing::warn!(peer = %label, error = %e, "malformed frame; closing");
                        break;
                    }
                    Err(CodecError::Io(e)) => {
                        tracing::debug!(peer = %label, error = %e, "connection failed");
                        break;
                    }
                }
            }
            closed.store(true, Ordering::SeqCst);
            // Dropping the senders wakes every waiter with "closed".
            lock(&pending).clear();
        });
        (peer, notice_rx)
    }

    /// The peer's address or name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Gives up on the peer: every request waiting for a reply fails at
    /// once with `Closed`, and so does every later one. For a peer the map
    /// declares dead, whose socket may stay open (a frozen process, a
    /// partition) and whose replies would otherwise be awaited forever.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        lock(&self.pending).clear();
    }

    /// Closes it and ends the connection now (the other end sees it close),
    /// even while clones of this peer are still held.
    pub fn shutdown(&self) {
        self.close();
        self.out.shutdown();
    }

    /// Holds this connection's frames back while the guard lives
    /// ([`Outbox::cork`]).
    pub fn cork(&self) -> Cork {
        self.out.cork()
    }

    /// True once the connection has failed or closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sends `frame` (its request id is set here) and waits for the reply.
    pub async fn request(&self, frame: Frame) -> Result<Frame, NodeError> {
        let reply = self.send_request(frame).await?;
        match reply.await {
            Ok(reply) => Ok(reply),
            // The peer may have refused the connection before this
            // request was sent: its refusal is the answer.
            Err(_) => self
                .refusal()
                .ok_or_else(|| NodeError::Closed(self.label.to_string())),
        }
    }

    /// The error frame with which the peer refused this connection, if it
    /// did (it was at a limit); requests on it are answered with it.
    pub fn refusal(&self) -> Option<Frame> {
        lock(&self.refusal).clone()
    }

    /// Queues `frame` as a request and returns the receiver of its reply
    /// without waiting for it, so that a caller can keep several requests
    /// in flight in the order it queued them. The receiver fails if the
    /// connection closes first.
    pub async fn send_request(
        &self,
        mut frame: Frame,
    ) -> Result<oneshot::Receiver<Frame>, NodeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        frame.header.request_id = id;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.is_closed() {
            lock(&self.pending).remove(&id);
            if let Some(refusal) = self.refusal() {
                // Answered at once, with the refusal.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(refusal);
                return Ok(rx);
            }
            return Err(NodeError::Closed(self.label.to_string()));
        }
        if let Err(e) = self.out.send(frame).await {
            lock(&self.pending).remove(&id);
            if matches!(e, NodeError::Closed(_)) {
                // The connection failed (writing this frame, say): no
                // request on it will be answered.
                self.close();
            }
            return Err(self.named(e));
        }
        Ok(rx)
    }

    /// Sends a frame that expects no reply (request id 0).
    pub async fn notify(&self, mut frame: Frame) -> Result<(), NodeError> {
        frame.header.request_id = 0;
        self.out.send(frame).await.map_err(|e| self.named(e))
    }

    /// An outbox's error, naming this peer.
    fn named(&self, e: NodeError) -> NodeError {
        match e {
            NodeError::Unsendable { why, .. } => NodeError::Unsendable {
                peer: self.label.to_string(),
                why,
            },
            _ => NodeError::Closed(self.label.to_string()),
        }
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it:
/// the maps guarded here stay consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Listens on `addr` over `net`; the error names the address.
pub async fn bind(
    net: &Net,
    addr: &str,
) -> Result<(Box<dyn Listener>, std::net::SocketAddr), NodeError> {
    net.bind(addr).await.map_err(|os| NodeError::Bind {
        addr: addr.to_string(),
        os,
    })
}

/// How long a new connection has to send the start of its first frame
/// (its length prefix and header) before it is closed: a real client sends
/// its first request at once, a silent connection only takes room.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// The same while the node serves more than three quarters of
/// `Limits::max_connections`.
pub const PRESSED_FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(1);

/// How far a served connection is into its first frame, as its stream has
/// seen it (shared with the accept loop, which decides by it).
#[derive(Debug, Default)]
struct FirstFrame(AtomicU8);

impl FirstFrame {
    /// Its length prefix and header have arrived.
    const HEADER: u8 = 1;
    /// All of it has.
    const WHOLE: u8 = 2;

    fn reached(&self, stage: u8) -> bool {
        self.0.load(Ordering::Relaxed) >= stage
    }
}

/// A served connection's stream, watched until its first frame is whole:
/// the accept loop may end it meanwhile (`kill`), which ends its reads as
/// if the peer had closed, so the node's own code for a closed connection
/// cleans up after it. Past its first frame it is a plain stream.
struct Watched {
    inner: BoxStream,
    first: Arc<FirstFrame>,
    /// Bytes of the first frame read so far, and its declared length.
    read: u64,
    prefix: [u8; 4],
    /// Fires to end the connection; `None` once it can no longer be ended.
    kill: Option<std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    killed: bool,
}

impl Watched {
    /// Counts `n` bytes just read, which begin with `head`, into the
    /// first frame.
    fn account(&mut self, n: usize, head: &[u8]) {
        for (i, b) in head.iter().enumerate() {
            if let Some(p) = self.prefix.get_mut(self.read as usize + i) {
                *p = *b;
            }
        }
        self.read += n as u64;
        if self.read < 4 {
            return;
        }
        let len = u64::from(u32::from_le_bytes(self.prefix));
        let header = 4 + len.min(pserver_wire::header::HEADER_LEN as u64);
        if self.read >= 4 + len {
            self.first.0.store(FirstFrame::WHOLE, Ordering::Relaxed);
            self.kill = None;
        } else if self.read >= header {
            self.first.0.store(FirstFrame::HEADER, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = &mut *self;
        if let Some(kill) = &mut this.kill {
            if kill.as_mut().poll(cx).is_ready() {
                this.killed = true;
                this.kill = None;
            }
        }
        if this.killed {
            // As if the peer had closed.
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.kill.is_some() && matches!(polled, std::task::Poll::Ready(Ok(()))) {
            let new = &buf.filled()[before..];
            let mut head = [0; 4];
            let k = new.len().min(4);
            head[..k].copy_from_slice(&new[..k]);
            this.account(new.len(), &head[..k]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections an accept loop serves, oldest first: how far each is
/// into its first frame, and its `kill`.
#[derive(Default)]
struct Served {
    next: u64,
    conns: BTreeMap<u64, (Arc<FirstFrame>, CancellationToken)>,
}

/// Accepts connections until `cancel` fires, running `serve(stream, peer)`
/// for each in its own task, itself stopped by `cancel`. At most
/// `limits.max_connections` are served at once. A connection that has not
/// sent the start of its first frame within [`FIRST_FRAME_TIMEOUT`]
/// ([`PRESSED_FIRST_FRAME_TIMEOUT`] while over three quarters of the limit
/// are served) is closed; at the limit, a newcomer closes the oldest
/// connection that has not yet sent a whole frame, and only when every
/// connection has is the newcomer refused, with an error frame saying so.
/// So silent connections cannot keep real clients out, and a flood of
/// connections cannot exhaust the node's memory or descriptors.
pub fn accept_loop<F, Fut>(
    mut listener: Box<dyn Listener>,
    cancel: tokio_util::sync::CancellationToken,
    limits: Limits,
    serve: F,
) where
    F: Fn(BoxStream, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let served = Arc::new(Mutex::new(Served::default()));
    let max = limits.max_connections;
    let throttle = Arc::new(crate::net::Throttle::new());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let (id, first, kill) = {
                            let mut s = lock(&served);
                            if s.conns.len() >= max {
                                let silent = s
                                    .conns
                                    .iter()
                                    .find(|(_, (first, _))| !first.reached(FirstFrame::WHOLE))
                                    .map(|(id, _)| *id);
                                let Some((_, old)) = silent.and_then(|id| s.conns.remove(&id)) else {
                                    drop(s);
                                    throttle.warn(format_args!(
                                        "refused a connection from {peer}: {max} connections \
                                         (the limit) are open and busy"
                                    ));
                                    tokio::spawn(refuse(stream, limits));
                                    continue;
                                };
                                old.cancel();
                                throttle.warn(format_args!(
                                    "closed a connection that had sent no whole frame: {max} \
                                     connections (the limit) are open and another came ({peer})"
                                ));
                            }
                            let (id, first, kill) =
                                (s.next, Arc::new(FirstFrame::default()), CancellationToken::new());
                            s.next += 1;
                            s.conns.insert(id, (Arc::clone(&first), kill.clone()));
                            (id, first, kill)
                        };
                        let watched = Watched {
                            inner: stream,
                            first: Arc::clone(&first),
                            read: 0,
                            prefix: [0; 4],
                            kill: Some(Box::pin(kill.clone().cancelled_owned())),
                            killed: false,
                        };
                        let conn = serve(Box::new(watched), peer);
                        let (token, served) = (cancel.clone(), Arc::clone(&served));
                        tokio::spawn(async move {
                            tokio::pin!(conn);
                            let pressed = || lock(&served).conns.len() > max.saturating_mul(3) / 4;
                            tokio::select! {
                                _ = token.cancelled() => {}
                                _ = &mut conn => {}
                                _ = first_frame_due(&first, pressed) => {
                                    // Ends its reads; `serve` cleans up as
                                    // for any closed connection.
                                    kill.cancel();
                                    tokio::select! {
                                        _ = token.cancelled() => {}
                                        _ = &mut conn => {}
                                    }
                                }
                            }
                            lock(&served).conns.remove(&id);
                        });
                    }
                    // Nothing will come (the listener's task ended: the
                    // runtime is shutting down, say): no warning, no retry.
                    Err(e) if crate::net::stopped(&e) => {
                        tracing::debug!(error = %e, "the listener stopped; no longer accepting");
                        break;
                    }
                    Err(e) => {
                        // Out of descriptors, say: a silent connection's
                        // is the one to give back; and back off instead of
                        // spinning.
                        if e.kind() != std::io::ErrorKind::ConnectionAborted {
                            let mut s = lock(&served);
                            let silent = s
                                .conns
                                .iter()
                                .find(|(_, (first, _))| !first.reached(FirstFrame::WHOLE))
                                .map(|(id, _)| *id);
                            if let Some((_, old)) = silent.and_then(|id| s.conns.remove(&id)) {
                                old.cancel();
                            }
                        }
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    });
}

/// Completes when a connection is due to be closed for not having sent
/// the start of its first frame: after [`PRESSED_FIRST_FRAME_TIMEOUT`] if
/// the node is `pressed` then, else after [`FIRST_FRAME_TIMEOUT`]. Never,
/// once the start has arrived.
async fn first_frame_due(first: &FirstFrame, pressed: impl Fn() -> bool) {
    tokio::time::sleep(PRESSED_FIRST_FRAME_TIMEOUT).await;
    if !first.reached(FirstFrame::HEADER) && pressed() {
        return;
    }
    tokio::time::sleep(FIRST_FRAME_TIMEOUT.saturating_sub(PRESSED_FIRST_FRAME_TIMEOUT)).await;
    if !first.reached(FirstFrame::HEADER) {
        return;
    }
    std::future::pending::<()>().await
}

/// Tells a connection over the limit why it is closed (an unsolicited
/// error frame), then closes it.
async fn refuse(stream: BoxStream, limits: Limits) {
    let msg = Control::Error {
        code: ErrorCode::Limit,
        message: format!(
            "this node already serves {} connections (its limit); try again later",
            limits.max_connections
        ),
    };
    let frame = Frame::control(Header::new(Kind::Error), &msg);
    let mut w = FramedWrite::new(stream, FrameCodec::new(limits));
    let send = async {
        let _ = w.send(frame).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(w.get_mut()).await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send).await;
}

#[cfg(test)]
mod tests;
