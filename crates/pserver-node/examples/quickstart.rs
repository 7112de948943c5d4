//! The worker API in a few calls: start a local cluster in this process,
//! create a table, push and pull by key list and by range, under bounded
//! delay with two workers. Run with
//! `cargo run -p pserver-node --example quickstart`.

use pserver_core::{Consistency, KeyRange, UpdaterSpec};
use pserver_node::NodeError;
use pserver_node::local::{LocalCluster, LocalConfig};
use pserver_node::worker::{TableOptions, Worker, WorkerConfig};

#[tokio::main]
async fn main() -> Result<(), NodeError> {
    let cluster = LocalCluster::start(LocalConfig::default()).await?;
    let addr = cluster.manager_addr().to_string();
    println!("cluster up: manager on {addr}");

    let a = Worker::connect(WorkerConfig::new(addr.clone())).await?;
    let b = Worker::connect(WorkerConfig::new(addr)).await?;
    a.create_table(
        "weights",
        TableOptions::new(1, UpdaterSpec::Add).consistency(Consistency::Bounded(1)),
    )
    .await?;

    // Sorted, unique keys; hashed features spread over the ring.
    let keys = vec![7, 1 << 40, 1 << 62, u64::MAX - 1];
    for clock in 1..=3 {
        a.set_clock(clock);
        b.set_clock(clock);
        // Both pushes are in flight at once; wait for both.
        let pa = a.push("weights", keys.clone(), vec![1.0; keys.len()]);
        let pb = b.push("weights", keys.clone(), vec![0.5; keys.len()]);
        pa.await?;
        pb.await?;
        // At clock t with tau = 1, every worker has pushed at least t - 1.
        let vals = a.pull("weights", keys.clone()).await?;
        println!("clock {clock}: {vals:?}");
    }

    // A dense range travels without a key list.
    a.set_clock(4);
    let r = KeyRange::new(100, 104).expect("ordered range");
    a.push_range("weights", r, vec![1.0, 2.0, 3.0, 4.0]).await?;
    println!("range {r}: {:?}", a.pull_range("weights", r).await?);
    Ok(())
}
