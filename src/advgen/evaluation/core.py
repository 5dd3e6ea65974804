"""Applying attacks to a test set: predictions, clean accuracy, and per-sample robustness under an attack
at each radius. Memory is bounded by the batch size: images are converted to float one batch at a time.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from tqdm import tqdm
from torch import nn

from ..errors import check

log = logging.getLogger(__name__)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) for images (N, C, H, W), uint8 or float in [0, 1]; eval mode, mode restored."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(_as_float(images[i:i + batch_size])).argmax(1)
                          for i in range(0, images.shape[0], batch_size)])
    finally:
        model.train(was)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Clean accuracy as a fraction."""
    return (predict(model, images, batch_size) == labels).float().mean().item()


def robust_flags(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 attack_at: Callable[[float], Callable], epsilons, batch_size: int = 500,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Per-sample robustness, bool (len(epsilons), N): sample i is classified correctly under
    attack_at(eps). Samples misclassified when clean are not attacked (False); each eps is attacked
    independently; memory_format: layout of the batches (channels_last for speed.inference_copy models)."""
    n = images.shape[0]
    flags = torch.zeros(len(epsilons), n, dtype=torch.bool, device=labels.device)
    # a progress bar with ETA on a terminal (images x radii done), silent otherwise
    name = type(attack_at(max(epsilons))).__name__ if epsilons else "attack"
    bar = tqdm(total=n * len(epsilons), unit="img", leave=False, disable=None,
               desc=f"{name} eps {','.join(f'{e:g}' for e in epsilons)}")
    try:
        for i in range(0, n, batch_size):
            x = _as_float(images[i:i + batch_size]).contiguous(memory_format=memory_format)
            y = labels[i:i + batch_size]
            ok = predict(model, x, batch_size) == y
            for j, eps in enumerate(epsilons):
                row = ok.clone()
                if eps != 0 and ok.any():
                    attack = attack_at(eps)
                    if hasattr(attack, "seed"):
                        attack.seed = attack.seed + i  # a different random start for every batch, reproducibly
                    row[ok] = predict(model, attack(x[ok], y[ok]), batch_size) == y[ok]
                flags[j, i:i + y.shape[0]] = row
                bar.update(y.shape[0])
    finally:
        bar.close()
    return flags


def check_pixels(images: torch.Tensor, labels: torch.Tensor) -> None:
    """UserError unless images are (N, C, H, W) pixels, uint8 (0-255, divided by 255 here) or float in
    [0, 1], and labels integer (N,): radii are in [0, 1] pixel units, so float 0-255 pixels or normalized
    images would give a number that means nothing, silently."""
    check(isinstance(images, torch.Tensor) and images.dim() == 4, f"images must be a (N, C, H, W) tensor, got "
          f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dtype != torch.uint8:
        check(images.is_floating_point(), f"images must be uint8 or float pixels in [0, 1], got {images.dtype}")
        lo, hi = (float(v) for v in images.aminmax())
        check(lo >= 0 and hi <= 1, f"images must be float pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                                   "(0-255 pixels? divide by 255; normalized? put the normalization inside the model)")
    check(isinstance(labels, torch.Tensor) and labels.dim() == 1 and not labels.is_floating_point()
          and labels.shape[0] == images.shape[0],
          f"labels must be integer class indices of shape ({images.shape[0]},), got "
          f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__} "
          f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else ''}")


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    attack_at: Callable[[float], Callable], epsilons, batch_size: int = 500,
                    memory_format: torch.memory_format = torch.contiguous_format) -> list[float]:
    """Accuracy (fractions, exact counts / N) under attack_at(eps) for every eps, on the same images
    (robust_flags averaged)."""
    check_pixels(images, labels)
    flags = robust_flags(model, images, labels, attack_at, epsilons, batch_size, memory_format)
    return [c / images.shape[0] for c in flags.sum(1).tolist()]
