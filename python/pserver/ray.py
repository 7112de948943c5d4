"""pserver on Ray: a cluster's manager and servers as Ray actors, and a
training job's worker processes and scheduler as Ray actors too.

Each node is a :class:`NodeActor` that runs one ``pserver`` child process
(``pserver manager``, ``pserver server``, ``pserver worker`` or ``pserver
train``), reads the child's first line of output for its id and address,
forwards its logs to the actor's own (which Ray streams to the driver),
and takes the child down with it: the child is its own process group and
gets SIGKILL from the kernel when the thread that started it goes
(``PR_SET_PDEATHSIG``), so a killed actor leaves no ``pserver`` behind::

    import ray
    import pserver.ray

    ray.init()
    result = pserver.ray.train(servers=2, workers=2)   # the bundled job
    print(result.auc, result.logloss)

    cluster = pserver.ray.start(servers=3, replicas=1)
    with cluster.connect() as client:                  # a pserver.Client
        ...
    job = cluster.submit(workers=2, wait=False, epochs=5)
    print(job.result(timeout=300))
    cluster.shutdown()

Failures: servers (and the manager) are started with ``max_restarts``, so
Ray restarts an actor that died (its process was killed, its node went,
or its ``pserver`` child exited on its own, which makes the actor exit).
A restarted server rejoins under the id it had (``pserver server --id
N``: the cluster's registry actor keeps each slot's id), so the manager
hands it back its ranges; a restarted manager listens on the address it
had and recovers from its ``--state`` file, and the servers rejoin it.

Placement: the servers are spread over Ray's nodes (``SPREAD``) and each
asks for ``server_cpus`` CPUs (0 by default) and ``server_resources`` (give each node a
custom resource such as ``{"pserver_server": 1}`` to hold one server per
node); on one machine they all land on it. Addresses: every node listens
on ``host`` (loopback by default: one machine); ``host="node"`` takes
each actor's Ray node address, for a cluster of several machines, which
then needs the cluster secret (``flags=["--secret-file", PATH]``) or
``--insecure``.

The ``pserver`` binary: ``binary=``, else ``$PSERVER_BIN``, else
``pserver`` on ``PATH``; every node must have it at that path (and the
job's data files at theirs).
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import ray

from .errors import Error

__all__ = [
    "RayError",
    "BinaryNotFound",
    "StartError",
    "JobFailed",
    "Ready",
    "JobResult",
    "NodeActor",
    "Cluster",
    "Job",
    "find_binary",
    "start",
    "train",
]

#: Roles a :class:`NodeActor` runs, with the ``pserver`` subcommand of each.
ROLES = ("manager", "server", "worker", "train")

#: The variable every child of a cluster carries, set to the cluster's
#: token, so its processes can be found (and proved gone) by it.
CLUSTER_ENV = "PSERVER_RAY_CLUSTER"

#: Lines of each child's standard error an actor keeps for error messages.
LOG_TAIL = 200


class RayError(Error):
    """pserver on Ray could not do what was asked."""


class BinaryNotFound(RayError, FileNotFoundError):
    """No ``pserver`` binary where one was looked for."""


class StartError(RayError):
    """A node's ``pserver`` process exited, or said nothing, at start."""


class JobFailed(RayError):
    """A training job ended without a result (its scheduler failed, or it
    did not finish in time)."""


# Plain data and functions: what each process is told and what its output
# means (unit-tested without Ray or processes).


@dataclass(frozen=True)
class Ready:
    """What a node's first line of output says: its id (none for the
    manager) and the address it listens on."""

    role: str
    id: Optional[int]
    addr: str


_READY = {
    "manager": re.compile(r"^manager listening on (?P<addr>\S+)$"),
    "server": re.compile(r"^server (?P<id>\d+) listening on (?P<addr>\S+)$"),
    "worker": re.compile(r"^worker (?P<id>\d+) takes tasks on (?P<addr>[^;\s]+)"),
}
_METRICS = re.compile(r"^metrics on (?P<addr>\S+)$")


