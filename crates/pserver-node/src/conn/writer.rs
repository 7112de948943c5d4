//! The writing half of a connection's stream: frames encoded into one
//! buffer, large keys and values sections written from where they are.

use super::*;

/// Keys and values sections of at least this many bytes are written from
/// where they are (a vectored write), not copied into the write buffer: a
/// pull's reply from the vector the store filled, a push from the caller's
/// array, a request's keys from its frame's key vector.
const WRITE_APART: usize = 64 << 10;

/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// The writing half of a connection: frames encoded into one buffer, with
/// large values sections kept apart as the bytes they are, and written in
/// order with vectored writes.
pub(super) struct Writer<W> {
    pub(super) inner: W,
    limits: Limits,
    /// Headers and small sections, as encoded.
    buf: bytes::BytesMut,
    /// What goes out, in order: pieces of `buf` and large sections.
    chunks: std::collections::VecDeque<bytes::Bytes>,
    /// The budget shares of the frames encoded here, given back once they
    /// are written.
    held: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Bytes went to the stream since its last flush.
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub(super) fn new(inner: W, limits: Limits) -> Writer<W> {
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
    pub(super) fn idle(&self) -> bool {
        self.buf.is_empty() && self.chunks.is_empty() && self.held.is_empty() && !self.unflushed
    }

    /// Writes what it can of everything queued without waiting: what the
    /// stream does not take now stays queued (so `idle` is false) for a
    /// later `write_out`.
    pub(super) fn try_write_out(&mut self) -> std::io::Result<()> {
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
    pub(super) fn queue(&mut self, mut frame: Frame, permit: tokio::sync::OwnedSemaphorePermit) {
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
        let chunks = &mut self.chunks;
        frame.encode_split(&mut self.buf, WRITE_APART, &mut |b| chunks.push_back(b));
        self.unflushed = true;
    }

    /// Writes everything queued, then flushes.
    pub(super) async fn write_out(&mut self) -> std::io::Result<()> {
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
