//! How nodes reach each other: real TCP by default, or any other byte
//! stream transport (a simulated network in deterministic tests; TLS later).
//!
//! Nodes never name `tokio::net` themselves: they dial and listen through a
//! [`Net`] carried in their configs, so the same manager, server and worker
//! code runs over loopback TCP in production and over a simulated network
//! (with partitions, delays and losses under a fixed seed) in tests.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// A connected byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T> Stream for T where T: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

/// A connected byte stream of any transport.
pub type BoxStream = Box<dyn Stream>;

/// A boxed future of an I/O result, as transports return them.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// A listening endpoint that yields connections.
pub trait Listener: Send + 'static {
    /// The next connection, with the peer's address for logs. An error
    /// for which [`stopped`] holds means no connection will ever come
    /// (the listener's own task ended, as when the runtime shuts down);
    /// any other is passing (out of descriptors, say).
    fn accept(&mut self) -> IoFuture<'_, (BoxStream, String)>;
}

/// Why a listener will accept nothing more: it stopped (its task ended,
/// say because the runtime is shutting down). An accept loop that meets it
/// ends, quietly: there is nothing to retry and nothing to warn about.
#[derive(Debug, thiserror::Error)]
#[error("the listener stopped")]
pub struct ListenerStopped;

impl ListenerStopped {
    /// As the I/O error a [`Listener`] returns.
    pub fn error() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, ListenerStopped)
    }
}

/// Whether `e`, from [`Listener::accept`], says the listener stopped for
/// good ([`ListenerStopped`]) rather than failed once.
pub fn stopped(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<ListenerStopped>())
}

/// Dialing and listening.
pub trait Transport: Send + Sync + 'static {
    /// Opens a connection to `addr` (`host:port`).
    fn connect(&self, addr: &str) -> IoFuture<'static, BoxStream>;
    /// Listens on `addr`; returns the listener and the address it got
    /// (which peers can dial).
    fn bind(&self, addr: &str) -> IoFuture<'static, (Box<dyn Listener>, SocketAddr)>;
}

/// The transport a node uses; cheap to clone. Defaults to TCP.
#[derive(Clone)]
pub struct Net(Arc<dyn Transport>);

impl Net {
    /// Plain TCP with `TCP_NODELAY` (small frames must not wait for Nagle).
    pub fn tcp() -> Net {
        Net(Arc::new(Tcp))
    }

    /// Another transport.
    pub fn new(transport: impl Transport) -> Net {
        Net(Arc::new(transport))
    }

    /// Opens a connection to `addr`.
    pub async fn connect(&self, addr: &str) -> io::Result<BoxStream> {
        self.0.connect(addr).await
    }

    /// Listens on `addr`.
    pub async fn bind(&self, addr: &str) -> io::Result<(Box<dyn Listener>, SocketAddr)> {
        self.0.bind(addr).await
    }
}

impl Default for Net {
    fn default() -> Net {
        Net::tcp()
    }
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Net")
    }
}

/// Real TCP.
struct Tcp;

impl Transport for Tcp {
    fn connect(&self, addr: &str) -> IoFuture<'static, BoxStream> {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> IoFuture<'static, (Box<dyn Listener>, SocketAddr)> {
        let addr = addr.to_string();
        Box::pin(async move {
            let listener = listen(&addr).await?;
            let local = listener.local_addr()?;
            Ok((Box::new(TcpListener(listener)) as Box<dyn Listener>, local))
        })
    }
}

/// Connections the kernel completes and queues for a listener before it
/// drops new ones (it caps this at `net.core.somaxconn`). Tokio's
/// default, 128, overflows under a burst of connections (a flood, or many
/// workers starting at once): a dropped SYN costs a real client a second
/// before it is sent again.
const BACKLOG: u32 = 4096;

/// Listens on the first address `addr` resolves to that can be bound, with
/// a [`BACKLOG`] long queue.
async fn listen(addr: &str) -> io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As the standard library does: a restarted node can listen again
        // at once, without waiting for the old port's TIME_WAIT.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

struct TcpListener(tokio::net::TcpListener);

impl Listener for TcpListener {
    fn accept(&mut self) -> IoFuture<'_, (BoxStream, String)> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Box::new(stream) as BoxStream, peer.to_string()))
        })
    }
}

/// A listener-side handshake in progress: the stream to use once it is
/// done, or why the peer was refused.
pub type Handshake = Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send>>;

/// Handshakes in progress at once on one handshaking listener (their own
/// budget, apart from the node's connections): a connection past it makes
/// room by dropping the oldest handshake still in progress, so a flood of
/// silent connections cannot keep a real peer waiting behind it, and the
/// listener never stops accepting (a backlog in the kernel would queue
/// real peers behind silent ones).
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// How long a handshake may take while more than half of
/// [`MAX_PENDING_HANDSHAKES`] are in progress (a real peer completes it
/// in a round trip or two; under a flood, silent ones go sooner).
pub const PRESSED_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// `inner`, yielding only connections whose `handshake` succeeded within
/// `timeout` (within [`PRESSED_HANDSHAKE_TIMEOUT`] under pressure). Each
/// handshake runs in its own task, so a slow or silent peer never holds up
/// the others; at most [`MAX_PENDING_HANDSHAKES`] run at once, the oldest
/// dropped for a newcomer. A refused or dropped peer's connection is
/// closed, and logged (naming `what` failed; under a flood, a count once
/// a second). For transports that prove something before the first frame
/// (the cluster secret, TLS).
pub fn handshaking(
    inner: Box<dyn Listener>,
    what: &'static str,
    timeout: Duration,
    handshake: impl Fn(BoxStream) -> Handshake + Send + Sync + 'static,
) -> Box<dyn Listener> {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(accept_handshakes(
        inner,
        what,
        timeout,
        Arc::new(handshake),
        tx,
    ));
    Box::new(HandshakingListener { rx, task })
}

