//! Errors that stop a read (as opposed to bad lines, which are counted and skipped).

use std::sync::Arc;

/// A fatal error: the file could not be opened or read, a schema is wrong,
/// or the options make no sense. Malformed *lines* are not errors; they are
/// counted in [`ReadStats`](crate::ReadStats) and reading goes on.
///
/// `Clone` so a caller can keep it after the [`Reader`](crate::Reader) is
/// gone; that is why I/O errors sit behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened (missing, permissions, ...).
    // The OS's words are part of the message, not a `source`: one line,
    // said once, however the error is printed (`{e}` or anyhow's `{e:#}`).
    #[error("{path}: cannot open: {os}")]
    Open {
        /// The file.
        path: String,
        /// What the OS said.
        os: Arc<std::io::Error>,
    },
    /// Reading failed part way; `line` is the 1-based line being read.
    #[error("{path}:{line}: read error: {os}")]
    Io {
        /// The file.
        path: String,
        /// 1-based line number being read when it failed.
        line: u64,
        /// What the OS said.
        os: Arc<std::io::Error>,
    },
    /// The schema is wrong; `message` names the TOML key at fault.
    #[error("{path}: {message}")]
    Schema {
        /// The schema file.
        path: String,
        /// What is wrong, starting with the TOML key (e.g. `features.crosses[2][1]`).
        message: String,
    },
    /// The header of a CSV data file does not fit the schema.
    #[error("{path}: {message}")]
    Header {
        /// The data file.
        path: String,
        /// What is missing or ambiguous, and which schema key needs it.
        message: String,
    },
    /// A row of a join side table is malformed (side tables are read whole
    /// at schema load, so one bad row fails the schema rather than being skipped).
    #[error("{path}:{line}: {message}")]
    Table {
        /// The side table file.
        path: String,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        message: String,
    },
    /// A gzip or zstd stream is corrupt or truncated.
    #[error("{path}: corrupt compressed data: {message}")]
    Compression {
        /// The file.
        path: String,
        /// What the decoder said, with the line it was reading.
        message: String,
    },
    /// [`ReadOptions`](crate::ReadOptions) are inconsistent (bad shard, a
    /// train/test split asked for without a holdout, ...).
    #[error("bad read options: {message}")]
    Options {
        /// What is wrong.
        message: String,
    },
}

impl DataError {
    pub(crate) fn schema(path: &str, message: impl Into<String>) -> Self {
        DataError::Schema {
            path: path.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn options(message: impl Into<String>) -> Self {
        DataError::Options {
            message: message.into(),
        }
    }
}
