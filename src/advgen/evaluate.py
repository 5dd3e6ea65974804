"""Robust accuracy curves with the self-checks of Carlini et al. 2019 ("On Evaluating Adversarial
Robustness"): accuracy must not rise with eps, PGD must be at least as strong as FGSM, and a very
large eps must drive accuracy towards 0. Failed checks are logged as warnings and kept in the result.
Memory is bounded by the batch size: images are converted to float one batch at a time.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
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


def robust_flags(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 attack_at: Callable[[float], Callable], epsilons, batch_size: int = 500,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Per-sample robustness, bool (len(epsilons), N): sample i is classified correctly under
    attack_at(eps). Samples misclassified when clean are not attacked (False); each eps is attacked
    independently; memory_format: layout of the batches (channels_last for speed.inference_copy models)."""
    n = images.shape[0]
    flags = torch.zeros(len(epsilons), n, dtype=torch.bool, device=labels.device)
    # a progress bar with ETA on a terminal (images x radii done), silent otherwise
    name = type(attack_at(max(epsilons))).__name__ if epsilons else "attack"
    bar = tqdm(total=n * len(epsilons), unit="img", leave=False, disable=None,
               desc=f"{name} eps {','.join(f'{e:g}' for e in epsilons)}")
    try:
        for i in range(0, n, batch_size):
            x = _as_float(images[i:i + batch_size]).contiguous(memory_format=memory_format)
            y = labels[i:i + batch_size]
            ok = predict(model, x, batch_size) == y
            for j, eps in enumerate(epsilons):
                row = ok.clone()
                if eps != 0 and ok.any():
                    attack = attack_at(eps)
                    if hasattr(attack, "seed"):
                        attack.seed = attack.seed + i  # a different random start for every batch, reproducibly
                    row[ok] = predict(model, attack(x[ok], y[ok]), batch_size) == y[ok]
                flags[j, i:i + y.shape[0]] = row
                bar.update(y.shape[0])
    finally:
        bar.close()
    return flags


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    attack_at: Callable[[float], Callable], epsilons, batch_size: int = 500,
                    memory_format: torch.memory_format = torch.contiguous_format) -> list[float]:
    """Accuracy (fractions, exact counts / N) under attack_at(eps) for every eps, on the same images
    (robust_flags averaged)."""
    flags = robust_flags(model, images, labels, attack_at, epsilons, batch_size, memory_format)
    return [c / images.shape[0] for c in flags.sum(1).tolist()]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% for z = 1.96): (low, high) as fractions."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(flags: torch.Tensor) -> dict:
    """{"accuracy", "ci95": [low, high], "correct", "n"} of a bool vector of per-sample correctness."""
    k, n = int(flags.sum()), flags.numel()
    return {"accuracy": k / n, "ci95": list(wilson(k, n)), "correct": k, "n": n}


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


def _bits(flags: torch.Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def full_evaluation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    pgd_eps=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0), aa_eps=(0.25, 0.5), pgd_steps: int = 50,
                    restarts: int = 2, seed: int = 0, batch_size: int = 500, progress_file=None) -> dict:
    """The full-strength L2 evaluation of one model (the model zoo's cards), every accuracy with its
    Wilson 95% interval:

    PGD-L2 (pgd_steps steps of 2.5·eps/steps, `restarts` random restarts, each sample's worst case) at
    every pgd_eps; the standard AutoAttack (APGD-CE, APGD-T with 9 targets, FAB-T, Square) at every
    aa_eps; per eps of both, the per-sample worst case (robust only if neither attack succeeds); the
    sanity checks of the PGD curve. Per-sample correctness is kept as bit strings ("samples") so every
    figure can be recomputed. progress_file: a JSON file the parts are written to as they finish and
    read back from on a second call with the same settings (an AutoAttack on 1,000 CPU images takes hours).
    """
    from .attacks import AutoAttack
    from .checkpoint import read_json, write_json
    settings = {"n": int(images.shape[0]), "pgd_eps": [float(e) for e in pgd_eps], "aa_eps": [float(e) for e in aa_eps],
                "pgd_steps": pgd_steps, "restarts": restarts, "seed": seed}
    done = {}
    if progress_file is not None and Path(progress_file).exists():
        saved = read_json(Path(progress_file))
        if saved.get("settings") == settings:
            done = saved.get("samples", {})
    fast = inference_copy(model)
    fmt = torch.channels_last

    def part(key: str, compute) -> torch.Tensor:
        if key not in done:
            done[key] = _bits(compute())
            if progress_file is not None:
                write_json(Path(progress_file), {"settings": settings, "samples": done})
        return torch.tensor([c == "1" for c in done[key]])

    pgd = {e: part(f"pgd:{e}", lambda e=e: robust_flags(
        fast, images, labels, lambda r: PGD(fast, norm="l2", eps=r, steps=pgd_steps, rel_step=2.5 / pgd_steps,
                                            restarts=restarts, seed=seed), [e], batch_size, fmt)[0])
           for e in settings["pgd_eps"]}
    aa = {e: part(f"aa:{e}", lambda e=e: robust_flags(
        fast, images, labels, lambda r: AutoAttack(fast, norm="l2", eps=r, seed=seed), [e], batch_size, fmt)[0])
          for e in settings["aa_eps"]}
    fgsm = part("fgsm", lambda: torch.stack([robust_flags(fast, images, labels, lambda r: FGSM(fast, norm="l2", eps=r,
                                                                                               seed=seed), [e],
                                                          batch_size, fmt)[0] for e in settings["pgd_eps"]]).flatten())
    k = min(200, images.shape[0])
    large = part("large", lambda: robust_flags(fast, images[:k], labels[:k], lambda r: PGD(
        fast, norm="l2", eps=r, steps=20, rel_step=0.1, seed=seed), [LARGE_EPS["l2"]], batch_size, fmt)[0])
    clean = part("clean", lambda: predict(fast, images, batch_size) == labels)
    n = images.shape[0]
    pgd_acc = [pgd[e].float().mean().item() for e in settings["pgd_eps"]]
    fgsm_acc = fgsm.view(len(settings["pgd_eps"]), n).float().mean(1).tolist()
    worst = {e: aa[e] & (pgd[e] if e in pgd else torch.ones_like(aa[e])) for e in settings["aa_eps"]}
    return {"settings": settings, "n": n, "clean": with_interval(clean),
            "pgd_l2": {str(e): with_interval(f) for e, f in pgd.items()},
            "autoattack_l2": {str(e): with_interval(f) for e, f in aa.items()},
            "worst_case_l2": {str(e): with_interval(f) for e, f in worst.items()},
            "checks": sanity_checks("l2", settings["pgd_eps"], pgd_acc, fgsm_acc, large.float().mean().item(), n),
            "samples": done}
