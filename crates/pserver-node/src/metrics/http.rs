//! The metrics listener: `GET /metrics`, `/healthz` and `/readyz` over
//! HTTP/1.1, one request per connection, every resource bounded.
//!
//! Why not a general HTTP server: the listener answers three fixed GETs
//! with no body, for Prometheus and for Kubernetes probes, both of which
//! are content with `Connection: close`. The request head is parsed by
//! `httparse` (the parser under hyper); what is left is a read with a
//! deadline, a size cap and a connection cap, which this module does in
//! the open, so each bound is visible and tested:
//!
//! - at most [`HttpLimits::max_connections`] connections at once; one more
//!   is answered `503` at once (without waiting to read it) and closed;
//! - the request head (request line and headers) must arrive whole within
//!   [`HttpLimits::max_head_bytes`] (else `431`) and within
//!   [`HttpLimits::timeout`] (else the connection is closed unanswered),
//!   so a slow or silent peer holds one slot for at most that long;
//! - the answer, and the scrape or readiness check behind it, get the same
//!   time again (a scrape that cannot take the node's figures in time is
//!   `503`);
//! - anything `httparse` refuses is `400`; a path other than the three is
//!   `404`; a method other than `GET` on one of them is `405`. A body is
//!   never read: the connection closes after the answer.
//!
//! [`parse`] and [`route`] are plain functions over bytes, unit-tested
//! without sockets; [`serve`] only carries them out.

use super::Exporter;
use crate::error::NodeError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The bounds of a metrics listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Largest request head (request line and headers) read, in bytes.
    pub max_head_bytes: usize,
    /// How long the request head may take to arrive, and then how long the
    /// answer may take to be made and written.
    pub timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: 64,
            max_head_bytes: 8 << 10,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Most headers a request may carry (more is `431`, as too large a head).
const MAX_HEADERS: usize = 64;

/// What the bytes read so far of a request head say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not all of it yet.
    Partial,
    /// A whole head: its method and path (the query cut off).
    Request {
        /// The method, as sent.
        method: String,
        /// The path without its query string.
        path: String,
    },
    /// Not HTTP/1.x (the parser's words).
    Bad(String),
    /// Over [`HttpLimits::max_head_bytes`] or [`MAX_HEADERS`].
    TooLarge,
}

/// Parses the start of a request (`buf`, every byte read so far) with
/// `httparse`; `max` is the largest head taken.
pub fn parse(buf: &[u8], max: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max => {
            let path = req.path.unwrap_or("/");
            Parsed::Request {
                method: req.method.unwrap_or("").to_string(),
                path: path.split('?').next().unwrap_or(path).to_string(),
            }
        }
        Ok(httparse::Status::Complete(_)) => Parsed::TooLarge,
        Ok(httparse::Status::Partial) if buf.len() >= max => Parsed::TooLarge,
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => Parsed::TooLarge,
        Err(e) => Parsed::Bad(e.to_string()),
    }
}

/// What a request is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`: the scrape.
    Metrics,
    /// `GET /healthz`: the process is alive.
    Health,
    /// `GET /readyz`: whether the node serves.
    Ready,
    /// Another path: `404`.
    NotFound,
    /// Another method on one of the three: `405`.
    NotAllowed,
}

/// Where `method` on `path` goes.
pub fn route(method: &str, path: &str) -> Route {
    let to = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        _ => return Route::NotFound,
    };
    if method == "GET" {
        to
    } else {
        Route::NotAllowed
    }
}

/// An answer, before it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// A plain-text answer: `body` and a newline.
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }

    /// The bytes on the wire: status line, headers, body; the connection
    /// closes after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let allow = if self.status == 405 {
            "Allow: GET\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// A running metrics listener; dropping it (or [`Endpoint::shutdown`])
/// stops it.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl Endpoint {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening; connections being answered end too.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Listens on `listen` (TCP; port 0 picks one) and answers every request
/// from `exporter`, within `limits`.
pub async fn serve(
    listen: &str,
    exporter: Arc<dyn Exporter>,
    limits: HttpLimits,
) -> Result<Endpoint, NodeError> {
    let bind_err = |os| NodeError::Bind {
        addr: listen.to_string(),
        os,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        loop {
            let accepted = tokio::select! {
                _ = token.cancelled() => break,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, say: pause instead of spinning.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => {
                    let (exporter, token) = (Arc::clone(&exporter), token.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = answer(stream, &*exporter, limits) => {}
                            _ = token.cancelled() => {}
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    // Refused without reading: the answer fits any socket
                    // buffer, so it is written without waiting.
                    let busy = Response::text(
                        503,
                        &format!(
                            "busy: {} connections are being served",
                            limits.max_connections
                        ),
                    );
                    // What the request already sent is read first (a
                    // socket closed with unread bytes resets, and the peer
                    // would lose the answer); no more than is there now.
                    let mut junk = [0u8; 1024];
                    for _ in 0..8 {
                        match stream.try_read(&mut junk) {
                            Ok(n) if n > 0 => continue,
                            _ => break,
                        }
                    }
                    let _ = stream.try_write(&busy.to_bytes());
                }
            }
        }
    });
    Ok(Endpoint { addr, cancel })
}

