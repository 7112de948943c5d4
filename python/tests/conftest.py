"""Fixtures: real `pserver` processes (a manager and servers) on loopback.

The binary is ``$PSERVER_BIN`` (set by crates/pserver-py/tests/python.rs,
which runs these tests under ``cargo test``), else the workspace's
``target/debug/pserver``. Every process is killed when its fixture ends,
pass or fail.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pserver_bin() -> str:
    """The `pserver` binary the tests run."""
    path = os.environ.get("PSERVER_BIN") or str(ROOT / "target" / "debug" / "pserver")
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"no pserver binary at {path}: run `cargo build -p pserver` first, "
            "or set PSERVER_BIN (cargo test --workspace does both)"
        )
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["RUST_LOG"] = "off"
    # The secret comes from files in these tests, never the environment.
    env.pop("PSERVER_SECRET", None)
    env.pop("PSERVER_SECRET_FILE", None)
    return env


class Cluster:
    """A manager and ``servers`` servers started with ``flags`` (the
    security flags every node and every `kv` command of it gets)."""

    def __init__(self, tmp: Path, servers: int = 1, flags: Optional[List[str]] = None):
        self.bin = pserver_bin()
        self.flags = list(flags or [])
        self.tmp = tmp
        self.procs: List[subprocess.Popen] = []
        try:
            line = self._start(["manager", "--listen", "127.0.0.1:0"], "manager")
            self.manager = line.rsplit(" ", 1)[-1]
            for i in range(servers):
                self._start(["server", "--manager", self.manager], f"server{i}")
        except BaseException:
            self.stop()
            raise

    def _start(self, args: List[str], name: str, limit: float = 30.0) -> str:
        """Starts ``pserver ARGS`` and returns its first line of output
        (the address it listens on)."""
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(
            [self.bin, *args, *self.flags],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=_env(),
        )
        log.close()
        self.procs.append(p)
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=limit):
            raise RuntimeError(f"pserver {args} printed nothing within {limit} s")
        line = p.stdout.readline().decode().strip()
        if not line:
            err = (self.tmp / f"{name}.log").read_text(errors="replace")
            raise RuntimeError(f"pserver {args} exited: {err}")
        return line

    def kv(self, *args: str, flags: Optional[List[str]] = None) -> str:
        """Runs ``pserver kv --manager M ARGS`` (with the cluster's flags,
        or ``flags``) and returns its stdout; raises if it fails."""
        out = self.kv_run(*args, flags=flags)
        if out.returncode != 0:
            raise AssertionError(f"pserver kv {args} failed: {out.stderr}")
        return out.stdout

    def kv_run(self, *args: str, flags: Optional[List[str]] = None) -> subprocess.CompletedProcess:
        """The same, returning the finished process whatever its status."""
        cmd = [self.bin, "kv", "--manager", self.manager, *args]
        cmd += self.flags if flags is None else flags
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env=_env(), stdin=subprocess.DEVNULL
        )

    def kv_pull(self, table: str, keys=None, range_=None) -> dict:
        """What `pserver kv pull` shows: ``{key: [floats]}``."""
        if keys is not None:
            out = self.kv("pull", table, "--keys", ",".join(str(int(k)) for k in keys))
        else:
            out = self.kv("pull", table, "--range", f"{range_[0]}..{range_[1]}")
        rows = {}
        for line in out.splitlines():
            parts = line.split()
            rows[int(parts[0])] = [float(x) for x in parts[1:]]
        return rows

    def stop(self) -> None:
        """Kills every process (servers first)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A plain cluster: a manager and two servers, so requests are split
    over partitions."""
    c = Cluster(tmp_path_factory.mktemp("cluster"), servers=2)
    yield c
    c.stop()


@pytest.fixture
def client(cluster):
    """A worker client of ``cluster``, closed after the test."""
    import pserver

    with pserver.Client(cluster.manager, timeout=30) as c:
        yield c


_counter = [0]


@pytest.fixture
def table_name(request):
    """A table name no other test uses (tables are never dropped)."""
    _counter[0] += 1
    base = "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:80]
    return f"{base}_{_counter[0]}"
