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
from .precision import evaluation_note
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


GAP_LIMIT = 0.03  # PGD minus AutoAttack accuracy above which PGD alone is not trusted
GAP_CHECK = f"PGD within {100 * GAP_LIMIT:.0f} points of AutoAttack"   # the name gap_check's result carries


def gap_check(pgd: dict, autoattack: dict, n: int) -> dict:
    """PGD must not exceed AutoAttack by more than GAP_LIMIT at any eps where both ran ({eps: accuracy},
    accuracies multiples of 1/n, hence the half-sample slack). A larger gap means PGD misses what
    AutoAttack finds, so PGD's accuracies at radii without AutoAttack overstate robustness."""
    stronger = [e for e in autoattack if e in pgd and pgd[e] - autoattack[e] > GAP_LIMIT + 0.5 / n]
    check = {"name": GAP_CHECK, "passed": not stronger,
             "detail": "ok" if not stronger else f"PGD overstates robustness at eps {', '.join(map(str, stronger))}"}
    if stronger:
        log.warning("sanity check failed: %s (%s)", check["name"], check["detail"])
    return check


def _log_precision(images: torch.Tensor) -> None:
    """Say what the evaluation computes in: fp32, unless its caller wrapped it in an autocast."""
    log.info("evaluation precision: %s", evaluation_note(images.device))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, attack: str = "pgd-l2",
             epsilons=(0.0, 0.25, 0.5), steps: int = 20, step_size: float | None = None,
             rel_step: float | None = None, restarts: int = 1, batch_size: int = 500, seed: int = 0,
             checks: bool = True, fast: bool = True, objective=("ce", "margin")) -> dict:
    """A robustness curve under one attack, with its sanity checks, as a JSON-ready dict.

    attack: pgd-l2 | pgd-linf | fgsm | fgsm-l2 | autoattack | autoattack-l2; eps in [0, 1] pixel units.
    fast: attack speed.inference_copy(model) (BatchNorm folded, channels-last): same function up to
    float rounding, fewer operations per PGD step. objective: what PGD's restarts ascend in turn (by
    default the cross-entropy, then the margin loss: README, "Evaluation you can trust").
    -> {"attack", "norm", "steps", "step_size", "rel_step", "restarts", "objective", "n", "results": [{"eps",
    "accuracy"}], "checks": [...], "seconds"}
    """
    epsilons = [float(e) for e in epsilons]
    _log_precision(images)
    fmt = torch.channels_last if fast else torch.contiguous_format
    if fast:
        model = inference_copy(model)
    norm = "l2" if attack.endswith("l2") else "linf"
    t0 = time.perf_counter()

    def attack_at(eps):
        return make_attack(attack, model, eps, steps=steps, step_size=step_size, rel_step=rel_step,
                           restarts=restarts, seed=seed, objective=objective)

    accs = robust_accuracy(model, images, labels, attack_at, epsilons, batch_size, fmt)
    seconds = time.perf_counter() - t0
    result = {"attack": attack, "norm": norm, "steps": steps, "step_size": step_size, "rel_step": rel_step,
              "restarts": restarts, "n": int(images.shape[0]),
              "objective": [objective] if isinstance(objective, str) else list(objective),
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


def _unbits(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def fingerprint(tensors) -> str:
    """sha256 (hex) of a model's state dict or of a sequence of tensors: names, dtypes, shapes and bytes.
    It names what a full evaluation measured, so that its results are never resumed or filed under
    other weights or other images."""
    import hashlib
    items = sorted(tensors.state_dict().items()) if isinstance(tensors, nn.Module) else \
        sorted(tensors.items()) if isinstance(tensors, dict) else list(enumerate(tensors))
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FullEvalProgress:
    """The per-sample results of a full evaluation as bit strings, one per part ("pgd:0.5", "aa:0.25",
    ...), written to a JSON file after every chunk of images, so that a stopped evaluation resumes
    where it was (an AutoAttack on 1,000 CPU images takes hours). A file written under other settings,
    another model or other images is refused, never overwritten."""

    def __init__(self, path: Path | None, settings: dict):
        from .checkpoint import read_json
        from .errors import UserError
        self.path, self.settings, self.parts, self.seconds = path, settings, {}, {}
        if path is not None and Path(path).exists():
            saved = read_json(Path(path))
            if saved.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(saved.get("settings") or {})
                              if (saved.get("settings") or {}).get(k) != settings.get(k))
                raise UserError(f"{path} holds a full evaluation with other settings ({', '.join(diff)} differ); "
                                "write to another file or remove it")
            self.parts, self.seconds = saved.get("samples", {}), saved.get("seconds", {})

    def save(self) -> None:
        from .checkpoint import write_json
        if self.path is not None:
            write_json(Path(self.path), {"settings": self.settings, "samples": self.parts, "seconds": self.seconds})

    def flags(self, key: str, n: int, chunk: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Per-sample bits of part `key` for samples 0..n-1; compute(start, stop) gives those of a chunk
        of at most `chunk` samples (the chunks are the same on every run, hence the same random starts)."""
        bits = self.parts.get(key, "")
        while len(bits) < n:
            start, t0 = len(bits), time.perf_counter()
            bits += _bits(compute(start, min(n, start + chunk)).cpu())
            self.parts[key] = bits
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
            self.save()
        return _unbits(bits[:n])


# PGD-L2's step in the full evaluation, as a fraction of eps. Madry's 2.5·eps/steps (0.05 at 50 steps)
# left 2.7-3 points between PGD and AutoAttack on the campaign's standard-trained models at L2 0.25;
# 0.2 and 0.4 close most of it (experiments/pgd_step_probe.py; README, "Evaluation you can trust")
FULL_REL_STEP = 0.2


def full_evaluation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                    pgd_eps=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0), aa_eps=(0.25, 0.5), pgd_steps: int = 50,
                    restarts: int = 2, seed: int = 0, batch_size: int = 500, progress_file=None,
                    objectives=("ce", "margin"), rel_step: float | None = FULL_REL_STEP) -> dict:
    """The full-strength L2 evaluation of one model (the model zoo's cards), every accuracy with its
    Wilson 95% interval:

    PGD-L2 (pgd_steps steps of rel_step·eps (None: Madry's 2.5·eps/steps), `restarts` random restarts
    ascending `objectives` in turn,
    each sample's worst case) at every pgd_eps; the standard AutoAttack (APGD-CE, APGD-T with 9 targets,
    FAB-T, Square; Croce & Hein 2020) at every aa_eps; per aa eps, the per-sample worst case over both (a
    sample counts robust only if every attack fails on it); the sanity checks of the PGD curve (Carlini
    et al. 2019) and the PGD - AutoAttack gap rule (gap_check).
    images: (N, C, H, W) uint8 or float in [0, 1]; eps in the same [0, 1] pixel units.
    Per-sample correctness is kept as bit strings ("samples", "1" = correct) so every figure can be
    recomputed. progress_file: a JSON file the results are written to after every chunk of batch_size
    images and resumed from (FullEvalProgress); its settings name the model's and the images' sha256.
    """
    from .attacks import AutoAttack
    _log_precision(images)
    n = int(images.shape[0])
    settings = {"n": n, "pgd_eps": [float(e) for e in pgd_eps], "aa_eps": [float(e) for e in aa_eps],
                "pgd_steps": pgd_steps, "restarts": restarts, "seed": seed, "batch_size": batch_size,
                "model_sha256": fingerprint(model), "data_sha256": fingerprint([images, labels])}
    objectives = (objectives,) if isinstance(objectives, str) else tuple(objectives)
    if objectives != ("ce",):   # named only when not the plain cross-entropy: older files resume as they were
        settings["pgd_objectives"] = list(objectives)
    rel = 2.5 / pgd_steps if rel_step is None else float(rel_step)
    if rel != 2.5 / pgd_steps:   # likewise named only when not the step of the first evaluations
        settings["pgd_rel_step"] = rel
    progress = FullEvalProgress(progress_file, settings)
    fast, fmt = inference_copy(model), torch.channels_last

    def attacked(key: str, make: Callable[[float, int], Callable], eps: float, count: int = n) -> torch.Tensor:
        return progress.flags(key, count, batch_size, lambda a, b: robust_flags(
            fast, images[a:b], labels[a:b], lambda r: make(r, seed + a), [eps], batch_size, fmt)[0])

    def pgd_at(r, s):
        return PGD(fast, norm="l2", eps=r, steps=pgd_steps, rel_step=rel, restarts=restarts, seed=s,
                   objective=objectives)

    clean = progress.flags("clean", n, batch_size, lambda a, b: predict(fast, images[a:b], batch_size) == labels[a:b])
    pgd = {e: attacked(f"pgd:{e}", pgd_at, e) for e in settings["pgd_eps"]}
    aa = {e: attacked(f"aa:{e}", lambda r, s: AutoAttack(fast, norm="l2", eps=r, seed=s), e) for e in settings["aa_eps"]}
    fgsm = [attacked(f"fgsm:{e}", lambda r, s: FGSM(fast, norm="l2", eps=r, seed=s), e) for e in settings["pgd_eps"]]
    k = min(200, n)
    large = attacked("large", lambda r, s: PGD(fast, norm="l2", eps=r, steps=20, rel_step=0.1, seed=s),
                     LARGE_EPS["l2"], k)
    worst = {e: aa[e] & pgd.get(e, aa[e]) for e in settings["aa_eps"]}
    mean = lambda f: f.float().mean().item()  # noqa: E731
    return {"settings": settings, "n": n,
            "attacks": {"pgd_l2": {"steps": pgd_steps, "step_size": f"{rel:g} * eps", "restarts": restarts,
                                   "objectives": list(objectives), "random_start": True,
                                   "keep": "each sample's worst case over restarts"},
                        "autoattack_l2": {"version": "standard",
                                          "attacks": ["apgd-ce", "apgd-t (9 targets)", "fab-t", "square"]}},
            "clean": with_interval(clean),
            "pgd_l2": {str(e): with_interval(f) for e, f in pgd.items()},
            "autoattack_l2": {str(e): with_interval(f) for e, f in aa.items()},
            "worst_case_l2": {str(e): with_interval(f) for e, f in worst.items()},
            "checks": sanity_checks("l2", settings["pgd_eps"], [mean(pgd[e]) for e in settings["pgd_eps"]],
                                    [mean(f) for f in fgsm], mean(large), n) +
                      [gap_check({e: mean(f) for e, f in pgd.items()}, {e: mean(f) for e, f in aa.items()}, n)],
            "samples": progress.parts, "seconds": progress.seconds}
