"""`advgen reproduce`: the paper's experiment end to end — Table 1, Figure 2, Figure 3, report.md.

Stages (each skipped when its output is complete): DIR/base (standard training), DIR/minmax and
DIR/generator (both fine-tuned from DIR/base, as in the paper), DIR/<run>/eval.json (PGD-L2 curves),
then DIR/figure2.png, DIR/figure3.png, DIR/results.json and DIR/report.md.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import GENERATORS_FILE, RUN_FILE, load_model
from ..data import load_subsets
from ..errors import UserError
from ..evaluation import EvalProtocol, evaluate, mean_std
from ..io import atomic_write, git_commit, machine_description, read_json, write_json
from ..recipes import recipe_config
from ..training import TrainConfig, config_changes
from ..training.config import as_run
from . import DATA_CAVEAT, curve, train_stage
from .figures import figure2, figure3

log = logging.getLogger(__name__)


@dataclass
class Preset:
    """Settings of one reproduction. The robust stages follow the paper (recipes minmax-paper: L2 min-max
    with eps 0.05, 40 steps of 0.005; gen-paper: 32 generators with the box bound s = 0.2; SGD 0.005 for
    both), fine-tuned from the base."""

    train_subset: int | None
    test_subset: int
    base_epochs: int
    robust_epochs: int
    eval_eps: list[float]
    eval_steps: int
    batch_size: int = 128
    seed: int = 0
    # changes to a stage's recipe options, {stage: {field: value}} (a cheaper inner attack for a test)
    stage_options: dict = field(default_factory=dict)


PRESETS = {
    # about 10 minutes on 2 CPU cores
    "quick": Preset(train_subset=3000, test_subset=300, base_epochs=15, robust_epochs=2,
                    eval_eps=[0.0, 0.1, 0.25, 0.5, 1.0], eval_steps=10),
    # a smoke test of every stage in seconds (used by the test suite); its numbers mean nothing
    "smoke": Preset(train_subset=128, test_subset=32, base_epochs=1, robust_epochs=1,
                    eval_eps=[0.0, 0.25, 1.0], eval_steps=3, batch_size=64),
    # the paper's settings on the full data (GPU-scale)
    "paper": Preset(train_subset=None, test_subset=1000, base_epochs=100, robust_epochs=8,
                    eval_eps=[0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0], eval_steps=20),
}

STAGES = ("base", "minmax", "generator")


# each stage's recipe (recipes.py): the paper's three trainings
STAGE_RECIPES = {"base": "standard", "minmax": "minmax-paper", "generator": "gen-paper"}


def stage_configs(p: Preset, out: Path) -> dict[str, TrainConfig]:
    """The stages' configs: their recipes at the preset's size, the robust ones fine-tuned from OUT/base."""
    common = dict(model="resnet20", batch_size=p.batch_size, seed=p.seed, train_subset=p.train_subset,
                  test_subset=p.test_subset)
    cfgs = {"base": recipe_config("standard", epochs=p.base_epochs, init=None, **common)}
    for stage in ("minmax", "generator"):
        cfgs[stage] = recipe_config(STAGE_RECIPES[stage], epochs=p.robust_epochs, init=str(out / "base"), **common)
        for name, value in p.stage_options.get(stage, {}).items():
            setattr(cfgs[stage].options, name, value)
    return cfgs


def run_complete(run_dir: Path, cfg: TrainConfig) -> bool:
    """A stage is done when its run.json says it finished, with the same config."""
    path = run_dir / RUN_FILE
    if not path.exists():
        return False
    rec = read_json(path)
    saved = as_run(rec.get("config") or {}, rec.get("version"))
    return rec.get("finished", False) and not config_changes(saved, rec.get("init_sha256"), cfg)


def reproduce(preset: str, out: Path, *, data_dir=None, download: bool = False, device="cpu",
              seed: int | None = None) -> Path:
    """Run every missing stage of the reproduction into `out`; return the path of report.md.

    seed: replaces the preset's seed (the training subset, initialisation, data order and attack starts
    all follow it)."""
    p = PRESETS[preset] if seed is None else dataclasses.replace(PRESETS[preset], seed=seed)
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_subsets("cifar10", data_dir, download=download, train_subset=p.train_subset,
                                       test_subset=p.test_subset, seed=p.seed)

    cfgs = stage_configs(p, out)
    runs, curves = {}, {}
    for name in STAGES:
        run_dir = out / name
        if run_complete(run_dir, cfgs[name]):
            log.info("stage %s: done already (%s)", name, run_dir)
        else:
            log.info("stage %s: training", name)
            torch.manual_seed(p.seed)
            train_stage(cfgs[name], train_set, test_set, run_dir, device, "reproduce")
        runs[name] = read_json(run_dir / RUN_FILE)
        eval_path = run_dir / "eval.json"
        model = load_model(run_dir, device=device)
        protocol = EvalProtocol(norm="l2", eps=tuple(p.eval_eps), steps=p.eval_steps, seed=p.seed)
        log.info("stage %s: %s", name, protocol.describe())
        # resumes a stopped evaluation, and reuses a finished one of the same model and settings
        result = evaluate(model, test_set.images.to(device), test_set.labels.to(device), protocol,
                          progress_file=eval_path, restart_stale=True)
        write_json(eval_path, result)
        curves[name] = curve(result)

    figure2(out / "generator" / GENERATORS_FILE, test_set, out / "figure2.png")
    figure3(curves, out / "figure3.png")
    # the report names what trained the runs (their records), not what re-rendered it: a preset run again
    # over finished stages must not restate them under today's torch or advgen
    trained = runs["base"]
    results = {"preset": preset, "settings": dataclasses.asdict(p),
               "machine": (trained["epochs"][-1].get("machine") if trained.get("epochs") else None)
               or machine_description(device),
               "version": trained.get("version", __version__), "git_commit": trained.get("git_commit", git_commit()),
               "table1": table1(runs), "runs": runs, "curves": curves}
    write_json(out / "results.json", results)
    path = out / "report.md"
    atomic_write(path, render_report(preset, p, results).encode())
    return path


def reproduce_seeds(preset: str, out: Path, seeds: list[int], **kw) -> Path:
    """The reproduction once per seed, into out/seed-K (each resumable as one reproduction), then
    out/report.md, out/results.json and out/figure3.png with the mean ± std over the seeds of every
    number: seconds per epoch and the two ratios of Table 1, and each point of Figure 3."""
    if len(set(seeds)) < 2:
        raise UserError(f"--seeds needs at least 2 distinct seeds, got {seeds}")
    per_seed = {}
    for seed in seeds:
        log.info("seed %d of %s", seed, seeds)
        reproduce(preset, out / f"seed-{seed}", seed=seed, **kw)
        per_seed[seed] = read_json(out / f"seed-{seed}" / "results.json")
    results = aggregate_seeds(per_seed)
    figure3(results["curves"], out / "figure3.png",
            title=f"mean ± std over {len(seeds)} seeds, first {results['n']} test images")
    write_json(out / "results.json", results)
    path = out / "report.md"
    atomic_write(path, render_seeds_report(preset, results).encode())
    return path


def aggregate_seeds(per_seed: dict[int, dict]) -> dict:
    """Mean ± std (sample std, n − 1) over seeds of Table 1 and of Figure 3's accuracies; per_seed maps
    a seed to the results.json of its reproduction."""
    first = next(iter(per_seed.values()))
    t1 = {name: {k: mean_std([r["table1"]["rows"][name][k] for r in per_seed.values()])
                 for k in ("seconds_per_epoch", "images_per_second")} for name in STAGES}
    ratios = {k: mean_std([r["table1"]["ratios"][k] for r in per_seed.values()]) for k in first["table1"]["ratios"]}
    curves = {}
    for name in STAGES:
        eps = [q["eps"] for q in first["curves"][name]["results"]]
        acc = [[r["curves"][name]["results"][i]["accuracy"] for r in per_seed.values()] for i in range(len(eps))]
        curves[name] = {"results": [{"eps": e, "accuracy": statistics.fmean(a), "std": statistics.stdev(a),
                                     "values": a} for e, a in zip(eps, acc)]}
    failed = [f"seed {seed}, {name}: {c['name']}: {c['detail']}" for seed, r in per_seed.items() for name in STAGES
              for c in r["curves"][name].get("checks", []) if not c["passed"]]
    return {"preset": first["preset"], "seeds": list(per_seed), "settings": first["settings"],
            "machine": first["machine"], "version": __version__, "git_commit": git_commit(),
            "n": first["curves"]["base"]["n"], "table1": {"rows": t1, "ratios": ratios}, "curves": curves,
            "failed_checks": failed}


def render_seeds_report(preset: str, results: dict) -> str:
    pm = lambda v, scale=1.0, d=1: f"{scale * v['mean']:.{d}f} ± {scale * v['std']:.{d}f}"  # noqa: E731
    t, seeds, n = results["table1"], results["seeds"], results["n"]
    lines = [f"# advgen reproduction of Jung (2024), preset `{preset}`, {len(seeds)} seeds", "",
             f"advgen {results['version']} (commit {results['git_commit'] or 'unknown'}); machine: {results['machine']}.",
             "", DATA_CAVEAT, "",
             f"Seeds {seeds}: each seed draws its own training subset, initialisation, data order and attack starts "
             f"(one reproduction per seed in seed-K/, with its own report.md and settings). Every number is the mean ± "
             f"std over the seeds (sample std); the first {n} test images.", "",
             "## Table 1: training time per epoch", "",
             "| method | seconds per epoch (median of the run's epochs) | images per second |", "|---|---|---|"]
    for name in STAGES:
        r = t["rows"][name]
        lines.append(f"| {name} | {pm(r['seconds_per_epoch'])} | {pm(r['images_per_second'], d=0)} |")
    lines += ["", f"min-max / generator = **{pm(t['ratios']['minmax/generator'])}×** (paper: 5.2×); generator / "
                  f"standard = {pm(t['ratios']['generator/standard'], d=2)}×.", "",
              "## Figure 3: accuracy against PGD-L2 eps", "", "![Figure 3](figure3.png)", ""]
    eps = [r["eps"] for r in results["curves"]["base"]["results"]]
    lines += ["| model | " + " | ".join(f"eps {e:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    for name in STAGES:
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['accuracy']:.1f} ± {100 * r['std']:.1f}"
                                                 for r in results["curves"][name]["results"]) + " |")
    lines += ["", "## Sanity checks (Carlini et al. 2019)", "",
              "Every check of every seed passed." if not results["failed_checks"] else
              "\n".join(f"- FAILED: {f}" for f in results["failed_checks"]), ""]
    return "\n".join(lines)


def table1(runs: dict) -> dict:
    """Median seconds per epoch of every stage, images per second, and the ratios the paper reports."""
    rows = {}
    for name, rec in runs.items():
        secs = statistics.median(r["seconds"] for r in rec["epochs"])
        rows[name] = {"seconds_per_epoch": secs, "images_per_second": rec["train_images"] / secs,
                      "epochs": len(rec["epochs"])}
    ratios = {"minmax/generator": rows["minmax"]["seconds_per_epoch"] / rows["generator"]["seconds_per_epoch"],
              "generator/standard": rows["generator"]["seconds_per_epoch"] / rows["base"]["seconds_per_epoch"]}
    return {"rows": rows, "ratios": ratios}


def render_report(preset: str, p: Preset, results: dict) -> str:
    t = results["table1"]
    rows, curves = t["rows"], results["curves"]
    n = next(iter(curves.values()))["n"]
    cfg = {name: results["runs"][name]["config"] for name in STAGES}
    mm, gen, base = cfg["minmax"]["options"], cfg["generator"]["options"], cfg["base"]
    lines = [f"# advgen reproduction of Jung (2024), preset `{preset}`", "",
             f"advgen {results['version']} (commit {results['git_commit'] or 'unknown'}); machine: {results['machine']}.",
             "", DATA_CAVEAT, "",
             "## Settings", "",
             f"- Data: CIFAR-10, {p.train_subset or 50000} training images"
             f"{' (seeded, class-balanced subset)' if p.train_subset else ''}; first {n} test images.",
             f"- Base (recipe `{STAGE_RECIPES['base']}`): ResNet-20, standard training, {p.base_epochs} epochs, SGD lr "
             f"{base['lr']} (Nesterov momentum 0.9, weight decay 5e-4, cosine), batch {p.batch_size}, random crop + flip.",
             f"- Min-max (eq. 1; recipe `{STAGE_RECIPES['minmax']}`): from the base, {p.robust_epochs} epochs, SGD lr "
             f"{cfg['minmax']['lr']}; PGD-{mm['norm'].upper()} eps {mm['eps']}, {mm['steps']} steps of {mm['step_size']}.",
             f"- Generator (eq. 2-5; recipe `{STAGE_RECIPES['generator']}`): from the base, {p.robust_epochs} epochs, SGD lr "
             f"{cfg['generator']['lr']}; {gen['bank']['n']} generators ({gen['bank']['depth']} conv layers of width "
             f"{gen['bank']['width']}, {'residual' if gen['bank']['residual'] else 'direct'}), {gen['bank']['bound']} bound "
             f"s = {gen['bank']['size']}, generator SGD lr {gen['lr']}.",
             f"- Evaluation: PGD-L2, {p.eval_steps} steps of 2.5·eps/{p.eval_steps}, random start, on the same {n} images.",
             "", "## Table 1: training time per epoch", "",
             "| method | seconds per epoch (median) | images per second | epochs |", "|---|---|---|---|"]
    for name in STAGES:
        r = rows[name]
        lines.append(f"| {name} | {r['seconds_per_epoch']:.1f} | {r['images_per_second']:.0f} | {r['epochs']} |")
    lines += ["", f"min-max / generator = **{t['ratios']['minmax/generator']:.1f}×** (paper: 551 s / 105 s = 5.2×); "
                  f"generator / standard = {t['ratios']['generator/standard']:.2f}×.", "",
              "## Figure 2: generator samples", "", "![Figure 2](figure2.png)", "",
              "## Figure 3: accuracy against PGD-L2 eps", "", "![Figure 3](figure3.png)", ""]
    eps = [r["eps"] for r in next(iter(curves.values()))["results"]]
    lines += ["| model | " + " | ".join(f"eps {e:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    for name in STAGES:
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['accuracy']:.1f}%" for r in curves[name]["results"]) + " |")
    lines += ["", "## Sanity checks (Carlini et al. 2019)", ""]
    for name in STAGES:
        for c in curves[name].get("checks", []):
            lines.append(f"- {name}: [{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}")
    lines.append("")
    return "\n".join(lines)
