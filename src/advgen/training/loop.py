"""The training loop shared by every method: data order, optimizer, schedule, timing, metrics, saving.

A method object provides `loss(x, y) -> (loss, logits, labels)` and optionally `after_step()` (called
after the classifier's optimizer step) and `bank` (a generator bank to save). Seconds per epoch count
the training steps alone; evaluation after the epoch and checkpoint writes are not counted.

Crash safety. With an out_dir, the whole training state (classifier, method state such as the generator
bank and its optimizer, optimizer and schedule, every RNG, data position, metrics so far) is written to
out_dir/state.safetensors every `checkpoint_every` steps, when the steps of an epoch are done, and after
each epoch's evaluation. It is one file written atomically, so a kill at any instant leaves the previous
good state; `train(..., resume=True)` continues from it and ends with the very weights of an
uninterrupted run (same device, same seed; with a time budget the stopping step depends on the clock,
so only the steps before it are exact). The method's state is captured from its attributes
(modules, optimizers, torch.Generators, tensors, plain numbers, `attack.seed`), so a method needs no
code of its own to be resumable.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..attacks import PGD
from ..checkpoint import (GENERATORS_FILE, MODEL_FILE, RUN_FILE, RUN_FILES, STATE_FILE, check_writable,
                          flatten_optimizer, git_commit, load_model, read_tensors, save_model, save_tensors,
                          unflatten_optimizer, write_json)
from ..config import TrainConfig
from ..data import Batches, Dataset
from ..errors import CheckpointError, Interrupted, RunDirError, TrainingDiverged, UserError, check
from ..evaluate import accuracy
from ..models import build_model
from .generator import Generator
from .minmax import FGSMRS, MinMax
from .standard import Standard

log = logging.getLogger(__name__)

METHOD_CLASSES = {"standard": Standard, "minmax": MinMax, "fgsm": FGSMRS, "generator": Generator}
STATE_FORMAT = "advgen-train-state/1"
# on accelerators the loss is checked for NaN/inf every this many steps (and before every save): a check
# is a host sync; on the CPU it is free and done every step
FINITE_CHECK_EVERY = 25


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Seconds of training steps: CUDA events on CUDA (device time, no host sync to start), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start()

    def start(self) -> None:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since start(); on CUDA it waits for the recorded work to finish."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.t0.elapsed_time(end) / 1000
        return time.perf_counter() - self.t0


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """cfg.channels_last, where None (auto) means on for the CPU: NHWC was ~0.77x the time of a
    ResNet-20 training step there (benchmarks/README.md); unmeasured elsewhere, so off."""
    return device.type == "cpu" if cfg.channels_last is None else cfg.channels_last


def check_speed_options(cfg: TrainConfig, device: torch.device) -> None:
    """UserError when --compile or --amp cannot work here (before any data is touched)."""
    if cfg.compile:
        import shutil
        if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
            raise UserError(f"--compile: torch {torch.__version__} has no torch.compile (needs torch >= 2.2)")
        try:
            importlib.import_module("torch._dynamo")
        except Exception as e:  # e.g. an unsupported Python version
            raise UserError(f"--compile: torch.compile is unavailable here ({type(e).__name__}: {e})") from None
        if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
            raise UserError("--compile on the CPU needs a C++ compiler (g++, c++ or clang++, or $CXX); none found")
    if cfg.amp and not torch.amp.is_autocast_available(device.type):
        raise UserError(f"--amp: autocast is not available on {device.type}")


class StopRequest:
    """Where SIGINT / SIGTERM meet the loop (the CLI installs `handler`).

    While `armed` (inside the training steps) a signal only records its number: the loop finishes the
    step, saves the state and raises Interrupted(saved=True). Outside the steps (loading, evaluating)
    or at a second signal the handler raises Interrupted at once; the last saved state stands.
    """

    def __init__(self):
        self.signum: int | None = None
        self.armed = False

    def handler(self, signum, frame) -> None:
        if self.armed and self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing the current step, then saving", signal.Signals(signum).name)
            return
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}", saved=False)

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT and SIGTERM (main thread only) inside the block; restore the old handlers after."""
        self.signum, self.armed = None, False
        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self.handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.signum, self.armed = None, False


