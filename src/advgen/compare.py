"""`advgen compare`: every method from one base model at several budgets and seeds, as curves.

Each entry (a training method and its options) is fine-tuned from the same base model with a constant
learning rate for its largest budget, once per seed; the classifier is snapshotted at every smaller
budget on the way (under a constant schedule a snapshot is exactly what a shorter run ends with), so a
curve costs one run per seed. Budgets are in work done, so the comparison reproduces on any machine:
one unit is `unit_passes` forward-backward passes of a batch, and an entry whose step costs P passes
(PGD-K: K + 1, FGSM: 2, the generator method: 1 + its gradient evaluations) gets units·unit_passes/P
steps. The seconds each budget took on the machine that ran it are recorded beside.

Every snapshot is evaluated on the same first N test images: clean, PGD-L2 (many steps, restarts
ascending the cross-entropy and the margin loss in turn, each sample's worst case), the sanity checks; AutoAttack at the preset's radii on the final model of every
run (or on every snapshot), with the PGD − AutoAttack gap rule: a variant whose PGD accuracy exceeds
AutoAttack's by more than 3 points is not called robust. The report gives mean ± std over seeds per
(entry, budget) and a plot of robust accuracy against the budget, a curve per method with error bars.

The work is a list of tasks, one per (entry, seed) with something left to do (run_task: train the run,
then evaluate each budget's model into RUN_DIR/eval-step-N.json, holding the run folder's lock); they
run one after the other in this process, or with jobs > 1 in that many worker processes (parallel.py).
The report is then read from the run folders alone.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .attacks import FGSM, PGD, AutoAttack
from .checkpoint import (MODEL_FILE, RUN_FILE, atomic_write, git_commit, load_model, machine_description, read_json,
                         read_tensors, write_json)
from .config import TrainConfig, from_dict
from .evaluate import LARGE_EPS, accuracy, gap_check, robust_accuracy, sanity_checks
from .report import DATA_CAVEAT, mean_std, run_complete
from .speed import inference_copy
from .training.method import METHODS, MethodSpec, Setup

log = logging.getLogger(__name__)

L2 = {"norm": "l2", "eps": 0.5}
GRADIENT_BANK = {"n": 32, "bound": "l2", "size": 0.5, "grad_input": True, "grad_skip": True}


@dataclass
class Entry:
    """One contender: a registered method, its options (as a dict of its options class's fields) and
    its budgets in units."""

    name: str
    label: str
    method: str
    options: dict
    budgets: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])


def _gen(**opts) -> dict:
    return {"bank": dict(GRADIENT_BANK), "optimizer": "adam", "lr": 1e-3, **opts}


ENTRIES = [
    Entry("fgsm_rs", "FGSM-RS (Wong et al. 2020)", "fgsm", dict(L2)),
    Entry("nfgsm", "N-FGSM (de Jorge et al. 2022), noise 2 eps", "nfgsm", dict(L2)),
    Entry("free", "Free-AT (Shafahi et al. 2019), 8 replays", "free", dict(L2)),
    Entry("trades", "TRADES (Zhang et al. 2019), beta 6, PGD-10", "trades", {**L2, "steps": 10}, [1.0, 2.0, 4.0, 8.0]),
    # to 16 units: at 8 PGD-10 has taken 186 steps (2.4 epochs of the quick preset's 10,000 images), a
    # 4-unit fast method 512, so the reference at 4x a fast method's passes needs 16
    Entry("pgd10", "min-max PGD-10 (Madry et al. 2018)", "minmax", {**L2, "steps": 10, "step_size": 0.125},
          [1.0, 2.0, 4.0, 8.0, 16.0]),
    Entry("gen_grad", "generators seeing the gradient, grad skip (advgen 0.1's recommendation)", "generator", _gen()),
    Entry("gen_sdi", "generator init + a gradient step from it (FGSM-SDI style)", "generator", _gen(step_after=True)),
    Entry("gen_rec2", "2 recursive generator steps", "generator", _gen(recursions=2)),
    Entry("gen_mem", "generators seeing x, the gradient and the sample's previous perturbation, + a gradient step",
          "generator", _gen(memory=True, step_after=True)),
    # gen_mem without the network: what the memory alone gives (FGSM-PGI-like)
    Entry("mem_step", "the sample's previous perturbation + a gradient step, no network (control of gen_mem)",
          "generator", _gen(memory=True, step_after=True, start="memory",
                            bank={**GRADIENT_BANK, "grad_input": False, "grad_skip": False})),
]


@dataclass
class ComparePreset:
    train_subset: int | None
    test_subset: int
    base_epochs: int
    unit_passes: int                # one budget unit: this many forward-backward passes of a batch
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 0.01                # constant fine-tuning learning rate of every classifier
    pgd_eps: list[float] = field(default_factory=lambda: [0.5])
    pgd_steps: int = 50
    pgd_restarts: int = 2
    # what the restarts ascend, in turn: the margin restart finds what the cross-entropy's saturated
    # gradient misses (an N-FGSM model: CE x2 38.5%, CE + margin 34.5%, AutoAttack 33.5%; README)
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
    entries: list[Entry] = field(default_factory=lambda: list(ENTRIES))


COMPARE_PRESETS = {
    # CPU: 10,000 training images, 200 test images, 3 seeds. Measured on the 2-core EPYC, one thread
    # sharing the machine: an N-FGSM run (512 steps, 4 evaluations) ~11 min of training and ~27 min of
    # AutoAttack on its final model, so the 30 runs are some 12-15 CPU-hours, AutoAttack the most of it
    "quick": ComparePreset(train_subset=10000, test_subset=200, base_epochs=15, unit_passes=256),
    # every stage in seconds, for the tests; its numbers mean nothing
    "smoke": ComparePreset(train_subset=256, test_subset=16, base_epochs=1, unit_passes=4, seeds=[0, 1],
                           pgd_eps=[0.25, 0.5], pgd_steps=3, pgd_restarts=1, aa_attacks=["apgd-ce"], aa_targets=1,
                           batch_size=64,
                           entries=[Entry("fgsm_rs", "FGSM-RS", "fgsm", dict(L2), [1.0, 2.0]),
                                    Entry("gen_sdi", "generator + step", "generator",
                                          {**_gen(step_after=True), "bank": {**GRADIENT_BANK, "n": 4, "width": 4}},
                                          [1.0, 2.0])]),
    # GPU-scale: the full training set, 1,000 test images, standard AutoAttack on every budget
    "full": ComparePreset(train_subset=None, test_subset=1000, base_epochs=100, unit_passes=3910,
                          pgd_eps=[0.25, 0.5], aa_eps=[0.25, 0.5], aa_every_budget=True, aa_chunk=100),
}


def passes_per_step(cfg: TrainConfig) -> int:
    """Forward-backward passes one training step of cfg's method costs (the method says)."""
    from .models import build_model
    probe = build_model(cfg.model)
    return METHODS[cfg.method].cls(probe, cfg.options, Setup(device=torch.device("cpu"), fold_bn=False)).passes


def entry_config(p: ComparePreset, e: Entry, seed: int, base: Path) -> tuple[TrainConfig, list[int]]:
    """The TrainConfig of one run of entry e (its largest budget) and the steps of each of its budgets."""
    options = from_dict(METHODS[e.method].options, e.options)
    cfg = TrainConfig(method=e.method, options=options, model="resnet20", epochs=1_000_000, lr=p.lr,
                      schedule="constant", batch_size=p.batch_size, seed=seed, train_subset=p.train_subset,
                      test_subset=p.test_subset, init=str(base), watch_subset=p.watch_subset)
    per_step = passes_per_step(cfg)
    steps = [max(1, round(u * p.unit_passes / per_step)) for u in e.budgets]
    cfg.budget_steps = steps[-1]
    cfg.validate()
    return cfg, steps


def evaluate_model(model, x, y, p: ComparePreset, autoattack: bool, seed: int = 0, aa_done: dict | None = None,
                   aa_progress: Path | None = None) -> dict:
    """Clean accuracy, PGD-L2 (worst case over restarts), the sanity checks, and AutoAttack if asked
    (aa_done: its {eps: accuracy} from an earlier evaluation of this model with the same AutoAttack
    settings, reused rather than recomputed; aa_progress: a file its per-sample results are saved to
    after every chunk of p.aa_chunk images and resumed from, see _autoattack)."""
    # BatchNorm folded and NHWC batches: the same function up to float rounding, 0.88x the time of a
    # PGD-50 evaluation here (benchmarks/README.md)
    model, fmt = inference_copy(model), torch.channels_last
    out = {"clean": accuracy(model, x, y), "pgd": {}, "autoattack": {}}
    pgd = robust_accuracy(model, x, y, lambda e: PGD(model, norm="l2", eps=e, steps=p.pgd_steps,
                                                     rel_step=2.5 / p.pgd_steps, restarts=p.pgd_restarts,
                                                     objective=tuple(p.pgd_objectives), seed=seed), p.pgd_eps,
                          memory_format=fmt)
    fgsm = robust_accuracy(model, x, y, lambda e: FGSM(model, norm="l2", eps=e, seed=seed), p.pgd_eps,
                           memory_format=fmt)
    k = min(200, x.shape[0])
    large = robust_accuracy(model, x[:k], y[:k], lambda e: PGD(model, norm="l2", eps=e, steps=20, rel_step=0.1),
                            [LARGE_EPS["l2"]], memory_format=fmt)[0]
    out["pgd"] = {str(e): a for e, a in zip(p.pgd_eps, pgd)}
    out["checks"] = sanity_checks("l2", [0.0] + p.pgd_eps, [out["clean"]] + pgd, [out["clean"]] + fgsm, large,
                                  x.shape[0])
    if autoattack:
        out["autoattack"] = dict(aa_done or _autoattack(model, x, y, p, seed, aa_progress, fmt))
        out["checks"].append(gap_check(out["pgd"], out["autoattack"], x.shape[0]))
    return out


def _autoattack(model, x, y, p: ComparePreset, seed: int, progress_file: Path | None,
                memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """{eps: accuracy} under AutoAttack at every p.aa_eps, p.aa_chunk images at a time, the chunk that
    starts at image a seeded seed + a (the same as one robust_flags call in batches of p.aa_chunk).
    progress_file: where the per-sample results are saved after every chunk (FullEvalProgress) and
    resumed from; one written for another model, other images or other settings is stale (the run was
    trained again), so it is started over, with a warning. memory_format: the batches' layout (the
    model's: channels_last for a speed.inference_copy)."""
    from .errors import UserError
    from .evaluate import FullEvalProgress, fingerprint, robust_flags
    settings = {**_aa_settings(p), "seed": seed, "model_sha256": fingerprint(model),
                "data_sha256": fingerprint([x, y])}
    try:
        progress = FullEvalProgress(progress_file, settings)
    except UserError as err:
        log.warning("%s; starting its AutoAttack over", err)
        progress_file.unlink()
        progress = FullEvalProgress(progress_file, settings)
    c = p.aa_chunk

    def chunk(eps: float, a: int, b: int) -> torch.Tensor:
        return robust_flags(model, x[a:b], y[a:b], lambda e: AutoAttack(
            model, norm="l2", eps=e, attacks=p.aa_attacks, targets=p.aa_targets, seed=seed + a), [eps], c,
            memory_format)[0]

    return {str(e): int(progress.flags(f"aa:{e}", len(y), c, lambda a, b, e=e: chunk(e, a, b)).sum()) / len(y)
            for e in p.aa_eps}


def _train_base(p: ComparePreset, out: Path, train_set, test_set, device) -> Path:
    from .training import train
    base = out / "base"
    cfg = TrainConfig(method="standard", epochs=p.base_epochs, lr=0.1, batch_size=p.batch_size, seed=p.base_seed,
                      train_subset=p.train_subset, test_subset=p.test_subset)
    if not run_complete(base, cfg):
        torch.manual_seed(p.base_seed)
        train(cfg, train_set, test_set, out_dir=base, device=device, resume=True)  # continues a stopped run
    return base


def _eval_cached(path: Path, settings: dict, compute) -> dict:
    """The evaluation stored at path if it was made with these settings, else compute(aa_done,
    aa_progress) and store it; aa_done: the stored AutoAttack accuracies when only the other settings
    changed (AutoAttack is most of an evaluation's cost), else None; aa_progress: the file a stopped
    AutoAttack left (PATH.aa-progress.json), removed once the evaluation is stored."""
    ev = _eval_stored(path, settings)
    if ev is None:
        old = read_json(path) if path.exists() else {}
        same_aa = settings["aa"] is not None and old.get("autoattack") and all(
            old.get("settings", {}).get(k) == settings[k] for k in ("aa", "n", "seed"))
        progress = path.with_suffix(".aa-progress.json")
        ev = {**compute(old["autoattack"] if same_aa else None, progress), "settings": settings}
        write_json(path, ev)
        progress.unlink(missing_ok=True)
    return ev


def _eval_stored(path: Path, settings: dict) -> dict | None:
    """The evaluation stored at path if it was made with these settings, else None."""
    if path.exists():
        ev = read_json(path)
        if ev.get("settings") == settings:
            return ev
    return None


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


def run_task(task: Task, *, device, log_file: Path | None = None, data=None) -> None:
    """Do one task, holding its run folder's lock throughout (rundir.hold_run_dir: another process on
    the folder, a worker of this command or of another compare, is refused with RunDirError).

    device: where it trains and evaluates. log_file: a worker's log file (parallel.send_output_to), None
    in-process. data: (train set, test set) already loaded, else loaded from task.data_dir. The global
    torch RNG is seeded with the run's seed before training, so the run is the same whoever does it.
    """
    from .training import train
    from .training.method import registered
    from .training.rundir import hold_run_dir

    p, e, device = task.preset, task.entry, torch.device(device)
    with hold_run_dir(task.run_dir), registered(e.method, task.method.cls, task.method.options, task.method.summary):
        if log_file is not None:
            from .parallel import send_output_to
            send_output_to(log_file, f"advgen {__version__} compare: {task.label} on {device}, "
                                f"{torch.get_num_threads()} CPU thread(s)")
        if data is None:
            from .data import load_subsets
            data = load_subsets("cifar10", task.data_dir, train_subset=p.train_subset, test_subset=p.test_subset,
                                seed=p.base_seed)
        train_set, test_set = data
        cfg, steps = entry_config(p, e, task.seed, task.base)
        if task.train and not run_complete(task.run_dir, cfg):
            log.info("%s: training %d steps", task.label, steps[-1])
            torch.manual_seed(task.seed)
            train(cfg, train_set, test_set, out_dir=task.run_dir, device=device, resume=True, snapshots=steps[:-1],
                  progress=False)
        if not run_complete(task.run_dir, cfg):
            return
        x, y = test_set.float_images().to(device), test_set.labels.to(device)
        for units, n, last, path in _budgets(task.run_dir, e, steps):
            autoattack = last or p.aa_every_budget
            _eval_cached(task.run_dir / f"eval-step-{n}.json", _settings(p, len(y), autoattack, task.seed),
                         lambda aa, prog: {**evaluate_model(load_model(path, device=device), x, y, p, autoattack,
                                                            task.seed, aa, prog), "work": _work(task.run_dir, n, last)})


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


def compare(preset: str, out: Path, *, data_dir=None, download=False, device="cpu", base: Path | None = None,
            entries: list[str] | None = None, jobs: int = 1, devices: list | None = None,
            threads: int | None = None) -> Path:
    """Run every missing run and evaluation of the comparison into `out`; return the path of compare.md.

    entries: names of the preset's entries to run (default all); the report covers every entry whose
    runs exist in `out`.

    jobs: worker processes for the (entry, seed) tasks (run_task: a run's training and the evaluations
    of its budgets). 1 does them one after the other in this process, with its output on the console.
    N > 1 runs N spawned workers at once (parallel.run_jobs), each on one of `devices` (round-robin over
    the workers; default [device]) with `threads` CPU threads (default: the CPUs shared out, at least 1),
    its output in RUN_DIR/compare.log. The base is trained and evaluated here first, and the report
    assembled here last, from the run folders alone, so it is the same whatever `jobs` (a run depends on
    its own seed and device only; bit for bit on the CPU where the thread count is the same too). A
    failed task does not stop the others: once all have ended errors.WorkersFailed names it and no
    report is written; the finished runs are reused by the next call.
    """
    from .data import load_subsets
    from .errors import UserError, check

    p = COMPARE_PRESETS[preset]
    device = torch.device(device)
    devices = [torch.device(d) for d in (devices or [device])]
    check(type(jobs) is int and jobs >= 1, f"--jobs must be a number of worker processes >= 1, got {jobs}")
    check(len(devices) <= jobs, f"--devices names {len(devices)} devices but --jobs {jobs} runs {jobs} worker(s): "
                                f"give --jobs {len(devices)} or more, or fewer devices")
    check(threads is None or (type(threads) is int and threads >= 1), f"threads must be >= 1, got {threads}")
    unknown = set(entries or []) - {e.name for e in p.entries}
    if unknown:
        raise UserError(f"unknown compare entries {sorted(unknown)}; preset {preset} has "
                        f"{', '.join(e.name for e in p.entries)}")
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_subsets("cifar10", data_dir, download=download, train_subset=p.train_subset,
                                       test_subset=p.test_subset, seed=p.base_seed)
    x, y = test_set.float_images().to(device), test_set.labels.to(device)
    base = base or _train_base(p, out, train_set, test_set, device)
    wanted = [e for e in p.entries if entries is None or e.name in entries]
    base_row = _base_row(base, x, y, p, out)
    tasks = _plan(p, wanted, base, out, len(test_set), data_dir)
    machine = machine_description(device)
    if jobs == 1:
        if devices != [device]:
            machine += f"; runs and their evaluations on {devices[0]}"
        for task in tasks:
            t0 = time.perf_counter()
            run_task(task, device=devices[0], data=(train_set, test_set))
            log.info("%s: done in %.1f s on %s", task.label, time.perf_counter() - t0, devices[0])
    else:
        from .parallel import Job, run_jobs, threads_per_worker
        threads = threads or threads_per_worker(jobs)
        machine += (f"; runs and their evaluations by {jobs} worker processes on {', '.join(map(str, devices))}, "
                    f"{threads} CPU thread(s) each")
        run_jobs([Job(t.label, t.run_dir / WORKER_LOG, run_task, (t,)) for t in tasks], workers=jobs,
                 devices=devices, threads=threads)
    rows = [base_row] + _rows(p, wanted, base, out, len(test_set))
    results = {"preset": preset, "settings": dataclasses.asdict(p), "machine": machine,
               "version": __version__, "git_commit": git_commit(), "base": str(base), "n_test": len(test_set),
               "rows": rows}
    return write_report(results, out)


def write_report(results: dict, out: Path, suffix: str = "") -> Path:
    """The comparison's outputs from its results: OUT/compare{suffix}.json, compare{suffix}.md (which shows
    curves{suffix}.png) and the plots curves{suffix}.png (against passes) and curves{suffix}-seconds.png;
    returns the path of the .md. A suffix keeps several comparisons apart in one folder (docs/)."""
    out = Path(out)
    write_json(out / f"compare{suffix}.json", results)
    plot_curves(results, out / f"curves{suffix}.png")
    plot_curves(results, out / f"curves{suffix}-seconds.png", axis="seconds")
    path = out / f"compare{suffix}.md"
    atomic_write(path, render(results, plot=f"curves{suffix}.png").encode())
    return path


def _base_row(base: Path, x, y, p: ComparePreset, out: Path) -> dict:
    settings = _settings(p, len(y), True, 0)
    ev = _eval_cached(out / "base.eval.json", settings,
                      lambda aa, prog: evaluate_model(load_model(base, device=x.device), x, y, p, autoattack=True,
                                                      aa_done=aa, aa_progress=prog))
    return {"name": "base", "method": "standard", "label": "base model (standard training)", "seed": p.base_seed,
            "budget_units": 0.0, "steps": 0, "passes": 0, "budget_seconds": 0.0, **_scores(ev)}


def _settings(p: ComparePreset, n: int, autoattack: bool, seed: int) -> dict:
    return {"pgd_eps": p.pgd_eps, "pgd_steps": p.pgd_steps, "pgd_restarts": p.pgd_restarts,
            "pgd_objectives": p.pgd_objectives, "n": n, "seed": seed,
            "aa": _aa_settings(p) if autoattack else None}


def _aa_settings(p: ComparePreset) -> dict:
    aa = {"eps": p.aa_eps, "attacks": p.aa_attacks, "targets": p.aa_targets}
    if p.aa_chunk != 500:   # named only when not the first presets' size: their records stay valid
        aa["chunk"] = p.aa_chunk
    return aa


def _scores(ev: dict) -> dict:
    return {k: ev[k] for k in ("clean", "pgd", "autoattack", "checks")}


def _rows(p: ComparePreset, wanted: list[Entry], base: Path, out: Path, n_test: int) -> list[dict]:
    """The rows of every complete and evaluated run in `out`, read from its folder (nothing is computed:
    the tasks did that). A complete run without its evaluations (one another command is doing now) is
    left out, with a warning."""
    rows = []
    for e in p.entries:
        if e.method not in METHODS:
            continue
        for seed in p.seeds:
            run_dir = out / f"{e.name}-s{seed}"
            if e not in wanted and not run_dir.exists():
                continue
            cfg, steps = entry_config(p, e, seed, base)
            if not run_complete(run_dir, cfg):
                continue
            got = [_row(e, seed, units, n, run_dir, p, n_test, last)
                   for units, n, last, _ in _budgets(run_dir, e, steps)]
            if None in got:
                log.warning("%s seed %d: its evaluations are not all in %s (is another advgen compare evaluating "
                             "it?); left out of the report", e.name, seed, run_dir)
                continue
            rows += got
    return rows


def _row(e: Entry, seed: int, units: float, steps: int, run_dir: Path, p: ComparePreset, n_test: int,
         last: bool) -> dict | None:
    """One (entry, seed, budget) row: its work (from the run record or the snapshot) and its stored
    evaluation; None if that is missing."""
    ev = _eval_stored(run_dir / f"eval-step-{steps}.json", _settings(p, n_test, last or p.aa_every_budget, seed))
    if ev is None:
        return None
    work = ev.get("work") or _work(run_dir, steps, last)   # evaluations of older advgens lack it
    return {"name": e.name, "method": e.method, "label": e.label, "seed": seed, "budget_units": units,
            "steps": steps, "passes": work["passes"], "budget_seconds": work["seconds"], **_scores(ev)}


def _work(run_dir: Path, steps: int, last: bool) -> dict:
    """{"passes", "seconds"} of training up to the budget of `steps`: the run record's totals for the
    final model, the snapshot's header otherwise. Stored with the budget's evaluation, so that the
    report needs only the records of a run (experiments/carry.py --light), not its weights."""
    if last:
        rec = read_json(run_dir / RUN_FILE)
        return {"passes": sum(r["passes"] for r in rec["epochs"]), "seconds": sum(r["seconds"] for r in rec["epochs"])}
    _, meta = read_tensors(run_dir / "snapshots" / f"step-{steps}.safetensors")
    return {"passes": meta["passes"], "seconds": meta["seconds"]}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (entry, budget): clean, PGD and AutoAttack at each eps, steps, passes,
    seconds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["budget_units"]), []).append(r)

    out = []
    for (name, units), rs in groups.items():
        eps_pgd = sorted({e for r in rs for e in r["pgd"]}, key=float)
        eps_aa = sorted({e for r in rs for e in r["autoattack"]}, key=float)
        out.append({"name": name, "label": rs[0]["label"], "budget_units": units, "seeds": len(rs),
                    "steps": mean_std([r["steps"] for r in rs]), "passes": mean_std([r["passes"] for r in rs]),
                    "seconds": mean_std([r["budget_seconds"] for r in rs]),
                    "clean": mean_std([r["clean"] for r in rs]),
                    "pgd": {e: mean_std([r["pgd"].get(e) for r in rs]) for e in eps_pgd},
                    "autoattack": {e: mean_std([r["autoattack"].get(e) for r in rs]) for e in eps_aa},
                    "failed": sorted({c["name"] for r in rs for c in r["checks"] if not c["passed"]})})
    return out


