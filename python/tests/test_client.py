"""The client against real processes: round trips checked against
`pserver kv`'s view of the same tables, the async forms, sort=True,
pull_range, clocks and barriers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pserver


def test_push_pull_round_trip_matches_kv(cluster, client, table_name):
    spec = client.create_table(table_name, dim=3, updater="add")
    assert spec["name"] == table_name and spec["dim"] == 3 and spec["updater"] == "add"
    # Keys spread over the key space, so both servers hold some.
    keys = np.array([1, 5, 9, 2**40, 2**63 + 7], dtype=np.uint64)
    vals = np.arange(15, dtype=np.float32).reshape(5, 3) / 4
    assert client.push(table_name, keys, vals) is None
    got = client.pull(table_name, keys)
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_array_equal(got, vals)

    # The command line reads the same values...
    seen = cluster.kv_pull(table_name, keys=keys)
    for k, row in zip(keys, vals):
        assert np.array_equal(np.float32(seen[int(k)]), row), (k, seen[int(k)], row)

    # ... and Python reads what the command line pushes (add: summed).
    cluster.kv("push", table_name, "--keys", "5,9", "--values", "1,1,1,2,2,2")
    got = client.pull(table_name, np.array([5, 9], dtype=np.uint64))
    np.testing.assert_array_equal(got, vals[1:3] + np.array([[1], [2]], dtype=np.float32))


def test_unpushed_keys_read_their_init(client, table_name):
    client.create_table(table_name, dim=2, updater="assign", init="uniform:0.5:7")
    keys = np.array([3, 4], dtype=np.uint64)
    first = client.pull(table_name, keys)
    assert np.all(np.abs(first) <= 0.5) and np.any(first != 0)
    # Derived from (seed, key): the same whenever read.
    np.testing.assert_array_equal(client.pull(table_name, keys), first)


def test_push_pull_returns_the_updated_rows(cluster, client, table_name):
    client.create_table(table_name, dim=2, updater={"type": "sgd", "lr": 0.5})
    keys = np.array([10, 20], dtype=np.uint64)
    got = client.push_pull(table_name, keys, np.array([[1, 2], [3, 4]], dtype=np.float32))
    np.testing.assert_allclose(got, [[-0.5, -1.0], [-1.5, -2.0]])
    seen = cluster.kv_pull(table_name, keys=keys)
    assert seen == {10: [-0.5, -1.0], 20: [-1.5, -2.0]}


def test_updaters_as_dicts_apply_on_the_servers(client, table_name):
    client.create_table(table_name, dim=1, updater={"type": "adagrad", "lr": 1.0, "eps": 1e-6})
    k = np.array([1], dtype=np.uint64)
    client.push(table_name, k, np.array([[2.0]], dtype=np.float32))
    # n = 4, w -= 1 * 2 / (2 + eps)
    np.testing.assert_allclose(client.pull(table_name, k), [[-1.0]], rtol=1e-5)
    ftrl = client.create_table(table_name + "_f", dim=1, updater={"type": "ftrl", "alpha": 0.1, "l1": 1.0})
    assert ftrl["updater"] == "ftrl"


def test_pull_range_is_dense(cluster, client, table_name):
    client.create_table(table_name, dim=2, updater="assign")
    client.push(table_name, np.array([3, 6], dtype=np.uint64), np.array([[1, 2], [3, 4]], dtype=np.float32))
    got = client.pull_range(table_name, 2, 8)
    assert got.shape == (6, 2)
    expect = np.zeros((6, 2), dtype=np.float32)
    expect[1] = [1, 2]
    expect[4] = [3, 4]
    np.testing.assert_array_equal(got, expect)
    seen = cluster.kv_pull(table_name, range_=(2, 8))
    np.testing.assert_array_equal(np.array([seen[k] for k in range(2, 8)], dtype=np.float32), got)


def test_sort_true_sorts_deduplicates_and_sums(cluster, client, table_name):
    client.create_table(table_name, dim=2, updater="add")
    keys = np.array([9, 1, 9, 4, 1, 9], dtype=np.uint64)
    vals = np.array([[1, 0], [0, 1], [2, 0], [5, 5], [0, 2], [4, 0]], dtype=np.float32)
    with pytest.raises(pserver.NotSorted):
        client.push(table_name, keys, vals)
    client.push(table_name, keys, vals, sort=True)
    assert cluster.kv_pull(table_name, keys=[1, 4, 9]) == {1: [0, 3], 4: [5, 5], 9: [7, 0]}
    # A pull with sort=True gives each key's row in the order asked.
    got = client.pull(table_name, np.array([9, 1, 9, 4], dtype=np.uint64), sort=True)
    np.testing.assert_array_equal(got, [[7, 0], [0, 3], [7, 0], [5, 5]])
    client.next_clock()
    got = client.push_pull(
        table_name, np.array([4, 1, 4], dtype=np.uint64), np.ones((3, 2), dtype=np.float32), sort=True
    )
    np.testing.assert_array_equal(got, [[7, 7], [1, 4], [7, 7]])


def test_keys_and_values_of_other_types_are_converted(client, table_name):
    client.create_table(table_name, dim=1, updater="assign")
    # A list of ints, float64 values, a 1-D array for a dim-1 table.
    client.push(table_name, [1, 2, 3], np.array([0.5, 1.5, 2.5]))
    got = client.pull(table_name, np.array([1, 2, 3], dtype=np.int64))
    np.testing.assert_array_equal(got[:, 0], [0.5, 1.5, 2.5])
    client.next_clock()
    # Non-contiguous views are copied in row order.
    wide = np.arange(12, dtype=np.float32).reshape(3, 4)
    client.push(table_name, [4, 5, 6], wide[:, 1:2])
    np.testing.assert_array_equal(client.pull(table_name, [4, 5, 6])[:, 0], [1, 5, 9])
    assert client.pull(table_name, np.empty(0, dtype=np.uint64)).shape == (0, 1)


def test_async_forms(client, table_name):
    client.create_table_async(table_name, 4, "add").wait()
    keys = np.arange(0, 1000, 7, dtype=np.uint64)
    ones = np.ones((keys.size, 4), dtype=np.float32)
    pushes = []
    for _ in range(20):
        # One push per clock: each is made at the clock current when called.
        pushes.append(client.push_async(table_name, keys, ones))
        client.next_clock()
    assert all(f.wait() is None for f in pushes)
    assert all(f.done() for f in pushes)
    pull = client.pull_async(table_name, keys)
    rows = pull.wait()
    np.testing.assert_array_equal(rows, np.full((keys.size, 4), 20, dtype=np.float32))
    # wait() again gives the same result.
    np.testing.assert_array_equal(pull.wait(), rows)
    pp = client.push_pull_async(table_name, keys, ones).wait()
    np.testing.assert_array_equal(pp, rows + 1)
    assert client.pull_range_async(table_name, 0, 8).wait().shape == (8, 4)
    assert client.table_async(table_name).wait()["dim"] == 4
    assert client.barrier_async("async-forms").wait() is None


def test_large_pull_comes_back_as_one_array(client, table_name):
    client.create_table(table_name, dim=8, updater="assign")
    keys = np.arange(1, 200_001, dtype=np.uint64) * 1_000_003
    vals = np.random.default_rng(1).standard_normal((keys.size, 8)).astype(np.float32)
    client.push(table_name, keys, vals)
    t = time.perf_counter()
    got = client.pull(table_name, keys)
    took = time.perf_counter() - t
    np.testing.assert_array_equal(got, vals)
    assert got.flags.c_contiguous and got.flags.writeable
    print(f"pull of {keys.size} keys x 8: {took * 1000:.1f} ms")


def test_wait_releases_the_gil_and_times_out(cluster, table_name):
    """A pull of a sequential table waits for the other worker's push: the
    wait times out first (the call goes on), other Python threads run
    while it blocks, and the push lets it finish."""
    with pserver.Client(cluster.manager, timeout=30) as a, pserver.Client(cluster.manager, timeout=30) as b:
        a.create_table(table_name, dim=1, updater="add", consistency="sequential")
        keys = np.array([1], dtype=np.uint64)
        one = np.ones((1, 1), dtype=np.float32)
        a.push(table_name, keys, one)  # a pushed clock 1; b has not
        pending = a.pull_async(table_name, keys)
        with pytest.raises(TimeoutError):
            pending.wait(timeout=0.3)
        assert not pending.done()

        ticks = [0]
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                ticks[0] += 1

        spinner = threading.Thread(target=spin)
        spinner.start()
        before = ticks[0]
        with pytest.raises(TimeoutError):
            pending.wait(timeout=0.3)
        assert ticks[0] - before > 1000, "the spinning thread did not run while wait() blocked"
        stop.set()
        spinner.join()

        b.push(table_name, keys, one)
        np.testing.assert_array_equal(pending.wait(timeout=20), [[2.0]])


def test_one_push_per_clock(cluster, client, table_name):
    client.create_table(table_name, dim=1, updater="add")
    k = np.array([1, 2**63], dtype=np.uint64)
    one = np.ones((2, 1), dtype=np.float32)
    client.push(table_name, k, one)
    with pytest.raises(pserver.Duplicate, match="already pushed clock 1") as e:
        client.push(table_name, k, one)
    assert e.value.code == "Duplicate"
    client.next_clock()
    client.push(table_name, k, one)
    assert cluster.kv_pull(table_name, keys=k) == {1: [2.0], 2**63: [2.0]}


def test_clocks(client):
    assert client.clock == 1
    assert client.next_clock() == 2
    client.set_clock(10)
    assert client.clock == 10
    assert client.next_clock() == 11
    with pytest.raises(ValueError):
        client.set_clock(-1)


def test_barrier_waits_for_every_worker(cluster):
    with pserver.Client(cluster.manager) as a, pserver.Client(cluster.manager) as b:
        first = a.barrier_async("b1")
        time.sleep(0.3)
        assert not first.done()
        b.barrier("b1")
        assert first.wait(timeout=20) is None


def test_bounded_delay_between_two_workers(cluster, table_name):
    with pserver.Client(cluster.manager) as a, pserver.Client(cluster.manager) as b:
        a.create_table(table_name, dim=1, updater="add", consistency="bounded:1")
        k = np.array([5], dtype=np.uint64)
        one = np.ones((1, 1), dtype=np.float32)
        for c in (a, b):
            c.push(table_name, k, one)  # clock 1
        a.next_clock()
        a.push(table_name, k, one)  # clock 2
        a.next_clock()
        # At clock 3 a pull needs every worker's clock 2: b's is missing.
        pending = a.pull_async(table_name, k)
        with pytest.raises(TimeoutError):
            pending.wait(timeout=0.3)
        b.next_clock()
        b.push(table_name, k, one)
        np.testing.assert_array_equal(pending.wait(timeout=20), [[4.0]])


def test_repr_and_context(cluster):
    c = pserver.Client(cluster.manager, role="client")
    assert "node" in repr(c) and c.manager == cluster.manager and c.id > 0
    with c:
        pass
    assert c.closed and "closed" in repr(c)


def test_the_readme_example_runs(cluster):
    """The README's Python example, against this cluster."""
    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python\n") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert "127.0.0.1:7070" in code
    scope = {}
    exec(compile(code.replace("127.0.0.1:7070", cluster.manager), "README.md", "exec"), scope)
    # AdaGrad's first step is lr (0.05) whatever the gradient; init within 0.01.
    rows = scope["rows"]
    assert rows.shape == (3, 4) and np.all(np.abs(rows + 0.05) <= 0.0101), rows
    dense = scope["dense"]
    assert dense.shape == (64, 4) and np.all(np.abs(dense) <= 0.12)
    # Keys 3 and 42 took a second step; 7 did not.
    assert np.all(dense[[3, 42]] < rows[[0, 2]]) and np.array_equal(dense[7], rows[1])


