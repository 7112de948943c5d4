//! Kubeflow's `TF_CONFIG`, read as a pserver cluster: the JSON a TFJob's
//! operator gives every replica (`{"cluster": {"chief": [...], "ps": [...],
//! "worker": [...]}, "task": {"type": "ps", "index": 0}}`) turned into a
//! plain value saying what this process is. Parsing only: no environment,
//! no sockets; `tfjob.rs` carries the decision out.
//!
//! The mapping: the chief (or, in older TFJobs, the master) runs the
//! manager and the job's scheduler, each `ps` entry is a server, each
//! `worker` entry a worker process. An evaluator entry is allowed in the
//! cluster (the operator leaves it out anyway) but is no pserver role.

use serde::Deserialize;
use std::collections::BTreeMap;

/// What a process of a TFJob is, from `task.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `chief` (or `master`): the manager and the job's scheduler.
    Chief,
    /// `ps`: a server.
    Ps,
    /// `worker`: a worker process.
    Worker,
}

impl Role {
    /// The name TF_CONFIG uses.
    pub fn name(self) -> &'static str {
        match self {
            Role::Chief => "chief",
            Role::Ps => "ps",
            Role::Worker => "worker",
        }
    }
}

/// A TF_CONFIG understood: the cluster's addresses by role, and this
/// process's task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TfConfig {
    /// The chief's `host:port`: where the manager listens.
    pub chief: String,
    /// The `ps` entries in index order: the servers.
    pub ps: Vec<String>,
    /// The `worker` entries in index order: the worker processes (may be
    /// empty: the chief then runs the job's workers itself).
    pub workers: Vec<String>,
    /// This process's role.
    pub role: Role,
    /// Its index among its role's entries.
    pub index: usize,
}

impl TfConfig {
    /// This process's own entry (`host:port`): the address the others
    /// know it by.
    pub fn own(&self) -> &str {
        match self.role {
            Role::Chief => &self.chief,
            Role::Ps => &self.ps[self.index],
            Role::Worker => &self.workers[self.index],
        }
    }

    /// The port of its own entry: the one it listens on.
    pub fn port(&self) -> u16 {
        // Checked by `parse`: every entry has a port.
        split_port(self.own()).map(|(_, p)| p).unwrap_or(0)
    }
}

/// Why a TF_CONFIG cannot start a pserver process. Each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TfConfigError {
    /// Not JSON of the expected shape.
    #[error("TF_CONFIG is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// A sparse cluster (the TFJob's `enableDynamicWorker`) names neither
    /// the chief nor the other workers.
    #[error(
        "TF_CONFIG has a sparseCluster (the TFJob sets enableDynamicWorker), which names no \
         chief: pserver needs the whole cluster; set enableDynamicWorker: false"
    )]
    Sparse,
    /// No `cluster` object.
    #[error("TF_CONFIG has no \"cluster\"")]
    NoCluster,
    /// No `task` object.
    #[error("TF_CONFIG has no \"task\": which replica is this process?")]
    NoTask,
    /// No chief and no master: nobody runs the manager.
    #[error(
        "TF_CONFIG's cluster has no chief: pserver's manager and the job's scheduler run as \
         the TFJob's Chief replica (1 replica)"
    )]
    NoChief,
    /// Both a chief and a master, or more than one entry.
    #[error(
        "TF_CONFIG's cluster has {0} chief/master entries: the manager is one process; give \
         the TFJob one Chief replica"
    )]
    ManyChiefs(usize),
    /// No `ps` entries: the model would live nowhere.
    #[error("TF_CONFIG's cluster has no ps entries: pserver's servers are the TFJob's PS replicas")]
    NoPs,
    /// A cluster key that is no pserver role.
    #[error(
        "TF_CONFIG's cluster has a {0:?} entry, which is no pserver role (chief or master, ps, \
         worker; evaluator is ignored)"
    )]
    UnknownClusterRole(String),
    /// A `task.type` that is no pserver role.
    #[error(
        "TF_CONFIG's task.type is {0:?}: pserver runs chief (or master: the manager and the \
         scheduler), ps (a server) and worker (a worker process)"
    )]
    UnknownTask(String),
    /// `task.index` past the role's entries.
    #[error("TF_CONFIG's task.index is {index}, but the cluster has {len} {role} entries")]
    IndexOutOfRange {
        /// The role.
        role: &'static str,
        /// The index given.
        index: usize,
        /// How many entries the role has.
        len: usize,
    },
    /// An entry that is not `host:port`.
    #[error("TF_CONFIG's {role}[{index}] is {entry:?}, not host:port")]
    BadAddress {
        /// The role.
        role: String,
        /// Its position.
        index: usize,
        /// The entry.
        entry: String,
    },
}