# two-sided 95% quantiles of Student's t by degrees of freedom (a fractional df is rounded down: wider)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def welch_interval(a: dict, b: dict) -> tuple[float, float, float]:
    """(difference of means a − b, low, high): the Welch 95% interval of a difference of two means over
    independent seeds, a and b mean_std dicts with n ≥ 2 each."""
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    d = a["mean"] - b["mean"]
    if va + vb == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    t = T975[max(k for k in T975 if k <= max(1, int(df)))] if df < 31 else 1.96
    half = t * (va + vb) ** 0.5
    return d, d - half, d + half


def contrasts(summary: list[dict], eps: str, ref: str = "nfgsm", slow: str = "pgd10", seeds: int = 3) -> list[dict]:
    """Every entry against two references, as the research issue states its target, at L2 eps:
    (1) against `ref` (N-FGSM) at the largest budget both have, on AutoAttack where both ran it (else PGD):
        it wins when the mean gain is >= 2 points and beyond one std of the difference, sqrt(sd1² + sd2²);
    (2) against `slow` (PGD-10) at <= 1/3 of its passes: the entry's largest budget with a `slow` budget
        of >= 3x its passes (the smallest such), on the same attack for both: it holds when the mean is
        within 1 point. Each with the Welch 95% interval of the difference; a side with fewer than `seeds`
        seeds is "pending" (no verdict)."""
    by = {(s["name"], s["budget_units"]): s for s in summary}
    names = [n for n in dict.fromkeys(s["name"] for s in summary) if n not in ("base", ref, slow)]
    out = []
    for name in names:
        mine = sorted((s for s in summary if s["name"] == name), key=lambda s: s["passes"]["mean"])
        row = {"name": name, "vs_ref": None, "vs_slow": None}
        shared = [s for s in mine if (ref, s["budget_units"]) in by]
        if shared:
            row["vs_ref"] = _contrast(shared[-1], by[(ref, shared[-1]["budget_units"])], eps, seeds,
                                      lambda d, sd: d >= 0.02 and d > sd)
        slows = sorted((s for s in summary if s["name"] == slow), key=lambda s: s["passes"]["mean"])
        pairs = [(m, q) for m in mine
                 if (q := next((q for q in slows if q["passes"]["mean"] >= 3 * m["passes"]["mean"]), None))]
        if pairs:
            row["vs_slow"] = _contrast(*pairs[-1], eps, seeds, lambda d, sd: d >= -0.01)
        out.append(row)
    return out