def parse_ready(role: str, line: str) -> Optional[Ready]:
    """The :class:`Ready` of ``role``'s line ``line``, or None for a line
    that comes before it (``metrics on ADDR``). Anything else raises
    :class:`StartError`: the binary is not the one this module speaks to."""
    line = line.strip()
    if _METRICS.match(line):
        return None
    m = _READY[role].match(line)
    if m is None:
        raise StartError(f"pserver {role} printed {line!r}, not the line it prints when ready")
    node_id = m.groupdict().get("id")
    return Ready(role, int(node_id) if node_id is not None else None, m.group("addr"))


def command(
    role: str,
    *,
    manager: Optional[str] = None,
    listen: str = "127.0.0.1:0",
    prior: Optional[Mapping[str, Any]] = None,
    state: Optional[str] = None,
    extra: Sequence[str] = (),
    flags: Sequence[str] = (),
    rejoin_wait_secs: int = 30,
) -> List[str]:
    """The arguments (after the binary) that start ``role``.

    ``prior`` is what the slot's earlier run recorded (``None`` on a first
    start): a restarted server rejoins under its id (``--id N``) and waits
    for a manager that may be restarting too; a restarted manager listens
    where it did, so the servers find it. ``extra`` are the role's own
    flags, ``flags`` the security flags every process of the cluster gets.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    args = [role]
    if role == "manager":
        addr = prior.get("addr") if prior else None
        args += ["--listen", addr or listen]
        if state is not None:
            args += ["--state", state]
    else:
        if not manager:
            raise ValueError(f"pserver {role} needs the manager's address")
        args += ["--manager", manager]
        if role != "train":
            args += ["--listen", listen]
        if role == "server" and prior and prior.get("id") is not None:
            args += ["--id", str(int(prior["id"])), "--wait-manager-secs", str(rejoin_wait_secs)]
    return args + list(extra) + list(flags)


def option_flags(options: Mapping[str, Any]) -> List[str]:
    """Keyword options as ``pserver train`` flags: ``epochs=5`` is
    ``--epochs 5``, ``no_key_caching=True`` is ``--no-key-caching``
    (False or None: left out), a list repeats the flag."""
    out: List[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return out


def error_of(lines: Sequence[str]) -> str:
    """The reason a ``pserver`` process gave for failing: its last
    ``error:`` line, else the last line it wrote, else a placeholder."""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return "(it wrote nothing on stderr)"


@dataclass
class JobResult:
    """A finished job: its name, test AUC and log-loss, accuracy, the
    scheduler's whole JSON report (``--report``) and its printed output."""

    job: str
    auc: float
    logloss: float
    accuracy: float
    report: Dict[str, Any] = field(repr=False)
    output: List[str] = field(default_factory=list, repr=False)


def result_of(job: str, report: Mapping[str, Any], output: Sequence[str] = ()) -> JobResult:
    """The :class:`JobResult` of a report; a report without scores (the
    job scored nothing) raises :class:`JobFailed`."""

    def score(name: str) -> float:
        v = report.get(name)
        if not isinstance(v, (int, float)):
            raise JobFailed(f"job {job}: its report has no {name} (got {v!r})")
        return float(v)

    return JobResult(
        job=job,
        auc=score("test_auc"),
        logloss=score("test_logloss"),
        accuracy=score("test_accuracy"),
        report=dict(report),
        output=list(output),
    )


def find_binary(binary: Optional[str] = None) -> str:
    """The ``pserver`` binary: ``binary``, else ``$PSERVER_BIN``, else
    ``pserver`` on ``PATH``; :class:`BinaryNotFound` says where it looked."""
    if binary is not None:
        path = os.fspath(binary)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
        raise BinaryNotFound(f"no executable pserver binary at {path}")
    env = os.environ.get("PSERVER_BIN")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return os.path.abspath(env)
        raise BinaryNotFound(f"PSERVER_BIN={env} is not an executable file")
    found = shutil.which("pserver")
    if found:
        return os.path.abspath(found)
    raise BinaryNotFound(
        "no pserver binary: pass binary=PATH, set PSERVER_BIN, or put pserver on PATH "
        "(cargo build --release puts it in target/release/)"
    )


# The child process, inside an actor.


