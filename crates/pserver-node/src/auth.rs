//! Cluster authentication: a shared secret and a challenge-response
//! handshake that every connection completes before its first frame.
//!
//! [`authenticated`] wraps any [`Net`]: dialing runs the client side of the
//! handshake, and the listener yields only connections whose peer proved it
//! holds the secret. Every node (manager, server, worker) dials and listens
//! through its `Net`, so wrapping it once covers every connection in the
//! cluster, and no frame from an unauthenticated peer ever reaches the code
//! that touches tables.
//!
//! The handshake (each side proves the secret without revealing it, with
//! fresh nonces so a recorded exchange cannot be replayed):
//!
//! ```text
//! client -> server   MAGIC, client nonce (32 bytes)
//! server -> client   MAGIC, server nonce (32), HMAC-SHA256(secret, "server" | nc | ns)
//! client -> server   HMAC-SHA256(secret, "client" | nc | ns)
//! ```
//!
//! The client checks the server's tag before sending its own, so neither side
//! talks to an impostor. The secret authenticates the connection's opening
//! only: on a network where someone can inject into a TCP stream, use TLS
//! (which also encrypts) as well.

use crate::net::{
    BoxStream, Handshake, IoFuture, Listener, Net, Transport, dial_handshake, handshaking,
};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The first bytes of a handshake, both ways: a protocol name and version,
/// so a peer speaking something else (or plain frames) is told apart.
const MAGIC: &[u8; 8] = b"PSAUTH1\n";

/// Bytes of each nonce and of each tag.
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// Fewest bytes a secret may have: shorter ones are guessable.
pub const MIN_SECRET_LEN: usize = 16;

/// How long a peer has to complete the handshake. A listener never waits on
/// one peer (each handshake runs in its own task), but a connection that
/// stalls is dropped after this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable holding the secret itself (for containers that
/// inject secrets that way). `--secret-file` is preferred.
pub const SECRET_ENV: &str = "PSERVER_SECRET";

/// Why a secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read the cluster secret from {path}: {os}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        os: io::Error,
    },
    /// The secret is too short.
    #[error(
        "the cluster secret from {from} has {len} bytes; at least {MIN_SECRET_LEN} are needed (try: head -c 32 /dev/urandom | base64 > FILE)"
    )]
    TooShort {
        /// Where it came from.
        from: String,
        /// Its length after trimming.
        len: usize,
    },
}

/// A cluster secret. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct Secret(Arc<hmac::Key>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret of these bytes (leading and trailing whitespace trimmed, so
    /// a file's final newline does not matter); `from` names the source in
    /// errors.
    pub fn new(bytes: &[u8], from: &str) -> Result<Secret, SecretError> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort {
                from: from.to_string(),
                len: trimmed.len(),
            });
        }
        Ok(Secret(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, trimmed))))
    }

    /// The secret in `path`.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            os: source,
        })?;
        Secret::new(&bytes, &path.display().to_string())
    }

    /// The secret in `$PSERVER_SECRET`, if set.
    pub fn from_env() -> Result<Option<Secret>, SecretError> {
        match std::env::var_os(SECRET_ENV) {
            None => Ok(None),
            Some(v) => Secret::new(v.as_encoded_bytes(), SECRET_ENV).map(Some),
        }
    }

    /// A fresh random secret, for a cluster whose nodes all live in one
    /// process (`pserver local`) or one test.
    pub fn random() -> Secret {
        let mut bytes = [0u8; 32];
        // The OS generator failing is not something a caller can act on;
        // fall back to a time-derived key rather than run unauthenticated.
        if SystemRandom::new().fill(&mut bytes).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            bytes[..16].copy_from_slice(&t.to_le_bytes());
        }
        Secret(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
    }

    /// A fresh random secret as text (64 hex digits), for handing to child
    /// processes in a file or `PSERVER_SECRET`.
    pub fn random_text() -> Result<String, SecretError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SecretError::TooShort {
                from: "the OS random generator (it failed)".into(),
                len: 0,
            })?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The tag one side sends: the MAC of its role and both nonces.
    fn tag(&self, role: &[u8], client: &[u8], server: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(role);
        ctx.update(client);
        ctx.update(server);
        ctx.sign()
    }

    /// Whether `tag` is the right one (compared in constant time).
    fn verify(&self, role: &[u8], client: &[u8], server: &[u8], tag: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(role.len() + client.len() + server.len());
        msg.extend_from_slice(role);
        msg.extend_from_slice(client);
        msg.extend_from_slice(server);
        hmac::verify(&self.0, &msg, tag).is_ok()
    }
}

/// `inner` with every connection authenticated by `secret`.
pub fn authenticated(inner: Net, secret: Secret) -> Net {
    Net::new(Authenticated { inner, secret })
}

/// The transport [`authenticated`] returns.
struct Authenticated {
    inner: Net,
    secret: Secret,
}

