"""What a run measures: the training loss and accuracy of an epoch, and the epoch-end evaluation.

The meter accumulates on the device, so the step loop has no host sync; the numbers are read once per
epoch. The evaluation after an epoch: clean accuracy on the test set and, with a watch, PGD accuracy on
its first images (for FGSM training this is the catastrophic-overfitting check of Wong et al. 2020).
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch
from torch import nn

from ..attacks import FGSM, PGD
from ..evaluation import accuracy

log = logging.getLogger(__name__)


class EpochMeter:
    """Sum of the loss, count of correct predictions and of samples, and the seconds of training steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.bad = torch.zeros((), device=self.device, dtype=torch.bool)
        self.seen, self.seconds = 0, 0.0

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Accumulate one step; returns the step's count of correct predictions (a device tensor)."""
        loss = loss.detach()
        correct = (logits.argmax(1) == labels).sum()
        self.loss_sum += loss * labels.shape[0]
        self.correct += correct
        self.seen += labels.shape[0]
        self.bad |= ~torch.isfinite(loss)
        return correct

    def summary(self, dist=None) -> dict:
        """The epoch's numbers; with a data-parallel `dist` over every rank's samples (sums all-reduced),
        seconds those of the slowest rank."""
        loss_sum, correct, seen, seconds = self.loss_sum.item(), self.correct.item(), self.seen, self.seconds
        if dist is not None and dist.active:
            t = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=self.device)
            dist.sum_(t)
            loss_sum, correct, seen = t.tolist()
            seconds = dist.agree(seconds)[0]
        seen = max(seen, 1)
        return {"seconds": seconds, "train_loss": loss_sum / seen, "train_acc": correct / seen}

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.correct = state["correct"].to(self.device)
        self.seen, self.seconds = int(state["seen"]), float(state["seconds"])


