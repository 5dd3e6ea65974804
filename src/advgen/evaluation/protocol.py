"""One evaluation protocol, run by one function: every caller (`advgen eval`, `eval --full`, compare,
reproduce, the zoo, the campaigns) describes what it measures as an EvalProtocol and hands it to
evaluate().

A protocol is a robustness curve under one attack (PGD by default) at radii `eps` of one norm, optionally
the standard AutoAttack (Croce & Hein 2020) at radii `aa_eps` with the per-sample worst case of both,
and the sanity checks of Carlini et al. (2019) with the PGD − AutoAttack gap rule. Every figure is kept
per sample (bit strings, "1" = classified correctly under the attack), so each accuracy comes with its
Wilson 95% interval and can be recomputed or paired (McNemar) later. Images and radii are in [0, 1]
pixel units; the model takes such pixels (normalization inside the model).

Randomness: the images are attacked in chunks of `batch_size`; the chunk that starts at image a is
seeded seed + a, so a run resumed after a stop, or sharded over processes along chunk boundaries, draws
the same random starts as one uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..attacks import FGSM, PGD, STANDARD_EPS, AutoAttack
from ..errors import UserError, check, check_field
from ..io import fingerprint
from ..models.folding import inference_copy
from ..precision import evaluation_note
from .checks import LARGE_EPS, LARGE_EPS_IMAGES, gap_check, sanity_checks
from .core import check_pixels, predict, robust_flags
from .progress import EvalProgress, unbits
from .stats import with_interval

log = logging.getLogger(__name__)

CURVE_ATTACKS = ("pgd", "fgsm", "autoattack")
# PGD's step in the full evaluation, as a fraction of eps. Madry's 2.5·eps/steps (0.05 at 50 steps)
# left 2.7-3 points between PGD and AutoAttack on the campaign's standard-trained models at L2 0.25;
# 0.2 and 0.4 close most of it (docs/evaluation.md, "PGD's step size")
FULL_REL_STEP = 0.2
# the radii of each norm's curves: a quick look, and the zoo's full evaluation (RobustBench's threat
# models: L2 0.5, Linf 8/255, with radii on either side)
QUICK_EPS = {"l2": (0.0, 0.25, 0.5), "linf": (0.0, 4 / 255, 8 / 255)}
FULL_EPS = {"l2": (0.0, 0.1, 0.25, 0.5, 0.75, 1.0), "linf": (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)}
FULL_AA_EPS = {"l2": (0.25, 0.5), "linf": (8 / 255,)}


@dataclass(frozen=True)
class EvalProtocol:
    """What one evaluation measures.

    norm: "l2" | "linf". eps: radii of the curve (pixel units; 0 is the clean accuracy). attack: the
    curve's attack, "pgd" | "fgsm" | "autoattack". steps, restarts, objectives: PGD's (restarts take
    the objectives in turn, each sample's worst case is kept); its step is rel_step·eps (None: Madry's
    2.5·eps/steps) or the absolute step_size. aa_eps: radii of the standard AutoAttack beside a PGD
    curve, with the per-sample worst case of both; aa_attacks: a cheaper AutoAttack subset (None: the
    standard version) with aa_targets target classes for APGD-T. checks: the sanity checks. seed: of
    every random start. batch_size: images per batch, and per chunk saved to the progress file.
    """

    norm: str = "l2"
    eps: tuple[float, ...] = QUICK_EPS["l2"]
    attack: str = "pgd"
    steps: int = 20
    restarts: int = 1
    rel_step: float | None = None
    step_size: float | None = None
    objectives: tuple[str, ...] = ("ce", "margin")
    aa_eps: tuple[float, ...] = ()
    aa_attacks: tuple[str, ...] | None = None
    aa_targets: int = 9
    checks: bool = True
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self):   # radii as float tuples, however given: they name the parts ("pgd:0.5")
        for name in ("eps", "aa_eps", "objectives"):
            values = getattr(self, name)
            object.__setattr__(self, name, tuple(v if name == "objectives" else float(v) for v in values))
        if self.aa_attacks is not None:
            object.__setattr__(self, "aa_attacks", tuple(self.aa_attacks))

    @classmethod
    def quick(cls, norm: str = "l2", **changes) -> "EvalProtocol":
        """A quick curve: PGD-20, one restart, at 0, half and all of the norm's standard radius; `changes`
        replace any of these settings."""
        return cls(**{"norm": norm, "eps": QUICK_EPS[norm], **changes})

    @classmethod
    def full(cls, norm: str = "l2", **changes) -> "EvalProtocol":
        """The zoo's full strength: PGD-50 with 2 restarts (cross-entropy, then margin) at FULL_EPS, the
        standard AutoAttack at FULL_AA_EPS, their worst case, every check; `changes` replace any of these
        settings (the speedrun's radii)."""
        return cls(**{"norm": norm, "eps": FULL_EPS[norm], "steps": 50, "restarts": 2, "rel_step": FULL_REL_STEP,
                      "aa_eps": FULL_AA_EPS[norm], **changes})

    @property
    def step_fraction(self) -> float | None:
        """PGD's step as a fraction of eps (None when an absolute step_size is given)."""
        if self.step_size is not None:
            return None
        return 2.5 / self.steps if self.rel_step is None else float(self.rel_step)

    def validate(self) -> None:
        """ConfigError naming the field (the CLI names its flag: --steps, --rel-step, ...)."""
        check_field(self.norm in STANDARD_EPS, "norm", f"must be l2 or linf, got {self.norm!r}")
        check_field(self.attack in CURVE_ATTACKS, "attack", f"must be one of {', '.join(CURVE_ATTACKS)}, got {self.attack!r}")
        for name in ("eps", "aa_eps"):
            values = getattr(self, name)
            check_field(all(math.isfinite(e) and e >= 0 for e in values), name, f"must be radii >= 0, got {list(values)}")
        check_field(len(self.eps) > 0 or len(self.aa_eps) > 0, "eps", "is empty: a protocol needs radii")
        check_field(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check_field(self.restarts >= 1, "restarts", f"must be >= 1, got {self.restarts}")
        check_field(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check_field(0 <= self.seed < 2**32, "seed", f"must lie in 0..{2**32 - 1}, got {self.seed}")
        check_field(self.rel_step is None or self.step_size is None, "step_size", "and rel_step exclude each other")
        for name in ("rel_step", "step_size"):
            v = getattr(self, name)
            check_field(v is None or (math.isfinite(v) and v > 0), name, f"must be > 0, got {v}")
        check_field(not self.aa_eps or self.attack == "pgd", "aa_eps", "goes with a PGD curve (attack pgd)")

    def settings(self, model_sha256: str, data_sha256: str, n: int) -> dict:
        """What identifies this evaluation of these weights on these images: a progress file made under
        other settings is never resumed. Settings at the values of advgen's first full evaluations are
        left out, so that their files still resume and match."""
        s = {"n": n, "pgd_eps": [float(e) for e in self.eps], "aa_eps": [float(e) for e in self.aa_eps],
             "pgd_steps": self.steps, "restarts": self.restarts, "seed": self.seed, "batch_size": self.batch_size,
             "model_sha256": model_sha256, "data_sha256": data_sha256}
        if tuple(self.objectives) != ("ce",):
            s["pgd_objectives"] = list(self.objectives)
        if self.step_size is not None:
            s["pgd_step_size"] = self.step_size
        elif self.step_fraction != 2.5 / self.steps:
            s["pgd_rel_step"] = self.step_fraction
        optional = {"norm": ("l2", self.norm), "attack": ("pgd", self.attack), "checks": (True, self.checks),
                    "aa_targets": (9, self.aa_targets),
                    "aa_attacks": (None, None if self.aa_attacks is None else list(self.aa_attacks))}
        s.update({k: v for k, (usual, v) in optional.items() if v != usual})
        return s

    def describe(self) -> str:
        """One line for the console: what ran."""
        curve = {"pgd": f"PGD-{self.norm.upper()} {self.steps} steps x {self.restarts} restart(s) ascending "
                        f"{', '.join(self.objectives[r % len(self.objectives)] for r in range(self.restarts))}",
                 "fgsm": f"FGSM-{self.norm.upper()}", "autoattack": f"AutoAttack-{self.norm.upper()}"}[self.attack]
        aa = f"; the standard AutoAttack-{self.norm.upper()} at {_radii(self.aa_eps, self.norm)}" if self.aa_eps else ""
        return f"{curve} at {_radii(self.eps, self.norm)}{aa}; fp32"


def _radii(values, norm: str) -> str:
    """Radii as people write them: 8/255 for Linf multiples of 1/255, decimals otherwise."""
    def one(e):
        k = e * 255
        return f"{round(k)}/255" if norm == "linf" and e and abs(k - round(k)) < 1e-6 else f"{e:g}"
    return ", ".join(one(e) for e in values)


def curve_key(attack: str, norm: str) -> str:
    """The result key of a curve: "pgd_l2", "autoattack_linf", ..."""
    return f"{attack}_{norm}"


def _attack_maker(p: EvalProtocol, model: nn.Module, kind: str) -> Callable[[float, int], Callable]:
    """(eps, seed) -> the attack callable of `kind` ("pgd", "fgsm", "autoattack", "large") at that radius."""
    if kind == "pgd":
        return lambda e, s: PGD(model, norm=p.norm, eps=e, steps=p.steps, step_size=p.step_size,
                                rel_step=p.step_fraction, restarts=p.restarts, seed=s, objective=tuple(p.objectives))
    if kind == "fgsm":
        return lambda e, s: FGSM(model, norm=p.norm, eps=e, seed=s)
    if kind == "autoattack":   # the standard version unless a subset is asked for
        custom = {} if p.aa_attacks is None and p.aa_targets == 9 else \
            {"targets": p.aa_targets, "attacks": None if p.aa_attacks is None else list(p.aa_attacks)}
        return lambda e, s: AutoAttack(model, norm=p.norm, eps=e, seed=s, **custom)
    return lambda e, s: PGD(model, norm=p.norm, eps=e, steps=20, rel_step=0.1, seed=s)


def collect(p: EvalProtocol, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            progress: EvalProgress, offset: int = 0) -> dict[str, torch.Tensor]:
    """Per-sample correctness of every part of protocol p, {part key: bool (N,)}: "clean", "ATTACK:eps"
    for the curve, "aa:eps", and for the checks "fgsm:eps" and "large" (the first LARGE_EPS_IMAGES
    images only). `model` is attacked as given (evaluate() passes a BatchNorm-folded copy); images
    (N, C, H, W) uint8 or float in [0, 1]; offset: index of images[0] in the whole test set (seeds)."""
    n, fmt = int(labels.shape[0]), torch.channels_last

    def part(key: str, kind: str, eps: float, count: int = n) -> torch.Tensor:
        make = _attack_maker(p, model, kind)
        return progress.flags(key, count, p.batch_size, lambda a, b: robust_flags(
            model, images[a:b], labels[a:b], lambda r: make(r, p.seed + offset + a), [eps], p.batch_size, fmt)[0])

    prefix = {"pgd": "pgd", "fgsm": "fgsm", "autoattack": "aa"}[p.attack]
    out = {"clean": progress.flags("clean", n, p.batch_size,
                                   lambda a, b: predict(model, images[a:b], p.batch_size) == labels[a:b])}
    out.update({f"{prefix}:{e}": part(f"{prefix}:{e}", p.attack, e) for e in p.eps})
    out.update({f"aa:{e}": part(f"aa:{e}", "autoattack", e) for e in p.aa_eps})
    if p.checks and p.attack == "pgd":
        out.update({f"fgsm:{e}": part(f"fgsm:{e}", "fgsm", e) for e in p.eps})
    if p.checks:
        out["large"] = part("large", "large", LARGE_EPS[p.norm], min(LARGE_EPS_IMAGES, n))
    return out


def summarize(p: EvalProtocol, flags: dict[str, torch.Tensor]) -> dict:
    """The result of protocol p from its per-sample flags (collect()): every accuracy with its Wilson
    interval, the worst case of PGD and AutoAttack per aa radius, and the checks."""
    n = int(flags["clean"].numel())
    prefix = {"pgd": "pgd", "fgsm": "fgsm", "autoattack": "aa"}[p.attack]
    curve = {e: flags[f"{prefix}:{e}"] for e in p.eps}
    aa = {e: flags[f"aa:{e}"] for e in p.aa_eps}
    mean = lambda f: f.float().mean().item()  # noqa: E731
    result = {"n": n, "clean": with_interval(flags["clean"]),
              curve_key(p.attack, p.norm): {str(e): with_interval(f) for e, f in curve.items()}}
    if aa:
        result[curve_key("autoattack", p.norm)] = {str(e): with_interval(f) for e, f in aa.items()}
        result[f"worst_case_{p.norm}"] = {str(e): with_interval(f & curve.get(e, f)) for e, f in aa.items()}
    if p.checks:
        fgsm = [mean(flags[f"fgsm:{e}"]) for e in p.eps] if p.attack == "pgd" else None
        checks = sanity_checks(p.norm, list(p.eps), [mean(f) for f in curve.values()], fgsm, mean(flags["large"]), n)
        if aa:
            checks.append(gap_check({e: mean(f) for e, f in curve.items()}, {e: mean(f) for e, f in aa.items()}, n))
        result["checks"] = checks
    return result


def _attacks_run(p: EvalProtocol) -> dict:
    """What each attack of the result was, for readers of the JSON."""
    out = {}
    if p.attack == "pgd":
        out[curve_key("pgd", p.norm)] = {
            "steps": p.steps, "restarts": p.restarts, "objectives": list(p.objectives), "random_start": True,
            "step_size": f"{p.step_fraction:g} * eps" if p.step_size is None else p.step_size,
            "keep": "each sample's worst case over restarts"}
    if p.attack == "autoattack" or p.aa_eps:
        out[curve_key("autoattack", p.norm)] = (
            {"version": "standard", "attacks": ["apgd-ce", "apgd-t (9 targets)", "fab-t", "square"]}
            if p.aa_attacks is None else {"version": "custom", "attacks": list(p.aa_attacks), "targets": p.aa_targets})
    if p.attack == "fgsm":
        out[curve_key("fgsm", p.norm)] = {"random_start": False}
    return out


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, protocol: EvalProtocol | None = None,
             *, progress_file: str | Path | None = None, restart_stale: bool = False) -> dict:
    """Run `protocol` (default: EvalProtocol.quick()) on (images, labels) and return its JSON-ready result:

    {"protocol", "settings", "n", "attacks", "clean", "<attack>_<norm>": {eps: {"accuracy", "ci95",
    "correct", "n"}}, ["autoattack_<norm>", "worst_case_<norm>"], "checks", "samples", "seconds"}.

    The model is attacked as a BatchNorm-folded, channels-last copy in eval mode (the same function up
    to float rounding, fewer operations per step), in fp32. progress_file: a JSON file the per-sample
    results are written to after every chunk and resumed from; one written under other settings,
    another model or other images is refused, never overwritten (restart_stale: an application's own
    cache file, which is started over with a warning instead: the run was trained again).
    """
    p = protocol or EvalProtocol.quick()
    p.validate()
    check_pixels(images, labels)
    n = int(labels.shape[0])
    check(n >= 1, "no test images to evaluate")
    settings = p.settings(fingerprint(model), fingerprint([images, labels]), n)
    try:
        progress = EvalProgress(progress_file, settings)
    except UserError as err:
        if not restart_stale:
            raise
        log.warning("%s; starting it over", err)
        Path(progress_file).unlink()
        progress = EvalProgress(progress_file, settings)
    log.info("evaluation precision: %s", evaluation_note(images.device))
    fast = inference_copy(model)
    flags = collect(p, fast, images, labels, progress)
    return {"protocol": dataclasses.asdict(p), "settings": settings, "attacks": _attacks_run(p),
            **summarize(p, flags), "samples": progress.parts, "seconds": progress.seconds}


def from_samples(p: EvalProtocol, samples: dict[str, str]) -> dict:
    """summarize() of the per-sample bit strings a result or progress file holds."""
    return summarize(p, {k: unbits(v) for k, v in samples.items()})
