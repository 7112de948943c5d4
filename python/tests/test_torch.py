"""pserver.torch against real pserver processes: forward and backward
against torch.nn.Embedding / EmbeddingBag with the same weights, the
pushed gradients as the servers' rows show them, clocks and consistency,
the error paths, and a two-process training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CI"):
    import torch  # CI installs it: missing is a failure, not a skip
else:
    torch = pytest.importorskip("torch")

import pserver  # noqa: E402
from pserver.torch import Embedding, EmbeddingBag, SparseOptimizer, keys_of  # noqa: E402

from conftest import ROOT, Cluster  # noqa: E402

HERE = Path(__file__).resolve().parent


def dense_weight(module, n):
    """The module's rows of ids 0..n-1 as an (n, dim) tensor, pulled."""
    return module.rows(torch.arange(n)).clone()


def server_rows(cluster, module, ids):
    """The rows of ``ids`` as `pserver kv pull` shows them: (len, dim)."""
    keys = module.keys(torch.as_tensor(ids))
    got = cluster.kv_pull(module.table, keys=keys)
    return np.array([got[int(k)] for k in keys], dtype=np.float32)


def test_keys_spread_and_are_distinct():
    ids = np.arange(100_000)
    k = keys_of(ids)
    assert k.dtype == np.uint64 and np.unique(k).size == ids.size
    # Spread over the ring: every sixteenth of it holds about 1/16.
    counts = np.bincount((k >> np.uint64(60)).astype(np.int64), minlength=16)
    assert counts.min() > 0.9 * ids.size / 16, counts
    assert keys_of(torch.tensor([5]))[0] == keys_of(np.array([5]))[0]


def test_embedding_forward_and_backward_match_torch(cluster, client, table_name):
    lr = 0.5
    emb = Embedding(client, table_name, 4, updater={"type": "sgd", "lr": lr}, init="uniform:0.1:7")
    n = 50
    w0 = dense_weight(emb, n)
    assert w0.abs().max() > 0 and w0.abs().max() <= 0.1
    ref = torch.nn.Embedding.from_pretrained(w0.clone(), freeze=False)

    ids = torch.tensor([[3, 7, 3], [42, 7, 0], [3, 3, 3]])
    out = emb(ids)
    want = ref(ids)
    assert out.shape == (3, 3, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert emb.pending == 1

    g = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    (want * g).sum().backward()
    clock = client.clock
    emb.step()
    assert client.clock == clock + 1 and emb.pending == 0

    # The servers' rows moved by exactly -lr times the summed gradient
    # (computed in float32, as the server's SGD does).
    grad = ref.weight.grad.numpy()
    expect = w0.numpy() - np.float32(lr) * grad
    touched = [0, 3, 7, 42]
    np.testing.assert_array_equal(server_rows(cluster, emb, touched), expect[touched])
    # Id 3 appears five times: its gradient is the sum of the five.
    np.testing.assert_allclose(grad[3], g[ids == 3].sum(0).numpy(), rtol=1e-6)
    # Untouched rows did not move (and were never stored: they read as init).
    others = [1, 2, 8, 49]
    np.testing.assert_array_equal(server_rows(cluster, emb, others), w0.numpy()[others])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_matches_torch(cluster, client, table_name, mode):
    lr = 0.25
    bag = EmbeddingBag(client, table_name, 3, mode=mode, updater={"type": "sgd", "lr": lr}, init="uniform:0.1:3")
    n = 20
    w0 = dense_weight(bag, n)
    ref = torch.nn.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode=mode)

    ids = torch.tensor([1, 2, 4, 4, 9, 1, 19])
    offsets = torch.tensor([0, 3, 3, 5])  # bag 1 is empty
    kw = {}
    if mode == "sum":
        kw["per_sample_weights"] = torch.tensor([1.0, 0.5, 2.0, -1.0, 1.0, 3.0, 0.25])
    out = bag(ids, offsets, **kw)
    want = ref(ids, offsets, **kw)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    assert torch.all(out[1] == 0)

    # Fixed-length bags, 2-D.
    ids2 = torch.tensor([[1, 2], [2, 2], [19, 0]])
    out2 = bag(ids2)
    want2 = ref(ids2)
    torch.testing.assert_close(out2, want2, rtol=1e-6, atol=1e-7)

    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    ((out * g).sum() + out2.sum()).backward()
    ((want * g).sum() + want2.sum()).backward()
    bag.step()
    grad = ref.weight.grad.numpy()
    touched = [0, 1, 2, 4, 9, 19]
    got = server_rows(cluster, bag, touched)
    np.testing.assert_allclose(got, (w0.numpy() - np.float32(lr) * grad)[touched], rtol=0, atol=2e-7)


