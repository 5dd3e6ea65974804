"""A training run's settings: TrainConfig, what every method shares (model, data, optimizer, schedule,
speed decisions) plus `options`, the typed options of its method, whose class the method registers beside
itself (training/method.py). Validation happens here, once; errors name the config field
(ConfigError.field), and the CLI maps fields to its flags.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..attacks import STANDARD_EPS
from ..config import NORMS, from_dict, resolved, with_defaults
from ..data import AUGMENTATIONS
from ..errors import ConfigError, check_field
from ..flags import check_types
from ..models import MODELS, is_import_path
from ..precision import PRECISIONS
from .method import METHODS

SCHEDULES = ("cosine", "cyclic", "constant")


def lr_factor(schedule: str, total: int):
    """The learning rate's multiplier at step i (0-based) of a run of `total` steps, as a function of i.

    cosine: 0.5 (1 + cos(pi i / total)) (Loshchilov & Hutter 2017, without restarts);
    cyclic: one cycle, linear from 0 up to 1 at 2/5 of the steps, then down to 0 at the last (Wong et al.
    2020, "Fast is better than free", their CIFAR-10 schedule; step i trains at the cycle's value at its
    middle, i + 1/2, so neither the first nor the last step has a rate of 0); constant: 1."""
    if schedule == "cosine":
        return lambda i: 0.5 * (1 + math.cos(math.pi * i / total))
    if schedule == "cyclic":
        peak = 0.4 * total
        return lambda i: (i + 0.5) / peak if i + 0.5 <= peak else max(0.0, (total - i - 0.5) / (total - peak))
    return lambda i: 1.0


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
    # the watch's threat model: None = the training's own (its options' norm and radius; L2 0.5 for a
    # method without one); set only with watch_subset > 0 (without a watch they would do nothing)
    watch_subset: int = 0
    watch_norm: str | None = None
    watch_eps: float | None = None
    watch_steps: int = 10
    init: str | None = None
    # the training augmentation: a comma list of crop and flip, or none (for data whose label depends on
    # left and right, flip changes it); crop,flip for every dataset unless told
    augment: str = "crop,flip"
    # the normalization of a foreign `init` file that does not carry its own (checkpoint.load_model's
    # normalize: "cifar10", "cifar100", "imagenet", "none" or "M1,M2,M3/S1,S2,S3"); never assumed
    init_normalize: str | None = None
    # stop training once this many seconds of training steps have run (None: run all epochs); the
    # epoch in progress ends early, is evaluated and saved as usual. Pair with schedule="constant".
    time_budget: float | None = None
    # the clock of time_budget: "wall" (seconds elapsed) or "process" (CPU seconds of this process, all
    # threads: on a shared machine, a single-threaded run's budget is then not eaten by other jobs)
    budget_clock: str = "wall"
    # stop after this many training steps in all (None: run all epochs): a budget in work done, the
    # same on every machine; each epoch row records its steps and the forward-backward passes they cost
    budget_steps: int | None = None
    # speed settings (benchmarks/README.md): the same training up to float rounding, except amp
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
        spec = _method_spec(self.method)
        check_field(isinstance(self.options, spec.options), "options",
                    f"of method {self.method} must be {spec.options.__name__}, got {type(self.options).__name__}")
        check_types(self)   # the options are a dataclass field of no fixed type: checked below, by their own
        if dataclasses.is_dataclass(self.options):
            check_types(self.options, "options.")
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
        check_field(self.init_normalize is None or (isinstance(self.init_normalize, str) and self.init is not None),
                    "init_normalize", f"states the normalization of a foreign init checkpoint: a text such as "
                                      f"cifar10, and only with init (got {self.init_normalize!r}, init {self.init!r})")
        parts = [a for a in self.augment.split(",") if a] if isinstance(self.augment, str) else None
        check_field(parts is not None and (parts == ["none"] or (parts and set(parts) <= set(AUGMENTATIONS)
                                                                 and len(set(parts)) == len(parts))),
                    "augment", f"must be none or a comma list of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        check_field(self.watch_subset >= 0, "watch_subset", f"must be >= 0, got {self.watch_subset}")
        check_field(self.watch_norm is None or self.watch_norm in NORMS, "watch_norm",
                    f"must be l2 or linf, got {self.watch_norm!r}")
        check_field(self.watch_eps is None or (math.isfinite(self.watch_eps) and self.watch_eps > 0), "watch_eps",
                    f"must be > 0, got {self.watch_eps}")
        for name in ("watch_norm", "watch_eps"):
            check_field(getattr(self, name) is None or self.watch_subset > 0, name,
                        "sets the watch's threat model: it needs watch_subset > 0 (the images watched)")
        check_field(self.watch_steps >= 1, "watch_steps", f"must be >= 1, got {self.watch_steps}")
        check_field(self.time_budget is None or (math.isfinite(self.time_budget) and self.time_budget > 0),
                    "time_budget", f"must be > 0 seconds, got {self.time_budget}")
        check_field(self.budget_steps is None or self.budget_steps >= 1, "budget_steps",
                    f"must be >= 1, got {self.budget_steps}")
        check_field(self.budget_clock in ("wall", "process"), "budget_clock",
                    f"must be wall or process, got {self.budget_clock!r}")
        check_field(self.budget_clock == "wall" or self.time_budget is not None, "budget_clock",
                    "is the clock of time_budget: it needs a time_budget")
        check_field(self.precision in PRECISIONS, "precision",
                    f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("compile", "fold_bn_attack"):
            check_field(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        check_field(self.channels_last in (None, True, False), "channels_last",
                    f"must be true, false or None (auto), got {self.channels_last!r}")
        self.options.validate()

    @property
    def augmentations(self) -> tuple[str, ...]:
        """augment as the batches take it: ("crop", "flip"), ("flip",), () for none."""
        return () if self.augment == "none" else tuple(a for a in self.augment.split(",") if a)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def threat(self) -> tuple[str, float] | None:
        """(norm, radius) the method trains against: an attack method's options, a generator bank
        bounded in an L2 or Linf ball; None for standard training and the paper's box bound."""
        if hasattr(self.options, "norm") and hasattr(self.options, "radius"):
            return self.options.norm, self.options.radius
        bank = getattr(self.options, "bank", None)
        if getattr(bank, "bound", None) in NORMS:
            return bank.bound, bank.size
        return None

    @property
    def watch_threat(self) -> tuple[str, float]:
        """(norm, radius) of the watch: watch_norm / watch_eps, else the training's threat model
        (`threat`), else L2 at its standard radius."""
        own = self.threat
        norm = self.watch_norm or (own[0] if own else "l2")
        if self.watch_eps is not None:
            return norm, self.watch_eps
        return norm, own[1] if own and own[0] == norm else STANDARD_EPS[norm]

    def resolved(self) -> "TrainConfig":
        """This config with its defaults written in as they ran (config.resolved; the watch's threat model
        where there is a watch): what run.json records."""
        watch = self.watch_threat if self.watch_subset > 0 else (None, None)
        return dataclasses.replace(self, options=resolved(self.options), watch_norm=watch[0], watch_eps=watch[1])

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of to_dict; also reads the configs of advgen 0.1 run folders (`attack` and
        `generator` beside the common fields), FGSM runs made before FGSMOptions (min-max's options, read
        as what ran) and runs made before `precision` (`amp`: false reads
        as precision auto, which is fp32; true as bf16, what --amp meant everywhere but on CUDA GPUs
        without bf16, where it meant fp16)."""
        d = dict(d)
        amp = d.pop("amp", None)
        if "precision" not in d:
            d["precision"] = "bf16" if amp else "auto"
        method = d.get("method", "standard")
        legacy = {"attack": d.pop("attack", None), "generator": d.pop("generator", None)}
        options = d.pop("options", None)
        spec = _method_spec(method)
        if options is None:
            options = legacy["generator"] if method == "generator" else legacy["attack"]
            if not dataclasses.fields(spec.options):
                options = None   # 0.1 kept `attack` in every config; standard training ignored it
        if method == "fgsm" and options and "steps" in options:
            # before FGSMOptions, FGSM carried min-max's options and ignored all but norm and eps: it ran
            # one step of 1.25 eps from a random start, whatever steps, step_size and random_start said
            options = {k: v for k, v in options.items() if k in ("norm", "eps")}
        return cls(options=from_dict(spec.options, options or {}), **d)


def at_radius(options, eps: float):
    """A method's options (its dataclass) at radius eps of their threat model, the inverse of
    TrainConfig.threat: an attack method's eps, the size of a generator bank bounded in a norm (its step
    after, sized by the bound by default, follows). Step sizes given in pixel units stay as given.
    ConfigError for options without a threat model (standard training, the paper's box bound)."""
    if hasattr(options, "norm") and hasattr(options, "eps"):
        return dataclasses.replace(options, eps=eps)
    bank = getattr(options, "bank", None)
    if getattr(bank, "bound", None) in NORMS:
        return dataclasses.replace(options, bank=dataclasses.replace(bank, size=eps))
    raise ConfigError("options", f"({type(options).__name__}) have no threat model whose radius could be set to "
                                 f"{eps:g}")


def as_run(saved: dict, version: str | None = None) -> dict:
    """A config dict read from a run (run.json, a state's header) as it ran, comparable with
    `cfg.resolved().to_dict()`: settings added since at their defaults, method defaults written in.
    advgen 0.1 trained every L2 attack method at eps 0.05 when none was given: a record of that version
    without an eps says 0.05 here, not today's 0.5."""
    saved = with_defaults(saved, TrainConfig(method=saved.get("method", "standard")).to_dict())
    if not saved.get("watch_subset"):   # records before watch_norm/eps could be None: without a watch, unused
        saved.update(watch_norm=None, watch_eps=None)
    cfg = TrainConfig.from_dict(saved)
    options = cfg.options
    if (version or "").startswith("0.1") and getattr(options, "eps", 0) is None and options.norm == "l2":
        options.eps = 0.05
    return cfg.resolved().to_dict()


def _method_spec(name: str, strict: bool = True):
    if name in METHODS:
        return METHODS[name]
    if strict:
        raise ConfigError("method", f"unknown: {name!r}; choose from {', '.join(sorted(METHODS))}")
    return None
