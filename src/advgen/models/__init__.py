"""Model registry: lower-case name -> factory(num_classes) returning Sequential(Normalize, net)."""
from torch import nn

from ..errors import UserError
from .generators import BankConfig, GeneratorBank
from .normalize import Normalize
from .resnet_cifar import CifarResNet, PreActResNet18


def _cifar_resnet(n: int):
    def factory(num_classes: int = 10) -> nn.Sequential:
        return nn.Sequential(Normalize(), CifarResNet(n, num_classes))
    return factory


def preact_resnet18(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(Normalize(), PreActResNet18(num_classes))


MODELS = {
    "resnet20": _cifar_resnet(3),
    "resnet32": _cifar_resnet(5),
    "resnet44": _cifar_resnet(7),
    "resnet56": _cifar_resnet(9),
    "resnet110": _cifar_resnet(18),
    "preact_resnet18": preact_resnet18,
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a registered classifier by name; unknown names are a UserError listing the choices."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes)


__all__ = ["MODELS", "build_model", "Normalize", "GeneratorBank", "BankConfig"]
