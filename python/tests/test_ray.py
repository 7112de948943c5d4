"""pserver.ray on a real local Ray instance (ray.init on this machine):
the bundled job trained by Ray actors, a server actor killed mid-job and
restarted by Ray under its old id, no pserver process left behind, and
bad arguments refused. Plus the module's plain functions, without Ray.

Under CI a missing Ray is a failure, not a skip (python.rs installs it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, pserver_bin

if os.environ.get("CI"):
    import ray  # CI installs it: missing is a failure, not a skip
else:
    ray = pytest.importorskip("ray")

import pserver  # noqa: E402
import pserver.ray as pray  # noqa: E402

#: What the children log: warnings only, so the test's output stays short.
QUIET = {"RUST_LOG": "warn"}

#: The README's figure for the bundled job (10 epochs, 2 workers, 2 servers).
README_AUC = 0.8118


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for this module: the machine's 2 cores (the
    actors ask for none by default, so every cluster and job fits), no
    dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def processes_of(token: str):
    """The pids of live processes carrying the cluster's token in their
    environment (what each child of the cluster gets)."""
    marker = f"{pray.CLUSTER_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # A zombie has exited; its parent just has not reaped it yet.
        if marker in env.split(b"\0") and stat.rsplit(")", 1)[-1].split()[0] != "Z":
            found.append(int(entry.name))
    return found


def gone(pid: int, limit: float = 10.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


class Counter:
    """Pushes +1 to ``keys`` of table ``n`` in a loop from its own client,
    counting the pushes acknowledged (what failover tests count)."""

    def __init__(self, cluster: pray.Cluster, keys: np.ndarray):
        self.keys = keys
        self.acked = 0
        self.failed = 0
        self.stop = threading.Event()
        self.client = cluster.connect(role="client", timeout=30)
        self.client.create_table("n", dim=1, updater="add")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ones = np.ones((self.keys.size, 1), dtype=np.float32)
        while not self.stop.is_set():
            self.client.next_clock()
            try:
                self.client.push("n", self.keys, ones)
                self.acked += 1
            except pserver.Error:
                self.failed += 1

    def finish(self) -> np.ndarray:
        """Stops the loop and returns every key's value."""
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the push loop did not stop"
        rows = self.client.pull("n", self.keys)[:, 0]
        self.client.close()
        return rows


def owner_of(status: dict, key: int) -> int:
    """The id of the live server whose primary ranges hold ``key``."""
    for node in status["nodes"]:
        if node["role"] == "server" and node["state"] == "alive":
            if any(lo <= key < hi for lo, hi in node["ranges"]):
                return node["id"]
    raise AssertionError(f"no live server holds {key}: {status}")


