"""What a training method is, and the registry of them.

A method turns a batch into the loss the classifier descends. The loop (loop.py) owns the classifier's
optimizer, schedule, data order, timing and saving; a method owns only what is its own (an attack's
seed, a generator bank and its optimizer) and hands it over as plain tensors and numbers, the way
torch optimizers do:

    loss(x, y) -> (loss, logits, labels)   x: (B, C, H, W) pixels in [0, 1], y: (B,) int64; loss is
                                           the scalar to minimise, logits/labels feed the metrics
    after_step()                           after the classifier's optimizer step (the loop's backward
                                           of `loss` has also filled .grad of any tensor of the
                                           method's own that the loss depends on: Free-AT's δ)
    state_dict() / load_state_dict(state)  everything needed to resume bit for bit: nested dicts and
                                           lists of tensors, numbers, strings, None
    modules()                              {name: module} saved beside the classifier (e.g. "generators")
    passes                                 forward-backward passes of the classifier per step (the
                                           work a step costs: budgets in work done, not seconds)
    per_sample                             True: the method keeps state per training sample and its
                                           loss is called as loss(x, y, where=Where) (data.Where: the
                                           rows' dataset indices and augmentation)

A new method is one module: a class derived from Method, decorated with @register(name, Options),
where Options is a dataclass with validate(), in a file of training/methods/ (imported with the package)
or in a module named in $ADVGEN_PLUGINS; its fields declare their flags with flags.option.
Methods get the unwrapped classifier and a Setup of decisions already made, never the raw config. The
forward of the training loss goes through `self.train_model` (the DDP-wrapped classifier under
torchrun, the classifier itself otherwise), exactly once per step; a loss of two training forwards
makes them in that one call, `self.train_model(x1, x2) -> (logits1, logits2)` (Forwards); every other
pass (attacks, input gradients) calls `self.model`.

A loop step is one batch and ends with one classifier update by the loop. A method that updates the
classifier more than once per batch (Free-AT's replays) makes the earlier updates inside loss() through
Setup.descend, each on a loss from one call of `self.train_model`, and counts them in `passes`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .distributed import SINGLE, Dist


class Forwards(nn.Module):
    """The classifier as the training loss's forward: Forwards(f)(x) = f(x), Forwards(f)(x1, x2, ...) =
    (f(x1), f(x2), ...). Several inputs in one call are what a DistributedDataParallel-wrapped module
    needs when a loss takes two training forwards (TRADES' f(x) and f(x')): DDP allows one forward per
    backward, while BatchNorm still sees each input as a batch of its own. Parameters and buffers are
    the classifier's (the same tensors)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *xs: torch.Tensor):
        out = tuple(self.model(x) for x in xs)
        return out[0] if len(out) == 1 else out


@dataclass(frozen=True)
class Setup:
    """What the loop decided before building the method.

    device: where the classifier lives; channels_last: the classifier and its batches are NHWC;
    fold_bn: attacks may run on a BatchNorm-folded copy; steps_per_epoch
    and epochs: the schedule; seed: the run's seed (methods derive their own RNGs from it);
    in_channels: channels of the images; train_size: training images (for per-sample state).
    dist: this process's place in a data-parallel run (training/distributed.py; world 1 without torchrun):
    seed is already this rank's, modules a method trains beside the classifier average their gradients
    with dist.average_grads before their optimizer step. train_forward: the classifier's forward for the
    training loss (under torchrun the DDP-wrapped Forwards of the classifier, whose backward all-reduces
    the gradients; None: Forwards of the classifier itself; the loop's is compiled under
    TrainConfig.compile, the classifier itself is not); attacks and extra passes call the unwrapped
    classifier.
    scaler: the loop's torch.amp.GradScaler under fp16 autocast (None otherwise): a method's own optimizer
    steps through scaler.step(opt) so it sees unscaled gradients (Setup.step), and a loss a method
    differentiates itself is scaled first (Setup.scale).
    precision: what the training forward passes run in (fp32 | bf16 | fp16, precision.py); attacks wrap
    their passes in Setup.attack_passes().
    descend: the loop's classifier update, descend(loss) = zero the gradients, backward, one optimizer
    step at the current learning rate (the schedule advances once per loop step), for methods that update
    the classifier more than once per batch (None where no loop runs).
    """

    device: torch.device
    channels_last: bool = False
    fold_bn: bool = True
    steps_per_epoch: int = 1
    epochs: int = 1
    seed: int = 0
    in_channels: int = 3
    train_size: int = 0
    descend: Callable[[torch.Tensor], None] | None = None
    dist: Dist = SINGLE
    train_forward: Callable | None = None
    scaler: object | None = None
    precision: str = "fp32"

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the GradScaler's scale under fp16 (so that its fp16 gradients do not underflow;
        the optimizer step through Setup.step unscales them), else `loss` itself."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self, optimizer: torch.optim.Optimizer, update: bool = False) -> None:
        """A method's own optimizer step: through the GradScaler under fp16 (it unscales the gradients
        and skips the step if any is inf or NaN), else optimizer.step(). update: also update the scale,
        for a step the loop's step does not follow (the scaler allows one step per optimizer between
        updates)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
            if update:
                self.scaler.update()
        else:
            optimizer.step()

    def attack_passes(self):
        """The context of an attack's passes (input gradients: PGD, FGSM, N-FGSM's step, TRADES' KL-PGD,
        the generator's gradient input). Under fp16 they run in fp32, autocast off: the gradient of a
        confident sample's loss with respect to its pixels is small, fp16 flushes whatever falls below
        6e-8 to zero on the way back, and a sign step does not move a pixel whose gradient is zero. The
        training backward instead is scaled by the GradScaler. bf16 has fp32's exponent range and keeps
        its autocast (fp32 has none)."""
        if self.precision == "fp16":
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


class Method:
    """Base class of the training methods: defaults for everything but loss()."""

    def __init__(self, model: nn.Module, options, setup: Setup):
        self.model, self.options, self.setup = model, options, setup
        # the training loss's forward (DDP under torchrun: exactly one call per step); attacks use self.model
        self.train_model = Forwards(model) if setup.train_forward is None else setup.train_forward

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    @property
    def passes(self) -> int:
        return 1

    @property
    def per_sample(self) -> bool:
        return False

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


@dataclass(frozen=True)
class MethodSpec:
    cls: type
    options: type
    summary: str


METHODS: dict[str, MethodSpec] = {}


def register(name: str, options: type, summary: str):
    """Class decorator: make a Method available as `name` (TrainConfig.method, advgen train --method)."""
    def deco(cls):
        if name in METHODS:
            raise ValueError(f"training method {name!r} is registered twice")
        METHODS[name] = MethodSpec(cls, options, summary)
        return cls
    return deco


@contextlib.contextmanager
def registered(name: str, cls: type, options: type | None = None, summary: str = ""):
    """Register `cls` as `name` for the duration of the block, replacing an entry of that name and
    restoring it after (extensions, experiments and tests)."""
    old = METHODS.get(name)
    METHODS[name] = MethodSpec(cls, options or (old.options if old else None), summary or (old.summary if old else ""))
    try:
        yield
    finally:
        if old is None:
            METHODS.pop(name, None)
        else:
            METHODS[name] = old


def build_method(name: str, model: nn.Module, options, setup: Setup) -> Method:
    return METHODS[name].cls(model, options, setup)
