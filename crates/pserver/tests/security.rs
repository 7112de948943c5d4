//! Security of real processes: a cluster started with a secret file (and
//! with TLS) serves clients that have it, refuses raw TCP clients that do
//! not before they touch any table, and nodes refuse to listen beyond
//! loopback without a secret.

use pserver_core::{Consistency, Init, KeyRange, TableSpec, UpdaterSpec};
use pserver_wire::{Control, Frame, FrameCodec, Header, Kind};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio_util::codec::Encoder;

mod common;

use common::{BIN, Procs, ok, run, spawn};

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "pserver {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn last_word(line: &str) -> String {
    line.rsplit(' ').next().unwrap().to_string()
}

/// A manager and a server started with `flags`; returns them with the
/// manager's and the server's addresses.
fn cluster(flags: &[&str]) -> (Procs, String, String) {
    let mut args = vec!["manager", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let (m, line) = spawn(&args);
    let manager = last_word(&line);
    let mut procs = Procs(vec![(m, line)]);
    let mut args = vec!["server", "--manager", &manager];
    args.extend_from_slice(flags);
    let (s, line) = spawn(&args);
    assert!(line.starts_with("server "), "{line:?}");
    let server = last_word(&line);
    procs.0.push((s, line));
    (procs, manager, server)
}

/// Writes `frame` on a fresh raw TCP connection to `addr` and returns what
/// came back before the node closed it.
fn raw(addr: &str, frame: Frame) -> Vec<u8> {
    let mut bytes = bytes::BytesMut::new();
    FrameCodec::default().encode(&frame, &mut bytes).unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&bytes);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back
}

/// Checks that `back` is nothing but one refusal saying the secret is needed.
fn refused(back: &[u8]) {
    let frame = Frame::decode(&back[4..], &Default::default()).expect("one frame");
    assert_eq!(back.len(), 4 + frame.encoded_len(), "only the refusal");
    assert_eq!(frame.header.kind, Kind::Error);
    match frame.control_msg().unwrap() {
        Control::Error { message, .. } => assert!(message.contains("secret"), "{message}"),
        other => panic!("{other:?}"),
    }
}

fn write_secret(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, secret).unwrap();
    path.display().to_string()
}

#[test]
fn only_clients_with_the_secret_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path(), "secret", "correct horse battery staple\n");
    let wrong = write_secret(dir.path(), "wrong", "incorrect horse battery staple\n");
    let (_procs, m, server) = cluster(&["--secret-file", &secret]);
    let m = m.as_str();
    ok(&[
        "kv",
        "--manager",
        m,
        "--secret-file",
        &secret,
        "create-table",
        "w",
        "--dim",
        "1",
        "--updater",
        "add",
    ]);
    ok(&[
        "kv",
        "--manager",
        m,
        "--secret-file",
        &secret,
        "push",
        "w",
        "--keys",
        "1,2",
        "--values",
        "0.5,1",
    ]);

    // Without the secret, or with another, the command line is turned away.
    let e = fails(&["kv", "--manager", m, "pull", "w", "--keys", "1,2"]);
    assert!(e.contains("secret"), "{e}");
    let e = fails(&[
        "kv",
        "--manager",
        m,
        "--secret-file",
        &wrong,
        "pull",
        "w",
        "--keys",
        "1,2",
    ]);
    assert!(e.contains("secret"), "{e}");

    // A raw TCP client sends well-formed frames: creating a table at the
    // manager, pushing to the server. Each connection is closed unanswered.
    let spec = TableSpec {
        id: 0,
        name: "intruder".into(),
        dim: 1,
        init: Init::Zero,
        updater: UpdaterSpec::Assign,
        consistency: Consistency::Eventual,
        aggregate: false,
        job: None,
    };
    let create = Frame::control(Header::new(Kind::Control), &Control::CreateTable(spec));
    refused(&raw(m, create));
    let mut h = Header::new(Kind::Push);
    h.table = 1;
    h.range = KeyRange::ALL;
    h.clock = 99;
    let push = Frame {
        header: h,
        keys: vec![1, 2],
        vals: vec![-100.0, -100.0].into(),
        ctrl: Default::default(),
        packed: None,
    };
    refused(&raw(&server, push));

    // Nothing changed: the values are those pushed, no table was added.
    let out = ok(&[
        "kv",
        "--manager",
        m,
        "--secret-file",
        &secret,
        "pull",
        "w",
        "--keys",
        "1,2",
    ]);
    assert_eq!(out, "1 0.5\n2 1\n");
    let status = ok(&["status", "--manager", m, "--secret-file", &secret, "--json"]);
    assert!(!status.contains("intruder"), "{status}");

    // The secret also comes from the environment, never the command line.
    let out = Command::new(BIN)
        .args(["kv", "--manager", m, "pull", "w", "--keys", "2"])
        .env("PSERVER_SECRET", "correct horse battery staple")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 1\n");
}

