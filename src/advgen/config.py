"""Typed configuration of a training run. The CLI fills these; library code never sees argparse.

A run's settings are a TrainConfig: what every method shares (model, data, optimizer, schedule, speed
decisions) plus `options`, the typed options of its method, whose class the method registers beside
itself (training/method.py). Validation happens here, once; errors name the config field
(ConfigError.field), and the CLI maps fields to its flags.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UserError, check_field
from .precision import PRECISIONS

SCHEDULES = ("cosine", "constant")
NORMS = ("l2", "linf")
# each norm's radius when none is given: the paper's min-max eps for L2, the field's 8/255 for Linf
DEFAULT_EPS = {"l2": 0.05, "linf": 8 / 255}


@dataclass
class NoOptions:
    """Options of a method that has none (standard training)."""

    def validate(self) -> None:
        pass


@dataclass
class ThreatModel:
    """The ball a training method perturbs in: norm "l2" | "linf" and radius eps in [0, 1] pixel units
    (None: DEFAULT_EPS of the norm). The base of every attack-based method's options; their fields keep
    the `attack.` prefix in errors, so the CLI reports them as --attack-norm, --attack-eps, ..."""

    norm: str = "l2"
    eps: float | None = None

    @property
    def radius(self) -> float:
        return DEFAULT_EPS[self.norm] if self.eps is None else self.eps

    def validate(self) -> None:
        check_field(self.norm in NORMS, "attack.norm", f"must be l2 or linf, got {self.norm!r}")
        check_field(self.eps is None or (math.isfinite(self.eps) and self.eps > 0), "attack.eps",
                    f"must be > 0, got {self.eps}")


def check_step_size(step_size: float | None) -> None:
    check_field(step_size is None or (math.isfinite(step_size) and step_size > 0),
                "attack.step_size", f"must be > 0, got {step_size}")


@dataclass
class SignedStepThreatModel(ThreatModel):
    """A threat model whose ascent takes steps of step_size (pixel units; None: eps), as N-FGSM's and
    Free-AT's do."""

    step_size: float | None = None

    @property
    def step(self) -> float:
        return self.radius if self.step_size is None else self.step_size

    def validate(self) -> None:
        super().validate()
        check_step_size(self.step_size)


@dataclass
class AttackConfig(ThreatModel):
    """A training attack: the inner maximiser of min-max training (eq. 1) and of FGSM-RS.

    Pixels in [0, 1]. eps None: DEFAULT_EPS of the norm. step_size None: 2.5·eps/steps (Madry et al.).
    Paper preset of min-max: L2, eps 0.05, 40 steps of 0.005.
    """

    steps: int = 40
    step_size: float | None = None
    random_start: bool = True

    @property
    def step(self) -> float:
        return 2.5 * self.radius / self.steps if self.step_size is None else self.step_size

    def validate(self) -> None:
        super().validate()
        check_field(self.steps >= 1, "attack.steps", f"must be >= 1, got {self.steps}")
        check_step_size(self.step_size)


