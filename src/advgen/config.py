"""Typed options shared by the training methods (threat models, the PGD training attack) and the helpers
that read configs back from JSON. The CLI fills these; library code never sees argparse.

A run's settings are a training.config.TrainConfig, whose `options` are the typed options of its method
(an options class derived from the ones here, or of its own). Validation happens in their validate(),
once; errors name the config field (ConfigError.field), and the CLI maps fields to its flags.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

from .attacks import STANDARD_EPS
from .errors import UserError, check_field
from .flags import check_types, option

NORMS = ("l2", "linf")


@dataclass
class NoOptions:
    """Options of a method that has none (standard training)."""

    def validate(self) -> None:
        pass


@dataclass
class ThreatModel:
    """The ball a training method perturbs in: norm "l2" | "linf" and radius eps in [0, 1] pixel units
    (None: STANDARD_EPS of the norm). The base of every attack-based method's options; their fields keep
    (--attack-norm, --attack-eps, ... on the command line)."""

    norm: str = option("l2", "--attack-norm", "the threat model's norm", choices=NORMS)
    eps: float | None = option(None, "--attack-eps", "radius in [0, 1] pixel units (default: the norm's standard radius, 0.5 for l2, 8/255 for linf)")

    @property
    def radius(self) -> float:
        return STANDARD_EPS[self.norm] if self.eps is None else self.eps

    def validate(self) -> None:
        check_types(self, "options.")
        check_field(self.norm in NORMS, "options.norm", f"must be l2 or linf, got {self.norm!r}")
        check_field(self.eps is None or (math.isfinite(self.eps) and self.eps > 0), "options.eps",
                    f"must be > 0, got {self.eps}")


def check_step_size(step_size: float | None) -> None:
    check_field(step_size is None or (math.isfinite(step_size) and step_size > 0),
                "options.step_size", f"must be > 0, got {step_size}")


@dataclass
class SignedStepThreatModel(ThreatModel):
    """A threat model whose ascent takes steps of step_size (pixel units; None: eps), as N-FGSM's and
    Free-AT's do."""

    step_size: float | None = option(None, "--attack-step-size", "step size in pixel units (default: the "
                                     "method's: 2.5 eps / steps for minmax, 2 eps / steps for trades, eps otherwise)")

    @property
    def step(self) -> float:
        return self.radius if self.step_size is None else self.step_size

    def validate(self) -> None:
        super().validate()
        check_step_size(self.step_size)


@dataclass
class AttackConfig(ThreatModel):
    """A training attack: the inner maximiser of min-max training (eq. 1) and of FGSM-RS.

    Pixels in [0, 1]. eps None: STANDARD_EPS of the norm. step_size None: 2.5·eps/steps (Madry et al.).
    Paper preset of min-max: L2, eps 0.05, 40 steps of 0.005.
    """

    steps: int = option(40, "--attack-steps", "PGD steps of minmax (default 40) and trades (default 10)")
    step_size: float | None = option(None, "--attack-step-size")
    random_start: bool = True

    @property
    def step(self) -> float:
        return 2.5 * self.radius / self.steps if self.step_size is None else self.step_size

    def validate(self) -> None:
        super().validate()
        check_field(self.steps >= 1, "options.steps", f"must be >= 1, got {self.steps}")
        check_step_size(self.step_size)


def resolved(options):
    """A copy of a method's options with the defaults that follow from other fields written in, as they
    ran: eps None -> the norm's standard radius, step_size None -> the method's step (its `step`). What
    run.json records, so that a record never says `"eps": null`."""
    if not dataclasses.is_dataclass(options):
        return options
    changes = {}
    if getattr(options, "eps", 0) is None and hasattr(options, "radius"):
        changes["eps"] = options.radius
    if getattr(options, "step_size", 0) is None and hasattr(options, "step"):
        changes["step_size"] = options.step
    return dataclasses.replace(options, **changes)


def with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` (a config dict of an older advgen) with every setting added since at its default, nested
    dicts (method options) too: a run made before a setting existed ran as with its default."""
    out = dict(defaults)
    for k, v in saved.items():
        out[k] = with_defaults(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


def from_dict(kind: type, d: dict):
    """Build dataclass `kind` from a dict (nested dataclass fields too); unknown keys are an error."""
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown {kind.__name__} settings: {', '.join(unknown)}")
    values = {}
    for k, v in d.items():
        t = hints[k]
        values[k] = from_dict(t, v) if dataclasses.is_dataclass(t) and isinstance(v, dict) else v
    return kind(**values)