impl Transport for Authenticated {
    fn connect(&self, addr: &str) -> IoFuture<'static, BoxStream> {
        let (inner, secret, addr) = (self.inner.clone(), self.secret.clone(), addr.to_string());
        Box::pin(async move {
            let mut stream = inner.connect(&addr).await?;
            let shake = client_side(&mut stream, &secret);
            dial_handshake("authentication", &addr, HANDSHAKE_TIMEOUT, shake).await?;
            Ok(stream)
        })
    }

    fn bind(&self, addr: &str) -> IoFuture<'static, (Box<dyn Listener>, SocketAddr)> {
        let (inner, secret, addr) = (self.inner.clone(), self.secret.clone(), addr.to_string());
        Box::pin(async move {
            let (listener, local) = inner.bind(&addr).await?;
            let handshake = move |mut stream: BoxStream| -> Handshake {
                let secret = secret.clone();
                Box::pin(async move {
                    server_side(&mut stream, &secret).await?;
                    Ok(stream)
                })
            };
            Ok((
                handshaking(listener, "authentication", HANDSHAKE_TIMEOUT, handshake),
                local,
            ))
        })
    }
}

/// A fresh nonce from the OS generator.
fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| io::Error::other("the OS random generator failed"))?;
    Ok(n)
}

/// A peer that opened with a plain pserver frame (a client started without
/// the secret) is answered in its own protocol, as a refusal of that
/// frame's request, so its user reads why instead of "connection closed".
async fn tell_plain_client(stream: &mut BoxStream, hello: &[u8]) {
    // Length prefix (4 bytes), then the header: magic at 0, request id at 8.
    let Some(id) = hello.get(12..20).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return;
    };
    if hello.get(4..8) != Some(b"PSRV".as_slice()) {
        return;
    }
    let mut h = pserver_wire::Header::new(pserver_wire::Kind::Error);
    h.request_id = u64::from_le_bytes(id);
    let refusal = pserver_wire::Control::Error {
        code: pserver_wire::ErrorCode::Invalid,
        message: format!(
            "this cluster requires its secret: give the client --secret-file FILE \
             (or set {SECRET_ENV})"
        ),
    };
    let frame = pserver_wire::Frame::control(h, &refusal);
    let mut out = bytes::BytesMut::new();
    if tokio_util::codec::Encoder::encode(
        &mut pserver_wire::FrameCodec::default(),
        &frame,
        &mut out,
    )
    .is_ok()
    {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    }
}

/// The dialing side: send a nonce, check the server's tag, send ours.
async fn client_side(stream: &mut BoxStream, secret: &Secret) -> io::Result<()> {
    let client = nonce()?;
    let mut hello = Vec::with_capacity(MAGIC.len() + NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&client);
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut answer = [0u8; 8 + NONCE_LEN + TAG_LEN];
    stream.read_exact(&mut answer).await.map_err(|e| {
        // A node without the secret reads the hello as a malformed frame
        // and closes, with an RST when bytes were left unread.
        if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        ) {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the peer closed the connection during the handshake \
                 (does it run with the same cluster secret?)",
            )
        } else {
            e
        }
    })?;
    let (magic, rest) = answer.split_at(MAGIC.len());
    let (server, tag) = rest.split_at(NONCE_LEN);
    if magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer does not speak pserver's authentication handshake",
        ));
    }
    if !secret.verify(b"pserver server", &client, server, tag) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the peer does not hold the cluster secret",
        ));
    }
    let ours = secret.tag(b"pserver client", &client, server);
    stream.write_all(ours.as_ref()).await?;
    stream.flush().await
}