@dataclass
class TrainConfig:
    method: str = "standard"
    options: Any = None              # the method's options (its registered class); None: its defaults
    model: str = "resnet20"
    dataset: str = "cifar10"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    # robust accuracy watched after each epoch on the first `watch_subset` test images (0: off);
    # for FGSM training it is the catastrophic-overfitting check of Wong et al. 2020
    watch_subset: int = 0
    watch_norm: str = "l2"
    watch_eps: float = 0.5
    watch_steps: int = 10
    init: str | None = None
    # stop training once this many seconds of training steps have run (None: run all epochs); the
    # epoch in progress ends early, is evaluated and saved as usual. Pair with schedule="constant".
    time_budget: float | None = None
    # the clock of time_budget: "wall" (seconds elapsed) or "process" (CPU seconds of this process, all
    # threads: on a shared machine, a single-threaded run's budget is then not eaten by other jobs)
    budget_clock: str = "wall"
    # stop after this many training steps in all (None: run all epochs): a budget in work done, the
    # same on every machine; each epoch row records its steps and the forward-backward passes they cost
    budget_steps: int | None = None
    # speed settings (benchmarks/README.md): the same training up to float rounding, except precision
    channels_last: bool | None = None  # NHWC layout of the classifier and its batches; None: on for the CPU only
    compile: bool = False              # torch.compile the training forward (on the CPU it needs a C++ compiler)
    # auto | fp32 | bf16 | fp16: autocast of the training forward passes (precision.py; fp16 with a
    # GradScaler); auto is fp32 on every device until the bf16 A/B decides. Evaluation runs in fp32.
    precision: str = "auto"
    fold_bn_attack: bool = True        # attack methods: attack a BatchNorm-folded copy of the classifier
    sync_bn: bool = False              # under torchrun: BatchNorm statistics over the global batch (CUDA only)

    def __post_init__(self):
        if self.options is None and isinstance(self.method, str):
            spec = _method_spec(self.method, strict=False)
            if spec is not None:
                self.options = spec.options()

    def validate(self) -> None:
        from .models import MODELS, is_import_path
        spec = _method_spec(self.method)
        check_field(isinstance(self.options, spec.options), "options",
                    f"of method {self.method} must be {spec.options.__name__}, got {type(self.options).__name__}")
        check_field(self.model in MODELS or is_import_path(self.model), "model",
                    f"unknown: {self.model!r}; choose from {', '.join(sorted(MODELS))} or package.module:factory")
        check_field(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check_field(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check_field(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check_field(0 <= self.momentum < 1, "momentum", f"must lie in [0, 1), got {self.momentum}")
        check_field(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                    f"must be >= 0, got {self.weight_decay}")
        check_field(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        check_field(0 <= self.seed < 2**32, "seed", f"must lie in 0..{2**32 - 1}, got {self.seed}")
        check_field(self.train_subset is None or self.train_subset >= 1, "train_subset",
                    f"must be >= 1, got {self.train_subset}")
        check_field(self.test_subset is None or self.test_subset >= 1, "test_subset",
                    f"must be >= 1, got {self.test_subset}")
        check_field(self.watch_subset >= 0, "watch_subset", f"must be >= 0, got {self.watch_subset}")
        check_field(self.watch_norm in NORMS, "watch_norm", f"must be l2 or linf, got {self.watch_norm!r}")
        check_field(math.isfinite(self.watch_eps) and self.watch_eps > 0, "watch_eps", f"must be > 0, got {self.watch_eps}")
        check_field(self.watch_steps >= 1, "watch_steps", f"must be >= 1, got {self.watch_steps}")
        check_field(self.time_budget is None or (math.isfinite(self.time_budget) and self.time_budget > 0),
                    "time_budget", f"must be > 0 seconds, got {self.time_budget}")
        check_field(self.budget_steps is None or self.budget_steps >= 1, "budget_steps",
                    f"must be >= 1, got {self.budget_steps}")
        check_field(self.budget_clock in ("wall", "process"), "budget_clock",
                    f"must be wall or process, got {self.budget_clock!r}")
        check_field(self.precision in PRECISIONS, "precision",
                    f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("compile", "fold_bn_attack"):
            check_field(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        check_field(self.channels_last in (None, True, False), "channels_last",
                    f"must be true, false or None (auto), got {self.channels_last!r}")
        self.options.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of to_dict; also reads the configs of advgen 0.1 run folders (`attack` and
        `generator` beside the common fields) and of runs made before `precision` (`amp`: false reads
        as precision auto, which is fp32; true as bf16, what --amp meant everywhere but on CUDA GPUs
        without bf16, where it meant fp16)."""
        d = dict(d)
        amp = d.pop("amp", None)
        if "precision" not in d:
            d["precision"] = "bf16" if amp else "auto"
        method = d.get("method", "standard")
        legacy = {"attack": d.pop("attack", None), "generator": d.pop("generator", None)}
        options = d.pop("options", None)
        if options is None:
            options = legacy["generator"] if method == "generator" else legacy["attack"]
        spec = _method_spec(method)
        return cls(options=from_dict(spec.options, options or {}), **d)


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


def _method_spec(name: str, strict: bool = True):
    from .training.method import METHODS
    if name in METHODS:
        return METHODS[name]
    if strict:
        raise ConfigError("method", f"unknown: {name!r}; choose from {', '.join(sorted(METHODS))}")
    return None
