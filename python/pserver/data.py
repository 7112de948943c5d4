"""Training data as ``pserver train`` reads it, for Python models.

:func:`read_fields` runs pserver-data's CSV reader (the Rust one, through
the native module) over a data file and its TOML schema, and returns the
hashed feature keys kept apart by field, so a model with one embedding
per field (a factorization machine, an MLP over concatenated embeddings)
reads exactly the rows, labels, keys and train/test split that the
bundled logistic regression does::

    from pserver.data import read_fields

    train = read_fields("data/nycflights13/flights.toml",
                        "data/nycflights13/flights.csv.gz", split="train")
    train.keys.shape     # (261882, 39): one uint64 key per row and field
    train.fields[:3]     # ['carrier', 'carrier_flight', 'tailnum']
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import numpy as np

from ._native import read_fields as _read_fields

PathLike = Union[str, "os.PathLike[str]"]

#: In :attr:`Fields.keys`, a field the row has no value for (``u64::MAX``:
#: no feature hashes to it).
MISSING = np.uint64(2**64 - 1)


@dataclass(frozen=True)
class Fields:
    """The examples of one read.

    ``labels``: ``float32`` of shape ``(n,)``, 0 or 1. ``keys``: ``uint64``
    of shape ``(n, len(fields))``, the key of each field of each row (the
    same 64-bit keys the logistic regression's weights are stored under),
    :data:`MISSING` where the row has no value for the field. ``fields``:
    the schema's features in schema order, then its crosses as ``a^b``.
    ``lines``, ``examples``, ``skipped`` (no label, e.g. cancelled
    flights), ``bad`` (malformed; ``first_bad`` names the first few) and
    ``elsewhere`` (lines of the other split or shard) are the reader's
    counts: ``lines == examples + skipped + bad + elsewhere``.
    """

    labels: np.ndarray
    keys: np.ndarray
    fields: List[str]
    lines: int
    examples: int
    skipped: int
    bad: int
    elsewhere: int
    first_bad: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_fields(
    schema: PathLike,
    data: PathLike,
    split: str = "all",
    validation: Optional[Tuple[float, int, str]] = None,
    shard: Optional[Tuple[int, int]] = None,
) -> Fields:
    """Reads the CSV file ``data`` as the TOML ``schema`` describes it.

    ``split``: ``"all"``, ``"train"`` or ``"test"``: the schema's
    ``[split]`` holdout, the same lines ``pserver train`` trains and
    tests on without ``--test``. ``validation``: ``(fraction, seed,
    part)``, a seeded validation split carved out of what ``split`` keeps
    (as ``pserver train --tune`` does; ``part`` is ``"train"`` for the
    lines outside it, ``"valid"`` for its lines). ``shard``: ``(index,
    count)`` keeps data line ``n`` iff ``n % count == index``. A missing
    file or a schema that does not fit raises :class:`pserver.DataError`;
    a bad argument ``ValueError``. Malformed lines are skipped and
    counted, not raised.
    """
    if validation is not None:
        if len(validation) != 3:
            raise ValueError("validation must be (fraction, seed, part)")
        f, s, p = validation
        validation = (float(f), int(s), str(p))
    if shard is not None:
        if len(shard) != 2:
            raise ValueError("shard must be (index, count)")
        shard = (int(shard[0]), int(shard[1]))
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard {shard} must have 0 <= index < count")
    d = _read_fields(os.fspath(schema), os.fspath(data), split, validation, shard)
    return Fields(
        labels=d["labels"],
        keys=d["keys"],
        fields=list(d["fields"]),
        lines=d["lines"],
        examples=d["examples"],
        skipped=d["skipped"],
        bad=d["bad"],
        elsewhere=d["elsewhere"],
        first_bad=list(d["first_bad"]),
    )


__all__ = ["Fields", "MISSING", "read_fields"]