def _pdeathsig():
    """A function for ``preexec_fn``: the child gets SIGKILL when the
    thread that forked it ends (Linux's ``PR_SET_PDEATHSIG``), and exits
    at once if that already happened. Resolved before the fork, so the
    child only makes one foreign call. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def set_it() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_it


class _Child:
    """One ``pserver`` process and the threads around it.

    The keeper thread forks it (so ``PR_SET_PDEATHSIG``, which follows
    the forking thread, fires only when the keeper ends: when the child
    has exited or the whole actor process goes), then waits for it and
    calls ``on_exit`` with its status. Two more threads copy its standard
    output and error into memory (the last lines) and to this process's
    own, each line prefixed by ``name``.
    """

    def __init__(self, argv: List[str], env: Dict[str, str], name: str, on_exit):
        self.name = name
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.stdout: List[str] = []
        self.stderr: "collections.deque[str]" = collections.deque(maxlen=LOG_TAIL)
        self.returncode: Optional[int] = None
        self.stopping = False
        self._done = threading.Event()
        started: "queue.Queue[Any]" = queue.Queue()

        def keep() -> None:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_pdeathsig(),
                )
            except OSError as e:
                started.put(e)
                return
            started.put(proc)
            out = threading.Thread(target=self._copy_out, args=(proc.stdout,), daemon=True)
            err = threading.Thread(target=self._copy_err, args=(proc.stderr,), daemon=True)
            out.start()
            err.start()
            code = proc.wait()
            out.join(5)
            err.join(5)
            self.returncode = code
            self._done.set()
            on_exit(self)

        threading.Thread(target=keep, name=f"pserver-{name}", daemon=True).start()
        got = started.get()
        if isinstance(got, OSError):
            raise StartError(f"cannot run {argv[0]}: {got}")
        self.proc: subprocess.Popen = got
        self.pid = got.pid

    def _copy_out(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout.append(line)
            self.lines.put(line)
            print(f"[{self.name}] {line}", flush=True)
        self.lines.put(None)

    def _copy_err(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.stderr.append(line)
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def first_ready(self, role: str, limit: float) -> Ready:
        """Waits up to ``limit`` seconds for the line that says the node
        is ready; :class:`StartError` with the child's reason if it exits
        first or says nothing."""
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                self.kill()
                raise StartError(f"{self.name} printed nothing within {limit:.0f} s") from None
            if line is None:
                self._done.wait(5)
                raise StartError(
                    f"{self.name} exited (status {self.returncode}) before it was ready: "
                    f"{error_of(list(self.stderr))}"
                )
            ready = parse_ready(role, line)
            if ready is not None:
                return ready

    def wait(self, timeout: Optional[float]) -> Optional[int]:
        """The exit status, waiting up to ``timeout`` seconds; None if it
        still runs."""
        self._done.wait(timeout)
        return self.returncode

    def kill(self, grace: float = 5.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``grace`` seconds."""
        self.stopping = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self._done.is_set():
                return
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            if self._done.wait(wait):
                return


@ray.remote
class _Registry:
    """What each slot of a cluster (``manager``, ``server-0``, ...)
    recorded on its first start (id, address, node, state directory), so a
    restarted actor comes back as the same node."""

    def __init__(self):
        self._slots: Dict[str, Dict[str, Any]] = {}

    def get(self, slot: str) -> Optional[Dict[str, Any]]:
        """The slot's record, or None before its first start."""
        return self._slots.get(slot)

    def put(self, slot: str, record: Dict[str, Any]) -> None:
        """Records (or updates) the slot's record."""
        self._slots.setdefault(slot, {}).update(record)

    def all(self) -> Dict[str, Dict[str, Any]]:
        """Every slot's record."""
        return dict(self._slots)


#: Roles whose process should run until stopped: their exit (other than
#: a drained server's status 0) takes the actor down, so Ray restarts it.
_LONG_LIVED = ("manager", "server")


