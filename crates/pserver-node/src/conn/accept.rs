//! Serving connections: [`accept_loop`], with its limits on connections
//! that send nothing.

use super::*;

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
