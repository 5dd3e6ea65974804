"""`advgen eval` under torchrun: each rank evaluates a contiguous shard of the images, rank 0 adds up
the shards' counts (exact: accuracy = correct / n over all images) and re-runs the sanity checks on the
combined curves. Rank r's attacks are seeded with seed + (index of its first image), so the random
starts differ from a one-process run's; everything else is the same computation.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import shard_rows
from .evaluate import evaluate, sanity_checks


def _counts(accs, n: int) -> list[int]:
    return [round(a * n) for a in accs]


def evaluate_sharded(dist, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                     *, seed: int = 0, **kwargs) -> dict | None:
    """evaluate() over every rank's shard; the combined result on rank 0, None on the others."""
    part = shard_rows(labels.shape[0], dist.rank, dist.world)
    x, y = images[part].to(device), labels[part].to(device)
    mine = evaluate(model, x, y, seed=seed + part.start, **kwargs) if y.numel() else None
    # patient: the ranks finish their shards at different times (AutoAttack's work depends on the images),
    # which may take longer than the job's collective timeout
    shards = [r for r in (dist.gather(mine, patient=True) or []) if r is not None]
    if not dist.main:
        return None
    n = sum(r["n"] for r in shards)
    eps = [e["eps"] for e in shards[0]["results"]]
    correct = [sum(c) for c in zip(*(_counts([e["accuracy"] for e in r["results"]], r["n"]) for r in shards))]
    result = {**shards[0], "n": n, "results": [{"eps": e, "accuracy": c / n} for e, c in zip(eps, correct)],
              "seconds": max(r["seconds"] for r in shards), "processes": dist.world}
    if "checks" in shards[0]:
        fgsm = None
        if shards[0]["fgsm_accuracy"] is not None:
            fgsm = [sum(c) / n for c in zip(*(_counts(r["fgsm_accuracy"], r["n"]) for r in shards))]
        k = sum(r["large_eps_n"] for r in shards)
        large = sum(round(r["large_eps_accuracy"] * r["large_eps_n"]) for r in shards) / k
        result.update(fgsm_accuracy=fgsm, large_eps_accuracy=large, large_eps_n=k,
                      checks=sanity_checks(result["norm"], eps, [c / n for c in correct], fgsm, large, n))
    return result
