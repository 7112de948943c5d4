//! The command line's security flags, shared by every subcommand: the
//! cluster secret, TLS files and `--insecure`, turned into the [`Net`] every
//! node and client of this process dials and listens through.

use anyhow::{Context, Result, bail};
use clap::Args;
use pserver_node::auth::{SECRET_ENV, Secret, authenticated};
use pserver_node::net::Net;
use pserver_node::tls::{TlsFiles, tls};
use std::path::PathBuf;

/// Flags that say how this process's connections are secured. Global:
/// they may stand before or after the subcommand.
#[derive(Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// File holding the cluster secret (at least 16 bytes); every
    /// connection must prove it. Or put the secret itself in
    /// PSERVER_SECRET. Never pass a secret on the command line.
    #[arg(
        long,
        global = true,
        env = "PSERVER_SECRET_FILE",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub secret_file: Option<PathBuf>,
    /// This node's TLS certificate chain (PEM); with --tls-key and
    /// --tls-ca, every connection is mutually authenticated TLS.
    #[arg(
        long,
        global = true,
        env = "PSERVER_TLS_CERT",
        hide_env_values = true,
        value_name = "PEM"
    )]
    pub tls_cert: Option<PathBuf>,
    /// This node's TLS private key (PEM).
    #[arg(
        long,
        global = true,
        env = "PSERVER_TLS_KEY",
        hide_env_values = true,
        value_name = "PEM"
    )]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM) peers must chain to.
    #[arg(
        long,
        global = true,
        env = "PSERVER_TLS_CA",
        hide_env_values = true,
        value_name = "PEM"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Allow listening on a non-loopback address with no cluster secret:
    /// anyone who can reach the port can then read and write every table.
    #[arg(long, global = true, env = "PSERVER_INSECURE")]
    pub insecure: bool,
}

/// The security a process runs with, resolved from [`SecurityArgs`].
#[derive(Clone, Debug)]
pub struct Security {
    /// The transport: TCP, in TLS if configured, with the secret's
    /// handshake if a secret is set.
    pub net: Net,
    /// Whether a cluster secret is in force.
    pub has_secret: bool,
    insecure: bool,
    args: SecurityArgs,
}

impl SecurityArgs {
    /// Reads the secret and TLS files and builds the transport. Errors name
    /// the flag and file.
    pub fn resolve(&self) -> Result<Security> {
        let secret = match &self.secret_file {
            Some(path) => Some(Secret::from_file(path)?),
            None => Secret::from_env()?,
        };
        let files = match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => bail!("--tls-cert, --tls-key and --tls-ca go together: give all three or none"),
        };
        let mut net = Net::tcp();
        if let Some(f) = &files {
            net = tls(net, f).context("setting up TLS")?;
        }
        let has_secret = secret.is_some();
        if let Some(s) = secret {
            net = authenticated(net, s);
        }
        Ok(Security {
            net,
            has_secret,
            insecure: self.insecure,
            args: self.clone(),
        })
    }
}

impl Security {
    /// Refuses to listen on a non-loopback address without a secret, unless
    /// `--insecure` was given.
    pub fn check_listen(&self, addr: &str) -> Result<()> {
        if self.has_secret || self.insecure || is_loopback(addr) {
            return Ok(());
        }
        bail!(
            "refusing to listen on {addr} without a cluster secret: anyone who can reach it \
             could read and write every table. Give --secret-file FILE (or {SECRET_ENV}), \
             or --insecure to accept that"
        )
    }

    /// The flags that give a child `pserver` process the same security (a
    /// secret from the environment reaches children by inheritance).
    pub fn child_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let a = &self.args;
        if let Some(p) = &a.secret_file {
            out.push("--secret-file".to_string());
            out.push(p.display().to_string());
        }
        for (flag, p) in [
            ("--tls-cert", &a.tls_cert),
            ("--tls-key", &a.tls_key),
            ("--tls-ca", &a.tls_ca),
        ] {
            if let Some(p) = p {
                out.push(flag.to_string());
                out.push(p.display().to_string());
            }
        }
        if a.insecure {
            out.push("--insecure".to_string());
        }
        out
    }

    /// The transport for a cluster that lives wholly in this process
    /// (`pserver local`, `train` without `--manager`): the configured one,
    /// or, with no secret configured, a fresh random secret, so even these
    /// loopback ports refuse other local users' processes.
    pub fn in_process(&self) -> Net {
        if self.has_secret {
            self.net.clone()
        } else {
            authenticated(self.net.clone(), Secret::random())
        }
    }
}

/// Whether `addr` (`host:port`) names a loopback interface.
fn is_loopback(addr: &str) -> bool {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_beyond_loopback_needs_a_secret_or_insecure() {
        for a in ["127.0.0.1:7070", "localhost:1", "[::1]:9", "127.3.2.1:0"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["0.0.0.0:7070", "10.0.0.5:1", "[::]:9", "example.com:80"] {
            assert!(!is_loopback(a), "{a}");
        }
        let plain = SecurityArgs::default().resolve().unwrap();
        assert!(plain.check_listen("127.0.0.1:0").is_ok());
        let e = plain.check_listen("0.0.0.0:7070").unwrap_err().to_string();
        assert!(
            e.contains("--secret-file") && e.contains("--insecure"),
            "{e}"
        );
        let open = SecurityArgs {
            insecure: true,
            ..SecurityArgs::default()
        };
        assert!(open.resolve().unwrap().check_listen("0.0.0.0:7070").is_ok());
        assert_eq!(open.resolve().unwrap().child_args(), ["--insecure"]);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let with = SecurityArgs {
            secret_file: Some(file.clone()),
            ..SecurityArgs::default()
        }
        .resolve()
        .unwrap();
        assert!(with.has_secret);
        assert!(with.check_listen("0.0.0.0:7070").is_ok());
        assert_eq!(with.child_args()[0], "--secret-file");
    }

    #[test]
    fn bad_security_flags_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = SecurityArgs {
            secret_file: Some(dir.path().join("missing")),
            ..SecurityArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
        let e = SecurityArgs {
            tls_cert: Some(dir.path().join("c.pem")),
            ..SecurityArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("all three"), "{e}");
    }
}
