"""Model registry: lower-case name -> factory(num_classes, *, in_channels, mean, std) returning
Sequential(Normalize(mean, std), net) for images of `in_channels` channels in [0, 1].

`preact_resnet18` and `preact_resnet18_v2` share their weights' names but not their forward (see
resnet_cifar); a saved model records which one in its metadata ("variant", VARIANTS), and a file saved
before advgen offered both (model "preact_resnet18", no variant) holds the v2 forward (saved_model_name).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from torch import nn

from ..errors import UserError
from .generators import BankConfig, GeneratorBank
from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize, check_stats
from .resnet_cifar import CifarResNet, PreActResNet18
from .wide_resnet import WideResNet


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
    """PreAct-ResNet-18, the fast-AT forward: the shortcut conv sees the block's raw input
    (locuslab/fast_adversarial, RobustBench PreActBlock / Wong2020Fast)."""
    mean, std = _stats(in_channels, mean, std)
    return nn.Sequential(Normalize(mean, std), PreActResNet18(num_classes, in_channels, shortcut_preact=False))


def preact_resnet18_v2(num_classes: int = 10, *, in_channels: int = 3, mean=None, std=None) -> nn.Sequential:
    """PreAct-ResNet-18, the pre-activated shortcut (RobustBench PreActBlockV2 / Rice2020Overfitting,
    pytorch-cifar; the forward advgen had before it offered both)."""
    mean, std = _stats(in_channels, mean, std)
    return nn.Sequential(Normalize(mean, std), PreActResNet18(num_classes, in_channels, shortcut_preact=True))


def wide_resnet(depth: int, widen_factor: int):
    """The registry factory of WRN-depth-widen_factor (RobustBench's WideResNet layout)."""
    def factory(num_classes: int = 10, *, in_channels: int = 3, mean=None, std=None) -> nn.Sequential:
        mean, std = _stats(in_channels, mean, std)
        return nn.Sequential(Normalize(mean, std), WideResNet(depth, widen_factor, num_classes, in_channels))
    factory.__name__ = f"wrn{depth}_{widen_factor}"
    return factory


MODELS = {
    "resnet20": _cifar_resnet(3),
    "resnet32": _cifar_resnet(5),
    "resnet44": _cifar_resnet(7),
    "resnet56": _cifar_resnet(9),
    "resnet110": _cifar_resnet(18),
    "preact_resnet18": preact_resnet18,
    "preact_resnet18_v2": preact_resnet18_v2,
    "wrn28_10": wide_resnet(28, 10),
    "wrn34_10": wide_resnet(34, 10),
}

# the forward a saved model of these names holds, recorded in its file's metadata as "variant"
VARIANTS = {"preact_resnet18": "shortcut-on-input", "preact_resnet18_v2": "shortcut-on-preactivation"}
LEGACY_VARIANT = {"preact_resnet18": "preact_resnet18_v2"}   # name without a recorded variant -> what it held


def saved_model_name(name: str, variant: str | None) -> str:
    """The registry name to build for a saved model's metadata ("model", "variant").

    A file or training state written before variants were recorded names "preact_resnet18" without a
    variant and holds the pre-activated forward: it is "preact_resnet18_v2". A recorded variant must be
    the one of its name; anything else is a UserError (the metadata are inconsistent)."""
    if variant is None:
        return LEGACY_VARIANT.get(name, name)
    if not isinstance(variant, str) or VARIANTS.get(name) != variant:
        raise UserError(f"model {name!r} with variant {variant!r}: advgen's {name} is "
                        f"{VARIANTS.get(name, 'without variants')}")
    return name


def is_import_path(name: str) -> bool:
    """"package.module:factory", a user's own model, as opposed to a registry name."""
    return isinstance(name, str) and ":" in name


def user_factory(spec: str):
    """The callable named by "package.module:factory", imported from the installed environment.

    Only modules outside the standard library are imported (a run folder names its model this way, so
    a tampered one must not be able to name os:system); the factory must be callable. Errors are one-line
    UserErrors."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".") + attr.split(".")):
        raise UserError(f"model {spec!r} is not of the form package.module:factory")
    if module_name.split(".")[0] in sys.stdlib_module_names:
        raise UserError(f"model {spec!r}: factories from the standard library are refused")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        raise UserError(f"model {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise UserError(f"model {spec!r}: {module_name} has no callable {attr}")
    return obj


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, *,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Build a classifier: Sequential(Normalize(mean, std), net).

    name: a registered architecture, or "package.module:factory", a user's own: net =
    factory(num_classes=K), an nn.Module mapping normalized (B, C, H, W) images to (B, K) logits.
    in_channels: channels of the input images; mean, std: per-channel statistics of pixels in [0, 1]
    (one value per channel; default CIFAR-10's, which only fit 3 channels). Unknown names, bad
    statistics or sizes are a UserError.
    """
    if is_import_path(name):
        net = user_factory(name)(num_classes=num_classes)
        if not isinstance(net, nn.Module):
            raise UserError(f"model {name!r}: the factory returned {type(net).__name__}, not a torch.nn.Module")
        mean, std = _stats(in_channels, mean, std)
        check_stats(mean, std, in_channels)
        return nn.Sequential(Normalize(mean, std), net)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))} or package.module:factory")
    if type(num_classes) is not int or num_classes < 1:
        raise UserError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if type(in_channels) is not int or in_channels < 1:
        raise UserError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    mean, std = _stats(in_channels, mean, std)
    check_stats(mean, std, in_channels)
    return MODELS[name](num_classes, in_channels=in_channels, mean=mean, std=std)


__all__ = ["MODELS", "VARIANTS", "build_model", "saved_model_name", "Normalize", "GeneratorBank", "BankConfig"]
