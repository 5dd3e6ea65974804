"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy", eq. 5).

Each batch x (B, C, H, W) in [0, 1], y (B,):

    p = softmax(f(x))                                the clean prediction (eval mode, a constant here)
    x' = argmax_{‖x' − x‖ ≤ eps} KL(p ‖ softmax(f(x')))   by PGD (attacks.pgd, objective "kl"): K steps
                                                     of size α (default 2·eps/K, the step of the authors'
                                                     L2 code), from x + 0.001·N(0, 1) clipped to [0, 1]
    L = CE(f(x), y) + β · (1/B) Σ_i KL(softmax(f(x_i)) ‖ softmax(f(x'_i)))     β = 6 by default

and the classifier descends L (train mode; the clean prediction in the KL term is not detached: its
gradient flows through both f(x) and f(x'), as in the authors' trades.py). KL in nats. The loss reported
to the metrics is L; the logits are those of x' (accuracy on the adversarial points, as min-max reports).

As in the authors' code (yaodongyu/TRADES, trades.py) the inner maximisation runs in eval mode and x'
is clipped to [0, 1]; advgen also clips the start (the authors' first iterate may leave [0, 1] by the
0.001 noise) and runs it on the BatchNorm-folded copy under Setup.fold_bn. f(x) and f(x') are two
separate forward passes in train mode (BatchNorm sees each batch alone, as theirs), made in one call of
the training forward (Method.train_model), so TRADES runs under torchrun/DDP too. Cost: K attack
passes + 2 training passes (clean and adversarial) per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...attacks import PGD
from ...attacks.pgd import eval_mode
from ...config import ThreatModel, check_step_size
from ...errors import check_field
from ...flags import option
from ..method import register
from .minmax import AttackMethod

START_STD = 0.001   # the authors' start: x + 0.001·N(0, 1)


@dataclass
class TradesOptions(ThreatModel):
    """norm, eps (ThreatModel); steps K of the KL-PGD; step_size α in pixel units (None: 2·eps/K);
    beta β ≥ 0, the weight of the KL (robustness) term (β = 6: the paper's CIFAR-10 setting)."""

    steps: int = option(10, "--attack-steps")
    step_size: float | None = option(None, "--attack-step-size")
    beta: float = option(6.0, "--trades-beta", "TRADES: weight of KL(f(x) || f(x')) beside CE(f(x), y)")

    @property
    def step(self) -> float:
        return 2 * self.radius / self.steps if self.step_size is None else self.step_size

    def validate(self) -> None:
        super().validate()
        check_field(self.steps >= 1, "options.steps", f"must be >= 1, got {self.steps}")
        check_step_size(self.step_size)
        check_field(math.isfinite(self.beta) and self.beta >= 0, "options.beta", f"must be >= 0, got {self.beta}")


def trades_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(logits, y) + β · mean_i KL(softmax(logits_i) ‖ softmax(logits_adv_i)): logits, logits_adv (B, K),
    y (B,) -> scalar (nats)."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits, dim=1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits, y) + beta * kl


@register("trades", TradesOptions, "TRADES: CE + beta KL(f(x) || f(x')), x' by KL-PGD (Zhang et al. 2019)")
class Trades(AttackMethod):
    @property
    def passes(self) -> int:
        return self.options.steps + 2

    def make_attack(self, model, o: TradesOptions, seed: int):
        return PGD(model, norm=o.norm, eps=o.radius, steps=o.steps, step_size=o.step, random_start=True,
                   start_std=START_STD, keep="last", objective="kl", seed=seed)

    def adversarial(self, x, y):
        """x' for this batch: KL-PGD from the clean prediction p (computed in eval mode, no gradient)."""
        self.attack.seed += 1
        if self.folder is not None:
            self.attack.model = self.folder.refresh()
        with self.setup.attack_passes():   # fp32 under fp16 autocast (Setup.attack_passes)
            with eval_mode(self.attack.model), torch.no_grad():
                p = F.softmax(self.attack.model(x), dim=1)
            return self.attack(x, p)

    def loss(self, x, y):
        x_adv = self.adversarial(x, y)
        logits, logits_adv = self.train_model(x, x_adv)   # one (DDP) call, BatchNorm sees each batch alone
        return trades_loss(logits, logits_adv, y, self.options.beta), logits_adv, y