STOP = StopRequest()


def build_classifier(cfg: TrainConfig, num_classes: int, device) -> nn.Module:
    """A fresh model of cfg.model, or the weights of cfg.init (`--init CKPT`)."""
    if cfg.init is None:
        return build_model(cfg.model, num_classes).to(device)
    model = load_model(cfg.init, model_name=cfg.model, num_classes=num_classes, device=device)
    if sum(1 for _ in model.modules()) != sum(1 for _ in build_model(cfg.model, num_classes).modules()):
        raise UserError(f"--init {cfg.init} holds another architecture than --model {cfg.model}")
    return model


# ----------------------------------------------------------------------------------------- run folders

def check_run_dir(out: str | Path, *, resume: bool = False, force: bool = False) -> None:
    """Refuse an --out folder that holds a run (finished or started) unless resume or force is given.

    resume: the folder must hold a resumable state, or no run at all (a run killed before its first
    save), but not a run without a state. Nothing is deleted here (see `train`).
    """
    out = Path(out)
    check(not (resume and force), "give --resume or --force, not both")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    found = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        if found and STATE_FILE not in found:
            raise RunDirError(f"--resume: {out} holds a run without a saved training state ({STATE_FILE}); "
                              "it cannot be resumed (--force starts it over)")
    elif found and not force:
        raise RunDirError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue "
                          "it, --force to start it over, or choose another folder")


def data_fingerprint(ds: Dataset) -> str:
    """sha256 of the training images and labels: a resumed run must see the very same data."""
    h = hashlib.sha256()
    h.update(str((tuple(ds.images.shape), ds.num_classes)).encode())
    h.update(np.ascontiguousarray(ds.images.cpu().numpy()))
    h.update(np.ascontiguousarray(ds.labels.cpu().numpy()))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- method state

