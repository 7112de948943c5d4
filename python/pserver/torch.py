"""PyTorch modules whose embedding rows live on a pserver cluster.

:class:`Embedding` and :class:`EmbeddingBag` are ``torch.nn.Module``\\ s
like ``torch.nn.Embedding`` and ``torch.nn.EmbeddingBag``, but their
weights are the rows of a pserver table: ``forward`` deduplicates the ids
of the batch, pulls their rows from the servers in one call, makes them a
leaf tensor that autograd tracks and gathers the output from it; after
``loss.backward()``, :meth:`Embedding.step` (or a :class:`SparseOptimizer`
over several modules) pushes each id's gradient, summed over its
occurrences, and the table's updater on the servers (SGD, AdaGrad, FTRL)
applies it. Dense layers stay ordinary torch parameters with an ordinary
torch optimizer::

    import torch
    import pserver
    from pserver.torch import Embedding, SparseOptimizer

    client = pserver.Client("127.0.0.1:7070")
    emb = Embedding(client, "item", dim=16, updater={"type": "adagrad", "lr": 0.05})
    head = torch.nn.Linear(16, 1)
    dense = torch.optim.Adam(head.parameters())
    sparse = SparseOptimizer([emb])

    for ids, y in batches:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(emb(ids)).squeeze(1), y)
        dense.zero_grad()
        loss.backward()
        dense.step()
        sparse.step()          # push the rows' gradients, next clock

**Ids and keys.** Ids are non-negative ``int64`` (or ``int32``), as for
``torch.nn.Embedding``, but unbounded: any id below 2**63 has a row. The
servers place keys on a ring by value, so the ids are spread over it by a
fixed bijective mix (:func:`keys_of`; ``hash_ids=False`` keeps the ids as
keys, for ids that are already uniform hashes). :meth:`Embedding.keys`
gives the keys of ids, to read rows with ``client.pull`` or ``pserver kv
pull``.

**Clocks and consistency.** Each step is one clock of the client. A
forward at clock ``c`` pulls at clock ``c - 1``: under the table's
bounded delay ``tau`` (``"sequential"`` is 0) it is answered once every
worker has pushed step ``c - 1 - tau``, so a worker runs at most ``tau``
steps ahead of the slowest, and sequential consistency is bulk
synchronous (every step sees every worker's previous one); under
``"eventual"`` nothing waits. The step's push goes at the clock of the
forward passes it pushes for, and the client then moves to the clock
after it, whether the push succeeded or not (a push the servers refused
in part has used its clock on the ranges that took it; pushing again at
that clock would be a :class:`pserver.Duplicate`). A step with nothing to
push still pushes an empty update, so other workers waiting for this
one's clock are not held back. Modules that share a client must be
stepped together by one :class:`SparseOptimizer`, which pushes them all
at one clock and moves the clock once.

This module imports PyTorch; ``import pserver`` alone does not.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - only without torch
    raise ImportError(
        "pserver.torch needs PyTorch (pip install torch); the rest of pserver does not"
    ) from e

from . import Client, errors

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MAX_KEY = np.uint64(2**64 - 1)


def keys_of(ids: Any) -> np.ndarray:
    """The table keys of non-negative integer ``ids`` (a tensor or array):
    SplitMix64's finalizer of ``id + 0x9E3779B97F4A7C15``, a bijection of
    the 64-bit integers, so distinct ids never share a key and any run of
    ids (0, 1, 2, ...) spreads evenly over the servers' ring. (The one id
    that would land on the reserved key ``2**64 - 1`` takes ``2**64 - 2``,
    as pserver-data's hashes do.)"""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    z = np.asarray(ids).astype(np.uint64) + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    z[z == _MAX_KEY] = _MAX_KEY - np.uint64(1)
    return z


def _check_ids(ids: Any, what: str = "ids") -> torch.Tensor:
    """``ids`` as an integer tensor, refusing other types and negative ids."""
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(np.asarray(ids))
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{what} must be an integer tensor (int64), not {ids.dtype}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(
            f"{what} must be non-negative: {what} holds {int(ids.min())} "
            "(every id below 2**63 has a row; map ids to non-negative first)"
        )
    return ids