@ray.remote
class NodeActor:
    """A Ray actor that runs one ``pserver`` node as its child process.

    ``role``: ``manager``, ``server``, ``worker`` or ``train``; ``binary``
    the ``pserver`` binary on this node; ``slot`` its name in the
    cluster's registry, the named actor ``registry`` (whose record makes a restarted server rejoin
    under its id and a restarted manager listen where it did); ``manager``
    the manager's address; ``host`` the address to listen on (``"node"``:
    this actor's Ray node address); ``extra`` the role's own flags,
    ``flags`` the security flags; ``env`` variables for the child;
    ``token`` the cluster's :data:`CLUSTER_ENV` value.

    The constructor returns once the child said it is ready (a ``train``
    child: once it started). If it could not start, every call raises
    the :class:`RayError` saying why (the actor stays, without a child).
    """

    def __init__(
        self,
        role: str,
        binary: str,
        *,
        slot: Optional[str] = None,
        registry: Optional[str] = None,
        manager: Optional[str] = None,
        host: str = "127.0.0.1",
        extra: Sequence[str] = (),
        flags: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        token: str = "",
        start_secs: float = 60.0,
    ):
        self.role = role
        self.slot = slot
        # The registry by name, not by handle: a handle among the
        # constructor's arguments would live in the object store, which a
        # restart needs to still hold.
        registry = ray.get_actor(registry) if registry else None
        self._registry = registry
        self.ready: Optional[Ready] = None
        self.child: Optional[_Child] = None
        # Set once the child is ready: from then on its exit is a failure
        # (before, it is a failed start, which _start reports).
        self._serving = False
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.restarted = bool(ctx.was_current_actor_reconstructed)
        prior = ray.get(registry.get.remote(slot)) if registry is not None and slot else None
        ip = ray.util.get_node_ip_address() if host == "node" else host
        listen = f"{ip}:0"
        state = None
        self._own_dir: Optional[str] = None
        if role == "manager":
            # The state directory outlives a restart (the record names it)
            # and goes at stop(), whichever run of the actor made it.
            state_dir = (prior or {}).get("state_dir")
            if state_dir is None or not os.path.isdir(state_dir):
                state_dir = tempfile.mkdtemp(prefix="pserver-ray-manager-")
            self._own_dir = state_dir
            state = os.path.join(state_dir, "state.json")
        if role == "train":
            self._own_dir = tempfile.mkdtemp(prefix="pserver-ray-job-")
        self.report = (
            os.path.join(self._own_dir, "report.json") if role == "train" and self._own_dir else None
        )
        argv_tail = command(
            role,
            manager=manager,
            listen=listen,
            prior=prior,
            state=state,
            extra=list(extra) + (["--report", self.report] if self.report else []),
            flags=flags,
        )
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env[CLUSTER_ENV] = token
        self._argv = [binary, *argv_tail]
        self._env = child_env
        # A failure is kept and raised by every call, so the caller gets
        # it as it was (Ray reports a constructor's exception only inside
        # the text of an ActorDiedError).
        self._failed: Optional[RayError] = None
        try:
            self._start(prior, start_secs)
        except RayError as e:
            self._failed = e
            print(f"[{slot or role}] {e}", file=sys.stderr, flush=True)
            if self.child is not None:
                self.child.kill()
            return
        if registry is not None and slot and self.ready is not None:
            record: Dict[str, Any] = {
                "id": self.ready.id,
                "addr": self.ready.addr,
                "node": self.node_id,
            }
            if role == "manager":
                record["state_dir"] = os.path.dirname(state)
            ray.get(registry.put.remote(slot, record))
        self._serving = True
        if self.child is not None and self.child.returncode is not None:
            self._exited(self.child)  # it went while being recorded

    def _start(self, prior: Optional[Mapping[str, Any]], start_secs: float) -> None:
        """Starts the child and waits for its ready line; a restarted
        server that is refused (its manager may not yet have seen its old
        self go) tries again until ``start_secs`` have passed."""
        role, slot = self.role, self.slot
        binary = self._argv[0]
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise BinaryNotFound(f"no executable pserver binary at {binary} on this node")
        deadline = time.monotonic() + start_secs
        while True:
            name = slot or role
            self.child = _Child(self._argv, self._env, name, self._exited)
            if role == "train":
                break
            try:
                self.ready = self.child.first_ready(role, max(1.0, deadline - time.monotonic()))
                break
            except StartError as e:
                # A restarted server may ask before the manager has seen
                # its old self go ("server N is alive at ADDR"): it tries
                # again until the deadline. Any other refusal is final.
                retry = prior and role == "server" and " is alive" in str(e)
                if not retry or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _exited(self, child: _Child) -> None:
        """Called by the keeper thread when the child exits: a manager or
        server that stopped by itself takes the actor down, so Ray
        restarts it, unless the server was drained (:meth:`Cluster.drain`
        marks its slot first). A server exits 0 both when drained and when
        the manager declared it dead, so its status cannot tell them apart."""
        if child.stopping or child is not self.child or not self._serving:
            return
        if self.role not in _LONG_LIVED:
            return
        if self.role == "server" and self._registry is not None and self.slot:
            try:
                record = ray.get(self._registry.get.remote(self.slot), timeout=30) or {}
            except Exception:  # no registry: restart, as for any failure
                record = {}
            if record.get("drained"):
                print(f"[{child.name}] drained; it stays down", file=sys.stderr, flush=True)
                return
        print(
            f"[{child.name}] exited with status {child.returncode}: "
            f"{error_of(list(child.stderr))}; the actor exits so Ray restarts it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    def info(self) -> Dict[str, Any]:
        """The node: role, slot, id, address, the child's pid, the Ray
        node it runs on and whether Ray restarted this actor."""
        self._check()
        return {
            "role": self.role,
            "slot": self.slot,
            "id": self.ready.id if self.ready else None,
            "addr": self.ready.addr if self.ready else None,
            "pid": self.child.pid,
            "node": self.node_id,
            "restarted": self.restarted,
            "returncode": self.child.returncode,
        }

    def wait(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Waits up to ``timeout`` seconds for the child to exit; its status,
        output and the tail of its log, or None if it still runs. A
        ``train`` child's ``report`` is its parsed ``--report`` (None if
        it wrote none)."""
        self._check()
        code = self.child.wait(timeout)
        if code is None:
            return None
        report = None
        if self.report and os.path.exists(self.report):
            with open(self.report) as f:
                report = json.load(f)
        return {
            "returncode": code,
            "stdout": list(self.child.stdout),
            "stderr": list(self.child.stderr),
            "report": report,
        }

    def log(self) -> List[str]:
        """The last lines the child wrote on stderr (its log)."""
        return list(self.child.stderr) if self.child is not None else []

    def _check(self) -> None:
        """Raises the error the node failed to start with, if it did."""
        if self._failed is not None:
            raise self._failed

    def stop(self) -> None:
        """Stops the child (SIGTERM, then SIGKILL) and removes the
        directories this actor made."""
        if self.child is not None:
            self.child.kill()
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)


# The driver's side.


def _actor_options(cpus: float, resources: Optional[Mapping[str, float]], restarts: int, spread: bool):
    """Ray's options for a server's or worker's actor: what it asks for,
    its restarts, and the spread over nodes."""
    opts: Dict[str, Any] = {"num_cpus": cpus, "max_restarts": restarts, "max_task_retries": 0}
    if resources:
        opts["resources"] = dict(resources)
    if spread:
        opts["scheduling_strategy"] = "SPREAD"
    return opts


def _get(ref, timeout: float, what: str):
    """``ray.get`` that turns an actor's failure into the error it raised
    (a :class:`RayError` keeps its class) and a time-out into one saying
    what was waited for."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RayError(f"{what}: no answer within {timeout:.0f} s") from None
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, RayError):
            raise type(cause)(*cause.args) from None
        raise RayError(f"{what}: {cause if cause is not None else e}") from None
    except ray.exceptions.RayActorError as e:
        raise RayError(f"{what}: the actor died: {e}") from None


