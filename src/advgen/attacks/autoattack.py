"""AutoAttack (Croce & Hein 2020) through the `pyautoattack` package, as an attack callable."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import UserError, check
from .pgd import eval_mode

log = logging.getLogger(__name__)


class AutoAttack:
    """`AutoAttack(model, norm="l2", eps=0.5)(x, y) -> x_adv`, standard version by default.

    version "standard" runs APGD-CE, APGD-T, FAB-T and Square; attacks=[...] with version "custom"
    runs a subset (e.g. ["apgd-ce", "apgd-t"]). Inputs in [0, 1]; the model runs in eval mode.
    """

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255,
                 version: str = "standard", attacks: list[str] | None = None, seed: int = 0,
                 batch_size: int = 250):
        check(norm in ("l2", "linf"), f"AutoAttack supports norms l2 and linf, got {norm!r}")
        check(math.isfinite(eps) and eps >= 0, f"eps must be a finite number >= 0, got {eps}")
        self.model, self.norm, self.eps, self.version = model, norm, float(eps), version
        self.attacks, self.seed, self.batch_size = attacks, seed, batch_size

    def settings(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "version": self.version, "attacks": self.attacks}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        try:
            from pyautoattack import AutoAttack as _AA
        except ImportError:
            raise UserError("AutoAttack needs the pyautoattack package: pip install 'advgen[autoattack]'") from None
        with eval_mode(self.model):
            aa = _AA(self.model, norm={"l2": "L2", "linf": "Linf"}[self.norm], eps=self.eps,
                     version=self.version, attacks=self.attacks, seed=self.seed, device=x.device)
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        return x_adv.detach()
