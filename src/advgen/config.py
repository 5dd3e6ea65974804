"""Typed configuration of a training run. The CLI fills these; library code never sees argparse."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import UserError, check
from .models.generators import GeneratorConfig

METHODS = ("standard", "minmax", "fgsm", "generator")
SCHEDULES = ("cosine", "constant")


@dataclass
class AttackConfig:
    """The inner maximiser of min-max training (eq. 1). Paper preset: L2, eps 0.05, 40 steps of 0.005."""

    norm: str = "l2"
    eps: float = 0.05
    steps: int = 40
    step_size: float | None = 0.005
    random_start: bool = True

    def validate(self) -> None:
        check(self.norm in ("l2", "linf"), f"--attack-norm must be l2 or linf, got {self.norm!r}")
        check(math.isfinite(self.eps) and self.eps > 0, f"--attack-eps must be > 0, got {self.eps}")
        check(self.steps >= 1, f"--attack-steps must be >= 1, got {self.steps}")
        check(self.step_size is None or (math.isfinite(self.step_size) and self.step_size > 0),
              f"--attack-step-size must be > 0, got {self.step_size}")


@dataclass
class GeneratorTraining:
    """How the generator bank is trained (eq. 5) and the variants beyond the paper."""

    bank: GeneratorConfig = field(default_factory=GeneratorConfig)
    optimizer: str = "sgd"          # sgd | adam
    lr: float = 0.005               # paper: SGD 0.005
    momentum: float = 0.0           # SGD momentum of the generators
    steps: int = 1                  # generator ascent steps per classifier step (>1 costs passes)
    clean_fraction: float = 0.0     # share of each batch left clean (eq. 2 uses 0)
    warmup_epochs: float = 0.0      # linear ramp of the bound size s from 0 over this many epochs
    reinit_every: int = 0           # every this many steps, re-draw the weakest generator (0: never)

    def validate(self) -> None:
        self.bank.validate()
        check(self.optimizer in ("sgd", "adam"), f"--gen-optimizer must be sgd or adam, got {self.optimizer!r}")
        check(math.isfinite(self.lr) and self.lr > 0, f"--gen-lr must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"--gen-momentum must lie in [0, 1), got {self.momentum}")
        check(self.steps >= 1, f"--gen-steps must be >= 1, got {self.steps}")
        check(0 <= self.clean_fraction < 1, f"--clean-fraction must lie in [0, 1), got {self.clean_fraction}")
        check(self.warmup_epochs >= 0, f"--gen-warmup must be >= 0, got {self.warmup_epochs}")
        check(self.reinit_every >= 0, f"--gen-reinit-every must be >= 0, got {self.reinit_every}")


def generator_preset(name: str) -> GeneratorTraining:
    """Named generator settings. "paper": Jung 2024 as published (32 generators, box bound s = 0.2, SGD
    0.005). "gradient": advgen's recommendation from its equal-time comparison (README): the generators
    also see the input gradient and start as the FGSM-L2 step they learn to correct (grad_skip), with
    the L2 bound at the evaluation's eps (0.5) and Adam 1e-3; one more forward and backward per step."""
    if name == "paper":
        return GeneratorTraining(bank=GeneratorConfig(n=32, bound="box", size=0.2), optimizer="sgd", lr=0.005)
    if name == "gradient":
        return GeneratorTraining(bank=GeneratorConfig(n=32, bound="l2", size=0.5, grad_input=True, grad_skip=True),
                                 optimizer="adam", lr=1e-3)
    raise UserError(f"unknown generator preset {name!r}; choose from {', '.join(GENERATOR_PRESETS)}")


GENERATOR_PRESETS = ("paper", "gradient")


@dataclass
class TrainConfig:
    method: str = "standard"
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
    # speed settings (benchmarks/README.md): the same training up to float rounding, except amp
    channels_last: bool | None = None  # NHWC layout of the classifier and its batches; None: on for the CPU only
    compile: bool = False              # torch.compile the classifier (on the CPU it needs a C++ compiler)
    amp: bool = False                  # bf16 autocast of the forward passes (meant for CUDA; works on the CPU)
    fold_bn_attack: bool = True        # minmax / fgsm: attack a BatchNorm-folded copy of the classifier
    attack: AttackConfig = field(default_factory=AttackConfig)
    generator: GeneratorTraining = field(default_factory=GeneratorTraining)

    def validate(self) -> None:
        from .models import MODELS
        check(self.method in METHODS, f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        check(self.model in MODELS, f"unknown model {self.model!r}; choose from {', '.join(sorted(MODELS))}")
        check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        check(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"--momentum must lie in [0, 1), got {self.momentum}")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
              f"--weight-decay must be >= 0, got {self.weight_decay}")
        check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
        check(0 <= self.seed < 2**32, f"--seed must lie in 0..{2**32 - 1}, got {self.seed}")
        check(self.train_subset is None or self.train_subset >= 1, f"--train-subset must be >= 1, got {self.train_subset}")
        check(self.test_subset is None or self.test_subset >= 1, f"--test-subset must be >= 1, got {self.test_subset}")
        check(self.watch_subset >= 0, f"--watch-subset must be >= 0, got {self.watch_subset}")
        check(self.watch_norm in ("l2", "linf"), f"--watch-norm must be l2 or linf, got {self.watch_norm!r}")
        check(math.isfinite(self.watch_eps) and self.watch_eps > 0, f"--watch-eps must be > 0, got {self.watch_eps}")
        check(self.watch_steps >= 1, f"--watch-steps must be >= 1, got {self.watch_steps}")
        check(self.time_budget is None or (math.isfinite(self.time_budget) and self.time_budget > 0),
              f"--time-budget must be > 0 seconds, got {self.time_budget}")
        check(self.budget_clock in ("wall", "process"), f"--budget-clock must be wall or process, got {self.budget_clock!r}")
        for name in ("compile", "amp", "fold_bn_attack"):
            check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        check(self.channels_last in (None, True, False),
              f"channels_last must be true, false or None (auto), got {self.channels_last!r}")
        if self.method in ("minmax", "fgsm"):
            self.attack.validate()
        if self.method == "generator":
            self.generator.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        attack = AttackConfig(**d.pop("attack", {}))
        gen = dict(d.pop("generator", {}))
        bank = GeneratorConfig(**gen.pop("bank", {}))
        return cls(attack=attack, generator=GeneratorTraining(bank=bank, **gen), **d)
