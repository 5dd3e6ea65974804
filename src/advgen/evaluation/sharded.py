"""`advgen eval` under torchrun: each rank evaluates a contiguous shard of the images and rank 0 joins
the shards' per-sample results in order, then summarizes them as one process would (exact counts, the
checks on the joined curves). Chunks are seeded by their index in the whole test set, so where the shard
boundaries fall on chunk boundaries the result is bit for bit the one-process result.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..data import shard_rows
from ..io import fingerprint
from ..models.folding import inference_copy
from .progress import EvalProgress, bits, unbits
from .protocol import EvalProtocol, _attacks_run, collect, summarize


def evaluate_sharded(dist, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                     protocol: EvalProtocol) -> dict | None:
    """evaluate() over every rank's shard; the joined result on rank 0, None on the others."""
    protocol.validate()
    part = shard_rows(labels.shape[0], dist.rank, dist.world)
    x, y = images[part].to(device), labels[part].to(device)
    progress = EvalProgress(None, {})
    mine = ({k: bits(v) for k, v in collect(protocol, inference_copy(model), x, y, progress,
                                             offset=part.start).items()} if y.numel() else None)
    # patient: the ranks finish their shards at different times (AutoAttack's work depends on the images),
    # which may take longer than the job's collective timeout
    shards = [s for s in (dist.gather((mine, progress.seconds), patient=True) or []) if s[0] is not None]
    if not dist.main:
        return None
    flags = {k: unbits("".join(s[0][k] for s in shards)) for k in shards[0][0]}
    seconds = {k: max(s[1].get(k, 0.0) for s in shards) for k in shards[0][1]}
    settings = protocol.settings(fingerprint(model), fingerprint([images, labels]), int(labels.shape[0]))
    return {"protocol": dataclasses.asdict(protocol), "settings": settings, "attacks": _attacks_run(protocol),
            **summarize(protocol, flags), "samples": {k: bits(v) for k, v in flags.items()}, "seconds": seconds,
            "processes": dist.world}
