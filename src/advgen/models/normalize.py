"""Per-channel normalization as the model's first layer, so every model takes pixels in [0, 1].

The statistics are per-channel mean and standard deviation of the training pixels in [0, 1]; they
live in the model's buffers, so a checkpoint carries them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # what akamaster/pytorch_resnet_cifar10 trained its CIFAR files with
IMAGENET_STD = (0.229, 0.224, 0.225)

# named statistics for --normalize; "none" is the identity (mean 0, std 1 for every channel)
NAMED_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
               "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int | None = None) -> None:
    """UserError unless mean and std are finite, of equal length (= channels when given) and std > 0."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or not mean:
        raise UserError(f"normalization mean and std need one value per channel, got {len(mean)} and {len(std)}")
    if channels is not None and len(mean) != channels:
        raise UserError(f"normalization has {len(mean)} channels, the images {channels}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise UserError(f"normalization needs finite means and stds > 0, got mean {mean}, std {std}")


class Normalize(nn.Module):
    """x -> (x - mean) / std per channel; mean and std are buffers (1, C, 1, 1), saved with the weights."""

    def __init__(self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        super().__init__()
        check_stats(mean, std)
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def parse_stats(text: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from 'cifar10' | 'cifar100' | 'imagenet' | 'none' | 'MEAN/STD'.

    MEAN and STD are comma lists, one value per channel ('0.5,0.5,0.5/0.25,0.25,0.25'), or one value
    for every channel ('0.5/0.25'); 'none' is mean 0, std 1 (the model sees raw [0, 1] pixels).
    A bad text, or a count that does not match `channels`, is a UserError.
    """
    t = text.strip().lower()
    if t == "none":
        return (0.0,) * channels, (1.0,) * channels
    if t in NAMED_STATS:
        mean, std = NAMED_STATS[t]
    else:
        parts = t.split("/")
        try:
            if len(parts) != 2:
                raise ValueError
            mean, std = ([float(v) for v in p.split(",")] for p in parts)
        except ValueError:
            raise UserError(f"normalization {text!r}: expected {', '.join(sorted(NAMED_STATS))}, none or "
                            "MEAN/STD with comma-separated values per channel (e.g. 0.5,0.5,0.5/0.25,0.25,0.25)") from None
        mean = mean * channels if len(mean) == 1 else mean
        std = std * channels if len(std) == 1 else std
    check_stats(mean, std, channels)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
