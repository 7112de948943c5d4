//! What a manager exports: its map's epoch, its nodes and their leases,
//! tables, jobs and hand-offs; and when it is ready. Plain functions of its
//! [`Membership`] and the time, so they are tested without a manager.

use super::{Family, MetricKind, MetricUnit, Scrape, Value};
use pserver_core::map::Group;
use pserver_core::membership::Membership;
use pserver_core::{NodeState, Role};

/// The scrape of a manager whose membership is `m`, at `now_ms` on the
/// clock its leases are kept by; `shown_epoch` is the epoch of the last
/// map it saved and told its nodes (`unsaved` when a newer one waits for a
/// save that failed).
pub fn scrape(m: &Membership, now_ms: u64, shown_epoch: u64, unsaved: bool) -> Scrape {
    let map = m.map();
    let mut s = Scrape::default();
    let gauge = |name, help, v: u64| {
        Family::new(name, help, MetricUnit::None, MetricKind::Gauge).with(Value::Int(v))
    };
    s.add(gauge(
        "manager_map_epoch",
        "Epoch of the last cluster map the manager saved and sent to its nodes.",
        shown_epoch,
    ));
    s.add(gauge(
        "manager_map_unsaved",
        "1 while a newer map waits for a save of the manager's state that failed (nodes are not told until it succeeds).",
        u64::from(unsaved),
    ));
    let mut nodes = Family::new(
        "manager_nodes",
        "Nodes of the map by role and state.",
        MetricUnit::None,
        MetricKind::Gauge,
    );
    for role in [Role::Server, Role::Worker] {
        for state in [NodeState::Alive, NodeState::Dead] {
            let n = map
                .nodes
                .iter()
                .filter(|n| n.role == role && n.state == state)
                .count();
            nodes.push(
                vec![("role", role.to_string()), ("state", state.to_string())],
                Value::Int(n as u64),
            );
        }
    }
    s.add(nodes);
    let mut age = Family::new(
        "manager_lease_age",
        "Seconds since each live node's last heartbeat (declared dead past three quarters of the lease).",
        MetricUnit::Seconds,
        MetricKind::Gauge,
    );
    for (id, seen) in m.last_seen() {
        let Some(n) = map.node(id) else { continue };
        age.push(
            vec![("node", id.to_string()), ("role", n.role.to_string())],
            Value::Float(now_ms.saturating_sub(seen) as f64 / 1e3),
        );
    }
    s.add(age);
    s.add(
        Family::new(
            "manager_lease",
            "The lease: a node silent for three quarters of it is declared dead.",
            MetricUnit::Seconds,
            MetricKind::Gauge,
        )
        .with(Value::Float(map.lease_ms as f64 / 1e3)),
    );
    s.add(gauge(
        "manager_tables",
        "Tables in the cluster.",
        map.tables.len() as u64,
    ));
    s.add(gauge(
        "manager_partitions",
        "Key ranges (partitions) of the map.",
        map.partitions.len() as u64,
    ));
    s.add(gauge(
        "manager_clients",
        "Ad-hoc clients present (pserver kv, status; they are not in the map).",
        m.clients_present() as u64,
    ));
    let mut jobs = Family::new(
        "manager_job_workers",
        "Live workers in each claimed job's group.",
        MetricUnit::None,
        MetricKind::Gauge,
    );
    for (job, _) in m.jobs() {
        let group = Group::Job(job.to_string());
        let n = map.live(Role::Worker).filter(|n| n.group == group).count();
        jobs.push(vec![("job", job.to_string())], Value::Int(n as u64));
    }
    s.add(jobs);
    s.add(gauge(
        "manager_workers_idle",
        "Live worker processes waiting for a job.",
        map.live(Role::Worker)
            .filter(|n| n.group == Group::Idle)
            .count() as u64,
    ));
    s.add(gauge(
        "manager_servers_draining",
        "Servers being drained (their ranges handed to the others).",
        m.leaving().count() as u64,
    ));
    let (synced, primaries) = m.handoff_progress().unwrap_or((0, 0));
    s.add(gauge(
        "manager_handoff_in_progress",
        "1 while a hand-off (a join or a drain) waits for primaries to copy what moves.",
        u64::from(m.handing_off()),
    ));
    let mut progress = Family::new(
        "manager_handoff_primaries",
        "Live primaries of a hand-off's intermediate map that have reported their copies done (synced) or not yet (pending); 0 when none is in progress.",
        MetricUnit::None,
        MetricKind::Gauge,
    );
    progress.push(vec![("state", "synced".into())], Value::Int(synced as u64));
    progress.push(
        vec![("state", "pending".into())],
        Value::Int((primaries - synced) as u64),
    );
    s.add(progress);
    s.add(gauge(
        "manager_rebuilding",
        "1 while a manager without state collects servers' reports to rebuild the map from.",
        u64::from(m.rebuilding()),
    ));
    s
}

/// Whether a manager is ready: it has a map it can hand out (not still
/// rebuilding one from servers' reports).
pub fn ready(m: &Membership) -> Result<(), String> {
    if m.rebuilding() {
        return Err(
            "rebuilding the cluster map from the servers' reports; registering no node until every server of the latest reported map has reported"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pserver_core::membership::MembershipConfig;

    #[test]
    fn lease_age_and_nodes_follow_the_membership() {
        let mut m = Membership::new(MembershipConfig::default()).unwrap();
        let a = m
            .register(Role::Server, "127.0.0.1:1", Group::Default, 1_000)
            .unwrap();
        let b = m.register(Role::Worker, "", Group::Idle, 1_500).unwrap();
        let s = scrape(&m, 2_000, m.map().epoch, false);
        let age = s.family("manager_lease_age").unwrap();
        let of = |id: u32| {
            age.samples
                .iter()
                .find(|x| x.labels[0].1 == id.to_string())
                .map(|x| x.value.clone())
        };
        assert_eq!(of(a), Some(Value::Float(1.0)));
        assert_eq!(of(b), Some(Value::Float(0.5)));
        let nodes = s.family("manager_nodes").unwrap();
        let alive_servers = nodes
            .samples
            .iter()
            .find(|x| x.labels[0].1 == "server" && x.labels[1].1 == "alive")
            .unwrap();
        assert_eq!(alive_servers.value, Value::Int(1));
        assert_eq!(
            s.family("manager_workers_idle").unwrap().samples[0].value,
            Value::Int(1)
        );
        assert_eq!(ready(&m), Ok(()));
    }
}
