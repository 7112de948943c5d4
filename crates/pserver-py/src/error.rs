//! Errors of the bindings, and how each becomes a Python exception of the
//! `pserver.errors` hierarchy (defined in Python, so classes can inherit
//! from two bases: `NotSorted` is both a `pserver.Error` and a `ValueError`).

use pserver_node::NodeError;
use pserver_node::auth::SecretError;
use pserver_node::tls::TlsError;
use pserver_wire::ErrorCode;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Why a call of the bindings failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The worker library (or a server, or the manager) refused or failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The cluster secret could not be read, or is too short.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A data file or its schema could not be read (`read_fields`).
    #[error(transparent)]
    Data(#[from] pserver_data::DataError),
    /// An argument is of the right type but a wrong value (a table spec,
    /// an updater name): a `ValueError`.
    #[error("{0}")]
    Value(String),
    /// An argument is of the wrong type (a dict where a string goes): a
    /// `TypeError`.
    #[error("{0}")]
    Type(String),
    /// Keys that are not sorted and unique.
    #[error("{0}")]
    NotSorted(String),
    /// Values whose shape does not match the keys.
    #[error("{0}")]
    Shape(String),
    /// The manager did not answer the connection in time.
    #[error("no answer from the manager at {addr} within {secs} s")]
    ConnectTimeout {
        /// The manager's address.
        addr: String,
        /// The limit.
        secs: u64,
    },
    /// The client was closed, so nothing can be sent.
    #[error("the client is closed")]
    Closed,
    /// The client was made in another process, which then forked this one.
    #[error(
        "this client was made in another process (this one is a fork of it): \
         make a new pserver.Client in this process"
    )]
    Forked,
}

/// The name of `code` as the exceptions' `code` attribute gives it.
fn code_name(code: ErrorCode) -> String {
    format!("{code:?}")
}

/// The `pserver.errors` class an error is raised as, with the wire code
/// the server gave, if any.
fn class_of(e: &BindError) -> (&'static str, Option<String>) {
    match e {
        BindError::Node(n) => match n {
            NodeError::UnknownTable(_) => ("UnknownTable", None),
            NodeError::Remote { code, message, .. } => {
                let class = match code {
                    ErrorCode::UnknownTable => "UnknownTable",
                    ErrorCode::WrongWidth => "WrongWidth",
                    ErrorCode::BadKeys => "NotSorted",
                    ErrorCode::NotFinite => "NotFinite",
                    ErrorCode::Limit => "LimitExceeded",
                    ErrorCode::Duplicate => "Duplicate",
                    // A node that wants the secret refuses a plain client
                    // with an error frame whose message says so.
                    _ if message.contains("secret") => "AuthError",
                    _ => "RemoteError",
                };
                (class, Some(code_name(*code)))
            }
            // The worker checks key order before it sends anything.
            NodeError::BadRequest(m) if m.contains("sorted") => ("NotSorted", None),
            NodeError::BadRequest(_) => ("InvalidRequest", None),
            // The handshakes of auth.rs and tls.rs name themselves first
            // in the dial error (net::dial_handshake).
            NodeError::Connect { os, .. } => {
                let why = os.to_string();
                if why.starts_with("authentication") {
                    ("AuthError", None)
                } else if why.starts_with("TLS") {
                    ("TlsError", None)
                } else {
                    ("ConnectError", None)
                }
            }
            NodeError::Closed(_) => ("ConnectError", None),
            NodeError::Timeout { .. } => ("Timeout", None),
            NodeError::NoServer(_) => ("Unavailable", None),
            NodeError::Abandoned => ("ClientClosed", None),
            _ => ("Error", None),
        },
        BindError::Secret(_) => ("AuthError", None),
        BindError::Tls(_) => ("TlsError", None),
        BindError::Data(_) => ("DataError", None),
        BindError::NotSorted(_) => ("NotSorted", None),
        BindError::Shape(_) => ("WrongWidth", None),
        BindError::ConnectTimeout { .. } => ("ConnectError", None),
        BindError::Closed => ("ClientClosed", None),
        BindError::Forked => ("Error", None),
        BindError::Value(_) | BindError::Type(_) => ("", None),
    }
}

/// The Python exception for `e`: an instance of the `pserver.errors`
/// class [`class_of`] names, with the message and a `code` attribute (the
/// server's error code, or `None`).
pub fn to_pyerr(py: Python<'_>, e: BindError) -> PyErr {
    let message = e.to_string();
    match e {
        BindError::Value(_) => return PyValueError::new_err(message),
        BindError::Type(_) => return PyTypeError::new_err(message),
        _ => {}
    }
    let (class, code) = class_of(&e);
    let made = (|| -> PyResult<PyErr> {
        let cls = py.import("pserver.errors")?.getattr(class)?;
        let err = cls.call1((message.clone(),))?;
        err.setattr("code", code)?;
        Ok(PyErr::from_value(err))
    })();
    // Only a broken installation (pserver.errors missing) gets here; the
    // message still reaches the user.
    made.unwrap_or_else(|why| PyRuntimeError::new_err(format!("{message} (and: {why})")))
}