def test_several_passes_push_once_summed(cluster, client, table_name):
    """Two forward passes before one step (gradient accumulation): one
    push at one clock, each id's gradient summed over both."""
    emb = Embedding(client, table_name, 2, updater={"type": "sgd", "lr": 1.0}, init="zero")
    a = emb(torch.tensor([5, 6]))
    b = emb(torch.tensor([6, 6, 8]))
    (a.sum() + 2 * b.sum()).backward()
    assert emb.pending == 2
    emb.step()
    np.testing.assert_array_equal(server_rows(cluster, emb, [5, 6, 8]), [[-1, -1], [-5, -5], [-2, -2]])


def test_no_tracking_without_grad_or_in_eval(client, table_name):
    emb = Embedding(client, table_name, 2)
    with torch.no_grad():
        emb(torch.tensor([1, 2]))
    emb.eval()
    out = emb(torch.tensor([1, 2]))
    assert emb.pending == 0 and not out.requires_grad
    emb.train()
    assert emb(torch.tensor([1])).requires_grad and emb.pending == 1


def test_dense_layers_train_with_a_torch_optimizer(client, table_name):
    """A model of a pserver embedding and a torch Linear: the Linear's
    parameters are ordinary ones (the embedding has none), and the two
    optimizers together lower the loss."""
    emb = Embedding(client, table_name, 4, updater={"type": "adagrad", "lr": 0.3}, init="uniform:0.1:1")
    head = torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(emb, head)
    assert [p.shape for p in model.parameters()] == [torch.Size([1, 4]), torch.Size([1])]
    dense = torch.optim.SGD(head.parameters(), lr=0.3)
    sparse = SparseOptimizer([model])
    ids = torch.arange(32)
    y = (ids % 2).float()
    losses = []
    for _ in range(30):
        logits = model(ids).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        dense.zero_grad()
        sparse.zero_grad()
        loss.backward()
        dense.step()
        sparse.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_one_clock_per_step_for_modules_sharing_a_client(cluster, client, table_name):
    a = Embedding(client, table_name + "_a", 2, updater="add", init="zero")
    b = EmbeddingBag(client, table_name + "_b", 2, mode="sum", updater="add", init="zero")
    opt = SparseOptimizer([a, b, torch.nn.Sequential(a)])
    assert len(opt.modules) == 2
    for _ in range(3):
        c = client.clock
        (a(torch.tensor([1])).sum() + b(torch.tensor([[1, 2]])).sum()).backward()
        opt.step()
        assert client.clock == c + 1
    # A step with nothing to push still takes its clock (an empty push).
    c = client.clock
    opt.step()
    assert client.clock == c + 1
    np.testing.assert_array_equal(server_rows(cluster, a, [1]), [[3, 3]])
    np.testing.assert_array_equal(server_rows(cluster, b, [1, 2]), [[3, 3], [3, 3]])


def test_a_refused_push_still_moves_the_clock(cluster, client, table_name):
    emb = Embedding(client, table_name, 1, updater={"type": "sgd", "lr": 1.0}, init="zero")
    out = emb(torch.tensor([1, 2]))
    (out * torch.tensor([[float("nan")], [1.0]])).sum().backward()
    c = client.clock
    with pytest.raises(pserver.NotFinite):
        emb.step()
    assert client.clock == c + 1 and emb.pending == 0
    # The next step goes at the next clock and is applied.
    emb(torch.tensor([3])).sum().backward()
    emb.step()
    assert server_rows(cluster, emb, [3])[0, 0] == -1.0


def test_sequential_steps_wait_for_every_worker(cluster, table_name):
    """Under sequential consistency a forward at step t sees every
    worker's step t-1: worker a's second forward waits for b's first
    step, then sees b's update."""
    with pserver.Client(cluster.manager, timeout=30) as ca, pserver.Client(cluster.manager, timeout=30) as cb:
        spec = dict(updater="add", init="zero", consistency="sequential")
        ea = Embedding(ca, table_name, 1, **spec)
        eb = Embedding(cb, table_name, 1, **spec)
        ea(torch.tensor([1])).sum().backward()
        ea.step()  # a pushed +1 at clock 1
        got = {}

        def second():
            got["a"] = ea(torch.tensor([1])).item()

        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive(), "a's forward at clock 2 did not wait for b's clock 1"
        eb(torch.tensor([1])).sum().backward()
        eb.step()
        t.join(20)
        assert not t.is_alive() and got["a"] == 2.0


