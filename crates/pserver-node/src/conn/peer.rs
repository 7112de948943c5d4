//! The requesting side of a connection: [`Peer`].

use super::*;

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