/// The JSON as the operator writes it; only the parts pserver reads.
#[derive(Deserialize)]
struct Raw {
    cluster: Option<BTreeMap<String, Vec<String>>>,
    task: Option<RawTask>,
    #[serde(rename = "sparseCluster")]
    sparse_cluster: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawTask {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    index: usize,
}

/// Parses a TF_CONFIG value. Role names are read case-insensitively (the
/// operator writes them in lower case).
pub fn parse(json: &str) -> Result<TfConfig, TfConfigError> {
    let raw: Raw = serde_json::from_str(json)?;
    if raw.sparse_cluster.is_some() && raw.cluster.is_none() {
        return Err(TfConfigError::Sparse);
    }
    let cluster = raw.cluster.ok_or(TfConfigError::NoCluster)?;
    let task = raw.task.ok_or(TfConfigError::NoTask)?;
    let mut chiefs = Vec::new();
    let mut ps = Vec::new();
    let mut workers = Vec::new();
    for (name, entries) in cluster {
        for (index, entry) in entries.iter().enumerate() {
            if split_port(entry).is_none() {
                return Err(TfConfigError::BadAddress {
                    role: name.clone(),
                    index,
                    entry: entry.clone(),
                });
            }
        }
        match name.to_ascii_lowercase().as_str() {
            "chief" | "master" => chiefs.extend(entries),
            "ps" => ps = entries,
            "worker" => workers = entries,
            "evaluator" => {}
            _ => return Err(TfConfigError::UnknownClusterRole(name)),
        }
    }
    let chief = match chiefs.len() {
        0 => return Err(TfConfigError::NoChief),
        1 => chiefs.remove(0),
        n => return Err(TfConfigError::ManyChiefs(n)),
    };
    if ps.is_empty() {
        return Err(TfConfigError::NoPs);
    }
    let (role, len) = match task.kind.to_ascii_lowercase().as_str() {
        "chief" | "master" => (Role::Chief, 1),
        "ps" => (Role::Ps, ps.len()),
        "worker" => (Role::Worker, workers.len()),
        _ => return Err(TfConfigError::UnknownTask(task.kind)),
    };
    if task.index >= len {
        return Err(TfConfigError::IndexOutOfRange {
            role: role.name(),
            index: task.index,
            len,
        });
    }
    Ok(TfConfig {
        chief,
        ps,
        workers,
        role,
        index: task.index,
    })
}

/// `host:port` split at its last colon (`[::1]:2222` too), with the port
/// a number and the host not empty.
pub fn split_port(entry: &str) -> Option<(&str, u16)> {
    let (host, port) = entry.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TF_CONFIG as the training operator writes it for a TFJob named
    /// `job` in namespace `ns`.
    fn operator(task: &str, index: usize) -> String {
        format!(
            r#"{{"cluster":{{"chief":["job-chief-0.ns.svc:2222"],
                "ps":["job-ps-0.ns.svc:2222","job-ps-1.ns.svc:2222"],
                "worker":["job-worker-0.ns.svc:2222","job-worker-1.ns.svc:2222","job-worker-2.ns.svc:2222"]}},
              "task":{{"type":"{task}","index":{index}}},"environment":"cloud"}}"#
        )
    }

    #[test]
    fn each_role_knows_its_entry_port_and_the_manager() {
        let c = parse(&operator("chief", 0)).unwrap();
        assert_eq!((c.role, c.index), (Role::Chief, 0));
        assert_eq!(c.own(), "job-chief-0.ns.svc:2222");
        assert_eq!(c.chief, "job-chief-0.ns.svc:2222");
        assert_eq!(c.ps.len(), 2);
        assert_eq!(c.workers.len(), 3);

        let p = parse(&operator("ps", 1)).unwrap();
        assert_eq!((p.role, p.index), (Role::Ps, 1));
        assert_eq!(p.own(), "job-ps-1.ns.svc:2222");
        assert_eq!(p.port(), 2222);
        assert_eq!(p.chief, "job-chief-0.ns.svc:2222");

        let w = parse(&operator("worker", 2)).unwrap();
        assert_eq!((w.role, w.index), (Role::Worker, 2));
        assert_eq!(w.own(), "job-worker-2.ns.svc:2222");
    }

    #[test]
    fn master_stands_for_chief_and_roles_ignore_case() {
        let c = parse(
            r#"{"cluster":{"Master":["m:1"],"PS":["p:2"]},"task":{"type":"MASTER","index":0}}"#,
        )
        .unwrap();
        assert_eq!((c.role, c.chief.as_str()), (Role::Chief, "m:1"));
        assert!(c.workers.is_empty());
        // An evaluator in the cluster is no harm; the index defaults to 0.
        let p = parse(r#"{"cluster":{"chief":["c:1"],"ps":["[::1]:9"],"evaluator":["e:3"]},"task":{"type":"ps"}}"#)
            .unwrap();
        assert_eq!((p.own(), p.port()), ("[::1]:9", 9));
    }

    #[test]
    fn malformed_json_is_refused_with_where() {
        let e = parse(r#"{"cluster": {"chief": ["c:1"]"#).unwrap_err();
        assert!(matches!(e, TfConfigError::Json(_)), "{e}");
        assert!(e.to_string().contains("TF_CONFIG is not valid"), "{e}");
        let e = parse(r#"{"cluster": {"chief": "c:1"}, "task": {"type": "ps"}}"#).unwrap_err();
        assert!(e.to_string().contains("expected a sequence"), "{e}");
        let e = parse(r#"{"cluster": {"chief": ["c:1"], "ps": ["p:1"]}, "task": {"type": "ps", "index": -1}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("-1"), "{e}");
        assert!(matches!(parse("").unwrap_err(), TfConfigError::Json(_)));
    }

    #[test]
    fn a_task_that_is_no_role_or_past_the_end_is_refused() {
        let e = parse(&operator("evaluator", 0)).unwrap_err();
        assert!(
            matches!(&e, TfConfigError::UnknownTask(t) if t == "evaluator"),
            "{e}"
        );
        assert!(e.to_string().contains("ps (a server)"), "{e}");
        let e = parse(&operator("ps", 2)).unwrap_err();
        assert!(
            matches!(
                e,
                TfConfigError::IndexOutOfRange {
                    role: "ps",
                    index: 2,
                    len: 2
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "TF_CONFIG's task.index is 2, but the cluster has 2 ps entries"
        );
        let e = parse(&operator("chief", 1)).unwrap_err();
        assert!(
            matches!(e, TfConfigError::IndexOutOfRange { len: 1, .. }),
            "{e}"
        );
        // A worker task in a cluster without workers.
        let e = parse(
            r#"{"cluster":{"chief":["c:1"],"ps":["p:1"]},"task":{"type":"worker","index":0}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(e, TfConfigError::IndexOutOfRange { len: 0, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_cluster_without_chief_or_ps_or_with_strangers_is_refused() {
        let e = parse(r#"{"cluster":{"ps":["p:1"],"worker":["w:1"]},"task":{"type":"ps"}}"#)
            .unwrap_err();
        assert!(matches!(e, TfConfigError::NoChief), "{e}");
        assert!(e.to_string().contains("Chief replica"), "{e}");
        let e = parse(
            r#"{"cluster":{"chief":["c:1"],"master":["m:1"],"ps":["p:1"]},"task":{"type":"ps"}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, TfConfigError::ManyChiefs(2)), "{e}");
        let e = parse(r#"{"cluster":{"chief":["c:1"],"worker":["w:1"]},"task":{"type":"worker"}}"#)
            .unwrap_err();
        assert!(matches!(e, TfConfigError::NoPs), "{e}");
        let e = parse(
            r#"{"cluster":{"chief":["c:1"],"ps":["p:1"],"launcher":["l:1"]},"task":{"type":"ps"}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, TfConfigError::UnknownClusterRole(r) if r == "launcher"),
            "{e}"
        );
        assert!(matches!(
            parse(r#"{"task":{"type":"ps"}}"#).unwrap_err(),
            TfConfigError::NoCluster
        ));
        assert!(matches!(
            parse(r#"{"cluster":{"chief":["c:1"],"ps":["p:1"]}}"#).unwrap_err(),
            TfConfigError::NoTask
        ));
    }

    #[test]
    fn a_sparse_cluster_or_an_entry_without_a_port_is_refused() {
        // What the operator writes with enableDynamicWorker.
        let e = parse(
            r#"{"sparseCluster":{"worker":{"1":"w1:2222"},"ps":["p:2222"]},"task":{"type":"worker","index":1}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, TfConfigError::Sparse), "{e}");
        assert!(e.to_string().contains("enableDynamicWorker: false"), "{e}");
        for bad in ["ps-0", "ps-0:", ":2222", "ps-0:port", "ps-0:70000"] {
            let json = format!(
                r#"{{"cluster":{{"chief":["c:1"],"ps":["p:1","{bad}"]}},"task":{{"type":"chief"}}}}"#
            );
            let e = parse(&json).unwrap_err();
            assert!(
                matches!(&e, TfConfigError::BadAddress { role, index: 1, entry } if role == "ps" && entry == bad),
                "{bad}: {e}"
            );
        }
    }
}
