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

    version "standard" runs APGD-CE, APGD-T (9 target classes), FAB-T and Square. attacks=[...] runs a
    cheaper subset (version "custom", e.g. ["apgd-ce", "apgd-t"]) with one APGD-CE restart and
    `targets` target classes for APGD-T (default 9, as in the standard version). Each attack only
    runs on the points still robust. Inputs in [0, 1]; the model runs in eval mode.
    """

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255,
                 attacks: list[str] | None = None, targets: int = 9, seed: int = 0, batch_size: int = 250):
        check(norm in ("l2", "linf"), f"AutoAttack supports norms l2 and linf, got {norm!r}")
        check(math.isfinite(eps) and eps >= 0, f"eps must be a finite number >= 0, got {eps}")
        check(1 <= targets <= 9, f"targets must lie in 1..9, got {targets}")
        self.model, self.norm, self.eps = model, norm, float(eps)
        self.version = "standard" if attacks is None else "custom"
        self.attacks, self.targets, self.seed, self.batch_size = attacks, targets, seed, batch_size

    def settings(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "version": self.version, "attacks": self.attacks,
                "targets": self.targets}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        try:
            from pyautoattack import AutoAttack as _AA
        except ImportError:
            raise UserError("AutoAttack needs the pyautoattack package, a dependency of advgen: pip install "
                            "pyautoattack==0.2.0") from None
        with eval_mode(self.model):
            aa = _AA(self.model, norm={"l2": "L2", "linf": "Linf"}[self.norm], eps=self.eps,
                     version=self.version, attacks=self.attacks, seed=self.seed, device=x.device)
            if self.version == "custom":
                aa.apgd.n_restarts = 1
                aa.apgd_targeted.n_target_classes = self.targets
            # pyautoattack reshapes with .view: a channels-last batch (speed.inference_copy) must be made
            # contiguous first, or APGD fails with "view size is not compatible"
            x_adv, _ = aa.run_standard_evaluation(x.contiguous(), y, batch_size=self.batch_size)
        return x_adv.detach()