class StepLog:
    """Per-step metrics, appended to RUN_DIR/metrics.csv: step (global, from 1), epoch, loss, accuracy
    (on the batch the step trained on), lr (of that step), seconds (training seconds of the run at its
    end, by the host clock).

    Rows are kept on the device and written in one go (one host sync) before every state save, so the
    file never lacks a step the saved state has done; on resume the rows after the saved step, written
    by a run that died before its next save, are dropped (`truncate`).
    """

    FIELDS = ("step", "epoch", "loss", "accuracy", "lr", "seconds")

    def __init__(self, path: Path | None, tensorboard: Path | None = None):
        self.path = path
        self.pending: list[tuple] = []
        self.writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from ..errors import UserError
                raise UserError("--tensorboard needs the tensorboard package: pip install 'advgen[tensorboard]'") from None
            self.writer = SummaryWriter(log_dir=str(tensorboard))

    def record(self, step: int, epoch: int, loss: torch.Tensor, correct: torch.Tensor, n: int, lr: float,
               seconds: float) -> None:
        if self.path is not None:
            self.pending.append((step, epoch, loss.detach(), correct, n, lr, seconds))

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([r[2].float() for r in self.pending]).tolist()
        corrects = torch.stack([r[3] for r in self.pending]).tolist()
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.FIELDS)
            for (step, epoch, _, _, n, lr, seconds), loss, correct in zip(self.pending, losses, corrects):
                w.writerow([step, epoch, f"{loss:.6g}", f"{correct / n:.6g}", f"{lr:.6g}", f"{seconds:.4f}"])
                if self.writer is not None:
                    for tag, value in (("train/loss", loss), ("train/accuracy", correct / n), ("train/lr", lr)):
                        self.writer.add_scalar(tag, value, step)
        if self.writer is not None:
            self.writer.flush()
        self.pending.clear()

    def epoch_end(self, step: int, row: dict) -> None:
        """The epoch's evaluation to TensorBoard (the CSV holds steps only; run.json holds epochs)."""
        if self.writer is not None:
            for key in ("test_acc", "watch_acc", "watch_fgsm_acc"):
                if key in row:
                    self.writer.add_scalar(f"eval/{key}", row[key], step)
            self.writer.flush()

    def truncate(self, last_step: int) -> None:
        """Drop the rows after global step `last_step` (a resumed run redoes those steps)."""
        if self.path is None or not self.path.exists():
            return
        rows = list(csv.reader(self.path.open(newline="")))
        # a row cut short by a full disk or a kill is dropped with the rows after the saved step
        keep = [list(self.FIELDS)] + [r for r in rows[1:] if len(r) == len(self.FIELDS) and r[0].isdigit()
                                      and int(r[0]) <= last_step]
        if len(keep) < len(rows):
            buf = io.StringIO()
            csv.writer(buf).writerows(keep)
            from ..io import atomic_write
            atomic_write(self.path, buf.getvalue().encode())


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats."""
    rows = list(csv.DictReader(Path(path).open(newline="")))
    return {k: [float(r[k]) for r in rows] for k in StepLog.FIELDS}


def evaluate_epoch(model: nn.Module, test_images: torch.Tensor, test_labels: torch.Tensor, *,
                   watch: int, watch_norm: str, watch_eps: float, watch_steps: int) -> dict:
    """{"test_acc"[, "watch_acc", "watch_fgsm_acc"]}: clean accuracy on the uint8 test images; on the first
    `watch` of them (only those are converted) the accuracy under PGD (`watch_steps` steps of 2.5·eps/steps)
    and under FGSM (no random start), the two sides of the catastrophic-overfitting check."""
    row = {"test_acc": accuracy(model, test_images, test_labels)}
    if watch:
        x = test_images[:watch].float().div(255)
        y = test_labels[:watch]
        pgd = PGD(model, norm=watch_norm, eps=watch_eps, steps=watch_steps, rel_step=2.5 / watch_steps)
        row["watch_acc"] = accuracy(model, pgd(x, y), y)
        row["watch_fgsm_acc"] = accuracy(model, FGSM(model, norm=watch_norm, eps=watch_eps)(x, y), y)
    return row


def catastrophic_overfitting(rows: list[dict], row: dict) -> bool:
    """Catastrophic overfitting (Wong et al. 2020; Andriushchenko & Flammarion 2020) at this epoch, the model
    having learnt to defeat the single step, not the attack, seen either way on the watched images:
    - the fall: PGD accuracy below half its best so far (by more than 2 points) while FGSM accuracy has not
      fallen below its value at that best epoch (less 2 points);
    - the state, for overfitting that set in before the watch saw any robustness (FGSM from zero at Linf
      16/255 with a cyclic lr 0.2 does it in its first epochs): FGSM accuracy at least 10 points above PGD
      accuracy and PGD below a quarter of it. No other committed run comes near (the Linf comparisons,
      the zoo, the earlier pilots: the largest gap in their watched epochs is 6.6 points).
    Logged as a warning when it happens."""
    if "watch_acc" not in row:
        return False
    pgd, fgsm = row["watch_acc"], row.get("watch_fgsm_acc", 0.0)
    if fgsm - pgd >= 0.10 and pgd < 0.25 * fgsm:
        log.warning("catastrophic overfitting: PGD accuracy on the watched images is %.1f%% against FGSM's %.1f%% "
                    "(the single step is defeated, the attack is not)", 100 * pgd, 100 * fgsm)
        return True
    prev = [r for r in rows if "watch_acc" in r]
    if not prev:
        return False
    best = max(prev, key=lambda r: r["watch_acc"])
    pgd_fell = pgd < 0.5 * best["watch_acc"] - 0.02
    fgsm_held = fgsm >= best.get("watch_fgsm_acc", 1.0) - 0.02
    if pgd_fell and fgsm_held:
        log.warning("catastrophic overfitting: PGD accuracy on the watched images fell from %.1f%% (epoch %d) to "
                    "%.1f%% while FGSM accuracy went from %.1f%% to %.1f%% (Wong et al. 2020)",
                    100 * best["watch_acc"], best["epoch"], 100 * pgd,
                    100 * best.get("watch_fgsm_acc", float("nan")), 100 * fgsm)
    elif pgd_fell:
        log.warning("PGD accuracy on the watched images fell from %.1f%% to %.1f%%", 100 * best["watch_acc"],
                    100 * pgd)
    return pgd_fell and fgsm_held


def log_epoch(method: str, row: dict) -> None:
    log.info("%s epoch %d: %.1f s, loss %.4f, train acc %.2f%%, test acc %.2f%%%s", method, row["epoch"],
             row["seconds"], row["train_loss"], 100 * row["train_acc"], 100 * row["test_acc"],
             f", PGD acc {100 * row['watch_acc']:.2f}%, FGSM acc {100 * row['watch_fgsm_acc']:.2f}%"
             if "watch_acc" in row else "")