def kill_owner_and_wait_back(cluster: pray.Cluster, key: int, child: bool = False,
                             limit: float = 60.0):
    """Kills the actor of the server holding ``key`` (ray.kill, restart
    allowed), or with ``child`` its pserver process alone (SIGKILL), and
    waits until Ray restarted the actor and the server is alive in the map
    again under its id. Returns (id, old child pid, new info)."""
    victim = owner_of(cluster.status(), key)
    actor = cluster.server_actor(victim)
    before = ray.get(actor.info.remote(), timeout=30)
    killed = time.monotonic()
    if child:
        os.kill(before["pid"], signal.SIGKILL)
    else:
        ray.kill(actor, no_restart=False)
    assert gone(before["pid"]), f"server {victim}'s pserver process outlived its actor"
    deadline = time.monotonic() + limit
    info = None
    while time.monotonic() < deadline:
        try:
            info = ray.get(actor.info.remote(), timeout=5)
            if info["restarted"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    assert info is not None and info["restarted"], f"Ray did not restart server {victim}'s actor"
    assert info["id"] == victim and info["pid"] != before["pid"], (before, info)
    while time.monotonic() < deadline:
        node = next((n for n in cluster.status()["nodes"] if n["id"] == victim), None)
        if node and node["state"] == "alive" and node["addr"] == info["addr"] and node["ranges"]:
            print(f"server {victim} back in the map {time.monotonic() - killed:.1f} s after the kill")
            return victim, before["pid"], info
        time.sleep(0.2)
    raise AssertionError(f"server {victim} is not back in the map: {cluster.status()}")


# Plain functions: no Ray, no processes.


def test_ready_lines_are_parsed():
    assert pray.parse_ready("manager", "manager listening on 127.0.0.1:7070") == pray.Ready(
        "manager", None, "127.0.0.1:7070"
    )
    assert pray.parse_ready("server", "server 3 listening on 127.0.0.1:4000\n") == pray.Ready(
        "server", 3, "127.0.0.1:4000"
    )
    assert pray.parse_ready(
        "worker", "worker 12 takes tasks on 127.0.0.1:5000; waiting for a job"
    ) == pray.Ready("worker", 12, "127.0.0.1:5000")
    assert pray.parse_ready("server", "metrics on 127.0.0.1:9100") is None
    with pytest.raises(pray.StartError, match="not the line"):
        pray.parse_ready("server", "manager listening on 127.0.0.1:1")


def test_command_lines():
    assert pray.command("manager", state="/s/state.json", extra=["--replicas", "1"]) == [
        "manager", "--listen", "127.0.0.1:0", "--state", "/s/state.json", "--replicas", "1",
    ]
    # A restarted manager listens where it did.
    assert pray.command("manager", prior={"addr": "127.0.0.1:7171"})[:3] == [
        "manager", "--listen", "127.0.0.1:7171",
    ]
    assert pray.command("server", manager="m:1", flags=["--secret-file", "s"]) == [
        "server", "--manager", "m:1", "--listen", "127.0.0.1:0", "--secret-file", "s",
    ]
    # A restarted server rejoins under its id.
    again = pray.command("server", manager="m:1", prior={"id": 4, "addr": "x"})
    assert again[again.index("--id") + 1] == "4" and "--wait-manager-secs" in again
    assert pray.command("train", manager="m:1", extra=["--epochs", "2"]) == [
        "train", "--manager", "m:1", "--epochs", "2",
    ]
    with pytest.raises(ValueError, match="unknown role"):
        pray.command("scheduler", manager="m:1")
    with pytest.raises(ValueError, match="manager's address"):
        pray.command("worker")


def test_options_become_flags_and_errors_are_found():
    assert pray.option_flags(
        {"epochs": 5, "no_key_caching": True, "resume": False, "tau": None, "data": ["a", "b"]}
    ) == ["--epochs", "5", "--no-key-caching", "--data", "a", "--data", "b"]
    assert pray.error_of(["INFO x", "error: reading /x: No such file", ""]) == "reading /x: No such file"
    assert pray.error_of(["just this"]) == "just this"
    assert pray.error_of([]) == "(it wrote nothing on stderr)"
    r = pray.result_of("j", {"test_auc": 0.8, "test_logloss": 0.4, "test_accuracy": 0.81})
    assert (r.auc, r.logloss, r.accuracy) == (0.8, 0.4, 0.81)
    with pytest.raises(pray.JobFailed, match="test_auc"):
        pray.result_of("j", {"test_auc": None, "test_logloss": 0.4, "test_accuracy": 0.8})


def test_a_missing_binary_is_named(tmp_path, monkeypatch):
    with pytest.raises(pray.BinaryNotFound, match="no executable pserver binary at"):
        pray.find_binary(str(tmp_path / "nope"))
    monkeypatch.setenv("PSERVER_BIN", str(tmp_path / "nope"))
    with pytest.raises(pray.BinaryNotFound, match="PSERVER_BIN"):
        pray.find_binary()
    monkeypatch.delenv("PSERVER_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pray.BinaryNotFound, match="pass binary=PATH"):
        pray.find_binary()


def test_import_pserver_does_not_import_ray():
    code = "import sys, pserver, pserver.data; assert 'ray' not in sys.modules, 'ray imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


# On Ray.


def test_bad_arguments_raise_clear_errors(ray_session, tmp_path):
    with pytest.raises(ValueError, match="servers must be a positive int"):
        pray.start(servers=0)
    with pytest.raises(ValueError, match="replicas=2 needs more than 2 servers"):
        pray.start(servers=2, replicas=2)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        pray.train(workers=0)
    with pytest.raises(pray.BinaryNotFound):
        pray.start(servers=1, binary=str(tmp_path / "no-pserver"))
    # A binary that is not pserver fails at start, saying what it printed.
    fake = tmp_path / "fake"
    fake.write_text("#!/bin/sh\necho 'error: this is not pserver' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(pray.StartError, match="this is not pserver"):
        pray.start(servers=1, binary=str(fake))
    # A bad flag of a role is pserver's own error.
    with pytest.raises(pray.StartError, match="--no-such-flag"):
        pray.start(servers=1, binary=pserver_bin(), manager_args=["--no-such-flag"], env=QUIET)


def test_the_bundled_job_trains_on_ray(ray_session):
    result = pray.train(servers=2, workers=2, binary=pserver_bin(),
                        start_options={"env": QUIET}, timeout=300)
    # The README's run: 10 epochs, 2 workers, 2 servers.
    assert abs(result.auc - README_AUC) < 0.005, result
    assert 0.40 < result.logloss < 0.44, result
    assert result.report["workers"] == 2 and result.report["servers"] == 2, result.report


def test_killing_a_server_actor_mid_job_loses_no_acknowledged_push(ray_session):
    cluster = pray.start(servers=3, replicas=1, binary=pserver_bin(), env=QUIET)
    try:
        token = cluster.token
        ids = cluster.server_ids()
        job = cluster.submit(workers=2, wait=False, epochs=10, timeout=300)
        keys = np.array([(i * (2**64 // 65)) for i in range(1, 65)], dtype=np.uint64)
        counter = Counter(cluster, keys)
        time.sleep(1.0)
        running = ray.get(job.scheduler.info.remote(), timeout=30)["returncode"] is None
        victim, _, _ = kill_owner_and_wait_back(cluster, int(keys[0]))
        assert running, "the job ended before the kill"
        time.sleep(1.0)  # pushes go on while it takes its ranges back
        got = counter.finish()
        print(f"acknowledged {counter.acked} pushes of {keys.size} keys, {counter.failed} failed")
        assert counter.acked > 0
        assert (got == counter.acked).all(), (
            f"acknowledged {counter.acked} (failed {counter.failed}), the keys hold {got}"
        )
        # The same ids as before, every server alive.
        assert cluster.server_ids() == ids
        alive = {n["id"] for n in cluster.status()["nodes"]
                 if n["role"] == "server" and n["state"] == "alive"}
        assert alive == set(ids.values()) and victim in alive
        # The job went through the kill.
        result = job.result()
        assert result.auc > 0.80, result
        # A client of the cluster: an unknown table is named.
        with cluster.connect(role="client", timeout=10) as c:
            with pytest.raises(pserver.UnknownTable, match="no_such_table"):
                c.pull("no_such_table", np.array([1], dtype=np.uint64))
    finally:
        cluster.shutdown()
    assert all(gone(p) for p in processes_of(token)), "pserver processes outlived the cluster"


def test_without_replicas_the_loss_is_detected(ray_session):
    cluster = pray.start(servers=2, replicas=0, binary=pserver_bin(), env=QUIET)
    token = cluster.token
    try:
        keys = np.array([(i * (2**64 // 65)) for i in range(1, 65)], dtype=np.uint64)
        counter = Counter(cluster, keys)
        time.sleep(1.0)
        kill_owner_and_wait_back(cluster, int(keys[0]))
        got = counter.finish()
        # The killed server's keys restarted from zero on another server:
        # what the test above checks would fail here.
        assert counter.acked > 0
        assert (got < counter.acked).any(), f"acknowledged {counter.acked}, the keys hold {got}"
    finally:
        cluster.shutdown()
    assert all(gone(p) for p in processes_of(token)), "pserver processes outlived the cluster"


def test_a_server_process_that_dies_takes_its_actor_down_and_comes_back(ray_session):
    cluster = pray.start(servers=2, replicas=1, binary=pserver_bin(), env=QUIET)
    token = cluster.token
    try:
        keys = np.array([(i * (2**64 // 33)) for i in range(1, 33)], dtype=np.uint64)
        counter = Counter(cluster, keys)
        time.sleep(0.5)
        kill_owner_and_wait_back(cluster, int(keys[0]), child=True)
        got = counter.finish()
        assert counter.acked > 0 and (got == counter.acked).all(), (counter.acked, got)
    finally:
        cluster.shutdown()
    assert all(gone(p) for p in processes_of(token)), "pserver processes outlived the cluster"


def test_a_killed_manager_actor_comes_back_where_it_was(ray_session):
    # With a replica, so that a server the restarted manager gives up on
    # (on a machine loaded enough) loses nothing: this test is about the
    # manager coming back.
    cluster = pray.start(servers=2, replicas=1, binary=pserver_bin(), env=QUIET)
    token = cluster.token
    try:
        keys = np.array([1, 2**63, 2**64 - 2], dtype=np.uint64)
        with cluster.connect(role="client", timeout=60) as c:
            c.create_table("kept", dim=1, updater="add")
            c.push("kept", keys, np.full((3, 1), 2.0, dtype=np.float32))
            servers = {n["id"] for n in cluster.status()["nodes"] if n["role"] == "server"}
            before = ray.get(cluster.manager_actor.info.remote(), timeout=30)
            ray.kill(cluster.manager_actor, no_restart=False)
            assert gone(before["pid"]), "the manager's process outlived its actor"
            deadline = time.monotonic() + 60
            info = None
            while time.monotonic() < deadline:
                try:
                    info = ray.get(cluster.manager_actor.info.remote(), timeout=5)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    time.sleep(0.2)
            assert info and info["restarted"] and info["addr"] == cluster.manager, (before, info)
            # Its state and its servers are back: the table, its values,
            # and a push through the restarted manager's map.
            while time.monotonic() < deadline:
                alive = {n["id"] for n in cluster.status()["nodes"]
                         if n["role"] == "server" and n["state"] == "alive"}
                if alive == servers:
                    break
                time.sleep(0.2)
            assert alive == servers, (cluster.status(), cluster.logs())
            c.next_clock()
            c.push("kept", keys, np.ones((3, 1), dtype=np.float32))
            assert (c.pull("kept", keys)[:, 0] == 3.0).all()
    finally:
        cluster.shutdown()
    assert all(gone(p) for p in processes_of(token)), "pserver processes outlived the cluster"


def test_a_drained_server_actor_stays_down_and_nothing_is_lost(ray_session):
    cluster = pray.start(servers=2, binary=pserver_bin(), env=QUIET)
    token = cluster.token
    try:
        keys = np.array([(i * (2**64 // 33)) for i in range(1, 33)], dtype=np.uint64)
        counter = Counter(cluster, keys)
        time.sleep(0.5)
        ids = cluster.server_ids()
        victim = owner_of(cluster.status(), int(keys[0]))
        cluster.drain(victim)
        time.sleep(0.5)
        got = counter.finish()
        # A drain hands the ranges over: nothing lost, even without replicas.
        assert counter.acked > 0 and (got == counter.acked).all(), (counter.acked, got)
        assert set(cluster.server_ids().values()) == set(ids.values()) - {victim}
        nodes = {n["id"]: n["state"] for n in cluster.status()["nodes"] if n["role"] == "server"}
        assert nodes[victim] == "dead" and list(nodes.values()).count("alive") == 1, nodes
        with pytest.raises(pray.RayError, match="last server"):
            cluster.drain(next(iter(cluster.server_ids().values())))
        with pytest.raises(KeyError, match="no server 999"):
            cluster.drain(999)
    finally:
        cluster.shutdown()
    assert all(gone(p) for p in processes_of(token)), "pserver processes outlived the cluster"


def test_a_failed_job_says_why_and_leaves_no_process(ray_session, tmp_path):
    with pray.start(servers=1, binary=pserver_bin(), env=QUIET) as cluster:
        token = cluster.token
        assert processes_of(token), "the token finds the cluster's processes"
        missing = tmp_path / "missing.csv"
        with pytest.raises(pray.JobFailed, match="missing.csv"):
            cluster.submit(workers=1, train=str(missing), format="csv",
                           schema=str(ROOT / "data" / "nycflights13" / "flights.toml"), timeout=120)
        with pytest.raises(pray.JobFailed, match="--no-such-flag|no_such_flag|unexpected"):
            cluster.submit(workers=1, no_such_flag=3, timeout=120)
        with pytest.raises(ValueError, match="set by the cluster"):
            cluster.submit(workers=1, manager="x")
        # A job past its time: stopped, its worker and scheduler with it.
        nodes = set(processes_of(token))
        with pytest.raises(pray.JobFailed, match="did not finish within 4 s"):
            cluster.submit(workers=1, epochs=1000, timeout=4)
        deadline = time.monotonic() + 10
        while set(processes_of(token)) != nodes and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(processes_of(token)) == nodes, "the job's processes outlived it"
    assert all(gone(p) for p in processes_of(token)), "pserver processes outlived the cluster"
    with pytest.raises(pray.RayError, match="shut down"):
        cluster.submit(workers=1)
