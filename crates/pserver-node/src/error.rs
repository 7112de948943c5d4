//! Errors of the runtime: what failed, and where.

use pserver_core::KeyRange;
use pserver_core::membership::MembershipError;
use pserver_wire::ErrorCode;

/// Why a node or client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    // The OS's words are part of these messages, not a `source`: one
    // line, said once, however the error is printed (`{e}` or `{e:#}`).
    /// Could not open a connection.
    #[error("cannot connect to {addr}: {os}")]
    Connect {
        /// Where to.
        addr: String,
        /// Why.
        os: std::io::Error,
    },
    /// Could not listen.
    #[error("cannot listen on {addr}: {os}")]
    Bind {
        /// Where.
        addr: String,
        /// Why.
        os: std::io::Error,
    },
    /// The manager's state file could not be written or read.
    #[error("manager state {path}: {why}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The connection closed before a reply came.
    #[error("connection to {0} closed")]
    Closed(String),
    /// A frame was not sent because the peer would refuse it (over the
    /// frame limit, say); nothing of it left.
    #[error("cannot send a frame to {peer}: {why}; split the request into smaller ones")]
    Unsendable {
        /// Whom it was for.
        peer: String,
        /// Which limit it breaks.
        why: pserver_wire::WireError,
    },
    /// The peer refused the request.
    #[error("{peer} refused the request ({code:?}): {message}")]
    Remote {
        /// Who refused.
        peer: String,
        /// Machine-readable reason.
        code: ErrorCode,
        /// What it said.
        message: String,
    },
    /// The peer answered with something that is not a valid reply.
    #[error("unexpected reply from {peer}: {what}")]
    Protocol {
        /// Who answered.
        peer: String,
        /// What was wrong.
        what: String,
    },
    /// No table of this name exists in the cluster.
    #[error("no table named {0:?} in the cluster (create it first)")]
    UnknownTable(String),
    /// The request is invalid before it is sent.
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A request did not complete in time.
    #[error("{what} did not complete within {secs} s{}", last_answer(.last))]
    Timeout {
        /// What was attempted.
        what: String,
        /// The deadline.
        secs: u64,
        /// The last passing refusal it met (a server whose lease lapsed
        /// while the manager is away, a hand-off, a broken connection), so
        /// a timeout says why it kept retrying.
        last: Option<String>,
    },
    /// No live server holds part of the range.
    #[error("no live server holds keys in {0}")]
    NoServer(KeyRange),
    /// The manager refused a config or a request.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// The handle's task was dropped (the runtime shut down).
    #[error("the request was abandoned: the node shut down")]
    Abandoned,
}

impl NodeError {
    /// True when retrying the same request after refreshing the map may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            NodeError::Connect { .. } | NodeError::Closed(_) => true,
            NodeError::Remote { code, .. } => {
                matches!(code, ErrorCode::EpochAhead | ErrorCode::NotOwner)
            }
            _ => false,
        }
    }
}

/// The tail of a timeout's message naming the last refusal it met.
fn last_answer(last: &Option<String>) -> String {
    match last {
        Some(why) => format!("; the last answer was: {why}"),
        None => String::new(),
    }
}
