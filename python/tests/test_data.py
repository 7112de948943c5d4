"""pserver.data.read_fields: the bundled flights as pserver train reads
them (same rows, keys and split), and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import pserver
from pserver.data import MISSING, read_fields

from conftest import ROOT

FLIGHTS = ROOT / "data" / "nycflights13"
SCHEMA = FLIGHTS / "flights.toml"
DATA = FLIGHTS / "flights.csv.gz"


@pytest.fixture(scope="module")
def train():
    return read_fields(SCHEMA, DATA, split="train")


def test_the_split_is_the_logistic_regressions(train):
    # The README's `cargo run --release -- train`: 261,882 train and
    # 65,464 test examples, the cancelled flights skipped.
    test = read_fields(SCHEMA, DATA, split="test")
    assert (len(train), len(test)) == (261_882, 65_464)
    assert train.lines == test.lines and train.bad == 0
    assert train.examples + train.skipped + train.elsewhere == train.lines
    assert train.elsewhere == test.examples + test.skipped
    assert train.keys.dtype == np.uint64 and train.labels.dtype == np.float32
    assert set(np.unique(train.labels)) == {0.0, 1.0}
    # About a fifth of the flights arrive 15 minutes late or more.
    assert 0.15 < train.labels.mean() < 0.3


def test_one_key_per_field(train):
    assert train.keys.shape == (len(train), 39) and len(train.fields) == 39
    assert train.fields[:3] == ["carrier", "carrier_flight", "tailnum"]
    assert "date^hour^origin" in train.fields
    col = {f: i for i, f in enumerate(train.fields)}
    # Every flight has a carrier; a field's keys are its own (no key of
    # one field appears in another).
    assert not np.any(train.keys[:, col["carrier"]] == MISSING)
    carriers = set(np.unique(train.keys[:, col["carrier"]]))
    assert len(carriers) == 16
    assert not carriers & set(np.unique(train.keys[:, col["origin"]]))
    # Some planes are not in planes.csv: their plane fields are missing.
    assert 0 < np.mean(train.keys[:, col["plane_model"]] == MISSING) < 0.5


def test_validation_and_shards():
    fit = read_fields(SCHEMA, DATA, split="train", validation=(0.1, 7, "train"), shard=(0, 4))
    valid = read_fields(SCHEMA, DATA, split="train", validation=(0.1, 7, "valid"), shard=(0, 4))
    whole = read_fields(SCHEMA, DATA, split="train", shard=(0, 4))
    assert len(fit) + len(valid) == len(whole)
    assert 0.07 < len(valid) / len(whole) < 0.13
    assert 0.2 < len(whole) / 261_882 < 0.3


def test_errors(tmp_path):
    with pytest.raises(pserver.DataError, match="nope.csv"):
        read_fields(SCHEMA, tmp_path / "nope.csv")
    with pytest.raises(pserver.DataError):
        read_fields(tmp_path / "nope.toml", DATA)
    bad = tmp_path / "s.toml"
    bad.write_text('label = { field = "arr_delay", ge = 15.0 }\ncategorical = ["no_such_column"]\n')
    with pytest.raises(pserver.DataError, match="no_such_column"):
        read_fields(bad, DATA)
    with pytest.raises(ValueError, match="split"):
        read_fields(SCHEMA, DATA, split="validation")
    with pytest.raises(ValueError, match="validation part"):
        read_fields(SCHEMA, DATA, validation=(0.1, 1, "test"))
    with pytest.raises(ValueError, match="within"):
        read_fields(SCHEMA, DATA, validation=(1.5, 1, "train"))
    with pytest.raises(ValueError, match="shard"):
        read_fields(SCHEMA, DATA, shard=(3, 2))
    with pytest.raises(ValueError, match="shard"):
        read_fields(SCHEMA, DATA, shard=(0, 0))
