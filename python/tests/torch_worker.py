"""One worker process of test_torch.py's two-process training run.

Usage: torch_worker.py MANAGER TABLE INDEX COUNT OUT.json

Trains an EmbeddingBag (rows on the cluster, sum mode) so that the sum
of a bag's rows predicts a synthetic label: the sign of the sum of
hidden per-id signs. Every worker draws its own bags (its shard) with
the same hidden signs, so they train one model together. Writes the
loss on a fixed evaluation set before and after, and the hidden signs
of the ids it probes, to OUT.json.
"""

import json
import sys

import numpy as np
import torch

import pserver
from pserver.torch import EmbeddingBag, SparseOptimizer

IDS = 500
BAG = 5
BATCH = 64
STEPS = 120


def batch(rng, signs, n):
    ids = rng.integers(0, IDS, size=(n, BAG))
    y = (signs[ids].sum(1) > 0).astype(np.float32)
    return torch.from_numpy(ids), torch.from_numpy(y)


def loss_of(bag, ids, y):
    logits = bag(ids).sum(1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)


def main():
    manager, table, index, count, out = sys.argv[1:6]
    index, count = int(index), int(count)
    signs = np.where(np.random.default_rng(0).random(IDS) < 0.5, -1.0, 1.0)
    eval_ids, eval_y = batch(np.random.default_rng(1000), signs, 512)
    rng = np.random.default_rng(1 + index)
    with pserver.Client(manager, timeout=60) as client:
        bag = EmbeddingBag(
            client, table, 4, mode="sum",
            updater={"type": "adagrad", "lr": 0.2}, init="zero", consistency="bounded:1",
        )
        opt = SparseOptimizer([bag])
        with torch.no_grad():
            first = loss_of(bag, eval_ids, eval_y).item()
        for _ in range(STEPS):
            ids, y = batch(rng, signs, BATCH)
            opt.zero_grad()
            loss_of(bag, ids, y).backward()
            opt.step()
        with torch.no_grad():
            final = loss_of(bag, eval_ids, eval_y).item()
    probe = list(range(0, IDS, 5))
    with open(out, "w") as f:
        json.dump({
            "first_loss": first, "final_loss": final, "steps": STEPS,
            "probe_ids": probe, "probe_sign": signs[probe].tolist(),
        }, f)
    print(f"worker {index}: loss {first:.4f} -> {final:.4f}")


if __name__ == "__main__":
    main()
