"""Robust accuracy curves with the self-checks of Carlini et al. 2019 ("On Evaluating Adversarial
Robustness"): accuracy must not rise with eps, PGD must be at least as strong as FGSM, and a very
large eps must drive accuracy towards 0. Failed checks are logged as warnings and kept in the result.
Memory is bounded by the batch size: images are converted to float one batch at a time.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from tqdm import tqdm
from torch import nn

from .attacks import FGSM, PGD, make_attack
from .speed import inference_copy

log = logging.getLogger(__name__)

LARGE_EPS = {"l2": 10.0, "linf": 0.5}   # radii at which any undefended-looking image can be changed


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels (N,) for images (N, C, H, W), uint8 or float in [0, 1]; eval mode, mode restored."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(_as_float(images[i:i + batch_size])).argmax(1)
                          for i in range(0, images.shape[0], batch_size)])
    finally:
        model.train(was)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Clean accuracy as a fraction."""
    return (predict(model, images, batch_size) == labels).float().mean().item()


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    attack_at: Callable[[float], Callable], epsilons, batch_size: int = 500,
                    memory_format: torch.memory_format = torch.contiguous_format) -> list[float]:
    """Accuracy (fractions) under attack_at(eps) for every eps, on the same images.

    attack_at(eps) returns an attack callable (x, y) -> x_adv. Each eps is attacked independently (so
    the monotonicity check means something); samples misclassified when clean are not attacked.
    memory_format: layout of the batches (channels_last for a model from speed.inference_copy).
    """
    correct = torch.zeros(len(epsilons), device=labels.device, dtype=torch.long)  # counts: exact fractions
    n = images.shape[0]
    # a progress bar with ETA on a terminal (images x radii done), silent otherwise
    bar = tqdm(total=n * len(epsilons), unit="img", leave=False, disable=None,
               desc=f"{type(attack_at(max(epsilons))).__name__ if epsilons else 'attack'} eps {','.join(f'{e:g}' for e in epsilons)}")
    try:
        for i in range(0, n, batch_size):
            x = _as_float(images[i:i + batch_size]).contiguous(memory_format=memory_format)
            y = labels[i:i + batch_size]
            ok = predict(model, x, batch_size) == y
            for j, eps in enumerate(epsilons):
                if eps == 0 or not ok.any():
                    correct[j] += ok.sum()
                else:
                    attack = attack_at(eps)
                    if hasattr(attack, "seed"):
                        attack.seed = attack.seed + i  # a different random start for every batch, reproducibly
                    x_adv = attack(x[ok], y[ok])
                    correct[j] += (predict(model, x_adv, batch_size) == y[ok]).sum()
                bar.update(y.shape[0])
    finally:
        bar.close()
    return [c / n for c in correct.tolist()]


def sanity_checks(norm: str, epsilons, accs, fgsm_accs, large_eps_acc, n: int) -> list[dict]:
    """The checks of Carlini et al. 2019 on one curve; each {"name", "passed", "detail"}."""
    tol = 1.0 / n + 0.005
    checks = []
    order = sorted(range(len(epsilons)), key=lambda j: epsilons[j])
    rises = [(epsilons[a], epsilons[b]) for a, b in zip(order, order[1:]) if accs[b] > accs[a] + tol]
    checks.append({"name": "accuracy non-increasing in eps", "passed": not rises,
                   "detail": "ok" if not rises else f"accuracy rises between eps {rises}"})
    if fgsm_accs is not None:
        weaker = [epsilons[j] for j in range(len(epsilons)) if accs[j] > fgsm_accs[j] + tol]
        checks.append({"name": "attack at least as strong as FGSM", "passed": not weaker,
                       "detail": "ok" if not weaker else f"FGSM beats the attack at eps {weaker}: "
                                                         "too few steps or masked gradients"})
    if large_eps_acc is not None:
        checks.append({"name": f"large eps ({LARGE_EPS[norm]}) drives accuracy to ~0",
                       "passed": large_eps_acc <= 0.05,
                       "detail": f"accuracy {large_eps_acc:.3f} at eps {LARGE_EPS[norm]}" +
                                 ("" if large_eps_acc <= 0.05 else ": gradients may be masked")})
    for c in checks:
        if not c["passed"]:
            log.warning("sanity check failed: %s (%s)", c["name"], c["detail"])
    return checks


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, attack: str = "pgd-l2",
             epsilons=(0.0, 0.25, 0.5), steps: int = 20, step_size: float | None = None,
             rel_step: float | None = None, restarts: int = 1, batch_size: int = 500, seed: int = 0,
             checks: bool = True, fast: bool = True) -> dict:
    """A robustness curve under one attack, with its sanity checks, as a JSON-ready dict.

    attack: pgd-l2 | pgd-linf | fgsm | fgsm-l2 | autoattack | autoattack-l2; eps in [0, 1] pixel units.
    fast: attack speed.inference_copy(model) (BatchNorm folded, channels-last): same function up to
    float rounding, fewer operations per PGD step.
    -> {"attack", "norm", "steps", "step_size", "rel_step", "restarts", "n", "results": [{"eps",
    "accuracy"}], "checks": [...], "seconds"}
    """
    epsilons = [float(e) for e in epsilons]
    fmt = torch.channels_last if fast else torch.contiguous_format
    if fast:
        model = inference_copy(model)
    norm = "l2" if attack.endswith("l2") else "linf"
    t0 = time.perf_counter()

    def attack_at(eps):
        return make_attack(attack, model, eps, steps=steps, step_size=step_size, rel_step=rel_step,
                           restarts=restarts, seed=seed)

    accs = robust_accuracy(model, images, labels, attack_at, epsilons, batch_size, fmt)
    seconds = time.perf_counter() - t0
    result = {"attack": attack, "norm": norm, "steps": steps, "step_size": step_size, "rel_step": rel_step,
              "restarts": restarts, "n": int(images.shape[0]),
              "results": [{"eps": e, "accuracy": a} for e, a in zip(epsilons, accs)], "seconds": seconds}
    if checks:
        fgsm = None
        if attack.startswith("pgd"):
            fgsm = robust_accuracy(model, images, labels, lambda e: FGSM(model, norm=norm, eps=e, seed=seed),
                                   epsilons, batch_size, fmt)
        k = min(200, images.shape[0])
        large = robust_accuracy(model, images[:k], labels[:k],
                                lambda e: PGD(model, norm=norm, eps=e, steps=max(steps, 20), rel_step=0.1, seed=seed),
                                [LARGE_EPS[norm]], batch_size, fmt)[0]
        result["fgsm_accuracy"] = fgsm
        result["large_eps_accuracy"], result["large_eps_n"] = large, k
        result["checks"] = sanity_checks(norm, epsilons, accs, fgsm, large, images.shape[0])
    return result