class Cluster:
    """A manager and servers running as Ray actors (see :func:`start`)."""

    def __init__(self, binary: str, token: str, registry: Any, manager_actor: Any, manager: str,
                 servers: Dict[str, Any], host: str, flags: List[str], env: Dict[str, str],
                 worker_cpus: float, worker_resources: Optional[Mapping[str, float]]):
        self.binary = binary
        #: The value of ``PSERVER_RAY_CLUSTER`` in every process of the cluster.
        self.token = token
        self.registry = registry
        self.manager_actor = manager_actor
        #: The manager's address.
        self.manager = manager
        #: Server actors by slot (``server-0``, ...).
        self.server_actors = servers
        self.host = host
        self.flags = flags
        self.env = env
        self.worker_cpus = worker_cpus
        self.worker_resources = worker_resources
        self._jobs: List["Job"] = []
        self._counter = 0
        self.closed = False

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"pserver.ray.Cluster(manager={self.manager!r}, servers={len(self.server_actors)})"

    def connect(self, **kwargs: Any):
        """A :class:`pserver.Client` of this cluster (keyword arguments go
        to it: ``timeout=``, ``role=``, ``secret_file=``, ``tls=``, ...)."""
        import pserver

        return pserver.Client(self.manager, **kwargs)

    def server_ids(self) -> Dict[str, int]:
        """Each server slot's node id (the one it keeps across restarts)."""
        records = _get(self.registry.all.remote(), 30, "the cluster's registry")
        return {s: records[s]["id"] for s in self.server_actors if s in records}

    def server_actor(self, node_id: int):
        """The actor of the server whose node id is ``node_id``."""
        for slot, nid in self.server_ids().items():
            if nid == node_id:
                return self.server_actors[slot]
        raise KeyError(f"no server {node_id} in this cluster")

    def logs(self) -> Dict[str, List[str]]:
        """The last lines of each node's log, by slot (for a failure's
        report; Ray also keeps every actor's output in its log files)."""
        actors = dict(self.server_actors, manager=self.manager_actor)
        refs = {slot: a.log.remote() for slot, a in actors.items()}
        out: Dict[str, List[str]] = {}
        for slot, ref in refs.items():
            try:
                out[slot] = ray.get(ref, timeout=10)
            except Exception as e:  # a dead or restarting actor
                out[slot] = [f"(no log: {e})"]
        return out

    def drain(self, node_id: int, timeout: float = 120.0) -> None:
        """Drains server ``node_id`` (``pserver drain``: its ranges are
        handed to the other servers while requests go on, then it exits)
        and removes its actor; Ray does not restart a drained server."""
        slot = next((s for s, n in self.server_ids().items() if n == node_id), None)
        if slot is None:
            raise KeyError(f"no server {node_id} in this cluster")
        if len(self.server_actors) < 2:
            raise RayError("cannot drain the cluster's last server")
        _get(self.registry.put.remote(slot, {"drained": True}), 30, "the cluster's registry")
        out = subprocess.run(
            [self.binary, "drain", "--manager", self.manager, str(node_id),
             "--timeout-s", str(int(timeout)), *self.flags],
            capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            _get(self.registry.put.remote(slot, {"drained": False}), 30, "the cluster's registry")
            raise RayError(f"draining server {node_id}: {error_of(out.stderr.splitlines())}")
        _stop_all([self.server_actors.pop(slot)])

    def status(self) -> Dict[str, Any]:
        """The cluster map as ``pserver status --json`` shows it (nodes with
        their state, address and ranges; tables; epoch)."""
        out = subprocess.run(
            [self.binary, "status", "--manager", self.manager, "--json", *self.flags],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RayError(f"pserver status: {error_of(out.stderr.splitlines())}")
        return json.loads(out.stdout)

    def submit(self, workers: int = 2, *, job: Optional[str] = None, wait: bool = True,
               timeout: float = 600.0, **options: Any):
        """Runs a training job on this cluster: ``workers`` ``pserver
        worker --exit-after-jobs 1`` actors and the job's scheduler
        (``pserver train --remote-workers N --wait-servers S``) as another.
        ``options`` are ``pserver train``'s flags (``epochs=5``,
        ``algo="ftrl"``, ``train="/data/part-*.gz"``, ...; without data
        flags, the bundled flights data). Returns its :class:`JobResult`,
        or with ``wait=False`` a :class:`Job` at once."""
        if self.closed:
            raise RayError("this cluster was shut down")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        for reserved in ("manager", "remote_workers", "report", "job", "wait_servers"):
            if reserved in options:
                raise ValueError(f"{reserved}= is set by the cluster, not an option of submit()")
        self._counter += 1
        name = job or f"ray-{self.token[:8]}-{self._counter}"
        extra = [
            "--remote-workers", str(workers), "--job", name,
            "--wait-servers", str(len(self.server_actors)),
        ] + option_flags(options)
        j = Job(self, name, workers, extra, timeout)
        self._jobs.append(j)
        return j.result() if wait else j

    def shutdown(self) -> None:
        """Stops every job, server and the manager (their processes with
        them) and kills their actors."""
        if self.closed:
            return
        self.closed = True
        for j in self._jobs:
            j.cancel()
        actors = list(self.server_actors.values()) + [self.manager_actor]
        _stop_all(actors)
        try:
            ray.kill(self.registry, no_restart=True)
        except Exception:  # already gone
            pass


def _stop_all(actors: Sequence[Any]) -> None:
    """Stops each actor's child, then kills the actor (no restart)."""
    refs = []
    for a in actors:
        try:
            refs.append(a.stop.remote())
        except Exception:
            pass
    try:
        ray.wait(refs, num_returns=len(refs), timeout=20)
    except Exception:
        pass
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass


class Job:
    """A training job submitted to a :class:`Cluster`: its workers and
    scheduler run as actors; :meth:`result` waits for its end."""

    def __init__(self, cluster: Cluster, name: str, workers: int, extra: List[str], timeout: float):
        self.cluster = cluster
        #: The job's name (its worker group and table).
        self.name = name
        self.timeout = timeout
        self._started = time.monotonic()
        self._result: Optional[JobResult] = None
        self._done = False
        opts = _actor_options(cluster.worker_cpus, cluster.worker_resources, 0, True)
        common = dict(binary=cluster.binary, manager=cluster.manager, host=cluster.host,
                      flags=cluster.flags, env=cluster.env, token=cluster.token)
        self.worker_actors = [
            NodeActor.options(**opts).remote(
                "worker", slot=f"{name}-worker-{i}", extra=["--exit-after-jobs", "1"], **common
            )
            for i in range(workers)
        ]
        try:
            # The workers register as idle before the scheduler looks.
            _get([w.info.remote() for w in self.worker_actors], 120, f"job {name}: its workers")
            self.scheduler = NodeActor.options(num_cpus=0, max_restarts=0).remote(
                "train", slot=f"{name}-scheduler", extra=extra, **common
            )
            _get(self.scheduler.info.remote(), 120, f"job {name}: its scheduler")
        except BaseException:
            self.cancel()
            raise

    def result(self, timeout: Optional[float] = None) -> JobResult:
        """Waits for the job (up to ``timeout`` seconds, else the time left
        of the ``timeout`` it was submitted with) and returns its
        :class:`JobResult`; :class:`JobFailed` if the scheduler failed or
        it did not finish in time (its actors are stopped then)."""
        if self._result is not None:
            return self._result
        if self._done:
            raise JobFailed(f"job {self.name} was cancelled")
        left = self.timeout - (time.monotonic() - self._started)
        limit = max(1.0, left if timeout is None else timeout)
        try:
            end = _get(self.scheduler.wait.remote(limit), limit + 30, f"job {self.name}")
        except RayError as e:
            self.cancel()
            raise JobFailed(str(e)) from None
        if end is None:
            self.cancel()
            total = self.timeout if timeout is None else limit
            raise JobFailed(f"job {self.name} did not finish within {total:.0f} s")
        try:
            if end["returncode"] != 0:
                raise JobFailed(f"job {self.name} failed: {error_of(end['stderr'])}")
            if end["report"] is None:
                raise JobFailed(f"job {self.name}: its scheduler wrote no report")
            self._result = result_of(self.name, end["report"], end["stdout"])
            # Workers leave once the job finished; give them a moment.
            ray.wait([w.wait.remote(30) for w in self.worker_actors],
                     num_returns=len(self.worker_actors), timeout=35)
            return self._result
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stops the job's worker and scheduler actors and their processes."""
        if self._done:
            return
        self._done = True
        actors = list(self.worker_actors)
        if getattr(self, "scheduler", None) is not None:
            actors.append(self.scheduler)
        _stop_all(actors)


def start(
    servers: int = 2,
    replicas: int = 0,
    *,
    binary: Optional[str] = None,
    host: str = "127.0.0.1",
    flags: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
    manager_args: Sequence[str] = (),
    server_args: Sequence[str] = (),
    lease_ms: Optional[int] = None,
    server_cpus: float = 0,
    server_resources: Optional[Mapping[str, float]] = None,
    worker_cpus: float = 0,
    worker_resources: Optional[Mapping[str, float]] = None,
    max_restarts: int = -1,
    spread: bool = True,
) -> Cluster:
    """Starts a cluster on Ray: a manager actor (``--state`` in a
    temporary directory of its node) and ``servers`` server actors with
    ``--replicas replicas``, each restarted by Ray up to ``max_restarts``
    times (-1: always) and rejoining under its id. ``binary``: the
    ``pserver`` binary (see :func:`find_binary`); ``host``: the address
    every node listens on (``"node"``: its Ray node's); ``flags``: the
    security flags every process gets (``["--secret-file", PATH]``);
    ``env``: variables for every process (``RUST_LOG``, ...);
    ``manager_args`` / ``server_args``: more flags of those roles;
    ``lease_ms``: the manager's ``--lease-ms``; ``server_cpus`` and
    ``server_resources``: what each server asks Ray for (placement; 0
    CPUs by default, so that a cluster and its job fit any Ray instance,
    since the processes, not the actors, do the work), and
    ``worker_cpus`` / ``worker_resources`` the same for a job's workers.
    Calls ``ray.init()`` if Ray is not initialized."""
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise ValueError(f"servers must be a positive int, got {servers!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"replicas must be a non-negative int, got {replicas!r}")
    if replicas >= servers:
        raise ValueError(
            f"replicas={replicas} needs more than {replicas} servers (each range is kept on "
            f"replicas + 1 of them), got servers={servers}"
        )
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < -1:
        raise ValueError(f"max_restarts must be -1 (always) or >= 0, got {max_restarts!r}")
    path = find_binary(binary)
    if not ray.is_initialized():
        ray.init()
    token = uuid.uuid4().hex
    common = dict(binary=path, host=host, flags=list(flags), env=dict(env or {}), token=token)
    registry_name = f"pserver-registry-{token}"
    registry = _Registry.options(num_cpus=0, name=registry_name).remote()
    margs = ["--replicas", str(replicas)] + list(manager_args)
    if lease_ms is not None:
        margs += ["--lease-ms", str(int(lease_ms))]
    manager_actor = NodeActor.options(num_cpus=0, max_restarts=max_restarts, max_task_retries=0).remote(
        "manager", slot="manager", registry=registry_name, extra=margs, **common
    )
    server_actors: Dict[str, Any] = {}
    try:
        manager = _get(manager_actor.info.remote(), 120, "starting the manager")["addr"]
        opts = _actor_options(server_cpus, server_resources, max_restarts, spread)
        for i in range(servers):
            server_actors[f"server-{i}"] = NodeActor.options(**opts).remote(
                "server", slot=f"server-{i}", registry=registry_name, manager=manager,
                extra=list(server_args), **common
            )
        _get([a.info.remote() for a in server_actors.values()], 120, "starting the servers")
    except BaseException:
        _stop_all(list(server_actors.values()) + [manager_actor])
        try:
            ray.kill(registry, no_restart=True)
        except Exception:
            pass
        raise
    return Cluster(path, token, registry, manager_actor, manager, server_actors, host,
                   list(flags), dict(env or {}), worker_cpus, worker_resources)


def train(
    servers: int = 2,
    workers: int = 2,
    replicas: int = 0,
    *,
    binary: Optional[str] = None,
    timeout: float = 600.0,
    start_options: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> JobResult:
    """Trains the bundled job (or the one ``options`` describe: ``pserver
    train``'s flags as keywords) on a cluster started on Ray for it
    (``servers``, ``replicas``, and :func:`start`'s other arguments in
    ``start_options``) with ``workers`` worker actors; shuts the cluster
    down and returns the :class:`JobResult` (``auc``, ``logloss``, ...)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    cluster = start(servers, replicas, binary=binary, **dict(start_options or {}))
    try:
        return cluster.submit(workers, timeout=timeout, **options)
    finally:
        cluster.shutdown()
