//! Python bindings of pserver's worker library: the native module
//! `pserver._native` of the `pserver` package (python/ at the repository
//! root; built by maturin). It wraps `pserver_node::worker::Worker`, so
//! Python speaks the protocol through the same code as every Rust worker;
//! nothing here knows the wire format.
//!
//! Each native call returns a [`future::Future`] at once; the Python
//! package's blocking methods wait on it. Waiting releases the GIL. Errors
//! become exceptions of `pserver.errors` ([`error::to_pyerr`]); nothing
//! given from Python panics.

mod client;
mod data;
mod error;
mod future;
mod spec;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<future::Future>()?;
    m.add_function(wrap_pyfunction!(data::read_fields, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
