//! The pending result of a call: `Future.wait()` blocks without the GIL.

use crate::error::{BindError, to_pyerr};
use numpy::{PyArray1, PyArrayMethods};
use pserver_core::{Init, TableSpec};
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// What a finished call gives back, before it is turned into Python.
pub enum Done {
    /// Nothing (a push, a barrier).
    Nothing,
    /// Pulled rows: `rows * dim` floats in key order.
    Rows {
        /// The floats.
        vals: Vec<f32>,
        /// Keys pulled.
        rows: usize,
        /// Floats per key.
        dim: usize,
    },
    /// A table's spec (create_table, table).
    Table(TableSpec),
}

/// The result a call's task sends.
pub type Outcome = Result<Done, BindError>;

/// How long one wait without the GIL lasts before Python gets to run its
/// signal handlers (so Ctrl-C interrupts a wait).
const SLICE: Duration = Duration::from_millis(100);

enum State {
    /// The call's task has not answered yet.
    Pending(Receiver<Outcome>),
    /// Another thread is waiting on it right now.
    Waiting,
    /// The answer, received but not yet turned into Python.
    Received(Outcome),
    /// The answer as Python sees it (kept so `wait()` may be called again).
    Finished(Result<Py<PyAny>, PyErr>),
}

/// A call in flight. `wait()` returns its result (raising its error);
/// `done()` says whether it has finished. Returned by every `*_async`
/// method of `pserver.Client`.
#[pyclass(module = "pserver._native", name = "Future")]
pub struct Future {
    state: Mutex<State>,
}

impl Future {
    /// A future of the answer `rx` will carry.
    pub fn new(rx: Receiver<Outcome>) -> Future {
        Future {
            state: Mutex::new(State::Pending(rx)),
        }
    }

    /// A future that has already finished with `outcome` (a call refused
    /// before it was sent).
    pub fn ready(outcome: Outcome) -> Future {
        Future {
            state: Mutex::new(State::Received(outcome)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the state half
        // changed (every change is one assignment), so a poisoned lock is
        // still good.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Turns a finished call's answer into Python objects.
fn to_python(py: Python<'_>, outcome: Outcome) -> Result<Py<PyAny>, PyErr> {
    match outcome.map_err(|e| to_pyerr(py, e))? {
        Done::Nothing => Ok(py.None()),
        Done::Rows { vals, rows, dim } => {
            if rows.checked_mul(dim) != Some(vals.len()) {
                return Err(PyRuntimeError::new_err(format!(
                    "the servers answered {} floats for {rows} keys of dim {dim}",
                    vals.len()
                )));
            }
            // The reply's buffer becomes the array's: no copy.
            let flat = PyArray1::from_vec(py, vals);
            Ok(flat.reshape([rows, dim])?.into_any().unbind())
        }
        Done::Table(spec) => Ok(table_dict(py, &spec)?.into_any().unbind()),
    }
}

/// A table's spec as a dict.
pub fn table_dict<'py>(py: Python<'py>, spec: &TableSpec) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("name", &spec.name)?;
    d.set_item("id", spec.id)?;
    d.set_item("dim", spec.dim)?;
    d.set_item("updater", spec.updater.name())?;
    d.set_item("consistency", spec.consistency.to_string())?;
    let init = match spec.init {
        Init::Zero => "zero".to_string(),
        Init::Uniform { scale, seed } => format!("uniform:{scale}:{seed}"),
    };
    d.set_item("init", init)?;
    d.set_item("aggregate", spec.aggregate)?;
    d.set_item("job", spec.job.clone())?;
    Ok(d)
}

#[pymethods]
impl Future {
    /// Blocks until the call finishes (at most `timeout` seconds, if
    /// given; then raises `TimeoutError` and the call goes on), and
    /// returns its result or raises its error. The GIL is released
    /// meanwhile. May be called again: it returns the same result.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let deadline = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => {
                Some(Instant::now() + Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "timeout {t} is not a finite number of seconds >= 0"
                )));
            }
        };
        // Take the receiver out, so no lock is held while waiting without
        // the GIL (a thread holding the GIL could otherwise wait on the
        // lock while this one waits for the GIL).
        // Its own statement: a guard in the match's scrutinee would live
        // through the arms, which lock again.
        let taken = std::mem::replace(&mut *self.state(), State::Waiting);
        let mut rx = match taken {
            State::Pending(rx) => rx,
            State::Waiting => {
                return Err(PyRuntimeError::new_err(
                    "another thread is already waiting on this future",
                ));
            }
            State::Received(outcome) => return self.finish(py, outcome),
            State::Finished(r) => {
                let copy = match &r {
                    Ok(v) => Ok(v.clone_ref(py)),
                    Err(e) => Err(e.clone_ref(py)),
                };
                *self.state() = State::Finished(r);
                return copy;
            }
        };
        loop {
            let slice = match deadline {
                None => SLICE,
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
            };
            // The receiver moves into the closure and back: it is not
            // `Sync`, so a reference could not cross.
            let (back, got) = py.detach(move || {
                let got = rx.recv_timeout(slice);
                (rx, got)
            });
            rx = back;
            match got {
                Ok(outcome) => return self.finish(py, outcome),
                Err(RecvTimeoutError::Disconnected) => {
                    return self.finish(py, Err(BindError::Closed));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        *self.state() = State::Pending(rx);
                        return Err(e);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        *self.state() = State::Pending(rx);
                        return Err(PyTimeoutError::new_err(format!(
                            "the call did not finish within {} s; it goes on: wait() again",
                            timeout.unwrap_or_default()
                        )));
                    }
                }
            }
        }
    }

    /// Whether the call has finished (`wait()` would not block).
    fn done(&self) -> bool {
        let mut state = self.state();
        match &*state {
            State::Pending(rx) => match rx.try_recv() {
                Ok(outcome) => {
                    *state = State::Received(outcome);
                    true
                }
                Err(TryRecvError::Disconnected) => {
                    *state = State::Received(Err(BindError::Closed));
                    true
                }
                Err(TryRecvError::Empty) => false,
            },
            State::Waiting => false,
            State::Received(_) | State::Finished(_) => true,
        }
    }
}

impl Future {
    /// Converts `outcome`, keeps it, and returns it.
    fn finish(&self, py: Python<'_>, outcome: Outcome) -> PyResult<Py<PyAny>> {
        let r = to_python(py, outcome);
        let copy = match &r {
            Ok(v) => Ok(v.clone_ref(py)),
            Err(e) => Err(e.clone_ref(py)),
        };
        *self.state() = State::Finished(r);
        copy
    }
}
