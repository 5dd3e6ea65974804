"""The training loop shared by every method: data order, optimizer, schedule, and the step loop.

`train` hands the classifier and a Setup to the method (training/method.py), then runs epochs of

    loss = method.loss(x, y); backward; optimizer step; method.after_step(); schedule step

with the side concerns in helpers of their own: the run folder's rules (rundir.py), the resumable
state (state.py), metrics and the epoch-end evaluation (metrics.py), stop requests, the time budget and
step timing (control.py). Seconds per epoch count the training steps alone; evaluation and saves are
not counted.

Crash safety. With an out_dir the whole training state is written to out_dir/state.safetensors every
`checkpoint_every` steps, when the steps of an epoch are done, and after each epoch's evaluation;
`train(..., resume=True)` continues from it and ends with the very weights of an uninterrupted run
(same device, same seed; with a time budget the stopping step depends on the clock, so only the steps
before it are exact).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import os
import shutil
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import METRICS_FILE, STATE_FILE, load_model, resolve_model_file, save_model, saved_architecture
from ..data import Batches, Dataset, balanced_subset, data_placement, first_n, normalization_for
from ..errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged, UserError, check, check_field
from ..models import VARIANTS, build_model, saved_model_name
from .. import devices, precision
from . import distributed
from ..io import file_digest, git_commit, machine_description
from .config import TrainConfig, as_run, lr_factor
from .control import STOP, Budget, StepTimer, StopFlag
from .distributed import Dist
from .method import Forwards, Method, Setup, build_method
from .metrics import EpochMeter, StepLog, catastrophic_overfitting, evaluate_epoch, log_epoch
from .rundir import hold_run_dir, prepare_run_dir, save_run
from .state import read_state, rng_state, set_rng_state, write_state

log = logging.getLogger(__name__)

# on accelerators the loss is checked for NaN/inf every this many steps (and before every save): a check
# is a host sync; on the CPU it is free and done every step
FINITE_CHECK_EVERY = 25
SNAPSHOTS = "snapshots"   # folder of the run's snapshots (train(snapshots=...))


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """cfg.channels_last, where None (auto) means on for the CPU: NHWC was ~0.77x the time of a
    ResNet-20 training step there (benchmarks/README.md); unmeasured elsewhere, so off."""
    return device.type == "cpu" if cfg.channels_last is None else cfg.channels_last


# DDP keeps the buffers out of its forward (the loop broadcasts them before the attacks); the keyword
# was renamed in torch 2.13
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


def check_speed_options(cfg: TrainConfig, device: torch.device, dist: Dist = distributed.SINGLE) -> None:
    """ConfigError when compile, precision or sync_bn cannot work here (before any data is touched)."""
    if cfg.sync_bn and not dist.active:
        raise ConfigError("sync_bn", "synchronizes BatchNorm across the processes of a torchrun job; this is one "
                                     "process (run under torchrun, or leave it off)")
    if cfg.sync_bn and device.type != "cuda":
        raise ConfigError("sync_bn", f"needs CUDA devices (torch's SyncBatchNorm has no {device.type} kernel)")
    if cfg.compile:
        if not hasattr(torch, "compile"):
            raise ConfigError("compile", f"needs torch >= 2.2 (this is {torch.__version__})")
        try:
            importlib.import_module("torch._dynamo")
        except Exception as e:  # e.g. an unsupported Python version
            raise ConfigError("compile", f"is unavailable here ({type(e).__name__}: {e})") from None
        if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
            raise ConfigError("compile", "on the CPU needs a C++ compiler (g++, c++ or clang++, or $CXX); none found")
    precision.check_available(precision.resolve(cfg.precision, device), device)


def build_classifier(cfg: TrainConfig, train_set: Dataset, *, init: bool = True) -> nn.Module:
    """The caller's convenience: a fresh cfg.model for the data (classes, channels, the data's
    normalization statistics in its first layer), holding the weights of cfg.init if `init`."""
    stats = normalization_for(train_set)
    model = build_model(cfg.model, train_set.num_classes, train_set.channels, mean=stats[0], std=stats[1])
    if init and cfg.init is not None:
        own = model.state_dict()
        held = saved_architecture(cfg.init)   # the two PreAct forwards share their keys: compare names
        if held is not None and held != cfg.model:
            raise ConfigError("init", f"{cfg.init} holds {held}, not {cfg.model}")
        theirs = load_model(cfg.init, model_name=cfg.model, num_classes=train_set.num_classes,
                            in_channels=train_set.channels, normalize=cfg.init_normalize).state_dict()
        if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
            raise ConfigError("init", f"{cfg.init} holds another architecture or class count than "
                                      f"{cfg.model} with {train_set.num_classes} classes")
        model.load_state_dict(theirs)
    return model


def data_fingerprint(ds: Dataset) -> str:
    """sha256 of the training images and labels: a resumed run must see the very same data."""
    h = hashlib.sha256()
    h.update(str((tuple(ds.images.shape), ds.num_classes)).encode())
    h.update(np.ascontiguousarray(ds.images.cpu().numpy()))
    h.update(np.ascontiguousarray(ds.labels.cpu().numpy()))
    return h.hexdigest()


def compiled(forward: nn.Module) -> nn.Module:
    """torch.compile of the training forward alone (Forwards of the classifier, or its DDP wrapper).

    The classifier itself stays eager: attacks run it in eval mode (or a BatchNorm-folded copy of it),
    the evaluation at its own batch sizes, and each mode and shape would be another compilation (and a
    recompilation limit reached); the training forward sees one mode and one batch shape."""
    return torch.compile(forward)


class _Counted:
    """The training forward as methods call it (Setup.train_forward), counting its calls: under torchrun
    each classifier update's loss must come from exactly one call (DDP's rule)."""

    def __init__(self, run: "Run", forward):
        self.run, self.forward = run, forward

    def __call__(self, *xs: torch.Tensor):
        self.run.ddp_calls += 1
        return self.forward(*xs)


def _nonfinite(modules: dict[str, nn.Module]) -> list[str]:
    """Names of floating-point parameters or buffers that hold NaN or inf."""
    return [f"{prefix}{k}" for prefix, module in modules.items() for k, v in module.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def init_digest(init: str | None) -> str | None:
    """sha256 of the weights file a run starts from (cfg.init; None without one or when it is gone): a
    run whose base is named by another path (a moved checkout, a copied run) is the same run when this
    is the same."""
    if init is None:
        return None
    path = resolve_model_file(init)
    if not path.is_file():
        return None
    st = path.stat()   # compare plans ask for every run: a large base is read once while it is unchanged
    return _file_digest_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _file_digest_cached(path: str, mtime_ns: int, size: int) -> str:
    return file_digest(Path(path))


def config_changes(saved: dict, saved_init: str | None, cfg: TrainConfig, *, precision: bool = True) -> list[str]:
    """The settings in which cfg differs from a run's saved config (as training/config.as_run reads it).
    `init` named by another path is no change when its file has the sha256 the run recorded (saved_init;
    runs that recorded none compare by path), and another file at the same path is a change (the base
    was trained again). precision=False: the precision is compared as resolved, by the caller."""
    new = cfg.resolved().to_dict()
    digest = init_digest(new["init"]) if saved_init is not None else None
    changed = digest is not None and digest != saved_init
    if saved_init is not None and digest == saved_init:
        saved = {**saved, "init": new["init"]}
    if not precision:
        saved, new = _without_precision(saved), _without_precision(new)
    return _config_changes(saved, new) + ([f"init's weights (sha256 {saved_init[:12]}..., now {digest[:12]}...)"]
                                          if changed else [])


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings that differ, top-level ones first: 'lr 0.1 (now 0.05)'."""
    changes, nested = [], []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            nested += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changes.append(f"{prefix}{k} {a!r} (now {b!r})")
    return changes + nested


