"""N-FGSM (de Jorge et al. 2022, "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training").

Each batch, from the clean x (B, C, H, W) in [0, 1] pixel units:

    η ~ U(B(0, k·eps))                 noise uniform in the ball of radius k·eps (k = 2 by default):
                                       Linf: each pixel U(−k·eps, k·eps); L2: uniform in the L2 ball
    η ← clip(x + η, 0, 1) − x          (the authors clip the noisy image to the valid range)
    δ = η + α · dir(∇_η CE(f(x + η), y))   ONE step of α = eps from the noisy point: dir = sign for Linf,
                                       g / ‖g‖₂ per sample for L2
    x_adv = clip(x + δ, 0, 1)          NO projection back onto the eps-ball

and the classifier descends CE(f(x_adv), y). Without the projection ‖δ‖ can reach (k + 1)·eps (only the
[0, 1] clip shrinks it): the larger noise and the unclipped step are what keep single-step training from
catastrophic overfitting (their Sec. 4). The authors' defaults on CIFAR-10 Linf: eps 8/255, k = 2, α = eps.

As in the authors' code (pdejorge/N-FGSM, train.py): the noise and the step are per pixel in the image's
own units, the gradient is of the batch's cross-entropy. One difference, shared with advgen's FGSM-RS and
min-max: the gradient is taken with the classifier in eval mode (on its BatchNorm-folded copy under
Setup.fold_bn), where the authors' code keeps it in train mode. Cost: two forward-backward passes per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...attacks.pgd import NORMS, eval_mode, generator
from ...config import SignedStepThreatModel
from ...errors import check_field
from ...flags import option
from ..method import register
from .minmax import AttackMethod


@dataclass
class NFGSMOptions(SignedStepThreatModel):
    """norm, eps (ThreatModel); k: noise radius in units of eps (k·eps, pixel units); step_size: α in
    pixel units (None: eps, the authors' default)."""

    k: float = option(2.0, "--nfgsm-k", "N-FGSM noise radius in units of eps: uniform in the k*eps ball")

    def validate(self) -> None:
        super().validate()
        check_field(math.isfinite(self.k) and self.k >= 0, "options.k", f"must be >= 0, got {self.k}")


class NoisyFGSM:
    """The N-FGSM perturbation as a configured callable: `NoisyFGSM(model, norm="linf", eps=8/255)(x, y)`.

    Args (keyword-only): norm "l2" | "linf"; eps in [0, 1] pixel units; k ≥ 0 (noise radius k·eps);
    step_size α (None: eps); seed of the noise (one torch.Generator per call, seeded with `seed`).
    x: (B, C, H, W) float in [0, 1]; y: (B,) int64 -> x_adv (B, C, H, W) in [0, 1], ‖x_adv − x‖ ≤ (k+1)·eps.
    The model runs in eval mode; its mode, its parameters' .grad and x are left as they were.
    """

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255, k: float = 2.0,
                 step_size: float | None = None, seed: int = 0):
        self.model, self.norm, self.eps, self.k, self.seed = model, norm, eps, k, seed
        self.step_size = eps if step_size is None else step_size

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ops = NORMS[self.norm]
        g = generator(self.seed, x.device)   # on the GPU where x is on one: no host-to-device copy
        eta = ops.random_start(x.shape, self.k * self.eps, g).to(x) if self.k > 0 else torch.zeros_like(x)
        eta = ((x + eta).clamp(0, 1) - x).requires_grad_(True)
        with eval_mode(self.model), torch.enable_grad():
            loss = F.cross_entropy(self.model(x + eta), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, eta)
        with torch.no_grad():
            return (x + eta + self.step_size * ops.direction(grad)).clamp(0, 1)


@register("nfgsm", NFGSMOptions, "N-FGSM: noise of k eps, one step of eps, no projection (de Jorge et al. 2022)")
class NFGSM(AttackMethod):
    """Training on NoisyFGSM's x_adv, a fresh noise seed every batch (AttackMethod: seed, BN folding)."""

    @property
    def passes(self) -> int:
        return 2

    def make_attack(self, model, o: NFGSMOptions, seed: int):
        return NoisyFGSM(model, norm=o.norm, eps=o.radius, k=o.k, step_size=o.step, seed=seed)
