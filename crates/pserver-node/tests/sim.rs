//! Deterministic network simulation (turmoil): a manager, three servers with
//! one replica per range, and clients pushing +1 in loops, on a simulated
//! network with a fixed seed. Partitions cut a server off (its lease runs
//! out and its ranges move while it still runs), held messages arrive late
//! and out of step. Afterwards every key holds exactly the pushes that were
//! acknowledged: none lost, none applied twice.

use pserver_core::UpdaterSpec;
use pserver_core::membership::MembershipConfig;
use pserver_node::manager::{ManagerConfig, start_manager};
use pserver_node::net::{BoxStream, IoFuture, Listener, Net, Transport};
use pserver_node::server::{ServerConfig, start_server};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The simulated network, as seen from host `host`.
struct Sim {
    host: &'static str,
}

impl Transport for Sim {
    fn connect(&self, addr: &str) -> IoFuture<'static, BoxStream> {
        let addr = addr.to_string();
        Box::pin(async move {
            let s = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> IoFuture<'static, (Box<dyn Listener>, SocketAddr)> {
        let host = self.host;
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Box::pin(async move {
            let l =
                turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await?;
            // Peers dial the host's simulated address, not 0.0.0.0.
            let me = SocketAddr::new(turmoil::lookup(host), port);
            Ok((Box::new(SimListener(l)) as Box<dyn Listener>, me))
        })
    }
}

struct SimListener(turmoil::net::TcpListener);

impl Listener for SimListener {
    fn accept(&mut self) -> IoFuture<'_, (BoxStream, String)> {
        Box::pin(async move {
            let (s, peer) = self.0.accept().await?;
            Ok((Box::new(s) as BoxStream, peer.to_string()))
        })
    }
}

const SERVERS: [&str; 3] = ["s1", "s2", "s3"];

fn run(seed: u64) {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .rng_seed(seed)
        .build();
    sim.host("manager", || async {
        let m = start_manager(ManagerConfig {
            listen: "0.0.0.0:7070".into(),
            membership: MembershipConfig {
                replicas: 1,
                vnodes: 8,
                lease_ms: 1000,
            },
            net: Net::new(Sim { host: "manager" }),
            ..ManagerConfig::default()
        })
        .await?;
        m.cancelled().cancelled().await;
        Ok(())
    });
    for host in SERVERS {
        sim.host(host, move || async move {
            let mut cfg = ServerConfig::new("manager:7070");
            cfg.listen = "0.0.0.0:7000".into();
            cfg.net = Net::new(Sim { host });
            let s = start_server(cfg).await?;
            s.cancelled().cancelled().await;
            Ok(())
        });
    }
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, st) = (acked.clone(), stop.clone());
    sim.client("test", async move {
        // Let the servers register.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let client = || async {
            let mut cfg = WorkerConfig::client("manager:7070");
            cfg.net = Net::new(Sim { host: "test" });
            cfg.timeout = Duration::from_secs(60);
            Worker::connect(cfg).await
        };
        let setup = client().await?;
        setup
            .create_table("n", TableOptions::new(1, UpdaterSpec::Add))
            .await?;
        let keys: Vec<u64> = (1..=32u64).map(|i| i * (u64::MAX / 33)).collect();
        let mut loops = Vec::new();
        for _ in 0..3 {
            let w = client().await?;
            let (keys, a, st) = (keys.clone(), a.clone(), st.clone());
            loops.push(tokio::spawn(async move {
                while !st.load(Ordering::Relaxed) {
                    w.advance();
                    if w.push("n", keys.clone(), vec![1.0; keys.len()])
                        .await
                        .is_ok()
                    {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        // Hardship: late messages between a server and its peers, then a
        // server cut off from the manager (declared dead while it runs),
        // then the network healed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        turmoil::hold("s2", "s3");
        turmoil::hold("test", "s1");
        tokio::time::sleep(Duration::from_millis(200)).await;
        turmoil::release("s2", "s3");
        turmoil::release("test", "s1");
        turmoil::partition("s1", "manager");
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Cut off past its lease: declared dead, its ranges moved on.
        let s1 = turmoil::lookup("s1").to_string();
        let map = setup.refresh().await?;
        let dead: Vec<_> = map
            .nodes
            .iter()
            .filter(|n| n.addr.starts_with(&format!("{s1}:")))
            .map(|n| (n.id, n.state))
            .collect();
        assert!(
            dead.iter()
                .all(|(_, st)| *st == pserver_core::NodeState::Dead),
            "{dead:?}"
        );
        assert!(
            map.partitions
                .iter()
                .all(|p| dead.iter().all(|(id, _)| p.primary != *id))
        );
        turmoil::repair("s1", "manager");
        tokio::time::sleep(Duration::from_millis(500)).await;
        st.store(true, Ordering::Relaxed);
        for l in loops {
            l.await?;
        }
        let total = a.load(Ordering::Relaxed);
        assert!(total > 0, "no push was acknowledged");
        let got = setup.pull("n", keys.clone()).await?;
        assert_eq!(
            got,
            vec![total as f32; keys.len()],
            "seed {seed}: {total} acknowledged"
        );
        Ok(())
    });
    sim.run().unwrap();
    let _ = (acked, stop);
}

#[test]
fn partitions_and_late_messages_lose_no_acknowledged_push() {
    for seed in 1..=8 {
        run(seed);
    }
}
