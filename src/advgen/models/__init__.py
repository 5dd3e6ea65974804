"""Model registry: lower-case name -> factory(num_classes, *, in_channels, mean, std) returning
Sequential(Normalize(mean, std), net) for images of `in_channels` channels in [0, 1]."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import UserError
from .generators import BankConfig, GeneratorBank
from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize, check_stats
from .resnet_cifar import CifarResNet, PreActResNet18


def _stats(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
    """(mean, std) to normalize with: the given ones, or CIFAR-10's for 3 channels when both are None."""
    if mean is None and std is None:
        if in_channels != 3:
            raise UserError(f"{in_channels}-channel images need their own normalization statistics "
                            "(pass mean= and std=, e.g. from advgen.data.normalization_for(train_set))")
        return CIFAR10_MEAN, CIFAR10_STD
    if mean is None or std is None:
        raise UserError("pass both mean and std, or neither")
    return mean, std


def _cifar_resnet(n: int):
    def factory(num_classes: int = 10, *, in_channels: int = 3, mean=None, std=None) -> nn.Sequential:
        mean, std = _stats(in_channels, mean, std)
        return nn.Sequential(Normalize(mean, std), CifarResNet(n, num_classes, in_channels))
    return factory


def preact_resnet18(num_classes: int = 10, *, in_channels: int = 3, mean=None, std=None) -> nn.Sequential:
    mean, std = _stats(in_channels, mean, std)
    return nn.Sequential(Normalize(mean, std), PreActResNet18(num_classes, in_channels))


MODELS = {
    "resnet20": _cifar_resnet(3),
    "resnet32": _cifar_resnet(5),
    "resnet44": _cifar_resnet(7),
    "resnet56": _cifar_resnet(9),
    "resnet110": _cifar_resnet(18),
    "preact_resnet18": preact_resnet18,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Build a registered classifier by name: Sequential(Normalize(mean, std), net).

    in_channels: channels of the input images; mean, std: per-channel statistics of pixels in [0, 1]
    (one value per channel; default CIFAR-10's, which only fit 3 channels). Unknown names, bad
    statistics or sizes are a UserError.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    if type(num_classes) is not int or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if type(in_channels) is not int or in_channels < 1:
        raise UserError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    mean, std = _stats(in_channels, mean, std)
    check_stats(mean, std, in_channels)
    return MODELS[name](num_classes, in_channels=in_channels, mean=mean, std=std)


__all__ = ["MODELS", "build_model", "Normalize", "GeneratorBank", "BankConfig"]
