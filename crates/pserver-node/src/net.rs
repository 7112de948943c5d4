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
use tokio::io::{AsyncRead, AsyncWrite};

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
