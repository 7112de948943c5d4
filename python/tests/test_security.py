"""The cluster secret and TLS from Python, against clusters started with
the command line's flags."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import pserver
from conftest import Cluster, pserver_bin

SECRET = "correct horse battery staple\n"


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("secrets")
    (d / "secret").write_text(SECRET)
    (d / "wrong").write_text("incorrect horse battery staple\n")
    (d / "short").write_text("tiny\n")
    return d


@pytest.fixture(scope="module")
def secure(tmp_path_factory, secret_files):
    c = Cluster(tmp_path_factory.mktemp("secure"), flags=["--secret-file", str(secret_files / "secret")])
    yield c
    c.stop()


def test_the_right_secret_gets_in(secure, secret_files):
    with pserver.Client(secure.manager, secret_file=secret_files / "secret") as c:
        c.create_table("s", dim=1, updater="add")
        c.push("s", np.array([1, 2], dtype=np.uint64), np.array([[0.5], [1.0]], dtype=np.float32))
        np.testing.assert_array_equal(c.pull("s", np.array([1, 2], dtype=np.uint64)), [[0.5], [1.0]])
    assert secure.kv_pull("s", keys=[1, 2]) == {1: [0.5], 2: [1.0]}


def test_a_wrong_secret_is_an_auth_error(secure, secret_files):
    with pytest.raises(pserver.AuthError, match="secret") as e:
        pserver.Client(secure.manager, secret_file=str(secret_files / "wrong"))
    assert isinstance(e.value, pserver.ConnectError)


def test_no_secret_is_an_auth_error(secure):
    with pytest.raises(pserver.AuthError, match="secret"):
        pserver.Client(secure.manager)


def test_unreadable_or_short_secret_files(secure, secret_files):
    with pytest.raises(pserver.AuthError, match="cannot read the cluster secret"):
        pserver.Client(secure.manager, secret_file=secret_files / "missing")
    with pytest.raises(pserver.AuthError, match="at least 16"):
        pserver.Client(secure.manager, secret_file=secret_files / "short")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    out = subprocess.run(
        [pserver_bin(), "certs", str(d / "a")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [pserver_bin(), "certs", str(d / "b")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return d


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs, secret_files):
    a = certs / "a"
    flags = [
        "--tls-cert", str(a / "node.pem"),
        "--tls-key", str(a / "node.key"),
        "--tls-ca", str(a / "ca.pem"),
        "--secret-file", str(secret_files / "secret"),
    ]
    c = Cluster(tmp_path_factory.mktemp("tls"), flags=flags)
    yield c
    c.stop()


def test_tls_with_the_secret(tls_cluster, certs, secret_files):
    a = certs / "a"
    forms = [
        a,  # the directory `pserver certs` wrote
        {"cert": a / "node.pem", "key": a / "node.key", "ca": a / "ca.pem"},
        (str(a / "node.pem"), str(a / "node.key"), str(a / "ca.pem")),
    ]
    for i, tls in enumerate(forms):
        with pserver.Client(tls_cluster.manager, secret_file=secret_files / "secret", tls=tls) as c:
            c.create_table("t", dim=2, updater="add")
            c.push("t", np.array([7], dtype=np.uint64), np.array([[1, 2]], dtype=np.float32))
            np.testing.assert_array_equal(
                c.pull("t", np.array([7], dtype=np.uint64)), [[i + 1, 2 * (i + 1)]]
            )
    assert tls_cluster.kv_pull("t", keys=[7]) == {7: [3.0, 6.0]}


def test_tls_refusals(tls_cluster, certs, secret_files):
    secret = secret_files / "secret"
    # The secret alone does not get through TLS.
    with pytest.raises(pserver.ConnectError):
        pserver.Client(tls_cluster.manager, secret_file=secret, connect_timeout=10)
    # Nor does a certificate of another CA.
    with pytest.raises(pserver.TlsError, match="TLS"):
        pserver.Client(tls_cluster.manager, secret_file=secret, tls=certs / "b", connect_timeout=10)
    # TLS files that are not there.
    with pytest.raises(pserver.TlsError, match="no-such"):
        pserver.Client(
            tls_cluster.manager,
            secret_file=secret,
            tls={"cert": certs / "no-such.pem", "key": certs / "a" / "node.key", "ca": certs / "a" / "ca.pem"},
        )
    with pytest.raises(ValueError, match="cert, key and ca"):
        pserver.Client(tls_cluster.manager, tls={"cert": "x"})
    with pytest.raises(ValueError, match="not a directory"):
        pserver.Client(tls_cluster.manager, tls=str(certs / "nowhere"))