/// The listener [`handshaking`] returns.
struct HandshakingListener {
    rx: mpsc::Receiver<io::Result<(BoxStream, String)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HandshakingListener {
    fn drop(&mut self) {
        // Stop accepting when the node stops listening.
        self.task.abort();
    }
}

impl Listener for HandshakingListener {
    fn accept(&mut self) -> IoFuture<'_, (BoxStream, String)> {
        Box::pin(async move {
            match self.rx.recv().await {
                Some(r) => r,
                None => Err(ListenerStopped::error()),
            }
        })
    }
}

/// The handshakes in progress, oldest first: each one's signal to give up.
#[derive(Default)]
struct InProgress {
    next: u64,
    running: std::collections::BTreeMap<u64, tokio_util::sync::CancellationToken>,
}

impl InProgress {
    /// Drops the oldest handshake in progress, if any.
    fn drop_oldest(&mut self) {
        if let Some((_, stop)) = self.running.pop_first() {
            stop.cancel();
        }
    }
}

/// Warnings about peers refused in a flood, at most one line a second
/// (with the count of those not logged), instead of one line each.
pub(crate) struct Throttle {
    count: std::sync::atomic::AtomicU64,
    since: std::sync::Mutex<tokio::time::Instant>,
}

impl Throttle {
    /// A throttle that has logged nothing yet.
    pub(crate) fn new() -> Throttle {
        Throttle {
            count: Default::default(),
            // So that the first warning is logged at once.
            since: std::sync::Mutex::new(
                tokio::time::Instant::now()
                    .checked_sub(Duration::from_secs(1))
                    .unwrap_or_else(tokio::time::Instant::now),
            ),
        }
    }

    /// Logs `line` if no warning was logged in the last second (saying
    /// how many were not), else counts it into the next line logged.
    pub(crate) fn warn(&self, line: fmt::Arguments<'_>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut since = crate::conn::lock(&self.since);
        if since.elapsed() < Duration::from_secs(1) {
            self.count.fetch_add(1, Relaxed);
            return;
        }
        *since = tokio::time::Instant::now();
        match self.count.swap(0, Relaxed) {
            0 => tracing::warn!("{line}"),
            more => tracing::warn!("{line} (and {more} more like it since the last such line)"),
        }
    }
}

/// Accepts connections and runs each one's handshake in its own task.
async fn accept_handshakes(
    mut listener: Box<dyn Listener>,
    what: &'static str,
    timeout: Duration,
    handshake: Arc<dyn Fn(BoxStream) -> Handshake + Send + Sync>,
    tx: mpsc::Sender<io::Result<(BoxStream, String)>>,
) {
    let in_progress = Arc::new(std::sync::Mutex::new(InProgress::default()));
    let refusals = Arc::new(Throttle::new());
    use crate::conn::lock;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if stopped(&e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                // Out of descriptors, most likely: a silent handshake's is
                // the one to give back.
                if e.kind() != io::ErrorKind::ConnectionAborted {
                    lock(&in_progress).drop_oldest();
                }
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let id = {
            let mut p = lock(&in_progress);
            if p.running.len() >= MAX_PENDING_HANDSHAKES {
                p.drop_oldest();
            }
            let id = p.next;
            p.next += 1;
            p.running.insert(id, stop.clone());
            id
        };
        let (running, tx) = (handshake(stream), tx.clone());
        let (in_progress, refusals) = (Arc::clone(&in_progress), Arc::clone(&refusals));
        tokio::spawn(async move {
            let pressed = async {
                tokio::time::sleep(PRESSED_HANDSHAKE_TIMEOUT).await;
                if lock(&in_progress).running.len() <= MAX_PENDING_HANDSHAKES / 2 {
                    std::future::pending::<()>().await;
                }
            };
            let outcome = tokio::select! {
                done = running => Ok(done),
                _ = tokio::time::sleep(timeout) => Err(format!("no {what} within {} s", timeout.as_secs())),
                _ = pressed => Err(format!(
                    "no {what} within {} s while over {} were in progress",
                    PRESSED_HANDSHAKE_TIMEOUT.as_secs(),
                    MAX_PENDING_HANDSHAKES / 2
                )),
                _ = stop.cancelled() => Err(format!(
                    "dropped before its {what} finished: {MAX_PENDING_HANDSHAKES} were in \
                     progress (the most) when a newer connection came"
                )),
            };
            lock(&in_progress).running.remove(&id);
            match outcome {
                Ok(Ok(s)) => {
                    let _ = tx.send(Ok((s, peer))).await;
                }
                Ok(Err(e)) => {
                    refusals.warn(format_args!(
                        "refused a connection from {peer}: {what}: {e}"
                    ));
                }
                Err(why) => {
                    refusals.warn(format_args!("refused a connection from {peer}: {why}"));
                }
            }
        });
    }
}

/// Runs a dialing-side handshake with `addr` for at most `timeout`; errors
/// say what failed with which peer (`"{what} with {addr}: ..."`).
pub async fn dial_handshake<T>(
    what: &str,
    addr: &str,
    timeout: Duration,
    handshake: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("{what} with {addr}: {e}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{what} with {addr}: no answer within {} s",
                timeout.as_secs()
            ),
        )),
    }
}
