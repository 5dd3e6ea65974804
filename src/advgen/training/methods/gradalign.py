"""GradAlign (Andriushchenko & Flammarion 2020, "Understanding and Improving Fast Adversarial Training").

FGSM training that prevents catastrophic overfitting by keeping the loss locally linear in the threat
ball. Each batch x (B, C, H, W) in [0, 1], y (B,):

    g1 = ∇_x CE(f(x), y)                        the input gradient at the clean point
    x_adv = clip(x + eps · dir(g1), 0, 1)       FGSM from a zero start (dir = sign for Linf, g / ‖g‖₂ for
                                                L2): the authors' step of 1.25·eps from zero, projected
                                                back onto the ball, is exactly this
    η ~ U(B(0, eps)),  g2 = ∇_x CE(f(clip(x + η, 0, 1)), y)   with its graph
    Ω = λ · (1 − mean_i cos(g1_i, g2_i))        over the samples whose g1 and g2 are both non-zero
    L = CE(f(x_adv), y) + Ω                     the classifier descends L; Ω by double backpropagation
                                                through g2 (g1 is a constant, as in the authors' code)

λ (None): the authors' CIFAR-10 Linf settings, 0.2 at 8/255 growing by 4/3 a pixel level (2.0 at
16/255), written λ(eps) = 0.2 · (4/3)^(255·eps − 8); an L2 threat model needs λ given.

Differences from the authors' code (tml-epfl/understanding-fast-adv-training, train.py), as for advgen's
FGSM-RS and N-FGSM: both input gradients are taken with the classifier in eval mode (g1 on its
BatchNorm-folded copy under Setup.fold_bn), where the authors' are in train mode; so the two gradients
are of the same function, the one an attack meets at test time. The training forward on x_adv is in
train mode. Cost: g1 (one forward-backward), g2 (one forward-backward kept as a graph), the training
pass, and the backward through g2's graph. Measured (ResNet-20, batch 128, one CPU thread, 2026-12-04): a
step takes 3.3× a standard step's time, FGSM-RS's 1.33×; `passes` = 5 keeps it in proportion to
FGSM-RS's 2, so budgets in passes charge it what it costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...attacks.pgd import NORMS, eval_mode, generator
from ...config import ThreatModel
from ...errors import UserError, check_field
from ...flags import option
from ...models.folding import BNFolder
from ..method import Method, register


@dataclass
class GradAlignOptions(ThreatModel):
    """norm, eps (ThreatModel); align: λ, the weight of the gradient-alignment term (None: the authors'
    Linf rule, 0.2 · (4/3)^(255·eps − 8))."""

    align: float | None = option(None, "--gradalign-lambda", "GradAlign: weight of 1 - cos(grad at x, grad at "
                                 "x + noise) (default: the authors' Linf rule, 0.2 at 8/255, 2.0 at 16/255)")

    @property
    def weight(self) -> float:
        """λ as used: `align`, or the authors' Linf rule at this radius."""
        return 0.2 * (4 / 3) ** (255 * self.radius - 8) if self.align is None else self.align

    def validate(self) -> None:
        super().validate()
        check_field(self.align is None or (math.isfinite(self.align) and self.align >= 0), "options.align",
                    f"must be >= 0, got {self.align}")
        check_field(self.align is not None or self.norm == "linf", "options.align",
                    "has no default at L2 (the authors' rule is for Linf): give it")


def alignment(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """mean_i cos(g1_i, g2_i) over the rows where neither gradient is zero (0 if there is none):
    g1, g2 (B, ...) -> scalar, differentiable in both. No host sync (a mask, not an index)."""
    a, b = g1.flatten(1), g2.flatten(1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    valid = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-30)
    return (cos * valid).sum() / valid.sum().clamp_min(1)


@register("gradalign", GradAlignOptions, "FGSM + gradient alignment against catastrophic overfitting "
          "(Andriushchenko & Flammarion 2020)")
class GradAlign(Method):
    def __init__(self, model, options: GradAlignOptions, setup):
        super().__init__(model, options, setup)
        if setup.dist.world > 1:
            # the regulariser's pass runs outside the DDP forward; untested there
            raise UserError("--method gradalign does not run under torchrun yet: train it in one process")
        self.seed = setup.seed
        self.folder = BNFolder(model, channels_last=setup.channels_last) if setup.fold_bn else None

    @property
    def passes(self) -> int:
        return 5

    def _input_grad(self, model, x, y, graph: bool) -> torch.Tensor:
        """∇_x CE(model(x), y) summed over the batch (per-sample gradients); with its graph if `graph`."""
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        return torch.autograd.grad(loss, x, create_graph=graph)[0]

    def loss(self, x, y):
        o, ops = self.options, NORMS[self.options.norm]
        self.seed += 1
        eps = o.radius
        with self.setup.attack_passes():   # fp32 under fp16 autocast (Setup.attack_passes)
            attacker = self.folder.refresh() if self.folder is not None else self.model
            with eval_mode(attacker), torch.enable_grad():
                g1 = self._input_grad(attacker, x, y, graph=False)
            x_adv = (x + eps * ops.direction(g1)).clamp(0, 1)
            eta = ops.random_start(x.shape, eps, generator(self.seed, x.device)).to(x)
            with eval_mode(self.model, freeze=False):
                g2 = self._input_grad(self.model, (x + eta).clamp(0, 1), y, graph=True)
            reg = o.weight * (1 - alignment(g1, g2))
        logits = self.train_model(x_adv)
        return F.cross_entropy(logits, y) + reg, logits, y

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])

