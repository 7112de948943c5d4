"""The flights example (examples/flights_ctr.py) end to end, briefly: its
own cluster of pserver processes, two worker processes, a hundred steps
each, a small slice of the test split scored. Its AUC is a result in the
README, not checked here; that it runs, trains and scores is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, pserver_bin

if not os.environ.get("CI"):
    pytest.importorskip("torch")


def test_the_flights_example_runs(tmp_path):
    out = tmp_path / "figures.json"
    cmd = [
        sys.executable, str(ROOT / "examples" / "flights_ctr.py"),
        "--pserver", pserver_bin(),
        "--workers", "2", "--servers", "2", "--epochs", "1",
        "--steps", "100", "--test-rows", "4000", "--json", str(out),
    ]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test AUC" in p.stdout and "test log-loss" in p.stdout, p.stdout
    f = json.loads(out.read_text())
    assert f["steps_per_worker"] == 100 and f["workers"] == 2
    assert f["test_examples"] == 4000
    # A hundred steps already learn something: better than chance and
    # than the base rate's log-loss (about 0.51 here).
    assert 0.6 < f["test_auc"] <= 1.0, f
    assert f["test_logloss"] < 0.5, f
    assert f["train_loss_last"] < f["train_loss_first"], f


def test_the_example_refuses_bad_flags():
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "flights_ctr.py"), "--workers", "0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2 and "--workers" in p.stderr