class Run:
    """Everything a training run holds: classifier, method, optimizer, schedule, data order, metrics,
    position and record; `state_dict()` / `load_state_dict()` cover all of it, RNGs included."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, train_set: Dataset, test_set: Dataset,
                 device: torch.device, dist: Dist = distributed.SINGLE, data_on: str = "auto"):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.num_classes = train_set.num_classes
        self.fingerprint = data_fingerprint(train_set)
        self.data_on = data_placement(train_set, device, data_on)
        self.train_set = train_set.to(device if self.data_on == "device" else "cpu")
        self.test_set = test_set.to(device)
        self.batches = Batches(self.train_set, cfg.batch_size, seed=cfg.seed, train=True, rank=dist.rank,
                               world=dist.world, device=device, augment=cfg.augmentations)
        self.steps_per_epoch = spe = len(self.batches)
        left = len(self.train_set) - spe * cfg.batch_size if self.batches.drop_last else 0
        if left > 0 and dist.main:   # said, not silent: a subset not a multiple of the batch loses its tail
            log.info("%d training images, %d steps of %d an epoch: %d images of each epoch's shuffled order are "
                     "left out (a partial last batch is not trained on)", len(self.train_set), spe, cfg.batch_size,
                     left)
        channels_last = use_channels_last(cfg, device)
        self.model = model.to(device)
        if channels_last:  # parameters keep this layout through load_state_dict (copy_)
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and dist.active:  # same state-dict keys
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # under torchrun the training forward goes through DDP (its backward all-reduces the gradients;
        # it starts from rank 0's weights); buffers are broadcast by the loop before each step instead
        self.ddp = (DistributedDataParallel(Forwards(self.model), device_ids=[device] if device.type == "cuda" else None,
                                            **_NO_FORWARD_BUFFER_SYNC) if dist.active else None)
        self.ddp_calls = self.descends = 0   # calls of the training forward; classifier updates
        forward = self.ddp if self.ddp is not None else Forwards(self.model)
        self.train_forward = _Counted(self, compiled(forward) if cfg.compile else forward)
        self.precision = precision.resolve(cfg.precision, device)
        # fp16 only: a GradScaler, whose scale is part of the resumable state
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.scaled)
        self.setup = Setup(device=device, channels_last=channels_last, fold_bn=cfg.fold_bn_attack,
                           steps_per_epoch=spe, epochs=cfg.epochs, seed=distributed.rank_seed(cfg.seed, dist.rank),
                           in_channels=train_set.images.shape[1], train_size=len(train_set), dist=dist,
                           train_forward=self.train_forward,
                           scaler=self.scaler if self.precision.scaled else None, descend=self.descend,
                           precision=self.precision.training)
        self.method: Method = build_method(cfg.method, self.model, cfg.options, self.setup)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg.schedule, cfg.epochs * spe))
        self.meter = EpochMeter(device)
        self.budget = Budget(cfg.time_budget, cfg.budget_clock)
        self.record = {"config": cfg.resolved().to_dict(), "epochs": [], "version": __version__, "git_commit": git_commit(),
                       "device": str(device), "world_size": dist.world, "train_images": len(train_set),
                       "test_images": len(test_set), "precision": self.precision.record(),
                       "init_sha256": init_digest(cfg.init)}
        self.machine = machine_description(device)   # each epoch's row names it: a resumed run may have moved
        self.epoch, self.step = 1, 0   # the next step to run: batch `step` of epoch `epoch`
        self.finished = False          # every epoch done (or the time budget spent), evaluated, saved
        self.out_of_time = False       # the time budget ended the steps of the current epoch
        self.check_every = 1 if device.type == "cpu" else FINITE_CHECK_EVERY

    def descend(self, loss: torch.Tensor, update: bool = True) -> None:
        """The classifier's update on `loss`: the step's own, and Free-AT's replays (Setup.descend).
        Through the GradScaler (a no-op without fp16); `update`: also update the scaler's scale (the
        step's own update leaves that until the method's after_step has stepped through it)."""
        self.descends += 1
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        if update:
            self.scaler.update()

    @property
    def global_step(self) -> int:
        return (self.epoch - 1) * self.steps_per_epoch + self.step

    def where(self, epoch: int | None = None, step: int | None = None) -> str:
        epoch, step = (self.epoch, self.step) if epoch is None else (epoch, step)
        if self.finished and (epoch, step) == (self.epoch, self.step):
            return "the finished run"
        return f"epoch {epoch}, step {step}/{self.steps_per_epoch}"

    def modules(self) -> dict[str, nn.Module]:
        return {"": self.model, **{f"{k}.": m for k, m in self.method.modules().items()}}

    def position(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "steps_per_epoch": self.steps_per_epoch,
                "finished": self.finished, "out_of_time": self.out_of_time, "spent": self.budget.spent,
                "world_size": self.dist.world}

    # the parts of a state each rank has its own of; under torchrun the state holds a list, one per rank
    PER_RANK = ("method", "meter", "rng")

    def state_dict(self) -> dict | None:
        """The whole state; under torchrun a collective (every rank's own parts are gathered), and None
        on ranks other than 0."""
        state = {"model": self.model.state_dict(), "record": self.record, "position": self.position()}
        if not self.finished:
            own = {"method": self.method.state_dict(), "meter": self.meter.state_dict(), "rng": rng_state(self.device)}
            ranks = self.dist.gather(own)
            if ranks is None:
                return None
            order, g = self.batches.position(self.epoch, self.step)
            state.update(optimizer=self.opt.state_dict(), schedule=self.sched.state_dict(),
                         data={"order": order, "augment_rng": g.get_state()}, scaler=self.scaler.state_dict(),
                         **(own if not self.dist.active else {k: [r[k] for r in ranks] for k in own}))
        return state if self.dist.main else None

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; the RNGs last, after everything that draws from them."""
        pos = state["position"]
        if int(pos.get("world_size", 1)) != self.dist.world:
            raise CheckpointError(f"the run was trained by {pos.get('world_size', 1)} processes and cannot be resumed "
                                  f"exactly by {self.dist.world}: resume it with the same number of processes "
                                  f"(torchrun --nnodes x --nproc_per_node = {pos.get('world_size', 1)}), or --force "
                                  "to start over")
        self._check_precision(state["record"])
        self.model.load_state_dict(state["model"])
        self.record = state["record"]
        self.epoch, self.step = int(pos["epoch"]), int(pos["step"])
        self.finished, self.out_of_time = bool(pos["finished"]), bool(pos["out_of_time"])
        self.budget.spent = float(pos["spent"])
        if pos["steps_per_epoch"] != self.steps_per_epoch or not 0 <= self.step <= self.steps_per_epoch:
            raise ValueError(f"position {self.epoch}/{self.step} does not fit {self.steps_per_epoch} steps per epoch")
        if self.finished:
            return
        own = {k: state[k][self.dist.rank] if self.dist.active else state[k] for k in self.PER_RANK}
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        self.method.load_state_dict(own["method"])
        self.meter.load_state_dict(own["meter"])
        self._load_scaler(state.get("scaler"))
        order, g = self.batches.position(self.epoch, self.step)
        if not (torch.equal(order, state["data"]["order"]) and torch.equal(g.get_state(), state["data"]["augment_rng"])):
            raise CheckpointError(f"this torch ({torch.__version__}) draws another data order than the run did; "
                                  "it cannot be resumed exactly (--force starts it over)")
        set_rng_state(own["rng"], self.device)

    def _check_precision(self, record: dict) -> None:
        """CheckpointError unless this run resolves to the precision the saved run trained in (auto may
        resolve differently in another advgen version or on other hardware)."""
        saved = (record.get("precision") or {}).get("training") or precision.legacy_training_precision(
            record.get("config") or {}, self.device)
        if saved != self.precision.training:
            raise CheckpointError(f"the run trained in {saved}, but --precision {self.cfg.precision} means "
                                  f"{self.precision.training} here ({self.precision.reason}): resume it with "
                                  f"--precision {saved}, or --force to start over")

    def _load_scaler(self, state: dict | None) -> None:
        """The GradScaler's scale and growth tracker (fp16); a state saved without them (advgen before
        they were saved) restarts the scaler at its initial scale, so the resume is not exact."""
        if not self.scaler.is_enabled():
            return
        if state:
            self.scaler.load_state_dict(state)
        else:
            log.warning("the saved state has no GradScaler state: fp16 loss scaling restarts at its initial "
                        "scale, so this resume is not bit-identical to an uninterrupted run")


class Saver:
    """Writes a run's state and folder; never writes non-finite weights."""

    def __init__(self, run: Run, out: Path | None, snapshots: set[int] = frozenset(), tensorboard: bool = False):
        self.run, self.out, self.snapshots = run, out, snapshots
        self.saved_at: tuple[int, int] | None = None
        self.writes = out is not None and run.dist.main   # under torchrun rank 0 alone writes
        self.steplog = StepLog(out / METRICS_FILE if self.writes else None,
                               out / "tensorboard" if self.writes and tensorboard else None)

    def diverged(self, what: str) -> TrainingDiverged:
        run = self.run
        msg = f"training diverged at {run.where()}: {what}; the run stopped"
        if self.out is not None and self.saved_at is not None:
            msg += f", the last good state ({run.where(*self.saved_at)}) is kept in {self.out / STATE_FILE}"
        return TrainingDiverged(msg + "; lower the learning rate and start over")

    def save_state(self) -> None:
        if self.out is None:
            return
        run = self.run
        bad = _nonfinite(run.modules())
        if run.dist.agree(len(bad))[0]:   # every rank stops, none waits for the others
            raise self.diverged(f"weights became non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        state = run.state_dict()   # a collective under torchrun
        if self.writes:
            self.steplog.flush()   # before the state: the file never lacks a step the state has done
            write_state(self.out / STATE_FILE, state,
                        {"version": __version__, "config": run.record["config"], "data_sha256": run.fingerprint,
                         "init_sha256": run.record.get("init_sha256"),
                         "variant": VARIANTS.get(run.cfg.model), **run.position()})
        self.saved_at = (run.epoch, run.step)

    def model_meta(self, epoch: int) -> dict:
        run = self.run
        return {"model": run.cfg.model, "num_classes": run.num_classes, "method": run.cfg.method, "epoch": epoch,
                "config": run.record["config"]}

    def save_run(self, epoch: int) -> None:
        if self.writes:
            save_run(self.out, self.run.model, self.run.method.modules(), self.run.record, self.model_meta(epoch))

    def snapshot(self) -> None:
        """The classifier as it is after this step: what a run with budget_steps = this step would end
        with (under a constant schedule), at no extra training cost."""
        run = self.run
        if not self.writes:
            return
        (self.out / SNAPSHOTS).mkdir(exist_ok=True)
        save_model(self.out / SNAPSHOTS / f"step-{run.global_step}.safetensors", run.model,
                   {**self.model_meta(run.epoch), "step": run.global_step,
                    "passes": run.global_step * run.method.passes, "git_commit": run.record["git_commit"],
                    "seconds": sum(r["seconds"] for r in run.record["epochs"]) + run.meter.seconds})


def _train_step(run: Run, x: torch.Tensor, y: torch.Tensor, autocast, where=None) -> tuple:
    """One step: the method's loss, the classifier's descent, the method's after-step hook.

    Under torchrun every rank starts the step with rank 0's BatchNorm statistics (its attacks use them)
    and the loss's backward through DDP leaves the gradients averaged over the ranks. Under fp16
    autocast the loss is scaled (GradScaler; the method's own optimizer steps through Setup.step)."""
    run.dist.broadcast_module(run.model, buffers_only=True)
    calls, descends = run.ddp_calls, run.descends
    with autocast:  # forward passes only; the backward runs in the dtypes autocast chose
        x = x.contiguous(memory_format=run.setup.memory_format)
        loss, logits, labels = run.method.loss(x, y) if where is None else run.method.loss(x, y, where=where)
    extra = run.descends - descends   # Free-AT's replays: each a call of train_model and an update
    if run.ddp is not None and run.ddp_calls != calls + 1 + extra:
        raise RuntimeError(f"method {run.cfg.method!r} called the DDP-wrapped classifier (Method.train_model) "
                           f"{run.ddp_calls - calls} times in a step with {extra} extra updates; under torchrun each "
                           "update's loss must come from exactly one call of self.train_model (attacks use self.model)")
    run.descend(loss, update=False)
    run.method.after_step()
    run.scaler.update()
    with warnings.catch_warnings():
        if run.precision.scaled:   # the scaler skips overflowing steps on purpose; torch warns of a skipped first one
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.sched.step()
    run.step += 1
    return loss, logits, labels


def _between_steps(run: Run, saver: Saver, timer: StepTimer, every: int | None, stop: StopFlag,
                   loss: torch.Tensor) -> bool:
    """Divergence check, time budget, checkpoint cadence and stop requests; True ends the epoch's steps."""
    due = bool(every) and run.global_step % every == 0
    signum, out_of_time, bad = _decisions(run, stop, due or run.global_step % run.check_every == 0)
    requested = signum is not None
    if bad:
        raise saver.diverged(f"the training loss is {loss.item()}")
    # a spent budget ends the epoch here; it is evaluated and saved as usual
    steps_spent = run.cfg.budget_steps is not None and run.global_step >= run.cfg.budget_steps
    run.out_of_time = steps_spent or out_of_time
    snap = run.global_step in saver.snapshots
    if saver.out is not None and (due or requested or snap):
        run.meter.seconds += timer.elapsed()
        run.budget.pause()   # the save is not training time
        if snap:
            saver.snapshot()
        if due or requested:
            saver.save_state()
        run.budget.resume()
        timer.start()
    if requested:
        name = signal.Signals(signum).name
        if saver.out is None:
            raise Interrupted(signum, f"interrupted by {name} after {run.where()} (no --out: nothing saved)")
        raise Interrupted(signum, f"interrupted by {name} after {run.where()}; the training state is saved "
                          f"in {saver.out / STATE_FILE}", saved=True)
    return run.out_of_time


def _decisions(run: Run, stop: StopFlag, check: bool) -> tuple[int | None, bool, bool]:
    """(the signal that asks to stop or None, time budget spent, training loss non-finite). Under
    torchrun they are agreed by every rank at the check steps (one small all-reduce: the maximum of
    each), so all ranks stop at the same step and none waits for one that stopped alone."""
    if not run.dist.active:
        signum = stop.signum
        return signum, run.budget.exhausted(), (check or signum is not None) and bool(run.meter.bad)
    if not check:
        return None, False, False
    signum, spent, bad = run.dist.agree(stop.signum or 0, run.budget.exhausted(), float(run.meter.bad))
    return int(signum) or None, bool(spent), bool(bad)


def run_steps(run: Run, saver: Saver, every: int | None, progress: bool, stop: StopFlag) -> None:
    """The remaining steps of the current epoch."""
    autocast = run.precision.autocast(run.device)
    run.model.train()
    per_sample = run.method.per_sample
    bar = tqdm(run.batches.epoch(run.epoch, run.step, where=per_sample), total=run.steps_per_epoch, initial=run.step, leave=False,
               desc=f"{run.cfg.method} epoch {run.epoch}/{run.cfg.epochs}",
               disable=None if progress and run.dist.main else True)
    timer = StepTimer(run.device)
    run.budget.resume()
    stop.armed = True
    try:
        done = sum(r["seconds"] for r in run.record["epochs"])
        for x, y, *where in bar:
            lr = run.opt.param_groups[0]["lr"]
            loss, logits, labels = _train_step(run, x, y, autocast, *where)
            correct = run.meter.update(loss, logits, labels)
            saver.steplog.record(run.global_step, run.epoch, loss, correct, labels.shape[0], lr,
                                 done + run.meter.seconds + timer.host_elapsed())
            if _between_steps(run, saver, timer, every, stop, loss):
                break
    except Exception as e:
        if run.cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise ConfigError("compile", f"failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                                         "train without it") from None
        raise
    finally:
        stop.armed = False
        bar.close()
        run.meter.seconds += timer.elapsed()
        run.budget.pause()
    if run.dist.agree(float(run.meter.bad))[0]:
        raise saver.diverged("the training loss is not finite")


def end_epoch(run: Run, saver: Saver) -> None:
    """Evaluate, record the epoch's row, save the run folder and the state of the next epoch."""
    cfg = run.cfg
    run.dist.broadcast_module(run.model, buffers_only=True)  # every rank evaluates (and saves) rank 0's model
    if saver.saved_at != (run.epoch, run.step):
        saver.save_state()  # the epoch's steps survive a kill during the evaluation
    row = {"epoch": run.epoch, "steps": run.step, "passes": run.step * run.method.passes,
           **run.meter.summary(run.dist), "machine": run.machine}
    with precision.full_precision(run.device):   # evaluation in fp32, whatever the training ran in
        row.update(evaluate_epoch(run.model, run.test_set.images, run.test_set.labels, watch=cfg.watch_subset,
                                  watch_norm=cfg.watch_threat[0], watch_eps=cfg.watch_threat[1],
                                  watch_steps=cfg.watch_steps))
    if catastrophic_overfitting(run.record["epochs"], row):
        row["catastrophic_overfitting"] = True
        run.record.setdefault("catastrophic_overfitting", row["epoch"])   # the first epoch it showed
    run.record["epochs"].append(row)
    last = run.epoch == cfg.epochs or run.out_of_time
    if last:
        run.record["finished"] = True
    if run.dist.main:
        log_epoch(cfg.method, row)
        saver.steplog.epoch_end(run.global_step, row)
    saver.save_run(run.epoch)
    run.epoch, run.step, run.finished = run.epoch + 1, 0, last
    run.meter.reset()
    saver.save_state()


def _without_precision(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("precision", "amp")}


def _resume_state(out: Path, cfg: TrainConfig) -> tuple[dict, dict]:
    state, header = read_state(out / STATE_FILE)
    saved = dict(header.get("config") or {})
    if isinstance(saved.get("model"), str):   # a state without "variant" predates them (models.saved_model_name)
        saved["model"] = saved_model_name(saved["model"], header.get("variant"))
    # settings added since the state was written count as their defaults, method defaults as they ran
    # (training/config.as_run); the precision is compared as resolved (Run._check_precision): `auto` and
    # `fp32` are the same run where auto means fp32
    try:
        saved = as_run(saved, header.get("version"))
    except (UserError, TypeError, ValueError) as e:
        raise CheckpointError(f"--resume: {out / STATE_FILE} holds a config this advgen cannot read "
                              f"({' '.join(str(e).split())[:200]}); pass --force to start over") from None
    changes = config_changes(saved, header.get("init_sha256"), cfg, precision=False)
    if changes:
        raise CheckpointError(f"--resume: {out} was started with other settings: {'; '.join(changes[:4])}"
                              f"{' ...' if len(changes) > 4 else ''}; pass the same arguments, or --force to "
                              "start over")
    return state, header


def train(cfg: TrainConfig, train_set: Dataset, test_set: Dataset, out_dir: str | Path | None = None,
          device: str | torch.device = "cpu", progress: bool = True, *, model: nn.Module | None = None,
          resume: bool = False, force: bool = False, checkpoint_every: int | None = None,
          snapshots: list[int] = (), tensorboard: bool = False, stop: StopFlag = STOP,
          dist: Dist | None = None, data_on: str = "auto") -> tuple[nn.Module, dict]:
    """Train a classifier with cfg.method; return (model in eval mode, run record).

    model: the classifier to train, any nn.Module mapping (B, C, H, W) pixels in [0, 1] to logits; None
    builds cfg.model (with the weights of cfg.init). On resume its weights come from the saved state.
    The record is {"config", "epochs": [{"epoch", "seconds", "steps", "train_loss", "train_acc", "test_acc",
    ["watch_acc"], "machine"}], "version", "git_commit", "world_size", "finished"}; with out_dir it is written to
    out_dir/run.json and the weights to out_dir/model.safetensors after every epoch, and the training state
    to out_dir/state.safetensors (see the module docstring). Seeds must be set by the caller (once; under
    torchrun distributed.rank_seed(seed, rank) on each rank).

    out_dir holding a run is refused (RunDirError) unless `resume` (continue from its state; a folder
    without any run starts afresh) or `force` (delete its run files and start over); a folder another
    process is writing (rundir.hold_run_dir) is refused in every case.
    checkpoint_every: also save the state every this many steps. snapshots: global steps after which
    the classifier is also written to out_dir/snapshots/step-N.safetensors. tensorboard: also write the
    per-step metrics and the epoch evaluations to out_dir/tensorboard (needs the tensorboard package).
    data_on: auto|device|host, where the training images live on a CUDA device (data.data_placement;
    the batches are the same either way).
    A non-finite loss or weight raises
    TrainingDiverged and keeps the last good state; a stop requested on `stop` (the CLI's signal
    handlers) raises Interrupted after saving the state of the current step.
    dist: the data-parallel job this process is part of (training/distributed.py); None: the initialized
    default process group if there is one (torchrun), else a single process.
    """
    dist = distributed.current() if dist is None else dist
    device = devices.indexed(device)   # "cuda" -> cuda:N, where tensors moved there report they are
    cfg.validate()
    check_speed_options(cfg, device, dist)
    check_dataset(cfg, train_set)
    train_set, test_set = subsets(cfg, train_set, test_set)
    check_field(checkpoint_every is None or (type(checkpoint_every) is int and checkpoint_every >= 1),
                "checkpoint_every", f"must be a number of steps >= 1, got {checkpoint_every}")
    check_field(cfg.watch_subset <= len(test_set), "watch_subset",
                f"{cfg.watch_subset} exceeds the {len(test_set)} test images")
    check_field(cfg.batch_size % dist.world == 0, "batch_size",
                f"{cfg.batch_size} (the global batch) must be divisible by the {dist.world} processes")
    out = Path(out_dir) if out_dir is not None else None
    # the run's GPU is the current CUDA device while it trains (events, streams), restored after
    with hold_run_dir(out) if out is not None and dist.main else contextlib.nullcontext(), devices.scope(device):
        return _train(cfg, train_set, test_set, out, device, progress, model, resume, force, checkpoint_every,
                      snapshots, tensorboard, stop, dist, data_on)


def check_dataset(cfg: TrainConfig, train_set: Dataset) -> None:
    """cfg.dataset names the data train() is handed (it cannot choose them: the caller loaded them); a
    CIFAR name must fit their image shape and classes, or the record would name data that did not train."""
    want = {"cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100)}.get(cfg.dataset)
    got = (*train_set.images.shape[1:], train_set.num_classes)
    check_field(want is None or got == want, "dataset",
                f"is {cfg.dataset}, but the training data are {got[0]}x{got[1]}x{got[2]} images of {got[3]} classes; "
                "set it to what they are (their path or a name of yours)")


def subsets(cfg: TrainConfig, train_set: Dataset, test_set: Dataset) -> tuple[Dataset, Dataset]:
    """The data cfg trains and tests on: a class-balanced subset of cfg.train_subset training images drawn
    with cfg.seed, and the first cfg.test_subset test images (data.load_subsets draws the same); a set
    that already has that size is taken as it is (the caller drew it)."""
    if cfg.train_subset is not None and cfg.train_subset != len(train_set):
        check_field(cfg.train_subset < len(train_set), "train_subset",
                    f"{cfg.train_subset} exceeds the {len(train_set)} training images")
        train_set = balanced_subset(train_set, cfg.train_subset, cfg.seed)
    if cfg.test_subset is not None and cfg.test_subset != len(test_set):
        check_field(cfg.test_subset < len(test_set), "test_subset",
                    f"{cfg.test_subset} exceeds the {len(test_set)} test images")
        test_set = first_n(test_set, cfg.test_subset)
    return train_set, test_set


def _prepare(out: Path, cfg: TrainConfig, resume: bool, force: bool) -> tuple[dict, dict] | None:
    if prepare_run_dir(out, resume=resume, force=force):
        return _resume_state(out, cfg)
    if resume:
        log.info("nothing to resume in %s: starting the run", out)
    return None


def _train(cfg, train_set, test_set, out, device, progress, model, resume, force, checkpoint_every, snapshots,
           tensorboard, stop, dist, data_on):
    # rank 0 checks the folder and reads the state; every rank gets the outcome
    saved = dist.share(_prepare, out, cfg, resume, force) if out is not None else None
    if model is None:  # on resume the weights come from the state
        model = build_classifier(cfg, train_set, init=saved is None)
    run = Run(cfg, model, train_set, test_set, device, dist, data_on)
    check(out is not None or not (snapshots or tensorboard), "snapshots and tensorboard need an out_dir")
    saver = Saver(run, out, set(snapshots), tensorboard)
    if saved is not None:
        state, header = saved
        if header.get("data_sha256") != run.fingerprint:
            raise CheckpointError(f"--resume: the training data differ from those {out} was started with")
        try:
            run.load_state_dict(state)
        except CheckpointError:
            raise
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError, AttributeError) as e:
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise CheckpointError(f"{out / STATE_FILE} cannot be resumed: it is damaged or from another advgen "
                                  f"version ({first})") from None
        saver.saved_at = (run.epoch, run.step)
        saver.steplog.truncate(run.global_step)
        if dist.main:
            log.info("resuming %s at %s", out, run.where())
    if dist.main:
        log.info("precision: training %s (%s); evaluation %s", run.precision.training, run.precision.reason,
                 precision.EVALUATION)
    while not run.finished:
        if run.step < run.steps_per_epoch and not run.out_of_time:
            run_steps(run, saver, checkpoint_every, progress, stop)
        end_epoch(run, saver)
    run.model.eval()
    return run.model, run.record
