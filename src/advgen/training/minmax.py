"""Min-max adversarial training (Madry et al. 2018; eq. 1 of Jung 2024) and FGSM-RS (Wong et al. 2020).

Each batch: PGD finds δ against the current classifier (K forward and backward passes, model in eval
mode), then the classifier descends CE(f(x + δ), y). FGSM-RS is the K = 1 case with a random start and
a step of 1.25·eps.
"""
import torch.nn.functional as F

from ..attacks import FGSM, PGD


class MinMax:
    def __init__(self, model, cfg, steps_per_epoch: int):
        a = cfg.attack
        self.model = model
        self.attack = PGD(model, norm=a.norm, eps=a.eps, steps=a.steps, step_size=a.step_size,
                          random_start=a.random_start, seed=cfg.seed)
        self.calls = 0

    def loss(self, x, y):
        self.attack.seed += 1  # a fresh random start every batch, reproducibly
        x_adv = self.attack(x, y)
        logits = self.model(x_adv)
        return F.cross_entropy(logits, y), logits, y


class FGSMRS(MinMax):
    """Wong et al. 2020, "Fast is better than free": one signed-gradient step from a random start."""

    def __init__(self, model, cfg, steps_per_epoch: int):
        a = cfg.attack
        self.model = model
        self.attack = FGSM(model, norm=a.norm, eps=a.eps, random_start=True, seed=cfg.seed)