def method_state(method, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The resumable state of a method object, read from its attributes -> (tensors, JSON).

    Modules, optimizers, torch.Generators and tensors go to the tensors (keys `method.<attr>...`);
    numbers, strings and the `seed` of attack objects to the JSON. The classifier (saved on its own)
    and configuration objects are skipped.
    """
    tensors, plain = {}, {}
    for name, value in vars(method).items():
        key = f"method.{name}"
        if value is model or name == "cfg":
            continue
        if isinstance(value, nn.Module):
            tensors.update({f"{key}.{k}": v for k, v in value.state_dict().items()})
            plain[name] = {"kind": "module"}
        elif isinstance(value, torch.optim.Optimizer):
            t, j = flatten_optimizer(key, value.state_dict())
            tensors.update(t)
            plain[name] = {"kind": "optimizer", "state": j}
        elif isinstance(value, torch.Generator):
            tensors[key] = value.get_state()
            plain[name] = {"kind": "generator"}
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
            plain[name] = {"kind": "tensor"}
        elif value is None or isinstance(value, (bool, int, float, str)):
            plain[name] = {"kind": "value", "value": value}
        elif isinstance(getattr(value, "seed", None), int):  # attacks: min-max bumps attack.seed per batch
            plain[name] = {"kind": "seed", "value": value.seed}
    return tensors, plain


def load_method_state(method, model: nn.Module, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Restore what method_state captured; a different set of attributes means another advgen version."""
    _, expected = method_state(method, model)
    if {k: v["kind"] for k, v in expected.items()} != {k: v["kind"] for k, v in plain.items()}:
        raise KeyError(f"the method's state holds {sorted(plain)}, this version has {sorted(expected)}")
    for name, entry in plain.items():
        key, current, kind = f"method.{name}", getattr(method, name), entry["kind"]
        if kind == "module":
            current.load_state_dict({k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")})
        elif kind == "optimizer":
            current.load_state_dict(unflatten_optimizer(key, tensors, entry["state"]))
        elif kind == "generator":
            current.set_state(tensors[key])
        elif kind == "tensor":
            if current.shape != tensors[key].shape:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(current.shape)}")
            current.copy_(tensors[key])
        elif kind == "value":
            setattr(method, name, entry["value"])
        elif kind == "seed":
            current.seed = entry["value"]


def _nonfinite(modules) -> list[str]:
    """Names of floating-point parameters or buffers that hold NaN or inf."""
    bad = []
    for prefix, module in modules:
        for k, v in module.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad.append(f"{prefix}{k}")
    return bad


# ------------------------------------------------------------------------------------------- training

class _Run:
    """Everything a training run holds, and the saving and restoring of it."""

    def __init__(self, cfg: TrainConfig, train_set: Dataset, test_set: Dataset, out: Path | None,
                 device: torch.device, fresh: bool):
        self.cfg, self.out, self.device = cfg, out, device
        self.num_classes = train_set.num_classes
        self.fingerprint = data_fingerprint(train_set)
        self.train_set, self.test_set = train_set.to(device), test_set.to(device)
        self.model = (build_classifier(cfg, self.num_classes, device) if fresh
                      else build_model(cfg.model, self.num_classes).to(device))
        self.channels_last = use_channels_last(cfg, device)
        if self.channels_last:  # parameters keep this layout through load_state_dict (copy_)
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:  # compiles forward in place: the state dict keeps its keys
            self.model.compile()
        self.batches = Batches(self.train_set, cfg.batch_size, seed=cfg.seed, train=True)
        self.steps_per_epoch = spe = len(self.batches)
        self.method = METHOD_CLASSES[cfg.method](self.model, cfg, spe)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        total = cfg.epochs * spe
        if cfg.schedule == "cosine":
            lam = lambda i: 0.5 * (1 + math.cos(math.pi * i / total))  # noqa: E731
        else:
            lam = lambda i: 1.0  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lam)
        self.record = {"config": cfg.to_dict(), "epochs": [], "version": __version__, "git_commit": git_commit(),
                       "device": str(device), "train_images": len(train_set), "test_images": len(test_set)}
        self.epoch, self.step = 1, 0          # the next step to run: batch `step` of epoch `epoch`
        self.finished = False                  # every epoch done (or the time budget spent), evaluated, saved
        self.out_of_time = False               # the time budget ended the steps of the current epoch
        self.spent = 0.0                       # seconds of the budget clock used by training steps so far
        self.budget_clock = time.process_time if cfg.budget_clock == "process" else time.perf_counter
        self.reset_metrics()
        self.saved_at: tuple[int, int] | None = None

    def method_loss(self, x, y):
        if not self.cfg.compile:
            return self.method.loss(x, y)
        try:
            return self.method.loss(x, y)
        except torch._dynamo.exc.TorchDynamoException as e:
            first = " ".join(str(e).split())[:300]
            raise UserError(f"--compile: torch.compile failed ({type(e).__name__}: {first}); "
                            "train without --compile") from None

    def reset_metrics(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen, self.seconds = 0, 0.0

    def where(self, epoch: int | None = None, step: int | None = None) -> str:
        epoch, step = (self.epoch, self.step) if epoch is None else (epoch, step)
        if self.finished and epoch == self.epoch and step == self.step:
            return "the finished run"
        return f"epoch {epoch}, step {step}/{self.steps_per_epoch}"

    # ---- state

    def save_state(self) -> None:
        """Write out/state.safetensors atomically; refuse (TrainingDiverged) to save non-finite weights."""
        bad = _nonfinite([("", self.model)] + [(f"{k}.", v) for k, v in vars(self.method).items()
                                              if isinstance(v, nn.Module) and v is not self.model])
        if bad:
            raise self.diverged(f"weights became non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_t, opt_j = flatten_optimizer("optim", self.opt.state_dict())
        meth_t, meth_j = method_state(self.method, self.model)
        tensors.update(opt_t)
        tensors.update(meth_t)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        if not self.finished:
            order, g = self.batches.position(self.epoch, self.step)
            tensors["data.order"] = order
            tensors["data.augment_rng"] = g.get_state()
        tensors["metrics.loss_sum"] = self.loss_sum
        tensors["metrics.correct"] = self.correct
        np_state = np.random.get_state()
        py_state = random.getstate()
        meta = {"format": STATE_FORMAT, "version": __version__, "config": self.record["config"],
                "data_sha256": self.fingerprint, "epoch": self.epoch, "step": self.step,
                "steps_per_epoch": self.steps_per_epoch, "finished": self.finished,
                "out_of_time": self.out_of_time, "spent": self.spent,
                "optim": opt_j, "sched": self.sched.state_dict(), "method": meth_j,
                "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
                "metrics": {"seen": self.seen, "seconds": self.seconds}, "record": self.record}
        save_tensors(self.out / STATE_FILE, tensors, meta)
        self.saved_at = (self.epoch, self.step)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
        """Restore a state read by read_state; the RNGs last, after everything that draws from them."""
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.record = meta["record"]
            self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
            self.finished, self.out_of_time = bool(meta["finished"]), bool(meta["out_of_time"])
            self.spent = float(meta["spent"])
            if meta["steps_per_epoch"] != self.steps_per_epoch or not 0 <= self.step <= self.steps_per_epoch:
                raise ValueError(f"position {self.epoch}/{self.step} does not fit {self.steps_per_epoch} steps per epoch")
            if self.finished:
                return
            self.opt.load_state_dict(unflatten_optimizer("optim", tensors, meta["optim"]))
            self.sched.load_state_dict(meta["sched"])
            load_method_state(self.method, self.model, tensors, meta["method"])
            self.loss_sum = tensors["metrics.loss_sum"].to(self.device)
            self.correct = tensors["metrics.correct"].to(self.device)
            self.seen, self.seconds = int(meta["metrics"]["seen"]), float(meta["metrics"]["seconds"])
            order, g = self.batches.position(self.epoch, self.step)
            if not (torch.equal(order, tensors["data.order"])
                    and torch.equal(g.get_state(), tensors["data.augment_rng"])):
                raise CheckpointError(f"{path}: this torch ({torch.__version__}) draws another data order than "
                                      "the run did; it cannot be resumed exactly (--force starts it over)")
            n = meta["rng_numpy"]
            np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
            p = meta["rng_python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
            if self.device.type == "cuda":
                torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                                              if f"rng.cuda.{i}" in tensors])
            torch.set_rng_state(tensors["rng.torch"])
        except CheckpointError:
            raise
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError, AttributeError) as e:
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise CheckpointError(f"{path} cannot be resumed: it is damaged or from another advgen version "
                                  f"({first})") from None
        self.saved_at = (self.epoch, self.step)

    def diverged(self, what: str) -> TrainingDiverged:
        msg = f"training diverged at {self.where()}: {what}; the run stopped"
        if self.out is not None and self.saved_at is not None:
            msg += f", the last good state ({self.where(*self.saved_at)}) is kept in {self.out / STATE_FILE}"
        return TrainingDiverged(msg + "; lower --lr and start over (--force)")

    # ---- the loop

    def run_steps(self, checkpoint_every: int | None, progress: bool) -> None:
        """The remaining steps of the current epoch."""
        cfg, spe, device = self.cfg, self.steps_per_epoch, self.device
        method, opt, sched, model = self.method, self.opt, self.sched, self.model
        after_step = getattr(method, "after_step", None)
        check_every = 1 if device.type == "cpu" else FINITE_CHECK_EVERY
        bad = torch.zeros((), dtype=torch.bool, device=device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
        model.train()
        timer, c0 = StepTimer(device), self.budget_clock()   # time since then is not yet in seconds / spent
        bar = tqdm(self.batches.epoch(self.epoch, self.step), total=spe, initial=self.step,
                   desc=f"{cfg.method} epoch {self.epoch}/{cfg.epochs}", disable=None if progress else True,
                   leave=False)  # disable=None: off when not a terminal
        STOP.armed = True
        try:
            for x, y in bar:
                with autocast:  # forward passes only; the backward runs in the dtypes autocast chose
                    loss, logits, labels = self.method_loss(x.contiguous(memory_format=fmt), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                sched.step()
                self.step += 1
                with torch.no_grad():  # accumulate on the device: no host sync inside the epoch
                    self.loss_sum += loss.detach() * labels.shape[0]
                    self.correct += (logits.argmax(1) == labels).sum()
                    self.seen += labels.shape[0]
                    bad |= ~torch.isfinite(loss.detach())
                global_step = (self.epoch - 1) * spe + self.step
                due = bool(checkpoint_every) and global_step % checkpoint_every == 0
                stop = STOP.signum is not None
                if (due or stop or global_step % check_every == 0) and bool(bad):
                    raise self.diverged(f"the training loss is {loss.item()}")
                if cfg.time_budget is not None and self.spent + self.budget_clock() - c0 >= cfg.time_budget:
                    self.out_of_time = True  # the epoch ends here; it is evaluated and saved as usual
                if self.out is not None and (due or stop):
                    _sync(device)
                    self.seconds += timer.elapsed()
                    self.spent += self.budget_clock() - c0
                    self.save_state()
                    timer.start()
                    c0 = self.budget_clock()   # the save is not training time
                if stop:
                    name = signal.Signals(STOP.signum).name
                    where = f"after {self.where()}"
                    if self.out is None:
                        raise Interrupted(STOP.signum, f"interrupted by {name} {where} (no --out: nothing saved)")
                    raise Interrupted(STOP.signum, f"interrupted by {name} {where}; the training state is "
                                      f"saved in {self.out / STATE_FILE}", saved=True)
                if self.out_of_time:
                    break
        finally:
            STOP.armed = False
            bar.close()
            self.seconds += timer.elapsed()
            _sync(device)
            self.spent += self.budget_clock() - c0
        if bool(bad):
            raise self.diverged("the training loss is not finite")

    def end_epoch(self) -> None:
        """Evaluate, record the epoch's row, save the run folder and the state of the next epoch."""
        cfg, model, epoch = self.cfg, self.model, self.epoch
        if self.out is not None and self.saved_at != (self.epoch, self.step):
            self.save_state()  # the epoch's steps survive a kill during the evaluation
        seen = max(self.seen, 1)
        row = {"epoch": epoch, "seconds": self.seconds, "steps": self.step, "train_loss": self.loss_sum.item() / seen,
               "train_acc": self.correct.item() / seen,
               "test_acc": accuracy(model, self.test_set.images, self.test_set.labels)}
        if cfg.watch_subset:
            n = cfg.watch_subset
            watch_x = self.test_set.images[:n].float().div(255)  # only the watched images, not the test set
            watch_y = self.test_set.labels[:n]
            attack = PGD(model, norm=cfg.watch_norm, eps=cfg.watch_eps, steps=cfg.watch_steps,
                         rel_step=2.5 / cfg.watch_steps)
            row["watch_acc"] = accuracy(model, attack(watch_x, watch_y), watch_y)
            prev = [r["watch_acc"] for r in self.record["epochs"] if "watch_acc" in r]
            if prev and row["watch_acc"] < 0.5 * max(prev) - 0.02:
                log.warning("PGD accuracy on the watched images fell from %.1f%% to %.1f%%: possible catastrophic "
                            "overfitting (Wong et al. 2020)", 100 * max(prev), 100 * row["watch_acc"])
        self.record["epochs"].append(row)
        last = epoch == cfg.epochs or self.out_of_time
        if last:
            self.record["finished"] = True
        log.info("%s epoch %d: %.1f s, loss %.4f, train acc %.2f%%, test acc %.2f%%%s", cfg.method, epoch,
                 row["seconds"], row["train_loss"], 100 * row["train_acc"], 100 * row["test_acc"],
                 f", PGD acc {100 * row['watch_acc']:.2f}%" if "watch_acc" in row else "")
        if self.out is not None:
            save_run(self.out, model, self.method, cfg, self.record, self.num_classes, epoch)
        self.epoch, self.step, self.finished = epoch + 1, 0, last
        self.reset_metrics()
        if self.out is not None:
            self.save_state()


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a training state file: (tensors, JSON); CheckpointError if it is not one."""
    try:
        tensors, meta = read_tensors(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the run cannot be resumed (--force starts it over)") from None
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not an advgen training state (format {meta.get('format')!r}, "
                              f"expected {STATE_FORMAT!r})")
    return tensors, meta


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


def train(cfg: TrainConfig, train_set: Dataset, test_set: Dataset, out_dir: str | Path | None = None,
          device: str | torch.device = "cpu", progress: bool = True, *, resume: bool = False,
          force: bool = False, checkpoint_every: int | None = None) -> tuple[nn.Module, dict]:
    """Train a classifier with cfg.method; return (model in eval mode, run record).

    The record is {"config", "epochs": [{"epoch", "seconds", "steps", "train_loss", "train_acc", "test_acc",
    ["watch_acc"]}], "version", "git_commit", "finished"}; with out_dir it is written to out_dir/run.json and the
    weights to out_dir/model.safetensors after every epoch, and the training state to
    out_dir/state.safetensors (see the module docstring). Seeds must be set by the caller (once).

    out_dir holding a run is refused (RunDirError) unless `resume` (continue from its state; a folder
    without any run starts afresh) or `force` (delete its run files and start over).
    checkpoint_every: also save the state every this many steps. A non-finite loss or weight raises
    TrainingDiverged and keeps the last good state; SIGINT/SIGTERM (with STOP.installed()) raise
    Interrupted after saving the state of the current step.
    """
    cfg.validate()
    check_speed_options(cfg, torch.device(device))
    check(checkpoint_every is None or (type(checkpoint_every) is int and checkpoint_every >= 1),
          f"--checkpoint-every must be a number of steps >= 1, got {checkpoint_every}")
    check(cfg.watch_subset <= len(test_set),
          f"--watch-subset {cfg.watch_subset} exceeds the {len(test_set)} test images")
    device = torch.device(device)
    out = Path(out_dir) if out_dir is not None else None
    state = None
    if out is not None:
        check_run_dir(out, resume=resume, force=force)
        if resume and (out / STATE_FILE).exists():
            state = read_state(out / STATE_FILE)
        elif resume:
            log.info("nothing to resume in %s: starting the run", out)
        check_writable(out)
        for f in RUN_FILES:  # temporary files of writes a kill cut short
            for tmp in out.glob(f".{f}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if force:
            for f in RUN_FILES:
                (out / f).unlink(missing_ok=True)
    if state is not None:
        tensors, meta = state
        # settings added since the state was written count as their defaults
        changes = _config_changes({**TrainConfig().to_dict(), **(meta.get("config") or {})}, cfg.to_dict())
        if changes:
            raise CheckpointError(f"--resume: {out} was started with other settings: {'; '.join(changes[:4])}"
                                  f"{' ...' if len(changes) > 4 else ''}; pass the same arguments, or --force to "
                                  "start over")
    run = _Run(cfg, train_set, test_set, out, device, fresh=state is None)
    if state is not None:
        if meta.get("data_sha256") != run.fingerprint:
            raise CheckpointError(f"--resume: the training data differ from those {out} was started with")
        run.load_state(tensors, meta, out / STATE_FILE)
        log.info("resuming %s at %s", out, run.where())
    while not run.finished:
        if run.step < run.steps_per_epoch and not run.out_of_time:
            run.run_steps(checkpoint_every, progress)
        run.end_epoch()
    run.model.eval()
    return run.model, run.record


def save_run(out: Path, model: nn.Module, method, cfg: TrainConfig, record: dict, num_classes: int, epoch: int) -> None:
    """Write the weights (and the generator bank) first, run.json last: run.json marks a complete save."""
    meta = {"model": cfg.model, "num_classes": num_classes, "method": cfg.method, "epoch": epoch,
            "version": __version__, "git_commit": record["git_commit"], "config": cfg.to_dict()}
    save_model(out / MODEL_FILE, model, meta)
    if getattr(method, "bank", None) is not None:
        save_tensors(out / GENERATORS_FILE, method.bank, {"generator": cfg.generator.bank.__dict__})
    write_json(out / RUN_FILE, record)
