"""Attacks: PGD (L2 / Linf), FGSM, AutoAttack; and the name -> attack factory used by the CLI."""
from ..errors import UserError
from .autoattack import AutoAttack
from .pgd import FGSM, NORMS, PGD, eval_mode

ATTACKS = ("pgd-l2", "pgd-linf", "fgsm", "fgsm-l2", "autoattack", "autoattack-l2")


def make_attack(name: str, model, eps: float, *, steps: int = 20, step_size=None, rel_step=None,
                restarts: int = 1, seed: int = 0, objective="ce"):
    """Build an attack by CLI name at radius eps (pixels in [0, 1]); objective: PGD's (a name or a tuple
    that the restarts take in turn, attacks/pgd.py)."""
    if name in ("pgd-l2", "pgd-linf"):
        return PGD(model, norm=name[4:], eps=eps, steps=steps, step_size=step_size, rel_step=rel_step,
                   restarts=restarts, seed=seed, objective=objective)
    if name in ("fgsm", "fgsm-l2"):
        return FGSM(model, norm="l2" if name == "fgsm-l2" else "linf", eps=eps, seed=seed)
    if name in ("autoattack", "autoattack-l2"):
        return AutoAttack(model, norm="l2" if name == "autoattack-l2" else "linf", eps=eps, seed=seed)
    raise UserError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")


__all__ = ["PGD", "FGSM", "AutoAttack", "NORMS", "ATTACKS", "make_attack", "eval_mode"]
