"""Every error path raises its exception, with the server's message where a
server refused; none crashes the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import pserver


def u64(*keys):
    return np.array(keys, dtype=np.uint64)


def test_unknown_table(client):
    with pytest.raises(pserver.UnknownTable, match="nosuch"):
        client.pull("nosuch", u64(1))
    with pytest.raises(pserver.UnknownTable):
        client.push("nosuch", u64(1), np.ones((1, 1), dtype=np.float32))
    with pytest.raises(pserver.UnknownTable):
        client.table("nosuch")
    # Also a KeyError, and its message is not quoted like one.
    with pytest.raises(KeyError) as e:
        client.pull_range("nosuch", 0, 4)
    assert str(e.value).startswith("no table named")


def test_wrong_width_carries_the_servers_message(client, table_name):
    client.create_table(table_name, dim=3, updater="add")
    with pytest.raises(pserver.WrongWidth) as e:
        client.push(table_name, u64(1, 2), np.ones((2, 2), dtype=np.float32))
    assert e.value.code == "WrongWidth"
    assert "refused" in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, pserver.Error)
    # Rows that do not match the keys are refused before sending.
    with pytest.raises(pserver.WrongWidth, match="do not fit 2 keys"):
        client.push(table_name, u64(1, 2), np.ones((3, 3), dtype=np.float32))
    with pytest.raises(pserver.WrongWidth):
        client.push(table_name, u64(1, 2), np.ones((2, 3, 1), dtype=np.float32))
    # Nothing was applied.
    np.testing.assert_array_equal(client.pull(table_name, u64(1, 2)), np.zeros((2, 3)))


def test_not_sorted(client, table_name):
    client.create_table(table_name, dim=1)
    one = np.ones((2, 1), dtype=np.float32)
    with pytest.raises(pserver.NotSorted, match=r"keys\[1\] = 1 follows 5"):
        client.push(table_name, u64(5, 1), one)
    with pytest.raises(pserver.NotSorted):
        client.push(table_name, u64(3, 3), one)
    with pytest.raises(pserver.NotSorted):
        client.pull(table_name, u64(2, 1))
    with pytest.raises(pserver.NotSorted):
        client.push_pull_async(table_name, u64(2, 1), one).wait()


def test_not_finite(client, table_name):
    client.create_table(table_name, dim=1)
    with pytest.raises(pserver.NotFinite) as e:
        client.push(table_name, u64(1, 2), np.array([[1.0], [np.nan]], dtype=np.float32))
    assert e.value.code == "NotFinite"
    # The push's other ranges took clock 1 (a push covers every range):
    # the next push goes at the next clock.
    client.next_clock()
    with pytest.raises(pserver.NotFinite):
        client.push(table_name, u64(1), np.array([[np.inf]], dtype=np.float32))


def test_reserved_key(client, table_name):
    client.create_table(table_name, dim=1)
    with pytest.raises(pserver.InvalidRequest, match="reserved"):
        client.pull(table_name, u64(2**64 - 1))


def test_bad_keys_and_values_are_type_or_value_errors(client, table_name):
    client.create_table(table_name, dim=1)
    with pytest.raises(TypeError, match="uint64"):
        client.pull(table_name, np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        client.pull(table_name, np.array([-1, 2]))
    with pytest.raises(ValueError, match="1-D"):
        client.pull(table_name, np.array([[1, 2]], dtype=np.uint64))
    with pytest.raises(TypeError, match="float32"):
        client.push(table_name, u64(1), np.array([["x"]]))
    with pytest.raises(ValueError, match="empty"):
        client.pull_range(table_name, 5, 5)
    with pytest.raises(ValueError):
        client.pull_range(table_name, -1, 5)


@pytest.mark.parametrize(
    "kwargs, kind, words",
    [
        ({"updater": "rmsprop"}, ValueError, "not one of"),
        ({"updater": {"type": "sgd", "momentum": 0.9}}, ValueError, "momentum"),
        ({"updater": {"type": "sgd", "lr": -1.0}}, ValueError, "lr must be"),
        ({"updater": {"type": "sgd", "lr": "fast"}}, TypeError, "number"),
        ({"updater": {"lr": 0.1}}, ValueError, "type"),
        ({"updater": 3}, TypeError, "string or a dict"),
        ({"consistency": "soon"}, ValueError, "bounded:N"),
        ({"consistency": -2}, ValueError, "negative"),
        ({"consistency": 1.5}, TypeError, "string or an int"),
        ({"init": "normal"}, ValueError, "uniform"),
        ({"init": {"type": "uniform"}}, ValueError, "scale"),
        ({"init": {"type": "uniform", "scale": -1.0}}, ValueError, "scale"),
        ({"dim": 0}, ValueError, "dim"),
        ({"dim": 5000}, ValueError, "dim"),
        ({"dim": 1.0}, TypeError, "int"),
        ({"name": "a b"}, ValueError, "invalid"),
    ],
)
def test_bad_specs(client, table_name, kwargs, kind, words):
    args = {"name": table_name, "dim": 2, **kwargs}
    with pytest.raises(kind, match=words):
        client.create_table(**args)


def test_specs_parse_like_the_command_line(client, table_name):
    s = client.create_table(table_name, 1, consistency=3, init={"type": "uniform", "scale": 0.1, "seed": 4})
    assert s["consistency"] == "bounded(3)" and s["init"] == "uniform:0.1:4"
    assert client.create_table(table_name + "_s", 1, consistency="bounded:0")["consistency"] == "sequential"
    assert client.create_table(table_name + "_e", 1, consistency="eventual")["consistency"] == "eventual"


def test_a_different_spec_for_an_existing_table_is_refused(client, table_name):
    client.create_table(table_name, dim=2, updater="add")
    # The same spec again is fine.
    client.create_table(table_name, dim=2, updater="add")
    with pytest.raises(pserver.Error, match=table_name):
        client.create_table(table_name, dim=3, updater="add")


def test_connecting_nowhere(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(pserver.ConnectError, match="cannot connect"):
        pserver.Client(f"127.0.0.1:{port}", connect_timeout=5)
    with pytest.raises(ConnectionError):
        pserver.Client(f"127.0.0.1:{port}", connect_timeout=5)
    with pytest.raises(ValueError, match="role"):
        pserver.Client(f"127.0.0.1:{port}", role="boss")
    with pytest.raises(ValueError, match="timeout"):
        pserver.Client(f"127.0.0.1:{port}", timeout=0)


def test_a_silent_manager_times_out():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # accepts, never answers
    try:
        with pytest.raises(pserver.ConnectError, match="within 1 s"):
            pserver.Client("127.0.0.1:%d" % s.getsockname()[1], connect_timeout=1)
    finally:
        s.close()


def test_closed_client(cluster, table_name):
    c = pserver.Client(cluster.manager)
    c.create_table(table_name, dim=1)
    c.close()
    c.close()
    with pytest.raises(pserver.ClientClosed):
        c.pull(table_name, u64(1))
    with pytest.raises(pserver.ClientClosed):
        c.next_clock()


def test_waiting_twice_at_once_and_bad_timeouts(client, table_name):
    client.create_table(table_name, dim=1)
    f = client.pull_async(table_name, u64(1))
    with pytest.raises(ValueError, match="timeout"):
        f.wait(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        f.wait(timeout=float("nan"))
    np.testing.assert_array_equal(f.wait(), [[0.0]])


def test_a_forked_child_is_told_to_make_its_own_client(client, table_name):
    import os

    client.create_table(table_name, dim=1)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            import signal

            signal.alarm(20)
            try:
                client.pull(table_name, u64(1))
            except pserver.Error as e:
                code = 0 if "fork" in str(e) else 2
            client.close()  # harmless: the parent's runtime is not touched
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    # The parent's client still works.
    np.testing.assert_array_equal(client.pull(table_name, u64(1)), [[0.0]])


def test_edge_sizes(client, table_name):
    client.create_table(table_name, dim=2)
    empty = np.empty(0, dtype=np.uint64)
    assert client.pull(table_name, empty).shape == (0, 2)
    client.push(table_name, empty, np.empty((0, 2), dtype=np.float32))
    with pytest.raises(pserver.Error):
        client.pull_range(table_name, 0, 2**62)
    with pytest.raises(TypeError):
        client.pull(table_name, [2**65])
    with pytest.raises(OverflowError):
        client.set_clock(2**70)
