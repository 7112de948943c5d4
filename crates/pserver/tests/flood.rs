//! Silent connections must not starve real clients (issue #16, defect 6):
//! 2,000 TCP connections that never send a byte are opened to a server
//! process and 2,000 to its manager, with and without a cluster secret;
//! meanwhile a real client (`pserver kv`, which registers with the manager
//! and pulls from the server) must get through within 2 s, twice, and the
//! silent connections must be closed within a bound.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{Procs, run_within, spawn};

/// Silent connections per node.
const FLOOD: usize = 2000;
/// How long a real client may take.
const CLIENT_BOUND: Duration = Duration::from_secs(2);
/// How long after the flood every silent connection must be closed.
const CLOSE_BOUND: Duration = Duration::from_secs(15);

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

/// Threads opening each node's silent connections.
const FLOODERS: usize = 8;

/// Starts opening `n` connections to `addr` that send nothing, from
/// several threads (a connect the node leaves unanswered for 3 s is given
/// up); `opened` counts those established so far. Join for them.
fn silent(
    addr: &str,
    n: usize,
    opened: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<Vec<TcpStream>>> {
    let addr: SocketAddr = addr.parse().unwrap();
    (0..FLOODERS)
        .map(|_| {
            let opened = Arc::clone(opened);
            std::thread::spawn(move || {
                (0..n / FLOODERS)
                    .filter_map(|_| {
                        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
                        opened.fetch_add(1, Ordering::Relaxed);
                        Some(c)
                    })
                    .collect()
            })
        })
        .collect()
}

/// How many of `conns` the other side has not closed yet.
fn still_open(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|c| {
            c.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 256];
            let mut c = *c;
            loop {
                match c.read(&mut buf) {
                    // A refusal frame first, perhaps; then the end.
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            }
        })
        .count()
}

/// Runs a real client: `pserver kv pull` of one key; returns how long it
/// took, or what it said when it failed.
fn client(manager: &str, flags: &[&str]) -> Result<Duration, String> {
    let mut args = vec!["kv", "--manager", manager, "pull", "t", "--keys", "1"];
    args.extend_from_slice(flags);
    let t0 = Instant::now();
    let out = run_within(&args, Duration::from_secs(60));
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout.trim() != "1 2" {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("failed after {took:.2?}: {}", err.trim()));
    }
    Ok(took)
}

/// Whether `c` got through within [`CLIENT_BOUND`].
fn fast(c: &Result<Duration, String>) -> bool {
    matches!(c, Ok(t) if *t < CLIENT_BOUND)
}

/// One flood against a cluster started with `flags`; prints the figures.
fn flood(flags: &[&str]) {
    let (_procs, manager, server) = cluster(flags);
    let kv = |args: &[&str]| {
        let mut a = vec!["kv", "--manager", manager.as_str()];
        a.extend_from_slice(args);
        a.extend_from_slice(flags);
        let out = run_within(&a, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    kv(&["create-table", "t"]);
    kv(&["push", "t", "--keys", "1", "--values", "2"]);

    // The flood starts; once it is under way (three quarters of it open,
    // past both nodes' connection limits; or the nodes take no more for
    // a second; or 10 s on), real clients come, one after the other.
    let t0 = Instant::now();
    let opened = Arc::new(AtomicUsize::new(0));
    let mut flooders = silent(&server, FLOOD, &opened);
    flooders.extend(silent(&manager, FLOOD, &opened));
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        let now = opened.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
        let stalled = now > 0 && since.elapsed() > Duration::from_secs(1);
        if now >= FLOOD * 3 / 2 || stalled || t0.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let under_way = opened.load(Ordering::Relaxed);
    let first = client(&manager, flags);
    let second = client(&manager, flags);
    let conns: Vec<TcpStream> = flooders
        .into_iter()
        .flat_map(|f| f.join().unwrap())
        .collect();
    let opened = conns.len();
    let flooded = t0.elapsed();
    // Then every silent connection is closed, within a bound.
    let t1 = Instant::now();
    let mut open = still_open(&conns);
    while open > 0 && t1.elapsed() < CLOSE_BOUND {
        std::thread::sleep(Duration::from_millis(200));
        open = still_open(&conns);
    }
    let closed_after = t1.elapsed();
    let figures = format!(
        "{flags:?}: clients came with {under_way} silent connections open: \
         {first:.2?}, then {second:.2?}; {opened} of {} opened in {flooded:.1?}; \
         {open} still open {closed_after:.1?} later",
        2 * FLOOD
    );
    eprintln!("{figures}");
    assert!(fast(&first) && fast(&second), "a client waited: {figures}");
    assert_eq!(open, 0, "silent connections held: {figures}");
    // The cluster still serves afterwards.
    let after = client(&manager, flags);
    assert!(fast(&after), "{after:?}");
}

/// The two floods take turns: each measures a client's wait, which the
/// other's load on this machine would distort.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn silent_connections_do_not_starve_clients_without_a_secret() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    flood(&[]);
}

#[test]
fn silent_connections_do_not_starve_clients_with_a_secret() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "correct horse battery staple\n").unwrap();
    flood(&["--secret-file", &secret.display().to_string()]);
}