/// Reads one request head from `stream` and answers it.
async fn answer(mut stream: TcpStream, exporter: &dyn Exporter, limits: HttpLimits) {
    let head = tokio::time::timeout(
        limits.timeout,
        read_head(&mut stream, limits.max_head_bytes),
    );
    let parsed = match head.await {
        Ok(Some(p)) => p,
        // Silent past the deadline, or closed before a whole head: there
        // is no request to answer.
        Err(_) | Ok(None) => return,
    };
    let respond = async {
        let response = match parsed {
            Parsed::Request { method, path } => match route(&method, &path) {
                Route::Metrics => Response {
                    status: 200,
                    content_type: super::scrape::CONTENT_TYPE,
                    body: exporter.scrape().await.render(),
                },
                Route::Health => Response::text(200, "ok"),
                Route::Ready => match exporter.ready().await {
                    Ok(()) => Response::text(200, "ready"),
                    Err(why) => Response::text(503, &one_line(&why)),
                },
                Route::NotFound => Response::text(
                    404,
                    &format!("no {path} here: try /metrics, /healthz or /readyz"),
                ),
                Route::NotAllowed => {
                    Response::text(405, &format!("{path} answers GET only, not {method}"))
                }
            },
            Parsed::Bad(why) => Response::text(400, &format!("not an HTTP/1.x request: {why}")),
            Parsed::TooLarge => Response::text(
                431,
                &format!(
                    "the request head is over {} bytes or {MAX_HEADERS} headers",
                    limits.max_head_bytes
                ),
            ),
            Parsed::Partial => return,
        };
        let _ = stream.write_all(&response.to_bytes()).await;
        let _ = stream.shutdown().await;
    };
    if tokio::time::timeout(limits.timeout, respond).await.is_err() {
        tracing::debug!("metrics listener: an answer was not made or written in time");
    }
}

/// Reads until `parse` has a verdict; `None` when the peer closes first.
async fn read_head(stream: &mut TcpStream, max: usize) -> Option<Parsed> {
    let mut buf = Vec::with_capacity(1024.min(max));
    let mut chunk = [0u8; 1024];
    loop {
        // Never more than one byte past the cap: enough to know it is over.
        let room = (max + 1 - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf, max) {
            Parsed::Partial => continue,
            verdict => return Some(verdict),
        }
    }
}

/// A reason as one line (a probe's answer is read by people in one line).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8 << 10;

    #[test]
    fn heads_parse_into_method_and_path() {
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", MAX),
            Parsed::Request {
                method: "GET".into(),
                path: "/metrics".into()
            }
        );
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost:", MAX),
            Parsed::Partial
        );
        assert_eq!(parse(b"", MAX), Parsed::Partial);
        assert!(matches!(
            parse(b"\x00\x01junk\r\n\r\n", MAX),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(b"GET /metrics HTTP/9.9\r\n\r\n", MAX),
            Parsed::Bad(_)
        ));
        // Over the cap, whether or not the head ended inside it.
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX));
        assert_eq!(parse(long.as_bytes(), MAX), Parsed::TooLarge);
        assert_eq!(parse(&long.as_bytes()[..MAX], MAX), Parsed::TooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(many.as_bytes(), MAX), Parsed::TooLarge);
    }

    #[test]
    fn routes_take_get_on_three_paths() {
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("GET", "/healthz"), Route::Health);
        assert_eq!(route("GET", "/readyz"), Route::Ready);
        assert_eq!(route("POST", "/metrics"), Route::NotAllowed);
        assert_eq!(route("HEAD", "/readyz"), Route::NotAllowed);
        assert_eq!(route("GET", "/"), Route::NotFound);
        assert_eq!(route("DELETE", "/metrics/x"), Route::NotFound);
    }

    #[test]
    fn answers_say_their_length_and_close() {
        let r = Response::text(405, "no");
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.contains("Allow: GET\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n\r\nno\n"), "{text}");
    }
}