def test_bounded_delay_lets_a_worker_run_ahead_by_tau(cluster, table_name):
    with pserver.Client(cluster.manager, timeout=30) as ca, pserver.Client(cluster.manager, timeout=30) as cb:
        ea = Embedding(ca, table_name, 1, updater="add", init="zero", consistency="bounded:2")
        Embedding(cb, table_name, 1)  # b is a worker of the table, never steps
        for _ in range(3):  # forwards at clocks 1, 2, 3 need b's clocks <= 0
            ea(torch.tensor([1])).sum().backward()
            ea.step()
        done = threading.Event()
        t = threading.Thread(target=lambda: (ea(torch.tensor([1])), done.set()))
        t.start()
        assert not done.wait(0.5), "a ran more than tau steps ahead of b"
        cb.push(table_name, np.empty(0, np.uint64), np.empty((0, 1), np.float32))  # b's clock 1
        assert done.wait(20)
        t.join()


def test_errors(cluster, client, table_name):
    Embedding(client, table_name, 4)
    with pytest.raises(pserver.WrongWidth, match="exists with dim 4, not 8"):
        Embedding(client, table_name, 8)
    with pytest.raises(ValueError, match="exists with dim 4"):
        EmbeddingBag(client, table_name, 2)
    emb = Embedding(client, table_name, 4)  # the same dim: the same table
    with pytest.raises(ValueError, match="non-negative.*-3"):
        emb(torch.tensor([1, -3]))
    with pytest.raises(TypeError, match="integer tensor"):
        emb(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="dim must be a positive int"):
        Embedding(client, table_name + "_z", 0)
    with pytest.raises(TypeError, match="pserver.Client"):
        Embedding("127.0.0.1:7070", table_name, 4)
    with pytest.raises(ValueError, match="mode 'max'"):
        EmbeddingBag(client, table_name, 4, mode="max")
    with pytest.raises(ValueError, match="bad updater|updater"):
        Embedding(client, table_name + "_u", 4, updater="rmsprop")

    bag = EmbeddingBag(client, table_name + "_bag", 2, mode="sum")
    ids = torch.tensor([1, 2, 3])
    for offsets, msg in [
        (torch.tensor([1, 2]), "start at 0"),
        (torch.tensor([0, 2, 1]), "not decrease"),
        (torch.tensor([0, 4]), "past the end"),
        (torch.tensor([[0, 1]]), "1-D"),
        (torch.tensor([], dtype=torch.int64), "empty"),
        (torch.tensor([0, -1]), "non-negative"),
    ]:
        with pytest.raises(ValueError, match=msg):
            bag(ids, offsets)
    with pytest.raises(TypeError, match="offsets must be an integer"):
        bag(ids, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="needs offsets"):
        bag(ids)
    with pytest.raises(ValueError, match="offsets must be None"):
        bag(torch.tensor([[1, 2]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        bag(torch.tensor([[[1]]]))
    with pytest.raises(ValueError, match="one weight per id"):
        bag(ids, torch.tensor([0]), per_sample_weights=torch.ones(2))
    mean = EmbeddingBag(client, table_name + "_mean", 2, mode="mean")
    with pytest.raises(ValueError, match="mode='sum'"):
        mean(ids, torch.tensor([0]), per_sample_weights=torch.ones(3))
    # None of these left a pass to push.
    assert bag.pending == 0 and emb.pending == 0
    with pytest.raises(ValueError, match="no pserver Embedding"):
        SparseOptimizer([torch.nn.Linear(2, 2)])


def test_closed_client_is_a_clear_error(cluster, table_name):
    c = pserver.Client(cluster.manager)
    emb = Embedding(c, table_name, 2)
    c.close()
    with pytest.raises(pserver.ClientClosed):
        emb(torch.tensor([1]))


def test_two_worker_processes_train(cluster, table_name, tmp_path):
    """Two Python processes train one model on their shards of a
    synthetic task (the label is the sign of a hidden weight of the
    bag's ids), on one embedding table under bounded delay: both see
    the loss fall, and the table's rows on the servers moved."""
    script = HERE / "torch_worker.py"
    out = [tmp_path / f"w{i}.json" for i in range(2)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), cluster.manager, table_name, str(i), "2", str(out[i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            o, _ = p.communicate(timeout=180)
            logs.append(o.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    results = [json.loads(o.read_text()) for o in out]
    for r in results:
        assert r["final_loss"] < 0.6 * r["first_loss"], results
        assert r["steps"] == 120
    # The rows on the servers moved from their initial zeros to the
    # hidden signs the two workers learned together.
    probe = results[0]["probe_ids"]
    emb_keys = keys_of(np.array(probe))
    got = cluster.kv_pull(table_name, keys=emb_keys)
    now = np.array([got[int(k)] for k in emb_keys])
    assert np.abs(now).min() > 0.01, now
    accuracy = np.mean(np.sign(now.sum(1)) == np.array(results[0]["probe_sign"]))
    assert accuracy > 0.9, accuracy


def test_import_pserver_does_not_import_torch():
    code = "import sys, pserver, pserver.data; assert 'torch' not in sys.modules, 'torch imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
