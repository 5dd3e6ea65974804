"""What a comparison runs: its presets, its entries (recipes at budgets in work done), and the tasks with
work left in an output folder. See run.py for how they run and report.py for what is written."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...checkpoint import MODEL_FILE
from ...config import from_dict
from ...io import read_json
from ...recipes import resolve_recipe
from ...training import METHODS, TrainConfig
from ...training.config import at_radius
from ...training.method import MethodSpec, Setup
from ..reproduce import run_complete

log = logging.getLogger(__name__)


def _merged(base: dict, changes: dict) -> dict:
    """base with changes on top, nested dicts (a generator's bank) merged key by key."""
    out = copy.deepcopy(base)
    for k, v in changes.items():
        out[k] = _merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


@dataclass(frozen=True)
class Entry:
    """One contender: a recipe (its method and options; the comparison sets the learning rate, schedule
    and budget), its budgets in units, and option changes of its own (a smaller bank for the smoke test)."""

    name: str
    budgets: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    changes: dict = field(default_factory=dict)
    # an entry that is no recipe (an experiment's, a test's): this registered method, `changes` its options
    method_name: str | None = None

    @property
    def method(self) -> str:
        return self.method_name or resolve_recipe(self.name).method

    @property
    def label(self) -> str:
        return self.name if self.method_name else resolve_recipe(self.name).summary

    def options(self) -> dict:
        base = {} if self.method_name else resolve_recipe(self.name).options
        return _merged(base, self.changes)


def _entries(norm: str, eps: float | None = None) -> list[Entry]:
    """Every recipe of the norm; eps: a radius other than the recipes' (the preset's `eps` sets it; PGD-10's
    step, eps/4 in pixel units in its recipe, follows here)."""
    # PGD-10 to 16 units: at 8 it has taken 186 steps (2.4 epochs of the quick preset's 10,000 images), a
    # 4-unit fast method 512, so the reference at 4x a fast method's passes needs 16
    pgd_step = {} if eps is None else {"step_size": eps / 4}
    # GradAlign (Linf only, 5 passes a step): at 4 units it has taken 205 steps
    gradalign = [Entry("gradalign-linf", [1.0, 2.0, 4.0])] if norm == "linf" else []
    # gen-sdi without the projection after its step: an entry of the Linf comparisons, where N-FGSM's lever
    # (no clip) is meant to matter; the L2 comparison (docs/compare-quick) ran without it
    unprojected = [Entry("gen-nfgsm-linf")] if norm == "linf" else []
    return [Entry(f"fgsm-rs-{norm}"), Entry(f"nfgsm-{norm}"), Entry(f"free-{norm}"),
            Entry(f"trades-{norm}", [1.0, 2.0, 4.0, 8.0]), Entry(f"pgd10-{norm}", [1.0, 2.0, 4.0, 8.0, 16.0], pgd_step),
            *gradalign, Entry(f"gen-gradient-{norm}"), Entry(f"gen-sdi-{norm}"), *unprojected, Entry(f"gen-rec2-{norm}"),
            Entry(f"gen-mem-{norm}"), Entry(f"mem-step-{norm}")]


L2_ENTRIES = _entries("l2")


@dataclass
class ComparePreset:
    train_subset: int | None
    test_subset: int
    base_epochs: int
    unit_passes: int                # one budget unit: this many forward-backward passes of a batch
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 0.01                # constant fine-tuning learning rate of every classifier
    norm: str = "l2"               # the threat model of the evaluation (and of the entries' recipes)
    pgd_eps: list[float] = field(default_factory=lambda: [0.5])
    pgd_steps: int = 50
    pgd_restarts: int = 2
    # what the restarts ascend, in turn: the margin restart finds what the cross-entropy's saturated
    # gradient misses (an N-FGSM model: CE x2 38.5%, CE + margin 34.5%, AutoAttack 33.5%; docs/evaluation.md)
    pgd_objectives: list[str] = field(default_factory=lambda: ["ce", "margin"])
    aa_eps: list[float] = field(default_factory=lambda: [0.5])
    aa_attacks: list[str] | None = None   # None: the standard AutoAttack
    aa_targets: int = 9
    aa_every_budget: bool = False   # AutoAttack on every snapshot, not only the final model of each run
    # AutoAttack in chunks of this many test images, each one's results saved as it ends, so that a
    # stopped comparison resumes inside an AutoAttack; a chunk's random starts depend on where it
    # begins, so the size is part of the evaluation's settings (500: the size of the first presets)
    aa_chunk: int = 500
    watch_subset: int = 0
    batch_size: int = 128
    base_seed: int = 0
    entries: list[Entry] = field(default_factory=lambda: list(L2_ENTRIES))
    # every entry trained at this radius of its norm instead of its recipe's own (Linf 16/255): at_radius
    eps: float | None = None


COMPARE_PRESETS = {
    # CPU: 10,000 training images, 200 test images, 3 seeds. Measured on the 2-core EPYC, one thread
    # sharing the machine: an N-FGSM run (512 steps, 4 evaluations) ~11 min of training and ~27 min of
    # AutoAttack on its final model, so the 30 runs are some 12-15 CPU-hours, AutoAttack the most of it
    "quick": ComparePreset(train_subset=10000, test_subset=200, base_epochs=15, unit_passes=256),
    # every stage in seconds, for the tests; its numbers mean nothing
    "smoke": ComparePreset(train_subset=256, test_subset=16, base_epochs=1, unit_passes=4, seeds=[0, 1],
                           pgd_eps=[0.25, 0.5], pgd_steps=3, pgd_restarts=1, aa_attacks=["apgd-ce"], aa_targets=1,
                           batch_size=64,
                           entries=[Entry("fgsm-rs-l2", [1.0, 2.0]),
                                    Entry("gen-sdi-l2", [1.0, 2.0], {"bank": {"n": 4, "width": 4}})]),
    # GPU-scale: the full training set, 1,000 test images, standard AutoAttack on every budget
    "full": ComparePreset(train_subset=None, test_subset=1000, base_epochs=100, unit_passes=3910,
                          pgd_eps=[0.25, 0.5], aa_eps=[0.25, 0.5], aa_every_budget=True, aa_chunk=100),
    # Linf at the standard 8/255 and at 16/255, where single-step training overfits catastrophically
    # (Wong et al. 2020; de Jorge et al. 2022); the quick preset's size and base
    "linf-quick": ComparePreset(train_subset=10000, test_subset=200, base_epochs=15, unit_passes=256, norm="linf",
                                pgd_eps=[8 / 255], aa_eps=[8 / 255], entries=_entries("linf"), watch_subset=200),
    "linf16-quick": ComparePreset(train_subset=10000, test_subset=200, base_epochs=15, unit_passes=256,
                                  norm="linf", pgd_eps=[16 / 255], aa_eps=[16 / 255],
                                  entries=_entries("linf", 16 / 255), eps=16 / 255, watch_subset=200),
}


def passes_per_step(cfg: TrainConfig) -> int:
    """Forward-backward passes one training step of cfg's method costs (the method says)."""
    from ...models import build_model
    probe = build_model(cfg.model)
    return METHODS[cfg.method].cls(probe, cfg.options, Setup(device=torch.device("cpu"), fold_bn=False)).passes


def entry_config(p: ComparePreset, e: Entry, seed: int, base: Path) -> tuple[TrainConfig, list[int]]:
    """The TrainConfig of one run of entry e (its largest budget) and the steps of each of its budgets."""
    options = from_dict(METHODS[e.method].options, e.options())
    if p.eps is not None:
        options = at_radius(options, p.eps)
    cfg = TrainConfig(method=e.method, options=options, model="resnet20", epochs=1_000_000, lr=p.lr,
                      schedule="constant", batch_size=p.batch_size, seed=seed, train_subset=p.train_subset,
                      test_subset=p.test_subset, init=str(base), watch_subset=p.watch_subset)
    per_step = passes_per_step(cfg)
    steps = [max(1, round(u * p.unit_passes / per_step)) for u in e.budgets]
    cfg.budget_steps = steps[-1]
    cfg.validate()
    return cfg, steps


@dataclass(frozen=True)
class Task:
    """One (entry, seed) of a comparison, what one worker does: train its run (if `train` and the run
    is not complete) and evaluate the model of every budget, into OUT/ENTRY-sSEED. It carries all it
    needs, so a worker process can do it from the pickled task alone: the preset, the entry, the
    method's registry entry (a method registered at run time in the parent is the same in the worker),
    the base and the data folder."""

    preset: ComparePreset
    entry: Entry
    seed: int
    method: MethodSpec
    base: Path
    out: Path
    data_dir: str | None
    train: bool

    @property
    def run_dir(self) -> Path:
        return self.out / f"{self.entry.name}-s{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.entry.name} seed {self.seed}"


WORKER_LOG = "compare.log"   # in the run folder: the output of the worker that ran it (appended per attempt)


def _budgets(run_dir: Path, e: Entry, steps: list[int]):
    """(units, steps, is the run's final model, its model file) of every budget of a run."""
    for units, n in zip(e.budgets, steps):
        last = n == steps[-1]
        yield units, n, last, run_dir / MODEL_FILE if last else run_dir / "snapshots" / f"step-{n}.safetensors"


def _plan(p: ComparePreset, wanted: list[Entry], base: Path, out: Path, n_test: int, data_dir) -> list[Task]:
    """The tasks with work left: the wanted entries' runs that are not complete, and every complete run
    in `out` (of any entry of the preset) with an evaluation missing or made with other settings."""
    tasks = []
    for e in p.entries:
        if e.method not in METHODS:
            log.warning("%s: no training method %r in this advgen; skipped", e.name, e.method)
            continue
        for seed in p.seeds:
            task = Task(p, e, seed, METHODS[e.method], base, out, None if data_dir is None else str(data_dir),
                        train=e in wanted)
            if not task.train and not task.run_dir.exists():
                continue
            cfg, steps = entry_config(p, e, seed, base)
            if not run_complete(task.run_dir, cfg):
                if task.train:
                    tasks.append(task)
                continue
            if any(_eval_stored(task.run_dir / f"eval-step-{n}.json",
                                _settings(p, n_test, last or p.aa_every_budget, seed)) is None
                   for _, n, last, _ in _budgets(task.run_dir, e, steps)):
                tasks.append(task)
    return tasks


def _settings(p: ComparePreset, n: int, autoattack: bool, seed: int) -> dict:
    return {"pgd_eps": p.pgd_eps, "pgd_steps": p.pgd_steps, "pgd_restarts": p.pgd_restarts,
            "pgd_objectives": p.pgd_objectives, "n": n, "seed": seed,
            "aa": _aa_settings(p) if autoattack else None}


def _aa_settings(p: ComparePreset) -> dict:
    aa = {"eps": p.aa_eps, "attacks": p.aa_attacks, "targets": p.aa_targets}
    if p.aa_chunk != 500:   # named only when not the first presets' size: their records stay valid
        aa["chunk"] = p.aa_chunk
    return aa


def _eval_stored(path: Path, settings: dict) -> dict | None:
    """The evaluation stored at path if it was made with these settings, else None."""
    if path.exists():
        ev = read_json(path)
        if ev.get("settings") == settings:
            return ev
    return None
