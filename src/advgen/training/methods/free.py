"""Free adversarial training (Shafahi et al. 2019, "Adversarial Training for Free!", Algorithm 1).

Each minibatch x (B, C, H, W) in [0, 1] is replayed m times (m = 8 by default); each replay is ONE
forward and ONE backward pass of L = CE(f(clip(x + δ, 0, 1)), y), with the classifier in train mode,
whose gradients serve both players:

    θ ← θ − τ · ∇_θ L                            the classifier's SGD step (the loop's optimizer)
    δ ← Π_eps(δ + α · dir(∇_δ L))                 the perturbation's ascent step, α = eps by default:
                                                  Linf: dir = sign, Π = clip to [−eps, eps];
                                                  L2: dir = g / ‖g‖₂ per sample, Π = the L2-ball projection

δ starts at zero and is carried over from replay to replay AND from minibatch to minibatch (a buffer of
the batch's shape; a smaller batch uses its first rows), as in the authors' code: δ itself is only kept
in the eps-ball, x + δ is clipped to [0, 1] where it enters the classifier.

How the replays fit advgen's loop (one loop step = one batch = one classifier update by the loop): replays
1..m−1 run inside loss(), each updating the classifier through Setup.descend, the loop's own update
(zero_grad, backward, optimizer step); loss() returns replay m's loss, the loop's backward of it also fills
δ.grad, and after_step() takes δ's step from it. So a step makes m classifier updates at the learning rate
of that step (the schedule advances once per batch) and costs m forward-backward passes (`passes` = m).

Epochs: advgen's epoch is one pass over the data, here m classifier updates per batch, so it costs about
m standard epochs; the metrics (loss, accuracy) are those of each batch's last replay. Shafahi et al.
divide the epoch count by m to compare at equal cost ("--epochs N" of PGD-free training ≈ N·m standard
epochs): to match N standard epochs of work pass --epochs N/m, or better a budget in work done
(--budget-steps; `passes` makes every comparison count each replay as the forward-backward pass it is).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...attacks.pgd import NORMS
from ...config import SignedStepThreatModel
from ...errors import check_field
from ...flags import option
from ..method import Method, register


@dataclass
class FreeOptions(SignedStepThreatModel):
    """norm, eps (ThreatModel); replays: m ≥ 1, the classifier updates per minibatch; step_size: α of
    δ's ascent in pixel units (None: eps, as Shafahi et al.)."""

    replays: int = option(8, "--free-replays", "Free-AT: m replays (classifier updates) per batch; an epoch costs m passes per batch")

    def validate(self) -> None:
        super().validate()
        check_field(self.replays >= 1, "options.replays", f"must be >= 1, got {self.replays}")


@register("free", FreeOptions, "Free-AT: m replays of each batch, the perturbation carried over (Shafahi et al. 2019)")
class FreeAT(Method):
    def __init__(self, model, options: FreeOptions, setup):
        super().__init__(model, options, setup)
        self.ops = NORMS[options.norm]
        self.delta: torch.Tensor | None = None   # (B, C, H, W) pixel units; made at the first batch
        self.leaf: torch.Tensor | None = None    # the rows of δ the last replay ran on, with their .grad

    @property
    def passes(self) -> int:
        return self.options.replays

    def _forward(self, x, y):
        """One replay's forward from the current δ: -> (loss, logits); δ's rows become self.leaf."""
        if self.delta is None:
            self.delta = torch.zeros_like(x, memory_format=self.setup.memory_format)
        self.leaf = self.delta[:x.shape[0]].clone().requires_grad_(True)
        inputs = (x + self.leaf).clamp(0, 1).contiguous(memory_format=self.setup.memory_format)
        logits = self.train_model(inputs)   # the training forward (DDP-wrapped under torchrun)
        return F.cross_entropy(logits, y), logits

    @torch.no_grad()
    def _ascend(self) -> None:
        """δ ← Π_eps(δ + α·dir(∇δ L)) from the .grad the last backward left on self.leaf; δ stays as it
        was where that gradient holds an inf or NaN.

        Under fp16 the backward is the loss scaled by the GradScaler (a sign or a normalized step does
        not depend on the scale), and its first steps overflow on purpose (the scaler starts high and
        halves until they do not): the classifier's step is then skipped by the scaler, and δ's must be
        too, or one NaN would stay in δ (carried from batch to batch) for the rest of the run. The check
        is a device tensor (torch.where), not a host sync."""
        leaf, o = self.leaf, self.options
        finite = torch.isfinite(leaf.grad).all()
        step = self.ops.project(leaf + o.step * self.ops.direction(leaf.grad), o.radius)
        self.delta[:leaf.shape[0]] = torch.where(finite, step, leaf)
        self.leaf = None

    def loss(self, x, y):
        if self.options.replays > 1 and self.setup.descend is None:
            raise RuntimeError("Free-AT updates the classifier inside its step: it needs Setup.descend "
                               "(train it through advgen.train)")
        for _ in range(self.options.replays - 1):
            loss, _ = self._forward(x, y)
            with torch.autocast(x.device.type, enabled=False):   # the backward outside autocast
                self.setup.descend(loss)
            self._ascend()
        loss, logits = self._forward(x, y)
        return loss, logits, y

    def after_step(self) -> None:
        """The loop's backward of replay m's loss filled δ.grad: δ's last ascent step of this batch."""
        self._ascend()

    def state_dict(self) -> dict:
        return {"delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        d = state["delta"]
        self.delta = None if d is None else d.to(self.setup.device).contiguous(memory_format=self.setup.memory_format)
