"""Round trips and throughput through the Python client, against one
server process on loopback: ``python python/bench.py PSERVER_BINARY``
(build the module and the binary with the release profile to measure
anything). Not a test: prints its figures."""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
os.environ["PSERVER_BIN"] = sys.argv[1]
from conftest import Cluster
import numpy as np, pserver
c = Cluster(Path(tempfile.mkdtemp()), servers=1)
try:
    cl = pserver.Client(c.manager)
    cl.create_table("t", 1, updater="assign")
    k1 = np.array([7], dtype=np.uint64); v1 = np.ones((1,1), np.float32)
    for _ in range(200): cl.pull("t", k1)
    lat = []
    for _ in range(3000):
        t = time.perf_counter(); cl.pull("t", k1); lat.append(time.perf_counter() - t)
    lat.sort(); print(f"1-key pull p50 {lat[len(lat)//2]*1e6:.0f} us p99 {lat[int(len(lat)*.99)]*1e6:.0f} us")
    lat = []
    for _ in range(3000):
        t = time.perf_counter(); cl.push("t", k1, v1); cl.next_clock(); lat.append(time.perf_counter() - t)
    lat.sort(); print(f"1-key push p50 {lat[len(lat)//2]*1e6:.0f} us")
    # 32 in flight
    t = time.perf_counter(); n = 0
    while time.perf_counter() - t < 1.0:
        fs = [cl.pull_async("t", k1) for _ in range(32)]
        for f in fs: f.wait()
        n += 32
    print(f"1-key pulls, 32 in flight: {n / (time.perf_counter() - t):.0f} req/s")
    rng = np.random.default_rng(0)
    for nk in (65536, 1048576):
        keys = np.unique(rng.integers(0, 2**63, size=nk, dtype=np.uint64))
        vals = np.ones((keys.size, 1), np.float32)
        cl.push("t", keys, vals); cl.next_clock()
        for name, fn in (("push", lambda: (cl.push("t", keys, vals), cl.next_clock())), ("pull", lambda: cl.pull("t", keys)), ("push_pull", lambda: (cl.push_pull("t", keys, vals), cl.next_clock()))):
            reps = []
            for _ in range(5):
                t = time.perf_counter(); fn(); reps.append(time.perf_counter() - t)
            reps.sort()
            print(f"{keys.size} keys {name}: {keys.size / reps[2] / 1e6:.1f}M keys/s (median of 5)")
    keys = np.unique(rng.integers(0, 2**63, size=1048576, dtype=np.uint64))
    t = time.perf_counter()
    for _ in range(5): k, v, _ = pserver._summed(np.concatenate([keys, keys[:1000]]), np.ones((keys.size + 1000, 1), np.float32))
    print(f"sort=True prep of 1M keys: {(time.perf_counter() - t) / 5 * 1000:.0f} ms")
finally:
    c.stop()
