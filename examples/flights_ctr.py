"""A click model on the bundled flights data, its embeddings on pserver.

Predicts whether a flight that left New York in 2013 arrives 15 or more
minutes late (data/nycflights13: flights, planes and weather, the schema
flights.toml), as `cargo run --release -- train` does with logistic
regression, on the same rows, features and train/test split: the rows
are read by pserver-data's CSV reader through `pserver.data.read_fields`
(the schema's seeded hold-out, `split="train"` / `"test"`), each of the
schema's 39 fields (13 categorical, 9 bucketed numeric, 17 crosses) one
hashed key per row.

The model is a factorization machine with a small MLP beside it
(DeepFM-like): each field's key has a weight and an embedding row,
on a local pserver cluster, trained by the servers' AdaGrad (one table
of 1 + DIM floats a key);
the logit is the bias, plus the
weights, plus the FM's pairwise dot products of the fields' rows, plus
an MLP over the rows laid side by side. The MLP's weights are ordinary
torch parameters: each worker process has a copy, averaged with the
others' through torch.distributed (gloo on loopback) after every step,
so the dense part is synchronous data parallel and the sparse part a
parameter server, as PERSIA and most CTR systems do it.

    python examples/flights_ctr.py                # 2 workers, 2 servers
    python examples/flights_ctr.py --workers 3 --dim 16

It starts a manager and the servers with the `pserver` binary
(`--pserver`, `$PSERVER_BIN`, else target/release/pserver or
target/debug/pserver), or joins a running cluster with `--manager`. The
final figures are on the schema's test split; `--validate` trains on the
training split less a seeded 10% and scores that 10% instead (what the
settings were chosen on), leaving the test split unread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "nycflights13"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--servers", type=int, default=2, help="servers to start (default 2)")
    p.add_argument("--manager", help="join the cluster of this manager instead of starting one")
    p.add_argument("--pserver", help="the pserver binary that starts the cluster")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training split (default 1: a second one overfits)")
    p.add_argument("--batch", type=int, default=256, help="examples per step and worker")
    p.add_argument("--dim", type=int, default=8, help="embedding width (8-16)")
    p.add_argument("--hidden", type=int, default=64, help="MLP hidden width (0: FM only)")
    p.add_argument("--lr-sparse", type=float, default=0.02, help="AdaGrad step of the tables")
    p.add_argument("--lr-linear", type=float, default=0.0,
                   help="AdaGrad step of the weights, in a table of their own (0: --lr-sparse, one table)")
    p.add_argument("--lr-dense", type=float, default=1e-2, help="Adam step of the MLP")
    p.add_argument("--init", type=float, default=0.01, help="uniform init scale of the rows")
    p.add_argument("--crosses", choices=["linear", "embed"], default="embed",
                   help="the schema's crosses: embedded like the other fields (default), or weights only")
    p.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the rows a batch uses, per example")
    p.add_argument("--steps", type=int, default=0, help="stop each worker after this many steps (0: all)")
    p.add_argument("--test-rows", type=int, default=0, help="score only the first N test rows (0: all)")
    p.add_argument("--validate", action="store_true", help="score a validation split of the training data, not the test split")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the figures to this file too")
    p.add_argument("--schema", default=str(DATA / "flights.toml"))
    p.add_argument("--data", default=str(DATA / "flights.csv.gz"))
    a = p.parse_args(argv)
    if a.workers < 1 or a.servers < 1:
        p.error("--workers and --servers must be at least 1")
    if not 1 <= a.dim <= 256:
        p.error("--dim must be 1-256")
    if a.batch < 1 or a.epochs < 1:
        p.error("--batch and --epochs must be at least 1")
    return a


# ---------------------------------------------------------------- the data

VALIDATION = (0.1, 7, "train")


def read(args, part, shard=None):
    """The examples of ``part`` ("train", "test", or "valid" for the
    validation lines of the training split) as (ids, labels): one
    non-negative int64 id per row and field."""
    from pserver.data import MISSING, read_fields

    if args.validate and part in ("train", "valid"):
        split, validation = "train", (VALIDATION[0], VALIDATION[1], part)
    else:
        split, validation = part, None
    d = read_fields(args.schema, args.data, split=split, validation=validation, shard=shard)
    keys = d.keys
    # Ids for torch are int64 >= 0: the 63 high bits of the 64-bit keys
    # (two features share an id once in 2^63 pairs). A field without a
    # value gets an id of its own per field.
    ids = (keys >> np.uint64(1)).astype(np.int64)
    missing = keys == MISSING
    ids[missing] = np.broadcast_to(np.arange(keys.shape[1], dtype=np.int64), keys.shape)[missing]
    return ids, d.labels, d.fields


# --------------------------------------------------------------- the model

def make_model(client, args, fields, create=True):
    """The model: its pserver tables and its torch MLP."""
    import torch
    from pserver.torch import Embedding

    init = f"uniform:{args.init}:{args.seed}"
    if args.lr_linear:
        # The weights and the rows in two tables, with steps of their own.
        lin = Embedding(client, "flights_w", 1, updater={"type": "adagrad", "lr": args.lr_linear}, init="zero")
        emb = Embedding(client, "flights_v", args.dim, updater={"type": "adagrad", "lr": args.lr_sparse}, init=init)
    else:
        # One table: per key its weight, then its DIM-wide row, so a step
        # pulls and pushes each key once.
        lin = None
        emb = Embedding(client, "flights", args.dim + 1, updater={"type": "adagrad", "lr": args.lr_sparse}, init=init)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.emb = lin, emb
            self.bias = torch.nn.Parameter(torch.zeros(1))
            # The fields whose rows the FM and the MLP see: every field
            # (the default), or the schema's base fields, the crosses
            # (`a^b`) then being logistic regression's features only.
            self.embedded = len(fields) if args.crosses == "embed" else sum("^" not in f for f in fields)
            width = self.embedded * args.dim
            self.mlp = (
                torch.nn.Sequential(
                    torch.nn.Linear(width, args.hidden), torch.nn.ReLU(),
                    torch.nn.Linear(args.hidden, 1),
                )
                if args.hidden > 0 else None
            )

        def forward(self, ids):
            if self.lin is None:
                e = self.emb(ids)                       # (B, F, 1 + dim)
                self.penalty = (e * e).sum() / ids.shape[0]
                w = e[..., 0].sum(1)                    # (B,)
                v = e[:, : self.embedded, 1:]           # (B, F', dim)
            else:
                w = self.lin(ids).squeeze(-1)           # (B, F)
                v = self.emb(ids[:, : self.embedded])   # (B, F', dim)
                self.penalty = ((w * w).sum() + (v * v).sum()) / ids.shape[0]
                w = w.sum(1)
            s = v.sum(1)
            fm = 0.5 * (s * s - (v * v).sum(1)).sum(1)  # pairwise <v_f, v_g>
            out = self.bias + w + fm
            if self.mlp is not None:
                out = out + self.mlp(v.flatten(1)).squeeze(1)
            return out

    torch.manual_seed(args.seed)  # the same MLP on every worker
    return Model()


# ------------------------------------------------------------- the workers

def worker(index, args, manager, port, out):
    """One worker process: trains on its shard of the training split."""
    import torch
    import torch.distributed as dist

    import pserver
    from pserver.torch import SparseOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=index, world_size=args.workers)
    ids, labels, fields = read(args, "train", shard=(index, args.workers))
    # Every worker takes as many steps as the smallest shard allows, so
    # the MLP's all-reduce pairs up.
    n = torch.tensor([len(labels)])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    steps_per_epoch = int(n.item()) // args.batch
    rng = np.random.default_rng(args.seed * 1000 + index)
    with pserver.Client(manager, timeout=120) as client:
        model = make_model(client, args, fields)
        dense = torch.optim.Adam([p for p in model.parameters()], lr=args.lr_dense)
        sparse = SparseOptimizer([model])
        steps, losses, t0 = 0, [], time.perf_counter()
        for epoch in range(args.epochs):
            order = rng.permutation(len(labels))
            for s in range(steps_per_epoch):
                rows = order[s * args.batch:(s + 1) * args.batch]
                x = torch.from_numpy(ids[rows])
                y = torch.from_numpy(labels[rows])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
                dense.zero_grad()
                (loss + args.l2 * model.penalty if args.l2 else loss).backward()
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= args.workers
                dense.step()
                sparse.step()
                losses.append(loss.item())
                steps += 1
                if args.steps and steps >= args.steps:
                    break
            if args.steps and steps >= args.steps:
                break
        seconds = time.perf_counter() - t0
        if index == 0:
            torch.save(model.state_dict(), out + ".pt")
        dist.barrier()
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump({"steps": steps, "seconds": seconds, "examples": steps * args.batch,
                   "first_loss": float(np.mean(losses[:50])), "last_loss": float(np.mean(losses[-50:]))}, f)


# ------------------------------------------------------------ the scoring

def auc(y, p):
    """Area under the ROC curve (ties count half)."""
    order = np.argsort(p, kind="mergesort")
    p, y = p[order], y[order]
    ranks = np.empty(len(p))
    # Average ranks over ties.
    _, first, counts = np.unique(p, return_index=True, return_counts=True)
    for f, c in zip(first, counts):
        ranks[f:f + c] = f + (c + 1) / 2
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score(args, manager, state_file):
    """Test (or validation) AUC and log-loss of the trained model."""
    import torch

    import pserver

    part = "valid" if args.validate else "test"
    ids, labels, fields = read(args, part)
    if args.test_rows:
        ids, labels = ids[: args.test_rows], labels[: args.test_rows]
    with pserver.Client(manager, role="client", timeout=120) as client:
        model = make_model(client, args, fields)
        model.load_state_dict(torch.load(state_file))
        model.eval()
        probs = []
        with torch.no_grad():
            for i in range(0, len(labels), 8192):
                probs.append(torch.sigmoid(model(torch.from_numpy(ids[i:i + 8192]))).numpy())
    p = np.clip(np.concatenate(probs).astype(np.float64), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return part, len(y), auc(y, p), logloss


# --------------------------------------------------------------- the cluster

def pserver_bin(args):
    for cand in (args.pserver, os.environ.get("PSERVER_BIN"),
                 ROOT / "target" / "release" / "pserver", ROOT / "target" / "debug" / "pserver"):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    sys.exit("no pserver binary: build it (cargo build --release) or give --pserver")


class Cluster:
    """A manager and servers, killed when done."""

    def __init__(self, binary, servers, logs):
        self.procs = []
        env = dict(os.environ, RUST_LOG="off")
        try:
            self.manager = self._start([binary, "manager", "--listen", "127.0.0.1:0"], env, logs / "manager.log")
            for i in range(servers):
                self._start([binary, "server", "--manager", self.manager], env, logs / f"server{i}.log")
        except BaseException:
            self.stop()
            raise

    def _start(self, cmd, env, log):
        with open(log, "wb") as err:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.procs.append(p)
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=30):
            raise RuntimeError(f"{cmd} printed nothing within 30 s")
        line = p.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"{cmd} exited: {Path(log).read_text(errors='replace')}")
        return line.rsplit(" ", 1)[-1]

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
            if p.stdout:
                p.stdout.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    import multiprocessing as mp

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flights-ctr-") as tmp:
        tmp = Path(tmp)
        cluster = None if args.manager else Cluster(pserver_bin(args), args.servers, tmp)
        manager = args.manager or cluster.manager
        try:
            ctx = mp.get_context("spawn")
            port = free_port()
            outs = [str(tmp / f"worker{i}.json") for i in range(args.workers)]
            procs = [ctx.Process(target=worker, args=(i, args, manager, port, outs[i]))
                     for i in range(args.workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
            if failed:
                sys.exit(f"worker(s) {failed} failed")
            results = [json.load(open(o)) for o in outs]
            train_s = max(r["seconds"] for r in results)
            part, n, a, ll = score(args, manager, outs[0] + ".pt")
        finally:
            if cluster is not None:
                cluster.stop()
    figures = {
        "workers": args.workers, "servers": args.servers, "epochs": args.epochs,
        "dim": args.dim, "hidden": args.hidden, "batch": args.batch,
        "steps_per_worker": results[0]["steps"],
        "train_loss_first": round(results[0]["first_loss"], 4),
        "train_loss_last": round(results[0]["last_loss"], 4),
        f"{part}_examples": n, f"{part}_auc": round(a, 4), f"{part}_logloss": round(ll, 4),
        "train_seconds": round(train_s, 1), "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"flights click model: {args.workers} workers, {args.servers} servers, "
          f"dim {args.dim}, MLP {args.hidden}, {args.epochs} epochs")
    print(f"  {part} AUC        {a:.4f}")
    print(f"  {part} log-loss   {ll:.4f}")
    print(f"  {part} examples   {n:,}")
    print(f"  steps/worker    {results[0]['steps']:,} of {args.batch}")
    print(f"  train loss      {figures['train_loss_first']} -> {figures['train_loss_last']}")
    print(f"  training        {train_s:.1f} s ({figures['seconds']} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