def test_a_signal_interrupts_a_wait(cluster, table_name):
    """A signal handler's exception (Ctrl-C's KeyboardInterrupt, here an
    alarm's) ends a blocked wait within its 100 ms slice; the call goes on
    and can be waited for again."""
    import signal

    class Alarm(Exception):
        pass

    def ring(*_):
        raise Alarm()

    with pserver.Client(cluster.manager, timeout=30) as a, pserver.Client(cluster.manager, timeout=30) as b:
        a.create_table(table_name, dim=1, updater="add", consistency="sequential")
        k = np.array([1], dtype=np.uint64)
        one = np.ones((1, 1), dtype=np.float32)
        a.push(table_name, k, one)
        pending = a.pull_async(table_name, k)  # waits for b's clock 1
        old = signal.signal(signal.SIGALRM, ring)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t = time.monotonic()
            with pytest.raises(Alarm):
                pending.wait()
            assert time.monotonic() - t < 2.0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        b.push(table_name, k, one)
        np.testing.assert_array_equal(pending.wait(timeout=20), [[2.0]])


def test_threads_share_a_client(client, table_name):
    client.create_table(table_name, dim=2, updater="assign")
    keys = np.arange(1, 5001, dtype=np.uint64) * 7919
    vals = np.stack([keys.astype(np.float32), -keys.astype(np.float32)], axis=1)
    client.push(table_name, keys, vals)
    errors = []

    def reader(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(50):
                pick = np.unique(rng.choice(keys, size=100))
                np.testing.assert_array_equal(client.pull(table_name, pick), vals[np.searchsorted(keys, pick)])
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_requests_at_a_given_clock(cluster, table_name):
    """``clock=`` sends one request at that clock without moving the
    client's: under sequential consistency a pull at clock 0 never waits,
    and one at clock 1 waits for every worker's push of clock 1."""
    with pserver.Client(cluster.manager, timeout=30) as a, pserver.Client(cluster.manager, timeout=30) as b:
        a.create_table(table_name, dim=1, updater="add", consistency="sequential")
        k = np.array([4], dtype=np.uint64)
        one = np.ones((1, 1), dtype=np.float32)
        a.push(table_name, k, one)  # clock 1
        np.testing.assert_array_equal(a.pull(table_name, k, clock=0), [[1.0]])
        pending = a.pull_async(table_name, k, clock=1)
        with pytest.raises(TimeoutError):
            pending.wait(timeout=0.3)
        b.push(table_name, k, one, clock=3)
        assert b.clock == 1
        np.testing.assert_array_equal(pending.wait(timeout=20), [[2.0]])
        # b's clock 3 is taken; its clock 1 is still free.
        with pytest.raises(pserver.Duplicate):
            b.push(table_name, k, one, clock=3)
        b.push_pull(table_name, k, one, clock=1)
        with pytest.raises(TypeError, match="clock must be an int"):
            a.pull(table_name, k, clock=1.5)
        with pytest.raises(ValueError, match="out of range"):
            a.push(table_name, k, one, clock=-1)
