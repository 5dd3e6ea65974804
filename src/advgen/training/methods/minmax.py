"""Min-max adversarial training (Madry et al. 2018; eq. 1 of Jung 2024) and FGSM-RS (Wong et al. 2020).

Each batch: PGD finds δ against the current classifier (K forward and backward passes, model in eval
mode), then the classifier descends CE(f(x + δ), y) on PGD's final iterate (keep="last", as Madry et
al.: a sample fooled at an early step is still pushed to full strength). FGSM-RS is the K = 1 case with
a random start and a step of 1.25·eps (its own options, FGSMOptions: no steps to set).

With Setup.fold_bn (default) the attack runs on a BatchNorm-folded copy of the classifier, refreshed
from its current weights and running statistics before every batch (speed.BNFolder): the same function
as the classifier in eval mode up to float rounding, two operations fewer per block in each of the K
forward and backward passes. The classifier itself still trains in train mode.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from ...attacks import PGD
from ...config import AttackConfig, SignedStepThreatModel
from ...models.folding import BNFolder
from ..method import Method, register


class AttackMethod(Method):
    """Training on the output of an attack object (self.attack) rebuilt per batch with a fresh seed."""

    def __init__(self, model, options: AttackConfig, setup):
        super().__init__(model, options, setup)
        self.attack = self.make_attack(model, options, setup.seed)
        self.folder = BNFolder(model, channels_last=setup.channels_last) if setup.fold_bn else None

    def make_attack(self, model, options: AttackConfig, seed: int):
        raise NotImplementedError

    def adversarial(self, x, y):
        """x + δ for this batch: a fresh random start every batch, reproducibly."""
        self.attack.seed += 1
        if self.folder is not None:
            self.attack.model = self.folder.refresh()
        with self.setup.attack_passes():   # fp32 under fp16 autocast (Setup.attack_passes)
            return self.attack(x, y)

    def loss(self, x, y):
        logits = self.train_model(self.adversarial(x, y))
        return F.cross_entropy(logits, y), logits, y

    def state_dict(self) -> dict:
        return {"attack_seed": self.attack.seed}

    def load_state_dict(self, state: dict) -> None:
        self.attack.seed = int(state["attack_seed"])


@register("minmax", AttackConfig, "min-max adversarial training on PGD-K (Madry et al. 2018)")
class MinMax(AttackMethod):
    @property
    def passes(self) -> int:
        return self.options.steps + 1

    def make_attack(self, model, a: AttackConfig, seed: int):
        return PGD(model, norm=a.norm, eps=a.radius, steps=a.steps, step_size=a.step,
                   random_start=a.random_start, keep="last", seed=seed)


@dataclass
class FGSMOptions(SignedStepThreatModel):
    """norm, eps (ThreatModel); step_size: the one step taken from the random start, pixel units (None:
    1.25·eps, Wong et al. 2020's alpha). FGSM takes one step: it has no steps option to ignore."""

    @property
    def step(self) -> float:
        return 1.25 * self.radius if self.step_size is None else self.step_size


@register("fgsm", FGSMOptions, "FGSM with a random start, step 1.25 eps (Wong et al. 2020)")
class FGSMRS(AttackMethod):
    """Wong et al. 2020, "Fast is better than free": one signed-gradient step from a random start."""

    @property
    def passes(self) -> int:
        return 2

    def make_attack(self, model, a: FGSMOptions, seed: int):
        return PGD(model, norm=a.norm, eps=a.radius, steps=1, step_size=a.step, random_start=True, keep="last",
                   seed=seed)
