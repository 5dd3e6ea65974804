"""Attacks: PGD (L2 / Linf), FGSM, AutoAttack; each norm's standard radius."""
from .autoattack import AutoAttack
from .pgd import FGSM, NORMS, PGD, eval_mode

# the standard threat model of each norm (RobustBench's CIFAR-10 leaderboards): the radius used wherever
# a norm is given without one, in training and in evaluation; pixel units ([0, 1])
STANDARD_EPS = {"l2": 0.5, "linf": 8 / 255}

__all__ = ["PGD", "FGSM", "AutoAttack", "NORMS", "STANDARD_EPS", "eval_mode"]