def _contrast(a: dict, b: dict, eps: str, seeds: int, wins) -> dict:
    """a against b at eps on the attack both have (AutoAttack if both ran it, else PGD)."""
    attack = "AA" if a["autoattack"].get(eps) and b["autoattack"].get(eps) else "PGD"
    va, vb = (p["autoattack" if attack == "AA" else "pgd"].get(eps) for p in (a, b))
    c = {"units": a["budget_units"], "other_units": b["budget_units"], "attack": attack,
         "passes_ratio": a["passes"]["mean"] / b["passes"]["mean"], "seeds": [a["seeds"], b["seeds"]]}
    if va is None or vb is None or min(va["n"], vb["n"]) < seeds:
        return {**c, "verdict": "pending"}
    d, lo, hi = welch_interval(va, vb)
    sd = (va["std"] ** 2 + vb["std"] ** 2) ** 0.5
    return {**c, "diff": d, "ci95": [lo, hi], "sd": sd, "verdict": "yes" if wins(d, sd) else "no"}


def plot_curves(results: dict, path: Path, axis: str = "passes") -> None:
    """Robust accuracy at the largest PGD eps against the budget: one curve per method, mean ± std over
    seeds as error bars (PGD open markers and dashed; AutoAttack filled, where evaluated)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in summarize(results["rows"]) if s["name"] != "base"]
    eps = str(results["settings"]["pgd_eps"][-1])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(dict.fromkeys(s["name"] for s in summary))
    for i, name in enumerate(names):
        pts = sorted((s for s in summary if s["name"] == name), key=lambda s: s["budget_units"])
        c = f"C{i % 10}"
        xs = [s[axis]["mean"] for s in pts]
        pgd = [s["pgd"].get(eps) for s in pts]
        ax.errorbar(xs, [100 * v["mean"] for v in pgd], yerr=[100 * v["std"] for v in pgd], color=c, ls="--",
                    marker="o", mfc="none", capsize=3,
                    label=f"{name}: {pts[0]['label']} ({_seeds(pts)})")
        aa = [(x, s["autoattack"][eps]) for x, s in zip(xs, pts) if s["autoattack"].get(eps)]
        if aa:
            ax.errorbar([a[0] for a in aa], [100 * a[1]["mean"] for a in aa], yerr=[100 * a[1]["std"] for a in aa],
                        color=c, ls="none", marker="s", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("training budget, forward-backward passes of a batch" if axis == "passes"
                  else f"training budget, seconds on {results['machine']}")
    ax.set_ylabel(f"accuracy (%) at L2 eps {eps}")
    ax.set_title(f"open/dashed: PGD-{results['settings']['pgd_steps']}; filled squares: AutoAttack. Mean ± std "
                 f"over the seeds in the legend, first {results['n_test']} CIFAR-10 test images", fontsize=8)
    ax.grid(alpha=0.3)
    # below the axes: ten entries with their descriptions would cover the curves
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.13), ncol=1, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _delta(c: dict) -> str:
    if c["verdict"] == "pending":
        return f"pending ({c['seeds'][0]} / {c['seeds'][1]} seeds)"
    return f"{100 * c['diff']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"


def _seeds(points: list[dict]) -> str:
    """How many seeds an entry's points average: "3 seeds", or "1-3 seeds" while some are still missing."""
    lo, hi = min(q["seeds"] for q in points), max(q["seeds"] for q in points)
    return f"{hi} seed{'s' * (hi > 1)}" if lo == hi else f"{lo}-{hi} seeds"