def _table_spec(client: Client, table: str, dim: int, create: Dict[str, Any]) -> dict:
    """The spec of ``table``: created with ``create`` if it does not exist,
    else the existing one, whose dim must be ``dim``."""
    try:
        spec = client.table(table)
    except errors.UnknownTable:
        try:
            spec = client.create_table(table, int(dim), **create)
        except errors.RemoteError:
            # Made meanwhile by another worker, with another spec: the
            # one that exists is the table; its dim is checked below.
            spec = client.table(table)
    if spec["dim"] != dim:
        raise errors.WrongWidth(
            f"table {table!r} exists with dim {spec['dim']}, not {dim}: "
            f"use dim={spec['dim']} or another table name"
        )
    return spec


class _Rows(torch.nn.Module):
    """What :class:`Embedding` and :class:`EmbeddingBag` share: the table,
    the pull of a batch's rows, and the gradients waiting to be pushed."""

    def __init__(
        self,
        client: Client,
        table: str,
        dim: int,
        updater: Any,
        init: Any,
        consistency: Any,
        aggregate: bool,
        hash_ids: bool,
    ):
        super().__init__()
        if not isinstance(client, Client):
            raise TypeError(f"client must be a pserver.Client, not {type(client).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, not {dim!r}")
        self.client = client
        self.table = str(table)
        self.dim = int(dim)
        self.hash_ids = bool(hash_ids)
        #: The table's spec as the cluster has it (an existing table's
        #: updater, init and consistency win over the arguments).
        self.spec = _table_spec(
            client,
            self.table,
            self.dim,
            dict(updater=updater, consistency=consistency, init=init, aggregate=aggregate),
        )
        # Per forward pass since the last step: the keys pulled, the leaf
        # tensor of their rows, and the clock the pass ran at.
        self._pending: List[Tuple[np.ndarray, torch.Tensor, int]] = []

    def keys(self, ids: Any) -> np.ndarray:
        """The table keys of ``ids`` (``uint64``, same shape): where their
        rows are stored (see :func:`keys_of` and ``hash_ids``)."""
        ids = _check_ids(ids)
        if self.hash_ids:
            return keys_of(ids)
        return ids.detach().cpu().numpy().astype(np.uint64)

    def rows(self, ids: Any) -> torch.Tensor:
        """The current rows of ``ids`` on the servers, ``(len(ids), dim)``
        ``float32``, not tracked by autograd (for checks and inspection)."""
        ids = _check_ids(ids).reshape(-1)
        if ids.numel() == 0:
            return torch.zeros((0, self.dim))
        return torch.from_numpy(self.client.pull(self.table, self.keys(ids), sort=True))

    @property
    def pending(self) -> int:
        """Forward passes whose gradients the next step will push."""
        return len(self._pending)

    def _gather(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rows of the distinct ids of ``ids`` (a leaf tensor autograd
        tracks, when it is on and the module is training) and, per id,
        the index of its row."""
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        clock = self.client.clock
        if unique.numel() == 0:
            rows = torch.zeros((0, self.dim))
            keys = np.empty(0, dtype=np.uint64)
        else:
            keys = self.keys(unique)
            if self.hash_ids:
                # Unique (ids are, and the mix is a bijection) but not in
                # order: the rows are kept in key order, the order the
                # servers want, so the step pushes them without sorting.
                order = np.argsort(keys)
                keys = keys[order]
                rank = np.empty_like(order)
                rank[order] = np.arange(order.size)
                inverse = torch.from_numpy(rank).to(inverse.device)[inverse]
            got = self.client.pull(self.table, keys, clock=max(clock - 1, 0))
            rows = torch.from_numpy(got)
        rows = rows.to(ids.device)
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_(True)
            self._pending.append((keys, rows, clock))
        return rows, inverse.reshape(ids.shape)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forgets the gradients of the pending forward passes (their rows
        are still pushed at the next step, with zero gradients)."""
        for _, rows, _ in self._pending:
            if set_to_none:
                rows.grad = None
            elif rows.grad is not None:
                rows.grad.zero_()
        super().zero_grad(set_to_none)

    def _take_gradients(self) -> Tuple[Optional[int], np.ndarray, np.ndarray]:
        """Empties the pending passes: the clock of the first, and each
        pulled key with its gradient (sorted and unique for one pass; for
        several, keys repeat and the push sorts and sums them)."""
        pending, self._pending = self._pending, []
        if not pending:
            return None, np.empty(0, dtype=np.uint64), np.empty((0, self.dim), dtype=np.float32)
        clock = min(c for _, _, c in pending)
        keys, grads = [], []
        for k, rows, _ in pending:
            if rows.grad is None or k.size == 0:
                continue
            keys.append(k)
            grads.append(rows.grad.detach().to("cpu", torch.float32).numpy())
        if not keys:
            return clock, np.empty(0, dtype=np.uint64), np.empty((0, self.dim), dtype=np.float32)
        if len(keys) == 1:
            # One pass: its keys are sorted and unique already.
            return clock, keys[0], grads[0]
        return clock, np.concatenate(keys), np.concatenate(grads)

    def step(self) -> None:
        """Pushes the gradients of the forward passes since the last step
        (summed per id) through the table's updater, then moves the client
        to the next clock (see the module docs); the same as a
        :class:`SparseOptimizer` of this module alone."""
        SparseOptimizer([self]).step()

    def extra_repr(self) -> str:
        return f"table={self.table!r}, dim={self.dim}, updater={self.spec.get('updater')!r}"


class Embedding(_Rows):
    """``torch.nn.Embedding`` with its rows on a pserver table.

    ``client``: a :class:`pserver.Client` (a ``"worker"`` one for training,
    so consistency counts it). ``table``: the table's name; created with
    ``dim``, ``updater``, ``init``, ``consistency`` and ``aggregate`` (as
    :meth:`pserver.Client.create_table` takes them) if it does not exist;
    an existing table is used as it is, and its dim must be ``dim``
    (else :class:`pserver.WrongWidth`). ``hash_ids``: spread ids over the
    ring (:func:`keys_of`); ``False`` uses them as keys.

    ``forward(ids)``: ids of any shape, non-negative integers; returns
    ``ids.shape + (dim,)`` float32.
    """

    def __init__(
        self,
        client: Client,
        table: str,
        dim: int,
        updater: Any = "adagrad",
        init: Any = "uniform:0.01",
        consistency: Any = "eventual",
        aggregate: bool = False,
        hash_ids: bool = True,
    ):
        super().__init__(client, table, dim, updater, init, consistency, aggregate, hash_ids)

    def forward(self, ids: Any) -> torch.Tensor:
        """The rows of ``ids``, shape ``ids.shape + (dim,)``."""
        ids = _check_ids(ids)
        rows, inverse = self._gather(ids)
        return F.embedding(inverse, rows)


_MODES = ("sum", "mean")


class EmbeddingBag(_Rows):
    """``torch.nn.EmbeddingBag`` (``mode="sum"`` or ``"mean"``) with its
    rows on a pserver table; the arguments as :class:`Embedding`'s.

    ``forward(ids, offsets=None, per_sample_weights=None)``: as
    ``torch.nn.EmbeddingBag``'s: a 2-D ``ids`` of fixed-length bags, or a
    1-D ``ids`` cut into bags at ``offsets`` (1-D, starting at 0, not
    decreasing, none past ``len(ids)``; an empty bag gives zeros).
    ``per_sample_weights`` (the shape of ``ids``, ``mode="sum"`` only)
    weighs each id. Returns ``(bags, dim)``.
    """

    def __init__(
        self,
        client: Client,
        table: str,
        dim: int,
        mode: str = "mean",
        updater: Any = "adagrad",
        init: Any = "uniform:0.01",
        consistency: Any = "eventual",
        aggregate: bool = False,
        hash_ids: bool = True,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(map(repr, _MODES))}")
        super().__init__(client, table, dim, updater, init, consistency, aggregate, hash_ids)
        self.mode = mode

    def forward(
        self,
        ids: Any,
        offsets: Any = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The bags' sums or means of their ids' rows, ``(bags, dim)``."""
        ids = _check_ids(ids)
        if ids.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when ids is 2-D (one bag per row)")
        elif ids.dim() == 1:
            if offsets is None:
                raise ValueError("a 1-D ids needs offsets: where each bag starts")
            offsets = _check_ids(offsets, "offsets")
            if offsets.dim() != 1:
                raise ValueError(f"offsets must be 1-D, not of shape {tuple(offsets.shape)}")
            n = ids.numel()
            if offsets.numel() == 0:
                raise ValueError("offsets is empty: give at least one bag's start (0)")
            if int(offsets[0]) != 0:
                raise ValueError(f"offsets must start at 0, not {int(offsets[0])}")
            if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
                raise ValueError("offsets must not decrease")
            if int(offsets[-1]) > n:
                raise ValueError(f"offsets holds {int(offsets[-1])}, past the end of ids ({n})")
            offsets = offsets.to(torch.int64)
        else:
            raise ValueError(f"ids must be 1-D (with offsets) or 2-D, not {ids.dim()}-D")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError("per_sample_weights needs mode='sum'")
            if tuple(per_sample_weights.shape) != tuple(ids.shape):
                raise ValueError(
                    f"per_sample_weights has shape {tuple(per_sample_weights.shape)}, "
                    f"ids {tuple(ids.shape)}: give one weight per id"
                )
        rows, inverse = self._gather(ids)
        return F.embedding_bag(
            inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"


class SparseOptimizer:
    """Steps several :class:`Embedding` / :class:`EmbeddingBag` modules
    (or every such module inside the given ``torch.nn.Module``\\ s)
    together: the modules of one client push at one clock, then that
    client moves to the clock after it (once, however many modules it
    serves). The updates themselves are the servers' updaters; this
    object has no state of its own but the modules' pending gradients.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]):
        found: List[_Rows] = []
        for m in modules:
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"SparseOptimizer takes torch modules, not {type(m).__name__}")
            for sub in m.modules():
                if isinstance(sub, _Rows) and all(sub is not f for f in found):
                    found.append(sub)
        if not found:
            raise ValueError("SparseOptimizer found no pserver Embedding or EmbeddingBag")
        #: The pserver modules it steps.
        self.modules: Sequence[_Rows] = found

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forgets the pending gradients (see :meth:`Embedding.zero_grad`)."""
        for m in self.modules:
            m.zero_grad(set_to_none)

    def step(self) -> None:
        """Pushes every module's pending gradients (all at once, then waits
        for every server's acknowledgement) and moves each client to the
        clock after the one pushed at, even when a push fails; the first
        failure is raised once every push has finished."""
        by_client: Dict[int, List[_Rows]] = {}
        for m in self.modules:
            by_client.setdefault(id(m.client), []).append(m)
        first_error: Optional[BaseException] = None
        for group in by_client.values():
            client = group[0].client
            taken = [m._take_gradients() for m in group]
            clocks = [c for c, _, _ in taken if c is not None]
            clock = min(clocks) if clocks else client.clock
            try:
                futures = []
                for m, (_, keys, grads) in zip(group, taken):
                    try:
                        # Sorting (and summing) only what is not sorted yet.
                        ordered = keys.size < 2 or bool(np.all(keys[1:] > keys[:-1]))
                        futures.append(
                            client.push_async(m.table, keys, grads, sort=not ordered, clock=clock)
                        )
                    except Exception as e:
                        first_error = first_error or e
                for f in futures:
                    try:
                        f.wait()
                    except Exception as e:  # every push is waited for first
                        first_error = first_error or e
            finally:
                # The clock is used, whatever happened to the push (a
                # closed client has no clock left to move).
                if not client.closed and client.clock <= clock:
                    client.set_clock(clock + 1)
        if first_error is not None:
            raise first_error


__all__ = ["Embedding", "EmbeddingBag", "SparseOptimizer", "keys_of"]
