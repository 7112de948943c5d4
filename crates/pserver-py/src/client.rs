//! `pserver._native.Client`: one `pserver_node::worker::Worker` and the
//! tokio runtime it runs on. The Python class `pserver.Client` wraps it
//! (argument checks, `sort=True`, the blocking forms).

use crate::error::{BindError, to_pyerr};
use crate::future::{Done, Future, Outcome};
use crate::spec;
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pserver_core::{KeyRange, Role};
use pserver_node::auth::{Secret, authenticated};
use pserver_node::net::Net;
use pserver_node::tls::{TlsFiles, tls};
use pserver_node::worker::{Keys, Op, Request, TableOptions, Worker, WorkerConfig};
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::sync_channel;
use std::time::Duration;

/// A connected client: the runtime its worker's tasks run on, and the worker.
struct Live {
    rt: tokio::runtime::Runtime,
    worker: Worker,
    /// The process that made it: a `fork`ed child inherits the memory but
    /// not the runtime's threads, so its calls would never run.
    pid: u32,
}

/// A connection to a pserver cluster, as a worker (counted by consistency
/// models and barriers) or an ad-hoc client. Each owns a tokio runtime of
/// its own (see `threads`), so clients in different processes, or made
/// after a `fork`, never share one.
#[pyclass(module = "pserver._native", name = "Client")]
pub struct Client {
    live: Mutex<Option<Live>>,
    manager: String,
}

/// The transport: TCP, in TLS if `tls_files` are given, with the secret's
/// handshake inside if `secret_file` is.
fn transport(secret_file: Option<PathBuf>, tls_files: Option<TlsFiles>) -> Result<Net, BindError> {
    let mut net = Net::tcp();
    if let Some(files) = &tls_files {
        net = tls(net, files)?;
    }
    if let Some(path) = secret_file {
        net = authenticated(net, Secret::from_file(&path)?);
    }
    Ok(net)
}

/// `secs` as a duration, refusing what is not a positive finite number.
fn seconds(secs: f64, what: &str) -> Result<Duration, BindError> {
    if secs.is_finite() && secs > 0.0 && secs < 1e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(BindError::Value(format!(
            "{what} must be a positive number of seconds, not {secs}"
        )))
    }
}

/// A request of `op` on `keys` at `clock` (`None`: the worker's clock
/// when it is sent, which is now).
fn request(table: String, op: Op, keys: Vec<u64>, vals: Vec<f32>, clock: Option<u64>) -> Request {
    Request {
        table,
        op,
        keys: Keys::List(keys),
        vals,
        clock,
        consistency: None,
    }
}

/// The position of the first key that is not above the one before it.
fn unsorted(keys: &[u64]) -> Option<usize> {
    keys.windows(2).position(|w| w[0] >= w[1]).map(|i| i + 1)
}

/// The keys of a request, checked: sorted and unique.
fn key_list(keys: &PyReadonlyArray1<'_, u64>) -> Result<Vec<u64>, BindError> {
    let keys: Vec<u64> = match keys.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => keys.as_array().iter().copied().collect(),
    };
    if let Some(i) = unsorted(&keys) {
        return Err(BindError::NotSorted(format!(
            "keys must be sorted and unique (or pass sort=True): keys[{i}] = {} follows {}",
            keys[i],
            keys[i - 1]
        )));
    }
    Ok(keys)
}

/// The values of a push, one row per key, flattened in row order.
fn value_rows(values: &PyReadonlyArray2<'_, f32>, keys: usize) -> Result<Vec<f32>, BindError> {
    let shape = values.shape();
    if shape[0] != keys {
        return Err(BindError::Shape(format!(
            "values have {} rows for {keys} keys: give one row per key, shape (n, dim)",
            shape[0]
        )));
    }
    Ok(match values.as_slice() {
        Ok(s) => s.to_vec(),
        // Not contiguous (a transposed or strided view): copied in row order.
        Err(_) => values.as_array().iter().copied().collect(),
    })
}

impl Client {
    /// The runtime handle and worker, or `Closed`.
    fn live(&self) -> Result<(tokio::runtime::Handle, Worker), BindError> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let l = live.as_ref().ok_or(BindError::Closed)?;
        if l.pid != std::process::id() {
            return Err(BindError::Forked);
        }
        Ok((l.rt.handle().clone(), l.worker.clone()))
    }

    /// Runs `task` on the runtime; its answer comes through the future.
    fn spawn<F>(&self, task: impl FnOnce(Worker) -> F) -> Future
    where
        F: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let (rt, worker) = match self.live() {
            Ok(l) => l,
            Err(e) => return Future::ready(Err(e)),
        };
        // Room for the one answer, so the task never blocks sending it.
        let (tx, rx) = sync_channel(1);
        let fut = task(worker);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        Future::new(rx)
    }
}

