use super::*;
use crate::conn::Peer;
use crate::durable::{Faulty, Step};
use crate::proto::{control_request, register, reply_control};
use crate::worker::TableOptions;
use pserver_core::map::ClusterMap;
use pserver_core::membership::MembershipConfig;
use pserver_core::{NodeState, TableSpec, UpdaterSpec};
use tokio::sync::mpsc;

fn saved() -> Persisted {
    let mut m = Membership::new(MembershipConfig::default()).unwrap();
    m.register(Role::Server, "127.0.0.1:1", Group::Default, 0)
        .unwrap();
    m.persisted()
}

#[test]
fn state_files_round_trip_and_refuse_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manager.state");
    assert_eq!(load_state(&path).unwrap(), None);
    save_state(&Disk::new(), &path, &saved()).unwrap();
    assert_eq!(load_state(&path).unwrap(), Some(saved()));
    let good = std::fs::read(&path).unwrap();
    for (what, bytes) in [
        ("truncated", good[..good.len() - 1].to_vec()),
        ("short", good[..10].to_vec()),
        ("flipped", {
            let mut b = good.clone();
            let last = b.len() - 1;
            b[last] ^= 1;
            b
        }),
        ("foreign", b"something else entirely".to_vec()),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let e = load_state(&path).unwrap_err().to_string();
        assert!(e.contains("manager.state"), "{what}: {e}");
    }
}

/// Asks the manager over `peer` as node `id`.
async fn ask(peer: &Peer, id: NodeId, msg: &Control) -> Result<Control, NodeError> {
    let reply = peer.request(control_request(id, 0, msg)).await?;
    reply_control(&reply, peer.label())
}

/// The next map broadcast on `notices` within `wait`, if one comes.
async fn next_map(notices: &mut mpsc::Receiver<Frame>, wait: Duration) -> Option<ClusterMap> {
    let deadline = Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, notices.recv()).await {
            Ok(Some(f)) => {
                if let Ok(Control::Map(m)) = f.control_msg() {
                    return Some(m);
                }
            }
            _ => return None,
        }
    }
}

fn create(name: &str) -> Control {
    let o = TableOptions::new(1, UpdaterSpec::Add);
    Control::CreateTable(TableSpec {
        id: 0,
        name: name.into(),
        dim: o.dim,
        init: o.init,
        updater: o.updater,
        consistency: o.consistency,
        aggregate: o.aggregate,
        job: None,
    })
}

/// Says whether `e` is the manager refusing for want of a save.
fn refused_unsaved(e: &NodeError) -> bool {
    matches!(e, NodeError::Remote { code: ErrorCode::Internal, message, .. }
        if message.contains("manager.state"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_state_cannot_be_synced_is_refused_and_not_made() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("manager.state");
        let fs = Arc::new(Faulty::new());
        let m = start_manager(ManagerConfig {
            state_file: Some(path.clone()),
            fs: fs.clone(),
            ..ManagerConfig::default()
        })
        .await
        .unwrap();
        let addr = m.addr().to_string();
        let (w, mut notices) = Peer::connect(&addr, Limits::default()).await.unwrap();
        let (id, _) = register(&w, Role::Worker, "", Group::Default, None)
            .await
            .unwrap();
        let before = load_state(&path).unwrap();
        fs.fail_at(Some(Step::SyncFile));
        let e = ask(&w, id, &create("t")).await.unwrap_err();
        assert!(refused_unsaved(&e), "{e}");
        assert!(e.to_string().contains("syncing"), "{e}");
        assert_eq!(load_state(&path).unwrap(), before);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        assert_eq!(
            next_map(&mut notices, Duration::from_millis(300)).await,
            None
        );
        fs.fail_at(None);
        assert!(matches!(
            ask(&w, id, &create("t")).await.unwrap(),
            Control::TableCreated(_)
        ));
        let map = next_map(&mut notices, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(map.table("t").is_some());
        assert_eq!(load_state(&path).unwrap().map(|p| p.map), Some(map));
        m.shutdown();
    })
    .await
    .expect("the test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_that_cannot_be_saved_reaches_no_one_until_it_is() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("manager.state");
        let lease_ms = 2000;
        let m = start_manager(ManagerConfig {
            state_file: Some(path.clone()),
            membership: MembershipConfig {
                lease_ms,
                ..MembershipConfig::default()
            },
            ..ManagerConfig::default()
        })
        .await
        .unwrap();
        let addr = m.addr().to_string();
        let limits = Limits::default();

        // The watcher sees every broadcast, and heartbeats to stay alive.
        let (watcher, mut notices) = Peer::connect(&addr, limits).await.unwrap();
        let (wid, _) = register(&watcher, Role::Worker, "", Group::Default, None)
            .await
            .unwrap();
        let beat = watcher.clone();
        tokio::spawn(async move {
            while beat
                .notify(control_request(wid, 0, &Control::Heartbeat))
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(lease_ms / 8)).await;
            }
        });
        // A worker that never heartbeats: its lease runs out while
        // saves fail, a change the manager cannot refuse.
        let (silent, _silent_notices) = Peer::connect(&addr, limits).await.unwrap();
        let (sid, _) = register(&silent, Role::Worker, "", Group::Default, None)
            .await
            .unwrap();
        let saved = next_map(&mut notices, Duration::from_secs(2))
            .await
            .expect("the silent worker's arrival is broadcast");

        // Saves fail from here: the directory vanishes (tests run as
        // root, so permissions would not stop a write).
        let gone = tmp.path().join("gone");
        std::fs::rename(&dir, &gone).unwrap();
        let unsent = next_map(&mut notices, Duration::from_millis(3 * lease_ms / 2)).await;
        assert_eq!(unsent, None, "a map the manager could not save was sent");
        // Requests whose change cannot be saved are refused, naming
        // the file; nothing goes out for them either.
        let (late, _late_notices) = Peer::connect(&addr, limits).await.unwrap();
        let e = register(&late, Role::Server, "127.0.0.1:9", Group::Default, None)
            .await
            .unwrap_err();
        assert!(refused_unsaved(&e), "{e}");
        let e = ask(&watcher, wid, &create("t")).await.unwrap_err();
        assert!(refused_unsaved(&e), "{e}");
        assert_eq!(
            next_map(&mut notices, Duration::from_millis(300)).await,
            None
        );
        // Asked for the map, the manager answers with the saved one.
        match ask(&watcher, wid, &Control::GetMap).await.unwrap() {
            Control::Map(map) => assert_eq!(map, saved),
            other => panic!("{other:?}"),
        }

        // Saves work again: the next tick saves the map and sends it.
        std::fs::rename(&gone, &dir).unwrap();
        let map = next_map(&mut notices, Duration::from_secs(5))
            .await
            .expect("the map goes out once saved");
        assert!(map.epoch > saved.epoch);
        assert_eq!(map.node(sid).map(|n| n.state), Some(NodeState::Dead));
        assert!(map.table("t").is_none(), "a refused table was created");
        assert_eq!(load_state(&path).unwrap().map(|p| p.map), Some(map));
        // And changes are accepted again.
        assert!(matches!(
            ask(&watcher, wid, &create("t")).await.unwrap(),
            Control::TableCreated(_)
        ));
        let map = next_map(&mut notices, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(map.table("t").is_some());
        m.shutdown();
    })
    .await
    .expect("the test finishes in time");
}
