//! TLS for every connection (rustls, ring backend), with a cluster CA and
//! mutual authentication: a node accepts only peers whose certificate the
//! cluster CA signed, and checks that the peer it dials is the host it named.
//!
//! [`tls`] wraps a [`Net`] the way [`crate::auth::authenticated`] does, and
//! the two compose (TLS outside, the secret's handshake inside). [`generate`]
//! writes a throwaway CA and one node certificate for a test cluster
//! (`pserver certs DIR`).

use crate::net::{
    BoxStream, Handshake, IoFuture, Listener, Net, Transport, dial_handshake, handshaking,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a peer has to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The PEM files a node needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain (`--tls-cert`).
    pub cert: PathBuf,
    /// This node's private key (`--tls-key`).
    pub key: PathBuf,
    /// The cluster CA's certificate (`--tls-ca`): peers must chain to it.
    pub ca: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration (say, a key that does not match
    /// the certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Generating certificates failed.
    #[error("generating certificates: {0}")]
    Generate(String),
}

fn file_error(path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Reads every certificate in a PEM file; none is an error.
fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in this PEM file"));
    }
    Ok(certs)
}

/// `inner` with every connection wrapped in mutually authenticated TLS.
pub fn tls(inner: Net, files: &TlsFiles) -> Result<Net, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca).map_err(|e| file_error(&files.ca, e))?;
    }
    let roots = Arc::new(roots);
    let config = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(config)?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(config)?;
    Ok(Net::new(Tls {
        inner,
        connector: TlsConnector::from(Arc::new(client)),
        acceptor: TlsAcceptor::from(Arc::new(server)),
    }))
}

/// The transport [`tls`] returns.
struct Tls {
    inner: Net,
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

/// The host part of `host:port` or `[v6]:port`, as TLS names it.
fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr}: not a host name TLS can check: {e}"),
        )
    })
}

impl Transport for Tls {
    fn connect(&self, addr: &str) -> IoFuture<'static, BoxStream> {
        let (inner, connector, addr) =
            (self.inner.clone(), self.connector.clone(), addr.to_string());
        Box::pin(async move {
            let name = server_name(&addr)?;
            let stream = inner.connect(&addr).await?;
            let handshake = connector.connect(name, stream);
            let s = dial_handshake("TLS", &addr, TLS_HANDSHAKE_TIMEOUT, handshake).await?;
            Ok(Box::new(s) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> IoFuture<'static, (Box<dyn Listener>, SocketAddr)> {
        let (inner, acceptor, addr) = (self.inner.clone(), self.acceptor.clone(), addr.to_string());
        Box::pin(async move {
            let (listener, local) = inner.bind(&addr).await?;
            let handshake = move |stream: BoxStream| -> Handshake {
                let accepting = acceptor.accept(stream);
                Box::pin(async move { Ok(Box::new(accepting.await?) as BoxStream) })
            };
            Ok((
                handshaking(listener, "TLS handshake", TLS_HANDSHAKE_TIMEOUT, handshake),
                local,
            ))
        })
    }
}

/// Writes a throwaway cluster CA (`ca.pem`, `ca.key`) and one node
/// certificate signed by it (`node.pem`, `node.key`) valid for `hosts`
/// (names or IP addresses) as both server and client, into `dir`. Keys are
/// written readable by their owner only. For test clusters; a real
/// deployment issues certificates from its own CA.
pub fn generate(dir: &Path, hosts: &[String]) -> Result<TlsFiles, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pserver cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;

    let mut node = CertificateParams::new(hosts.to_vec()).map_err(gen_err)?;
    node.distinguished_name
        .push(DnType::CommonName, "pserver node");
    node.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    node.use_authority_key_identifier_extension = true;
    let node_key = KeyPair::generate().map_err(gen_err)?;
    let issuer = Issuer::new(ca, ca_key);
    let node_cert = node.signed_by(&node_key, &issuer).map_err(gen_err)?;

    let files = TlsFiles {
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        ca: dir.join("ca.pem"),
    };
    write(&files.ca, ca_cert.pem().as_bytes(), false)?;
    write(
        &dir.join("ca.key"),
        issuer.key().serialize_pem().as_bytes(),
        true,
    )?;
    write(&files.cert, node_cert.pem().as_bytes(), false)?;
    write(&files.key, node_key.serialize_pem().as_bytes(), true)?;
    Ok(files)
}

/// Writes `bytes` to `path`; private files get mode 0600 before any byte.
fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = private;
    let mut f = opts.open(path).map_err(|e| file_error(path, e))?;
    f.write_all(bytes).map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn nodes_of_one_ca_talk_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let net = tls(Net::tcp(), &files).unwrap();
        let (mut listener, addr) = net.bind("127.0.0.1:0").await.unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let mut c = net.connect(&addr.to_string()).await.unwrap();
        let mut s = accepted.await.unwrap().unwrap();
        c.write_all(b"over tls").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 8];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"over tls");

        // A node of another CA is refused, both as client and as server.
        let other = tempfile::tempdir().unwrap();
        let other_files = generate(other.path(), &["127.0.0.1".into()]).unwrap();
        let stranger = tls(Net::tcp(), &other_files).unwrap();
        let (mut listener, addr) = net.bind("127.0.0.1:0").await.unwrap();
        let accepted = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_ok()
        });
        assert!(stranger.connect(&addr.to_string()).await.is_err());
        assert!(!accepted.await.unwrap(), "no connection reached the node");

        // A plain TCP client gets nothing through either.
        let (mut listener, addr) = net.bind("127.0.0.1:0").await.unwrap();
        let accepted = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_ok()
        });
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut frame = vec![0u8; 84];
        frame[0] = 80;
        raw.write_all(&frame).await.unwrap();
        assert!(!accepted.await.unwrap());

        // Dialing by a name the certificate does not carry fails.
        let (_l, addr) = net.bind("127.0.0.2:0").await.unwrap();
        let e = net
            .connect(&addr.to_string())
            .await
            .err()
            .expect("name mismatch refused");
        assert!(e.to_string().contains("TLS"), "{e}");
    }

    #[test]
    fn bad_files_say_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), &["127.0.0.1".into()]).unwrap();
        let missing = TlsFiles {
            cert: dir.path().join("nope.pem"),
            ..files.clone()
        };
        let e = tls(Net::tcp(), &missing).err().unwrap();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = tls(
            Net::tcp(),
            &TlsFiles {
                ca: empty.clone(),
                ..files.clone()
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        // The CA's key is not this node's key.
        let e = tls(
            Net::tcp(),
            &TlsFiles {
                key: dir.path().join("ca.key"),
                ..files.clone()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(e, TlsError::Config(_)), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(server_name("127.0.0.1:80").is_ok());
        assert!(server_name("[::1]:80").is_ok());
        assert!(server_name("node-3.example:80").is_ok());
    }
}
