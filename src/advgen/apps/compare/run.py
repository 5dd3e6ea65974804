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
run one after the other in this process, or with jobs > 1 in that many worker processes (workers.py).
The report is then read from the run folders alone.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from ..._version import __version__
from ...checkpoint import RUN_FILE, load_model
from ...data import load_subsets
from ...errors import UserError, check
from ...evaluation import EvalProtocol, curve_key, evaluate, gap_check
from ...recipes import RECIPES, resolve_recipe
from ...io import git_commit, machine_description, read_json, read_tensors, write_json
from ...training import METHODS, TrainConfig, train
from ...training.rundir import hold_run_dir
from ..reproduce import run_complete
from .plan import COMPARE_PRESETS, ComparePreset, Entry, Task, _budgets, WORKER_LOG, _eval_stored, _plan, _settings, entry_config
from .report import write_report

log = logging.getLogger(__name__)


def protocol_of(p: ComparePreset, autoattack: bool, seed: int) -> EvalProtocol:
    """The comparison's evaluation: PGD at the preset's radii with Madry's step 2.5·eps/steps (the step of
    its first records), restarts ascending the preset's objectives in turn; AutoAttack at p.aa_eps if asked;
    every check; chunks of p.aa_chunk images (they fix the random starts)."""
    return EvalProtocol(norm=p.norm, eps=(0.0, *p.pgd_eps), steps=p.pgd_steps, restarts=p.pgd_restarts,
                        objectives=tuple(p.pgd_objectives), aa_eps=tuple(p.aa_eps) if autoattack else (),
                        aa_attacks=None if p.aa_attacks is None else tuple(p.aa_attacks), aa_targets=p.aa_targets,
                        seed=seed, batch_size=p.aa_chunk)


def evaluate_model(model, x, y, p: ComparePreset, autoattack: bool, seed: int = 0,
                   progress: Path | None = None, aa_done: dict | None = None) -> dict:
    """Clean accuracy, PGD (worst case over restarts), the sanity checks, and AutoAttack if asked, as the
    comparison's rows keep them ({"clean", "pgd": {eps: accuracy}, "autoattack": {...}, "checks"}); the
    per-sample results are saved to `progress` after every chunk and resumed from. aa_done: the AutoAttack
    accuracies of an earlier evaluation of this model under the same AutoAttack settings, reused rather
    than computed again (AutoAttack is most of an evaluation's cost; a changed PGD setting needs only PGD)."""
    protocol = protocol_of(p, autoattack and aa_done is None, seed)
    r = evaluate(model, x, y, protocol, progress_file=progress, restart_stale=True)
    acc = lambda key: {e: d["accuracy"] for e, d in r.get(key, {}).items() if float(e) > 0}  # noqa: E731
    out = {"clean": r["clean"]["accuracy"], "pgd": acc(curve_key("pgd", p.norm)),
           "autoattack": acc(curve_key("autoattack", p.norm)), "checks": r["checks"]}
    if autoattack and aa_done is not None:
        out["autoattack"] = dict(aa_done)
        out["checks"].append(gap_check(out["pgd"], out["autoattack"], len(y)))
    return out


def _train_base(p: ComparePreset, out: Path, train_set, test_set, device) -> Path:
    base = out / "base"
    cfg = TrainConfig(method="standard", epochs=p.base_epochs, lr=0.1, batch_size=p.batch_size, seed=p.base_seed,
                      train_subset=p.train_subset, test_subset=p.test_subset)
    if not run_complete(base, cfg):
        torch.manual_seed(p.base_seed)
        train(cfg, train_set, test_set, out_dir=base, device=device, resume=True)  # continues a stopped run
    return base


def _eval_cached(path: Path, settings: dict, compute) -> dict:
    """The evaluation stored at path if it was made with these settings, else compute(progress, aa_done)
    and store it; progress: the file a stopped evaluation left (PATH.progress.json), removed once it is
    stored; aa_done: the stored AutoAttack accuracies when only other settings changed, else None."""
    ev = _eval_stored(path, settings)
    if ev is None:
        old = read_json(path) if path.exists() else {}
        same_aa = settings["aa"] is not None and old.get("autoattack") and all(
            old.get("settings", {}).get(k) == settings[k] for k in ("aa", "n", "seed"))
        progress = path.with_suffix(".progress.json")
        ev = {**compute(progress, old["autoattack"] if same_aa else None), "settings": settings}
        write_json(path, ev)
        progress.unlink(missing_ok=True)
    return ev