#[test]
fn tls_clusters_serve_only_their_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = ok(&["certs", certs.to_str().unwrap()]);
    assert!(out.contains("--tls-cert"), "{out}");
    let file = |f: &str| certs.join(f).display().to_string();
    let (cert, key, ca) = (file("node.pem"), file("node.key"), file("ca.pem"));
    let secret = write_secret(dir.path(), "secret", "0123456789abcdef0123456789");
    let flags = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--secret-file",
        &secret,
    ];
    let (_procs, m, server) = cluster(&flags);
    let with = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&flags);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = with(&[
        "kv",
        "--manager",
        &m,
        "create-table",
        "t",
        "--dim",
        "1",
        "--updater",
        "add",
    ]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = with(&[
        "kv",
        "--manager",
        &m,
        "push",
        "t",
        "--keys",
        "7",
        "--values",
        "2",
    ]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = with(&["kv", "--manager", &m, "pull", "t", "--keys", "7"]);
    assert_eq!(
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        "7 2\n"
    );

    // The secret alone does not get through TLS; nor does a raw client.
    let e = fails(&[
        "kv",
        "--manager",
        &m,
        "--secret-file",
        &secret,
        "pull",
        "t",
        "--keys",
        "7",
    ]);
    assert!(e.contains("error"), "{e}");
    let mut h = Header::new(Kind::Pull);
    h.table = 1;
    h.range = KeyRange::ALL;
    let pull = Frame {
        header: h,
        keys: vec![7],
        vals: vec![].into(),
        ctrl: Default::default(),
        packed: None,
    };
    let back = raw(&server, pull);
    assert!(
        !back.windows(4).any(|w| w == 2.0f32.to_le_bytes()),
        "a raw client read a weight"
    );

    // Another CA's node is refused.
    let other = dir.path().join("other");
    ok(&["certs", other.to_str().unwrap()]);
    let o = |f: &str| other.join(f).display().to_string();
    let e = fails(&[
        "kv",
        "--manager",
        &m,
        "--secret-file",
        &secret,
        "--tls-cert",
        &o("node.pem"),
        "--tls-key",
        &o("node.key"),
        "--tls-ca",
        &o("ca.pem"),
        "pull",
        "t",
        "--keys",
        "7",
    ]);
    assert!(e.contains("error"), "{e}");
}

#[test]
fn listening_beyond_loopback_needs_a_secret() {
    let e = fails(&["manager", "--listen", "0.0.0.0:0"]);
    assert!(
        e.contains("--secret-file") && e.contains("--insecure"),
        "{e}"
    );
    let e = fails(&["server", "--listen", "0.0.0.0:0"]);
    assert!(e.contains("--secret-file"), "{e}");
    // With --insecure it is the operator's choice.
    let (m, line) = spawn(&["manager", "--listen", "0.0.0.0:0", "--insecure"]);
    let _procs = Procs(vec![(m, line.clone())]);
    assert!(line.starts_with("manager listening"), "{line}");
    // Bad security flags are named.
    let e = fails(&["status", "--secret-file", "/nonexistent/secret"]);
    assert!(e.contains("/nonexistent/secret"), "{e}");
    let e = fails(&["status", "--tls-cert", "/x.pem"]);
    assert!(e.contains("all three"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let short = write_secret(dir.path(), "short", "tiny");
    let e = fails(&["status", "--secret-file", &short]);
    assert!(e.contains("at least 16"), "{e}");
}
