"""Min-max adversarial training (Madry et al. 2018; eq. 1 of Jung 2024) and FGSM-RS (Wong et al. 2020).

Each batch: PGD finds δ against the current classifier (K forward and backward passes, model in eval
mode), then the classifier descends CE(f(x + δ), y) on PGD's final iterate (keep="last", as Madry et
al.: a sample fooled at an early step is still pushed to full strength). FGSM-RS is the K = 1 case with a random start and
a step of 1.25·eps.

With cfg.fold_bn_attack (default) the attack runs on a BatchNorm-folded copy of the classifier,
refreshed from its current weights and running statistics before every batch (speed.BNFolder): the
same function as the classifier in eval mode up to float rounding, two operations fewer per block in
each of the K forward and backward passes. The classifier itself still trains in train mode.
"""
import torch
import torch.nn.functional as F

from ..attacks import FGSM, PGD
from ..speed import BNFolder


def _folder(model, cfg):
    if not getattr(cfg, "fold_bn_attack", False) or getattr(cfg, "compile", False):
        return None
    first = next(model.parameters())
    return BNFolder(model, channels_last=first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)
                    and not first.is_contiguous())


class MinMax:
    def __init__(self, model, cfg, steps_per_epoch: int):
        a = cfg.attack
        self.model = model
        self.attack = PGD(model, norm=a.norm, eps=a.eps, steps=a.steps, step_size=a.step_size,
                          random_start=a.random_start, keep="last", seed=cfg.seed)
        self._set_folder(model, cfg)

    def _set_folder(self, model, cfg):
        folder = _folder(model, cfg)
        if folder is not None:  # not saved with the method's state (no attribute when unused either)
            self.folder = folder

    def loss(self, x, y):
        self.attack.seed += 1  # a fresh random start every batch, reproducibly
        folder = getattr(self, "folder", None)
        if folder is not None:
            self.attack.model = folder.refresh()
        x_adv = self.attack(x, y)
        logits = self.model(x_adv)
        return F.cross_entropy(logits, y), logits, y


class FGSMRS(MinMax):
    """Wong et al. 2020, "Fast is better than free": one signed-gradient step from a random start."""

    def __init__(self, model, cfg, steps_per_epoch: int):
        a = cfg.attack
        self.model = model
        self.attack = FGSM(model, norm=a.norm, eps=a.eps, random_start=True, keep="last", seed=cfg.seed)
        self._set_folder(model, cfg)
