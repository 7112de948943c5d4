//! Training jobs between processes: the paper's task scheduler and the
//! worker processes it drives.
//!
//! A worker process ([`agent::serve`], `pserver worker`) registers as an
//! idle worker with the address it takes tasks on, and waits. A job's
//! scheduler ([`scheduler::run`], `pserver train`) claims the job's name at
//! the manager, picks idle workers from the map, offers each the job over a
//! [`link`], splits the training data into [`Unit`]s among the files they
//! can read ([`shards`]), creates the job's table and issues steps: one
//! key-range block per DBPG iteration (Algorithm 3), one epoch of
//! minibatches per FTRL step. Workers read their data from their own file
//! system and push and pull against the servers; only small messages cross
//! the link, never a training example.
//!
//! A worker joins the job's worker group in the map ([`pserver_node::worker::Group`]),
//! so the table's consistency and sums count only this job's workers. A
//! worker that dies (its link breaks, or the map declares it dead) has its
//! units handed to a live worker from the next step; a worker that becomes
//! idle mid-run is taken (up to the job's maximum) and given a share from
//! the next epoch.

pub mod agent;
pub mod link;
pub mod proto;
pub mod scheduler;
pub mod shards;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How training files are read, as a job names it: a CSV schema is named by
/// its path, which every worker reads (with its side tables) from its own
/// file system, like the data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataFormat {
    /// `label idx:val ...`
    Libsvm,
    /// Criteo TSV.
    Criteo,
    /// CSV with the TOML schema at this path.
    Csv(PathBuf),
}

impl DataFormat {
    /// Loads what reading needs (the schema, for CSV).
    pub fn load(&self) -> Result<pserver_data::Format, pserver_data::DataError> {
        Ok(match self {
            DataFormat::Libsvm => pserver_data::Format::Libsvm,
            DataFormat::Criteo => pserver_data::Format::Criteo,
            DataFormat::Csv(path) => {
                pserver_data::Format::Csv(std::sync::Arc::new(pserver_data::load_schema(path)?))
            }
        })
    }
}

/// One piece of the training data a worker is given: a whole file, or one
/// line shard of a file (when the data is one file).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Unit {
    /// The file, as the worker that reads it names it.
    pub path: String,
    /// Lines `n` with `n % count == index` (`0 of 1`: the whole file).
    pub index: usize,
    /// Number of line shards of the file.
    pub count: usize,
}

impl Unit {
    /// The whole of `path`.
    pub fn file(path: impl Into<String>) -> Unit {
        Unit {
            path: path.into(),
            index: 0,
            count: 1,
        }
    }

    /// Its line shard.
    pub fn shard(&self) -> pserver_data::Shard {
        pserver_data::Shard {
            index: self.index,
            count: self.count,
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 1 {
            write!(f, "{}", self.path)
        } else {
            write!(f, "{} lines {}/{}", self.path, self.index + 1, self.count)
        }
    }
}

/// A short description of a set of units, for the map's task field.
pub fn describe(units: &[Unit]) -> String {
    match units {
        [] => "no data".into(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} and {} more", rest.len()),
    }
}