#[pymethods]
impl Client {
    /// Connects to the manager at `manager` (`host:port`). `secret_file`:
    /// the cluster secret; `tls_cert`, `tls_key`, `tls_ca`: this client's
    /// certificate, its key and the cluster CA, all three or none. `role`:
    /// `"worker"` (counted by consistency models and barriers) or
    /// `"client"` (never waited for). `timeout`: seconds one request may
    /// take, retries included; `connect_timeout`: seconds the manager has
    /// to answer; `threads`: the runtime's threads.
    #[new]
    #[pyo3(signature = (manager, secret_file=None, tls_cert=None, tls_key=None, tls_ca=None, role="worker", timeout=120.0, connect_timeout=10.0, threads=2))]
    // Python's keyword arguments, one per setting.
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        manager: String,
        secret_file: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
        role: &str,
        timeout: f64,
        connect_timeout: f64,
        threads: usize,
    ) -> PyResult<Client> {
        let made = (|| -> Result<Live, BindError> {
            let role = match role {
                "worker" => Role::Worker,
                "client" => Role::Client,
                other => {
                    return Err(BindError::Value(format!(
                        "role {other:?} is not \"worker\" or \"client\""
                    )));
                }
            };
            let tls_files = match (tls_cert, tls_key, tls_ca) {
                (None, None, None) => None,
                (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
                _ => {
                    return Err(BindError::Value(
                        "tls needs cert, key and ca together: give all three or none".into(),
                    ));
                }
            };
            if threads == 0 || threads > 256 {
                return Err(BindError::Value(format!(
                    "threads must be 1-256, not {threads}"
                )));
            }
            let timeout = seconds(timeout, "timeout")?;
            let connect_timeout = seconds(connect_timeout, "connect_timeout")?;
            let net = transport(secret_file, tls_files)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("pserver-py")
                .enable_all()
                .build()
                .map_err(|e| BindError::Value(format!("cannot start the runtime: {e}")))?;
            let cfg = WorkerConfig {
                role,
                timeout,
                net,
                ..WorkerConfig::new(manager.clone())
            };
            let addr = manager.clone();
            let worker = py.detach(|| {
                rt.block_on(async {
                    match tokio::time::timeout(connect_timeout, Worker::connect(cfg)).await {
                        Ok(r) => r.map_err(BindError::from),
                        Err(_) => Err(BindError::ConnectTimeout {
                            addr,
                            secs: connect_timeout.as_secs(),
                        }),
                    }
                })
            });
            match worker {
                Ok(worker) => Ok(Live {
                    rt,
                    worker,
                    pid: std::process::id(),
                }),
                Err(e) => {
                    // Without waiting for tasks that may still be dialing.
                    rt.shutdown_background();
                    Err(e)
                }
            }
        })();
        match made {
            Ok(live) => Ok(Client {
                live: Mutex::new(Some(live)),
                manager,
            }),
            Err(e) => Err(to_pyerr(py, e)),
        }
    }

    /// The manager's address.
    #[getter]
    fn manager(&self) -> String {
        self.manager.clone()
    }

    /// This node's id in the cluster.
    #[getter]
    fn id(&self, py: Python<'_>) -> PyResult<u64> {
        let (_, w) = self.live().map_err(|e| to_pyerr(py, e))?;
        Ok(u64::from(w.id()))
    }

    /// The clock sent with the next request.
    #[getter]
    fn clock(&self, py: Python<'_>) -> PyResult<u64> {
        let (_, w) = self.live().map_err(|e| to_pyerr(py, e))?;
        Ok(w.clock())
    }

    /// Moves to the next clock (iteration) and returns it.
    fn next_clock(&self, py: Python<'_>) -> PyResult<u64> {
        let (_, w) = self.live().map_err(|e| to_pyerr(py, e))?;
        Ok(w.advance())
    }

    /// Sets the clock sent with later requests.
    fn set_clock(&self, py: Python<'_>, clock: u64) -> PyResult<()> {
        let (_, w) = self.live().map_err(|e| to_pyerr(py, e))?;
        w.set_clock(clock);
        Ok(())
    }

    /// Creates a table, or finds the existing one if its spec is the same;
    /// the future gives its spec as a dict.
    #[pyo3(signature = (name, dim, updater, consistency, init, aggregate))]
    // The table's spec, one argument per field, as Python passes them.
    #[allow(clippy::too_many_arguments)]
    fn create_table(
        &self,
        py: Python<'_>,
        name: String,
        dim: u32,
        updater: &Bound<'_, PyAny>,
        consistency: &Bound<'_, PyAny>,
        init: &Bound<'_, PyAny>,
        aggregate: bool,
    ) -> PyResult<Future> {
        let opts = (|| -> Result<TableOptions, BindError> {
            let opts = TableOptions::new(dim, spec::updater(updater)?)
                .consistency(spec::consistency(consistency)?)
                .init(spec::init(init)?)
                .aggregate(aggregate);
            // The manager would refuse it too, but as a remote error:
            // checked here it is a ValueError naming what is wrong.
            pserver_core::TableSpec {
                id: 0,
                name: name.clone(),
                dim: opts.dim,
                init: opts.init.clone(),
                updater: opts.updater.clone(),
                consistency: opts.consistency,
                aggregate: opts.aggregate,
                job: None,
            }
            .validate()
            .map_err(|e| BindError::Value(e.to_string()))?;
            Ok(opts)
        })()
        .map_err(|e| to_pyerr(py, e))?;
        Ok(self.spawn(move |w| async move {
            w.create_table(&name, opts)
                .await
                .map(Done::Table)
                .map_err(BindError::from)
        }))
    }

    /// The spec of table `name` as a dict (raises `UnknownTable`).
    fn table(&self, name: String) -> Future {
        self.spawn(move |w| async move {
            w.table(&name)
                .await
                .map(Done::Table)
                .map_err(BindError::from)
        })
    }

    /// Pushes `values` (one row per key) for sorted, unique `keys`, at
    /// `clock` (default: the current clock).
    #[pyo3(signature = (table, keys, values, clock=None))]
    fn push(
        &self,
        table: String,
        keys: PyReadonlyArray1<'_, u64>,
        values: PyReadonlyArray2<'_, f32>,
        clock: Option<u64>,
    ) -> Future {
        let got = key_list(&keys).and_then(|k| Ok((value_rows(&values, k.len())?, k)));
        let (vals, keys) = match got {
            Ok(x) => x,
            Err(e) => return Future::ready(Err(e)),
        };
        self.spawn(move |w| {
            let handle = w.send(request(table, Op::Push, keys, vals, clock));
            async move { handle.await.map(|_| Done::Nothing).map_err(BindError::from) }
        })
    }

    /// Pulls the rows of sorted, unique `keys`: an `(n, dim)` float32
    /// array; at `clock` (default: the current clock), which the table's
    /// consistency model may make wait for other workers' pushes.
    #[pyo3(signature = (table, keys, clock=None))]
    fn pull(&self, table: String, keys: PyReadonlyArray1<'_, u64>, clock: Option<u64>) -> Future {
        let keys = match key_list(&keys) {
            Ok(k) => k,
            Err(e) => return Future::ready(Err(e)),
        };
        self.spawn(move |w| {
            let rows = keys.len();
            // Made now, not in the task: the clock is the one current now.
            let handle = w.send(request(table.clone(), Op::Pull, keys, Vec::new(), clock));
            async move {
                let dim = w.table(&table).await?.dim as usize;
                let vals = handle.await?.vals;
                Ok(Done::Rows { vals, rows, dim })
            }
        })
    }

    /// Pushes, then pulls the same keys once the push is applied; at
    /// `clock` (default: the current clock).
    #[pyo3(signature = (table, keys, values, clock=None))]
    fn push_pull(
        &self,
        table: String,
        keys: PyReadonlyArray1<'_, u64>,
        values: PyReadonlyArray2<'_, f32>,
        clock: Option<u64>,
    ) -> Future {
        let got = key_list(&keys).and_then(|k| Ok((value_rows(&values, k.len())?, k)));
        let (vals, keys) = match got {
            Ok(x) => x,
            Err(e) => return Future::ready(Err(e)),
        };
        self.spawn(move |w| {
            let rows = keys.len();
            // Made now, not in the task: pushes leave in the order made.
            let handle = w.send(request(table.clone(), Op::PushPull, keys, vals, clock));
            async move {
                let dim = w.table(&table).await?.dim as usize;
                let vals = handle.await?.vals;
                Ok(Done::Rows { vals, rows, dim })
            }
        })
    }

    /// Pulls every key of `[begin, end)`: an `(end - begin, dim)` array.
    fn pull_range(&self, table: String, begin: u64, end: u64) -> Future {
        if begin >= end {
            return Future::ready(Err(BindError::Value(format!(
                "range [{begin}, {end}) is empty: the end is exclusive"
            ))));
        }
        self.spawn(move |w| async move {
            let rows = usize::try_from(end - begin)
                .map_err(|_| BindError::Value("range too long".into()))?;
            let dim = w.table(&table).await?.dim as usize;
            let vals = w.pull_range(&table, KeyRange { begin, end }).await?;
            Ok(Done::Rows { vals, rows, dim })
        })
    }

    /// Waits until every live worker has entered barrier `name`.
    fn barrier(&self, name: String) -> Future {
        self.spawn(move |w| async move {
            w.barrier(&name)
                .await
                .map(|_| Done::Nothing)
                .map_err(BindError::from)
        })
    }

    /// Leaves the cluster and stops the runtime; calls after this raise
    /// `ClientClosed`, and calls in flight end with it. Closing twice is
    /// harmless.
    fn close(&self) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(live) = live {
            if live.pid != std::process::id() {
                // A forked child's copy: the runtime's threads and the
                // connections belong to the parent. Dropping it here would
                // try to stop threads this process does not have.
                std::mem::forget(live);
                return;
            }
            live.worker.shutdown();
            // Not waiting for the tasks: a closing client must not hang on
            // a server that does not answer.
            live.rt.shutdown_background();
        }
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}