/// The listening side: read the client's nonce, prove the secret, check
/// the client's proof.
async fn server_side(stream: &mut BoxStream, secret: &Secret) -> io::Result<()> {
    let mut hello = [0u8; 8 + NONCE_LEN];
    stream.read_exact(&mut hello).await?;
    let (magic, client) = hello.split_at(MAGIC.len());
    if magic != MAGIC {
        tell_plain_client(stream, &hello).await;
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "it did not start with the authentication handshake \
             (is it running without the cluster secret?)",
        ));
    }
    let server = nonce()?;
    let tag = secret.tag(b"pserver server", client, &server);
    let mut answer = Vec::with_capacity(MAGIC.len() + NONCE_LEN + TAG_LEN);
    answer.extend_from_slice(MAGIC);
    answer.extend_from_slice(&server);
    answer.extend_from_slice(tag.as_ref());
    stream.write_all(&answer).await?;
    stream.flush().await?;
    let mut theirs = [0u8; TAG_LEN];
    stream.read_exact(&mut theirs).await?;
    if !secret.verify(b"pserver client", client, &server, &theirs) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "wrong cluster secret",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes(), "test").unwrap()
    }

    /// Binds `server` on loopback and dials it with `client`; returns what
    /// each side got.
    async fn dial(server: Net, client: Net) -> (io::Result<BoxStream>, Option<BoxStream>) {
        let (mut listener, addr) = server.bind("127.0.0.1:0").await.unwrap();
        let accept = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|(s, _)| s)
        });
        let dialed = client.connect(&addr.to_string()).await;
        (dialed, accept.await.unwrap())
    }

    #[tokio::test]
    async fn same_secret_connects_and_carries_bytes() {
        let k = secret("0123456789abcdef-same");
        let (c, s) = dial(
            authenticated(Net::tcp(), k.clone()),
            authenticated(Net::tcp(), k),
        )
        .await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.write_all(b"frame").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"frame");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_both_ways() {
        let (c, s) = dial(
            authenticated(Net::tcp(), secret("server-secret-0123456")),
            authenticated(Net::tcp(), secret("client-secret-0123456")),
        )
        .await;
        let e = c.err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(
            e.to_string().contains("does not hold the cluster secret"),
            "{e}"
        );
        assert!(s.is_none());
    }

    #[tokio::test]
    async fn a_plain_client_never_gets_through() {
        let server = authenticated(Net::tcp(), secret("server-secret-0123456"));
        let (mut listener, addr) = server.bind("127.0.0.1:0").await.unwrap();
        let accept = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_ok()
        });
        // A raw client sends a frame-like prefix and then waits.
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut junk = vec![0u8; 44];
        junk[0] = 80;
        raw.write_all(&junk).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "the server closed without answering");
        assert!(!accept.await.unwrap(), "no connection reached the node");

        // A plain client dialing an authenticated server, and an
        // authenticated one dialing a plain server, both fail clearly.
        let (c, s) = dial(server, Net::tcp()).await;
        assert!(c.is_ok() && s.is_none());
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = plain.local_addr().unwrap();
        tokio::spawn(async move {
            // As a node without the secret does: the hello is no frame, so
            // it closes the connection.
            let (s, _) = plain.accept().await.unwrap();
            drop(s);
        });
        let client = authenticated(Net::tcp(), secret("client-secret-0123456"));
        let e = client.connect(&addr.to_string()).await.err().unwrap();
        assert!(e.to_string().contains("same cluster secret"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_peer_does_not_block_others() {
        let k = secret("0123456789abcdef-same");
        let server = authenticated(Net::tcp(), k.clone());
        let (mut listener, addr) = server.bind("127.0.0.1:0").await.unwrap();
        // Opens a connection and says nothing.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client = authenticated(Net::tcp(), k);
        let dialed = client.connect(&addr.to_string()).await;
        assert!(dialed.is_ok());
        let got = tokio::time::timeout(Duration::from_secs(1), listener.accept()).await;
        assert!(matches!(got, Ok(Ok(_))));
    }

    #[tokio::test]
    async fn a_flood_of_silent_peers_does_not_block_others() {
        let k = secret("0123456789abcdef-same");
        let server = authenticated(Net::tcp(), k.clone());
        let (mut listener, addr) = server.bind("127.0.0.1:0").await.unwrap();
        // More silent connections than handshakes may be in progress.
        let n = crate::net::MAX_PENDING_HANDSHAKES + 44;
        let mut silent = Vec::new();
        for _ in 0..n {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // A real peer still gets through at once...
        let t0 = std::time::Instant::now();
        let client = authenticated(Net::tcp(), k);
        let dialed =
            tokio::time::timeout(Duration::from_secs(2), client.connect(&addr.to_string()))
                .await
                .expect("not queued behind the silent ones");
        assert!(dialed.is_ok());
        let got = tokio::time::timeout(Duration::from_secs(1), listener.accept()).await;
        assert!(matches!(got, Ok(Ok(_))));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // ...because the oldest silent ones were dropped to make room.
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(1), silent[0].read(&mut buf))
            .await
            .expect("the oldest silent connection was closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert!(matches!(
            Secret::new(b"short\n", "x"),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        let k = secret("a-long-enough-secret");
        assert_eq!(format!("{k:?}"), "Secret(..)");
        let dir = tempfile::tempdir().unwrap();
        let missing = Secret::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        let path = dir.path().join("secret");
        std::fs::write(&path, "a-long-enough-secret\n").unwrap();
        let from_file = Secret::from_file(&path).unwrap();
        // The trailing newline is ignored: same key, same tags.
        let (c, s) = ([1u8; 32], [2u8; 32]);
        assert_eq!(
            from_file.tag(b"r", &c, &s).as_ref(),
            k.tag(b"r", &c, &s).as_ref()
        );
        assert!(k.verify(b"r", &c, &s, k.tag(b"r", &c, &s).as_ref()));
        assert!(!k.verify(b"x", &c, &s, k.tag(b"r", &c, &s).as_ref()));
    }
}