def render(results: dict, plot: str = "curves.png") -> str:
    """compare.md: the settings in words, the mean ± std table per entry and budget, the plot `plot`."""
    s = results["settings"]
    summary = summarize(results["rows"])
    pgd_eps = [str(e) for e in s["pgd_eps"]]
    aa_eps = [str(e) for e in s["aa_eps"]]
    def fmt(v):   # one value (the base, a single seed) has no spread to show
        return "–" if v is None else f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["n"] > 1 else "")
    head = ["entry", "units", "steps", "passes", "seconds", "seeds", "clean"] + [f"PGD {e}" for e in pgd_eps] + \
           [f"AA {e}" for e in aa_eps] + ["checks"]
    aa = "standard AutoAttack" if s["aa_attacks"] is None else \
        f"AutoAttack {' + '.join(s['aa_attacks'])} ({s['aa_targets']} target classes)"
    lines = [f"# advgen compare, preset `{results['preset']}`", "",
             f"advgen {results['version']} (commit {results['git_commit'] or 'unknown'}); machine: "
             f"{results['machine']}.", "", DATA_CAVEAT, "",
             f"Every entry is fine-tuned from the same base ({results['base']}) on {s['train_subset'] or 50000} "
             f"training images with SGD lr {s['lr']} (constant), seeds {s['seeds']}. One budget unit is "
             f"{s['unit_passes']} forward-backward passes of a batch of {s['batch_size']}; an entry whose step costs P "
             f"passes trains units·{s['unit_passes']}/P steps (each step one batch: steps·{s['batch_size']} images seen). Evaluation on the first {results['n_test']} test "
             f"images: PGD-L2 {s['pgd_steps']} steps of 2.5·eps/{s['pgd_steps']}, {s['pgd_restarts']} restarts "
             f"ascending {' / '.join(s.get('pgd_objectives', ['ce']))} in turn (worst case kept); {aa} at L2 {', '.join(aa_eps)} on "
             f"{'every budget' if s['aa_every_budget'] else 'the final model of each run'}. Accuracies in %, "
             f"mean ± std over seeds; with n = {results['n_test']} one sample is {100 / results['n_test']:.1f} points.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["name"], f"{r['budget_units']:g}", f"{r['steps']['mean']:.0f}", f"{r['passes']['mean']:.0f}",
                 f"{r['seconds']['mean']:.0f}",
                 str(r["seeds"]), fmt(r["clean"])] + [fmt(r["pgd"].get(e)) for e in pgd_eps] + \
                [fmt(r["autoattack"].get(e)) for e in aa_eps] + ["FAILED: " + "; ".join(r["failed"]) if r["failed"] else "ok"]
        lines.append("| " + " | ".join(cells) + " |")
    eps = pgd_eps[-1]
    lines += ["", f"Against the references at L2 {eps} (the research issue's target; AA where both sides ran "
              "AutoAttack, else PGD; Δ in points with the Welch 95% interval over seeds; a verdict needs 3 seeds "
              "a side). N-FGSM at equal budget: a win is Δ ≥ 2 and beyond one std of the difference. PGD-10 at "
              "≤ 1/3 of its passes: held when Δ ≥ −1.", "",
              "| entry | vs N-FGSM: units, attack | Δ | win | vs PGD-10: units / PGD-10's, passes | Δ | within 1 |",
              "|---|---|---|---|---|---|---|"]
    for c in contrasts(summary, eps):
        r, q = c["vs_ref"], c["vs_slow"]
        lines.append(f"| {c['name']} | " + (f"{r['units']:g}, {r['attack']} | {_delta(r)} | {r['verdict']}"
                                            if r else "– | – | –") + " | " +
                     (f"{q['units']:g} / {q['other_units']:g}, {q['passes_ratio']:.2f}×, {q['attack']} | "
                      f"{_delta(q)} | {q['verdict']}" if q else "– | – | –") + " |")
    lines += ["", f"![robust accuracy against the training budget]({plot})", "",
              "Entries: " + "; ".join(f"`{r['name']}` {r['label']}" for r in summary if r["budget_units"] ==
                                      min(q["budget_units"] for q in summary if q["name"] == r["name"])), ""]
    return "\n".join(lines)
