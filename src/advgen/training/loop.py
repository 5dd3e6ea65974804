"""The training loop shared by every method: data order, optimizer, schedule, timing, metrics, saving.

A method object provides `loss(x, y) -> (loss, logits, labels)` and optionally `after_step()` (called
after the classifier's optimizer step) and `bank` (a generator bank to save). Seconds per epoch count
the training steps alone; evaluation after the epoch is timed separately.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..attacks import PGD
from ..checkpoint import (GENERATORS_FILE, MODEL_FILE, RUN_FILE, git_commit, load_model, save_model,
                          save_tensors, write_json)
from ..config import TrainConfig
from ..data import Batches, Dataset
from ..errors import UserError
from ..evaluate import accuracy
from ..models import build_model
from .generator import Generator
from .minmax import FGSMRS, MinMax
from .standard import Standard

log = logging.getLogger(__name__)

METHOD_CLASSES = {"standard": Standard, "minmax": MinMax, "fgsm": FGSMRS, "generator": Generator}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_classifier(cfg: TrainConfig, num_classes: int, device) -> nn.Module:
    """A fresh model of cfg.model, or the weights of cfg.init (`--init CKPT`)."""
    if cfg.init is None:
        return build_model(cfg.model, num_classes).to(device)
    model = load_model(cfg.init, model_name=cfg.model, num_classes=num_classes, device=device)
    if sum(1 for _ in model.modules()) != sum(1 for _ in build_model(cfg.model, num_classes).modules()):
        raise UserError(f"--init {cfg.init} holds another architecture than --model {cfg.model}")
    return model


def train(cfg: TrainConfig, train_set: Dataset, test_set: Dataset, out_dir: str | Path | None = None,
          device: str | torch.device = "cpu", progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a classifier with cfg.method; return (model in eval mode, run record).

    The record is {"config", "epochs": [{"epoch", "seconds", "train_loss", "train_acc", "test_acc",
    ["watch_acc"]}], "version", "git_commit"}; with out_dir it is written to out_dir/run.json and the
    weights to out_dir/model.safetensors after every epoch. Seeds must be set by the caller (once).
    """
    cfg.validate()
    device = torch.device(device)
    train_set, test_set = train_set.to(device), test_set.to(device)
    model = build_classifier(cfg, train_set.num_classes, device)
    batches = Batches(train_set, cfg.batch_size, seed=cfg.seed, train=True)
    steps_per_epoch = len(batches)
    method = METHOD_CLASSES[cfg.method](model, cfg, steps_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    after_step = getattr(method, "after_step", None)
    watch = test_set.float_images()[:cfg.watch_subset], test_set.labels[:cfg.watch_subset]

    record = {"config": cfg.to_dict(), "epochs": [], "version": __version__, "git_commit": git_commit(),
              "device": str(device), "train_images": len(train_set), "test_images": len(test_set)}
    spent, out_of_time = 0.0, False  # seconds of the budget clock used by training steps so far
    budget_clock = time.process_time if cfg.budget_clock == "process" else time.perf_counter
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = steps = 0
        _sync(device)
        t0, c0 = time.perf_counter(), budget_clock()
        bar = tqdm(batches.epoch(epoch), total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}",
                   disable=None if progress else True, leave=False)  # None: off when not a terminal
        for x, y in bar:
            loss, logits, labels = method.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            sched.step()
            with torch.no_grad():  # accumulate on the device: no host sync inside the epoch
                loss_sum += loss.detach() * labels.shape[0]
                correct += (logits.argmax(1) == labels).sum()
                seen += labels.shape[0]
            steps += 1
            if cfg.time_budget is not None and spent + budget_clock() - c0 >= cfg.time_budget:
                out_of_time = True
                break
        _sync(device)
        seconds = time.perf_counter() - t0
        spent += budget_clock() - c0
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch}; lower --lr")
        row = {"epoch": epoch, "seconds": seconds, "steps": steps, "train_loss": train_loss, "train_acc": correct.item() / seen,
               "test_acc": accuracy(model, test_set.images, test_set.labels)}
        if cfg.watch_subset:
            attack = PGD(model, norm=cfg.watch_norm, eps=cfg.watch_eps, steps=cfg.watch_steps, rel_step=2.5 / cfg.watch_steps)
            row["watch_acc"] = accuracy(model, attack(*watch), watch[1])
            prev = [r["watch_acc"] for r in record["epochs"]]
            if prev and row["watch_acc"] < 0.5 * max(prev) - 0.02:
                log.warning("PGD accuracy on the watched images fell from %.1f%% to %.1f%%: possible catastrophic "
                            "overfitting (Wong et al. 2020)", 100 * max(prev), 100 * row["watch_acc"])
        record["epochs"].append(row)
        log.info("%s epoch %d: %.1f s, loss %.4f, train acc %.2f%%, test acc %.2f%%%s", cfg.method, epoch, seconds,
                 row["train_loss"], 100 * row["train_acc"], 100 * row["test_acc"],
                 f", PGD acc {100 * row['watch_acc']:.2f}%" if "watch_acc" in row else "")
        if out_dir is not None:
            save_run(Path(out_dir), model, method, cfg, record, train_set.num_classes, epoch)
        if out_of_time:
            break
    record["finished"] = True
    if out_dir is not None:
        write_json(Path(out_dir) / RUN_FILE, record)
    model.eval()
    return model, record


def save_run(out: Path, model: nn.Module, method, cfg: TrainConfig, record: dict, num_classes: int, epoch: int) -> None:
    """Write the weights (and the generator bank) first, run.json last: run.json marks a complete save."""
    meta = {"model": cfg.model, "num_classes": num_classes, "method": cfg.method, "epoch": epoch,
            "version": __version__, "git_commit": record["git_commit"], "config": cfg.to_dict()}
    save_model(out / MODEL_FILE, model, meta)
    if getattr(method, "bank", None) is not None:
        save_tensors(out / GENERATORS_FILE, method.bank, {"generator": cfg.generator.bank.__dict__})
    write_json(out / RUN_FILE, record)
