"""Python client of pserver, a parameter server (Li et al., OSDI 2014).

The client is the cluster's own worker library (Rust, through PyO3): keys
are ``numpy.uint64`` arrays, values ``float32`` arrays of shape
``(n, dim)``, and every call has a blocking form and an ``*_async`` form
that returns a :class:`Future` at once::

    import numpy as np
    import pserver

    with pserver.Client("127.0.0.1:7070") as c:
        c.create_table("emb", dim=4, updater={"type": "adagrad", "lr": 0.05})
        keys = np.array([3, 7, 42], dtype=np.uint64)
        c.push("emb", keys, np.ones((3, 4), dtype=np.float32))
        rows = c.pull("emb", keys)          # (3, 4) float32

Errors are exceptions of :mod:`pserver.errors`, all subclasses of
:class:`pserver.Error`, carrying the server's message.

Beside the client: :mod:`pserver.torch` (``Embedding``, ``EmbeddingBag``
and ``SparseOptimizer``: PyTorch modules whose rows live on the cluster;
importing it imports torch, ``import pserver`` alone never does) and
:mod:`pserver.data` (``read_fields``: the training data as ``pserver
train`` reads it, by field, as numpy arrays) and :mod:`pserver.ray` (a
cluster and its training jobs as Ray actors; it imports ray).

Threads: each :class:`Client` owns a tokio runtime of its own (``threads``
threads, 2 by default), started when it connects and stopped by
:meth:`Client.close`; nothing is shared between clients, so a process
started by ``fork`` (``torch.multiprocessing``, ``multiprocessing``)
makes its own client and never inherits a runtime. Waiting releases the
GIL, so other Python threads run meanwhile.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import numpy as np

from . import errors
from .errors import *  # noqa: F401,F403 (the exceptions are part of the API)
from .errors import __all__ as _error_names
from ._native import Client as _NativeClient
from ._native import __version__ as _native_version

__version__ = _native_version

PathLike = Union[str, "os.PathLike[str]"]


class Future:
    """A call in flight, returned by every ``*_async`` method.

    :meth:`wait` blocks (without the GIL) until the call finishes and
    returns its result or raises its error; :meth:`done` says whether it
    has finished. ``wait`` may be called again and gives the same result.
    """

    __slots__ = ("_native", "_then")

    def __init__(self, native: Any, then: Optional[Callable[[Any], Any]] = None):
        self._native = native
        self._then = then

    def wait(self, timeout: Optional[float] = None) -> Any:
        """The call's result. With ``timeout`` (seconds), raises
        ``TimeoutError`` if it has not finished by then (the call goes on;
        wait again)."""
        result = self._native.wait(timeout)
        return self._then(result) if self._then is not None else result

    def done(self) -> bool:
        """Whether the call has finished, so :meth:`wait` would not block."""
        return self._native.done()


def _keys(keys: Any) -> np.ndarray:
    """``keys`` as a 1-D ``uint64`` array. Other unsigned or non-negative
    signed integer arrays are converted; anything else is refused."""
    a = np.asarray(keys)
    if a.ndim != 1:
        raise ValueError(f"keys must be a 1-D array, not of shape {a.shape}")
    if a.dtype == np.uint64:
        return a
    if a.size == 0:
        return np.empty(0, dtype=np.uint64)
    if a.dtype.kind == "u":
        return a.astype(np.uint64)
    if a.dtype.kind == "i":
        if a.min() < 0:
            raise ValueError("keys must be non-negative (they are numpy.uint64)")
        return a.astype(np.uint64)
    raise TypeError(f"keys must be an array of numpy.uint64, not {a.dtype}")


def _values(values: Any, n: int) -> np.ndarray:
    """``values`` as a 2-D ``float32`` array of ``n`` rows (other float
    types are converted; a 1-D array is cut into ``n`` rows)."""
    v = np.asarray(values)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"values must be an array of float32, not {v.dtype}")
    v = v.astype(np.float32, copy=False)
    if v.ndim == 1 and n > 0 and v.size % n == 0:
        v = v.reshape(n, -1)
    if v.ndim != 2 or v.shape[0] != n:
        raise errors.WrongWidth(
            f"values of shape {v.shape} do not fit {n} keys: give one row per key, shape (n, dim)"
        )
    return v


def _dedup(keys: np.ndarray):
    """Sorts and deduplicates ``keys``: the unique keys, the order that
    sorts ``keys``, where each unique key's run starts in that order, and
    for each given key the index of its unique key."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(ordered.size, dtype=bool)
    if ordered.size > 1:
        first[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(first)
    inverse = np.empty(keys.size, dtype=np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[starts], order, starts, inverse


def _summed(keys: np.ndarray, values: np.ndarray):
    """``keys`` sorted and unique, the rows of repeated keys summed; and
    the index, per given key, of its row among them."""
    unique, order, starts, inverse = _dedup(keys)
    if keys.size == 0:
        return unique, values, inverse
    return unique, np.add.reduceat(values[order], starts, axis=0), inverse


def _clock(clock: Any) -> Optional[int]:
    """``clock`` as a clock a request may carry, or None for the current."""
    if clock is None:
        return None
    if isinstance(clock, bool) or not isinstance(clock, (int, np.integer)):
        raise TypeError(f"clock must be an int, not {type(clock).__name__}")
    if not 0 <= clock < 2**64:
        raise ValueError(f"clock {clock} is out of range")
    return int(clock)


def _tls_files(tls: Any):
    """``(cert, key, ca)`` from what ``tls`` may be: None, a dict with
    ``cert``, ``key`` and ``ca``, a 3-tuple, or the directory
    ``pserver certs DIR`` wrote (``node.pem``, ``node.key``, ``ca.pem``)."""
    if tls is None:
        return None, None, None
    if isinstance(tls, dict):
        unknown = set(tls) - {"cert", "key", "ca"}
        if unknown or len(tls) != 3:
            raise ValueError(
                f"tls must have exactly the entries cert, key and ca; got {sorted(tls)}"
            )
        return (os.fspath(tls["cert"]), os.fspath(tls["key"]), os.fspath(tls["ca"]))
    if isinstance(tls, (tuple, list)):
        if len(tls) != 3:
            raise ValueError("tls as a sequence must be (cert, key, ca)")
        return tuple(os.fspath(p) for p in tls)
    if isinstance(tls, (str, os.PathLike)):
        d = os.fspath(tls)
        if not os.path.isdir(d):
            raise ValueError(
                f"tls {d!r} is not a directory; give a dict with cert, key and ca instead"
            )
        return tuple(os.path.join(d, f) for f in ("node.pem", "node.key", "ca.pem"))
    raise TypeError(f"tls must be None, a dict, a (cert, key, ca) tuple or a directory, not {type(tls).__name__}")


class Client:
    """A connection to a pserver cluster.

    ``manager``: the manager's ``host:port``. ``secret_file``: the cluster
    secret (as the command line's ``--secret-file``); a wrong or missing
    one raises :class:`AuthError`. ``tls``: mutual TLS, as a dict
    ``{"cert": ..., "key": ..., "ca": ...}``, a ``(cert, key, ca)`` tuple,
    or the directory ``pserver certs DIR`` wrote. ``role``: ``"worker"``
    (the default: counted by consistency models, aggregation and barriers,
    as a training process should be) or ``"client"`` (an ad-hoc client,
    like ``pserver kv``, never waited for). ``timeout``: seconds one
    request may take, retries included. ``connect_timeout``: seconds the
    manager has to answer. ``threads``: threads of this client's runtime.

    The client leaves the cluster at :meth:`close` (or the end of a
    ``with`` block, or when it is garbage-collected).
    """

    def __init__(
        self,
        manager: str = "127.0.0.1:7070",
        secret_file: Optional[PathLike] = None,
        tls: Any = None,
        *,
        role: str = "worker",
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        threads: int = 2,
    ):
        cert, key, ca = _tls_files(tls)
        secret = os.fspath(secret_file) if secret_file is not None else None
        self._c = _NativeClient(
            manager, secret, cert, key, ca, role, float(timeout), float(connect_timeout), int(threads)
        )

    # Connection -----------------------------------------------------------

    @property
    def manager(self) -> str:
        """The manager's address."""
        return self._c.manager

    @property
    def id(self) -> int:
        """This client's node id in the cluster."""
        return self._c.id

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._c.closed

    def close(self) -> None:
        """Leaves the cluster and stops this client's runtime. Later calls
        raise :class:`ClientClosed`; closing twice is harmless."""
        self._c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"node {self.id}"
        return f"pserver.Client({self.manager!r}, {state})"

    # Clocks and barriers --------------------------------------------------

    @property
    def clock(self) -> int:
        """The clock (iteration) sent with the next request."""
        return self._c.clock

    def next_clock(self) -> int:
        """Moves to the next clock and returns it. Pulls of a table with
        a bounded-delay or sequential model wait for the other workers'
        pushes of earlier clocks."""
        return self._c.next_clock()

    def set_clock(self, clock: int) -> None:
        """Sets the clock sent with later requests."""
        if clock < 0:
            raise ValueError(f"clock {clock} is negative")
        self._c.set_clock(int(clock))

    def barrier_async(self, name: str) -> Future:
        """:meth:`barrier`, returning a :class:`Future`."""
        return Future(self._c.barrier(name))

    def barrier(self, name: str) -> None:
        """Waits until every live worker has entered barrier ``name``."""
        return self.barrier_async(name).wait()

    # Tables ---------------------------------------------------------------

    def create_table_async(
        self,
        name: str,
        dim: int,
        updater: Any = "add",
        consistency: Any = "eventual",
        init: Any = "zero",
        aggregate: bool = False,
    ) -> Future:
        """:meth:`create_table`, returning a :class:`Future`."""
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int, not {type(dim).__name__}")
        if not 0 < dim < 2**32:
            raise ValueError(f"dim {dim} is out of range")
        return Future(
            self._c.create_table(name, int(dim), updater, consistency, init, bool(aggregate))
        )

    def create_table(
        self,
        name: str,
        dim: int,
        updater: Any = "add",
        consistency: Any = "eventual",
        init: Any = "zero",
        aggregate: bool = False,
    ) -> dict:
        """Creates table ``name`` of ``dim`` floats per key, or finds it if
        it exists with the same spec; returns its spec as a dict.

        ``updater``: what servers do with a push: ``"assign"``, ``"add"``,
        ``"sgd"``, ``"adagrad"``, ``"ftrl"``, ``"prox"``, or a dict naming
        one with its parameters (the command line's defaults otherwise):
        ``{"type": "sgd", "lr": 0.1}``, ``{"type": "adagrad", "lr": 0.1,
        "eps": 1e-6}``, ``{"type": "ftrl", "alpha": 0.1, "beta": 1.0,
        "l1": 0.0, "l2": 0.0}``, ``{"type": "prox", "eta": 1.0, "l1": 0.0,
        "l2": 0.0, "eps": 1e-6}``. ``consistency``: ``"eventual"``,
        ``"sequential"``, ``"bounded:N"`` or the delay bound ``N``.
        ``init``: ``"zero"``, ``"uniform:SCALE[:SEED]"`` or ``{"type":
        "uniform", "scale": S, "seed": N}``. ``aggregate``: sum each
        clock's pushes of every live worker, then apply them once.
        A bad value raises ``ValueError``.
        """
        return self.create_table_async(name, dim, updater, consistency, init, aggregate).wait()

    def table_async(self, name: str) -> Future:
        """:meth:`table`, returning a :class:`Future`."""
        return Future(self._c.table(name))

    def table(self, name: str) -> dict:
        """The spec of table ``name`` as a dict; raises :class:`UnknownTable`."""
        return self.table_async(name).wait()

    # Data -----------------------------------------------------------------

    def push_async(
        self, table: str, keys: Any, values: Any, sort: bool = False, clock: Optional[int] = None
    ) -> Future:
        """:meth:`push`, returning a :class:`Future`."""
        k = _keys(keys)
        v = _values(values, k.size)
        if sort:
            k, v, _ = _summed(k, v)
        return Future(self._c.push(table, k, v, _clock(clock)))

    def push(
        self, table: str, keys: Any, values: Any, sort: bool = False, clock: Optional[int] = None
    ) -> None:
        """Pushes ``values`` (``float32``, one row per key: shape ``(n,
        dim)``) for ``keys`` (``uint64``, sorted and unique) through the
        table's updater, at the current clock (or at ``clock``). With
        ``sort=True`` the keys may come in any order and repeat: they are
        sorted and the rows of a repeated key summed. Returns once every
        server acknowledged."""
        return self.push_async(table, keys, values, sort, clock).wait()

    def pull_async(
        self, table: str, keys: Any, sort: bool = False, clock: Optional[int] = None
    ) -> Future:
        """:meth:`pull`, returning a :class:`Future`."""
        k = _keys(keys)
        c = _clock(clock)
        if not sort:
            return Future(self._c.pull(table, k, c))
        unique, _, _, inverse = _dedup(k)
        return Future(self._c.pull(table, unique, c), lambda rows: rows[inverse])

    def pull(
        self, table: str, keys: Any, sort: bool = False, clock: Optional[int] = None
    ) -> np.ndarray:
        """The rows of ``keys`` (sorted and unique): a ``float32`` array of
        shape ``(n, dim)``. With ``sort=True`` the keys may come in any
        order and repeat; each distinct key is pulled once and the rows
        come back in the order given. The pull goes at the current clock
        (or at ``clock``): under a table's bounded delay ``tau`` (0 for
        sequential) it is answered once every worker has pushed clock
        ``clock - tau``."""
        return self.pull_async(table, keys, sort, clock).wait()

    def push_pull_async(
        self, table: str, keys: Any, values: Any, sort: bool = False, clock: Optional[int] = None
    ) -> Future:
        """:meth:`push_pull`, returning a :class:`Future`."""
        k = _keys(keys)
        v = _values(values, k.size)
        c = _clock(clock)
        if not sort:
            return Future(self._c.push_pull(table, k, v, c))
        unique, summed, inverse = _summed(k, v)
        return Future(self._c.push_pull(table, unique, summed, c), lambda rows: rows[inverse])

    def push_pull(
        self, table: str, keys: Any, values: Any, sort: bool = False, clock: Optional[int] = None
    ) -> np.ndarray:
        """Pushes like :meth:`push`, then pulls the same keys once the
        push is applied (one round trip). ``sort=True`` and ``clock`` as
        in :meth:`push` and :meth:`pull`."""
        return self.push_pull_async(table, keys, values, sort, clock).wait()

    def pull_range_async(self, table: str, begin: int, end: int) -> Future:
        """:meth:`pull_range`, returning a :class:`Future`."""
        if begin < 0 or end < 0:
            raise ValueError(f"range [{begin}, {end}) has a negative end")
        return Future(self._c.pull_range(table, int(begin), int(end)))

    def pull_range(self, table: str, begin: int, end: int) -> np.ndarray:
        """The rows of every key of ``[begin, end)`` (dense: no key list
        on the wire): a ``float32`` array of shape ``(end - begin, dim)``."""
        return self.pull_range_async(table, begin, end).wait()


__all__ = ["Client", "Future", "errors", *_error_names]