def run_task(task: Task, *, device, log_file: Path | None = None, data=None) -> None:
    """Do one task, holding its run folder's lock throughout (rundir.hold_run_dir: another process on
    the folder, a worker of this command or of another compare, is refused with RunDirError).

    device: where it trains and evaluates. log_file: a worker's log file (parallel.send_output_to), None
    in-process. data: (train set, test set) already loaded, else loaded from task.data_dir. The global
    torch RNG is seeded with the run's seed before training, so the run is the same whoever does it.
    """
    from ...training.method import registered

    p, e, device = task.preset, task.entry, torch.device(device)
    with hold_run_dir(task.run_dir), registered(e.method, task.method.cls, task.method.options, task.method.summary):
        if log_file is not None:
            from .workers import send_output_to
            send_output_to(log_file, f"advgen {__version__} compare: {task.label} on {device}, "
                                f"{torch.get_num_threads()} CPU thread(s)")
        if data is None:
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
                         lambda prog, aa: {**evaluate_model(load_model(path, device=device), x, y, p, autoattack,
                                                            task.seed, prog, aa), "work": _work(task.run_dir, n, last)})


def _entry_name(name: str) -> str:
    """An entry named by its recipe, or by the recipe's old name (with a deprecation line)."""
    try:
        return resolve_recipe(name).name
    except UserError:
        return name   # not a recipe: an entry of the preset's own, or unknown (refused below)


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

    p = COMPARE_PRESETS[preset]
    device = torch.device(device)
    devices = [torch.device(d) for d in (devices or [device])]
    check(type(jobs) is int and jobs >= 1, f"--jobs must be a number of worker processes >= 1, got {jobs}")
    check(len(devices) <= jobs, f"--devices names {len(devices)} devices but --jobs {jobs} runs {jobs} worker(s): "
                                f"give --jobs {len(devices)} or more, or fewer devices")
    check(threads is None or (type(threads) is int and threads >= 1), f"threads must be >= 1, got {threads}")
    entries = None if entries is None else [_entry_name(n) for n in entries]
    # a recipe the preset does not list (one of a plugin's, say) joins it at the budgets of its first entry
    extra = [Entry(n, list(p.entries[0].budgets)) for n in dict.fromkeys(entries or [])
             if n in RECIPES and n not in {e.name for e in p.entries}]
    p = dataclasses.replace(p, entries=p.entries + extra)
    unknown = set(entries or []) - {e.name for e in p.entries}
    if unknown:
        raise UserError(f"unknown compare entries {sorted(unknown)}; preset {preset} has "
                        f"{', '.join(e.name for e in p.entries)}, and any recipe ({', '.join(sorted(RECIPES))})")
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
        from .workers import Job, run_jobs, threads_per_worker
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


def _base_row(base: Path, x, y, p: ComparePreset, out: Path) -> dict:
    settings = _settings(p, len(y), True, 0)
    ev = _eval_cached(out / "base.eval.json", settings,
                      lambda prog, aa: evaluate_model(load_model(base, device=x.device), x, y, p, autoattack=True,
                                                      progress=prog, aa_done=aa))
    return {"name": "base", "method": "standard", "label": "base model (standard training)", "seed": p.base_seed,
            "budget_units": 0.0, "steps": 0, "passes": 0, "budget_seconds": 0.0, **_scores(ev)}


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
    row = {"name": e.name, "method": e.method, "label": e.label, "seed": seed, "budget_units": units,
           "steps": steps, "passes": work["passes"], "budget_seconds": work["seconds"],
           "catastrophic_overfitting": _overfit_by(run_dir, steps), **_scores(ev)}
    if last and row["catastrophic_overfitting"] is not None:
        row["watch"] = _watch_curve(run_dir)
    return row


def _watch_curve(run_dir: Path) -> list[dict]:
    """The run's catastrophic-overfitting watch after each epoch: passes done by then, PGD and FGSM accuracy
    on the watched test images, and whether the check fired (the figure of the report)."""
    out, passes = [], 0
    for row in read_json(run_dir / RUN_FILE)["epochs"]:
        passes += row["passes"]
        if "watch_acc" in row:
            out.append({"passes": passes, "pgd": row["watch_acc"], "fgsm": row["watch_fgsm_acc"],
                        "overfit": bool(row.get("catastrophic_overfitting"))})
    return out


def _overfit_by(run_dir: Path, steps: int) -> bool | None:
    """Whether the run's catastrophic-overfitting check (training.metrics) had fired by `steps` steps; None
    for a run that did not watch (watch_subset 0)."""
    rec, done = read_json(run_dir / RUN_FILE), 0
    if not any("watch_acc" in row for row in rec["epochs"]):
        return None
    for row in rec["epochs"]:
        done += row["steps"]
        if done > steps:
            return False
        if row.get("catastrophic_overfitting"):
            return True
    return False


def _work(run_dir: Path, steps: int, last: bool) -> dict:
    """{"passes", "seconds"} of training up to the budget of `steps`: the run record's totals for the
    final model, the snapshot's header otherwise. Stored with the budget's evaluation, so that the
    report needs only the records of a run (tools/carry.py --light), not its weights."""
    if last:
        rec = read_json(run_dir / RUN_FILE)
        return {"passes": sum(r["passes"] for r in rec["epochs"]), "seconds": sum(r["seconds"] for r in rec["epochs"])}
    _, meta = read_tensors(run_dir / "snapshots" / f"step-{steps}.safetensors")
    return {"passes": meta["passes"], "seconds": meta["seconds"]}
