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
    /// The next connection, with the peer's address for logs.
    fn accept(&mut self) -> IoFuture<'_, (BoxStream, String)>;
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
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            let local = listener.local_addr()?;
            Ok((Box::new(TcpListener(listener)) as Box<dyn Listener>, local))
        })
    }
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

/// Handshakes in progress at once on one handshaking listener; further
/// connections wait in the kernel's backlog, so a flood of idle ones cannot
/// pile up tasks and buffers.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// `inner`, yielding only connections whose `handshake` succeeded within
/// `timeout`. Each handshake runs in its own task, so a slow or silent peer
/// never holds up the others; a refused peer gets one log line naming
/// `what` failed, and its connection is dropped. For transports that
/// prove something before the first frame (the cluster secret, TLS).
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
                None => Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the listener stopped",
                )),
            }
        })
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
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let (running, tx) = (handshake(stream), tx.clone());
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(timeout, running).await;
            drop(permit);
            match outcome {
                Ok(Ok(s)) => {
                    let _ = tx.send(Ok((s, peer))).await;
                }
                Ok(Err(e)) => tracing::warn!("refused a connection from {peer}: {what}: {e}"),
                Err(_) => tracing::warn!(
                    "refused a connection from {peer}: no {what} within {} s",
                    timeout.as_secs()
                ),
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
