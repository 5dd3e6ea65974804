"""`advgen reproduce`: the paper's experiment end to end — Table 1, Figure 2, Figure 3, report.md.

Stages (each skipped when its output is complete): DIR/base (standard training), DIR/minmax and
DIR/generator (both fine-tuned from DIR/base, as in the paper), DIR/<run>/eval.json (PGD-L2 curves),
then DIR/figure2.png, DIR/figure3.png, DIR/results.json and DIR/report.md.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (GENERATORS_FILE, RUN_FILE, atomic_write, git_commit, machine_description, read_json,
                         read_tensors, write_json)
from .config import AttackConfig, TrainConfig, with_defaults
from .training.generator import GeneratorOptions, generator_preset

log = logging.getLogger(__name__)

DATA_CAVEAT = ("Data: the offline CIFAR-10 copy is JPEG-derived (mean absolute pixel error about 6/255 against "
               "the official batches); absolute accuracies on it can sit a few points below published CIFAR-10 "
               "figures, while comparisons between methods on the same images are sound.")


@dataclass
class Preset:
    """Settings of one reproduction. The robust stages follow the paper: L2 min-max with eps 0.05,
    40 steps of 0.005; 32 generators with the box bound s = 0.2; SGD 0.005 for both, from the base."""

    train_subset: int | None
    test_subset: int
    base_epochs: int
    robust_epochs: int
    eval_eps: list[float]
    eval_steps: int
    base_lr: float = 0.1
    robust_lr: float = 0.005
    batch_size: int = 128
    seed: int = 0
    # the paper's min-max: PGD-L2, eps 0.05, 40 steps of 0.005; its generators: 32, box s = 0.2, SGD 0.005
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(norm="l2", eps=0.05, steps=40, step_size=0.005))
    generator: GeneratorOptions = field(default_factory=lambda: generator_preset("paper"))


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


def stage_configs(p: Preset, out: Path) -> dict[str, TrainConfig]:
    common = dict(model="resnet20", batch_size=p.batch_size, seed=p.seed, train_subset=p.train_subset,
                  test_subset=p.test_subset)
    base = TrainConfig(method="standard", epochs=p.base_epochs, lr=p.base_lr, **common)
    robust = dict(epochs=p.robust_epochs, lr=p.robust_lr, init=str(out / "base"), **common)
    return {"base": base,
            "minmax": TrainConfig(method="minmax", options=dataclasses.replace(p.attack), **robust),
            "generator": TrainConfig(method="generator", options=copy.deepcopy(p.generator), **robust)}


def run_complete(run_dir: Path, cfg: TrainConfig) -> bool:
    """A stage is done when its run.json says it finished, with the same config."""
    path = run_dir / RUN_FILE
    if not path.exists():
        return False
    rec = read_json(path)
    saved = with_defaults(rec.get("config") or {}, TrainConfig(method=cfg.method).to_dict())
    return saved == cfg.to_dict() and rec.get("finished", False)


def reproduce(preset: str, out: Path, *, data_dir=None, download: bool = False, device="cpu",
              seed: int | None = None) -> Path:
    """Run every missing stage of the reproduction into `out`; return the path of report.md.

    seed: replaces the preset's seed (the training subset, initialisation, data order and attack starts
    all follow it)."""
    from .checkpoint import load_model
    from .data import load_subsets
    from .evaluate import evaluate
    from .training import train

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
            # resume=True: a stage stopped part-way continues from its state (a fresh folder starts afresh)
            train(cfgs[name], train_set, test_set, out_dir=run_dir, device=device, resume=True)
        runs[name] = read_json(run_dir / RUN_FILE)
        eval_path = run_dir / "eval.json"
        settings = {"attack": "pgd-l2", "eps": p.eval_eps, "steps": p.eval_steps, "n": len(test_set)}
        if eval_path.exists() and read_json(eval_path).get("settings") == settings:
            curves[name] = read_json(eval_path)
            continue
        log.info("stage %s: PGD-L2 evaluation", name)
        model = load_model(run_dir, device=device)
        curve = evaluate(model, test_set.images.to(device), test_set.labels.to(device), attack="pgd-l2",
                         epsilons=p.eval_eps, steps=p.eval_steps, rel_step=2.5 / p.eval_steps, seed=p.seed)
        curve["settings"] = settings
        write_json(eval_path, curve)
        curves[name] = curve

    figure2(out / "generator" / GENERATORS_FILE, test_set, out / "figure2.png")
    figure3(curves, out / "figure3.png")
    results = {"preset": preset, "settings": dataclasses.asdict(p), "machine": machine_description(device),
               "version": __version__, "git_commit": git_commit(), "table1": table1(runs),
               "runs": runs, "curves": curves}
    write_json(out / "results.json", results)
    path = out / "report.md"
    atomic_write(path, render_report(preset, p, results).encode())
    return path


def reproduce_seeds(preset: str, out: Path, seeds: list[int], **kw) -> Path:
    """The reproduction once per seed, into out/seed-K (each resumable as one reproduction), then
    out/report.md, out/results.json and out/figure3.png with the mean ± std over the seeds of every
    number: seconds per epoch and the two ratios of Table 1, and each point of Figure 3."""
    if len(set(seeds)) < 2:
        from .errors import UserError
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


def mean_std(vals: list) -> dict | None:
    """{"mean", "std" (sample std, n − 1; 0 for one value), "n", "values"} of the values that are not
    None; None when there are none (seeds of a reproduction, of a comparison's entry and budget)."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


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


def figure2(gen_file: Path, test_set, path: Path, images: int = 6, generators: int = 6) -> None:
    """Originals (left column) beside the samples of several generators (Figure 2 of the paper)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .models.generators import BankConfig, GeneratorBank

    tensors, meta = read_tensors(gen_file)
    cfg = BankConfig(**{**meta.get("config", meta.get("generator", {})), "assign": "all"})
    bank = GeneratorBank(cfg)
    bank.load_state_dict(tensors)
    x = test_set.float_images()[:images]
    with torch.no_grad():
        grad = torch.zeros_like(x) if cfg.grad_input else None
        memory = torch.zeros_like(x) if cfg.memory_input else None   # as on a sample's first visit
        adv, _ = bank(x, grad, memory=memory)
    adv = adv.view(cfg.n, images, *x.shape[1:])
    cols = min(generators, cfg.n)
    fig, axes = plt.subplots(images, cols + 1, figsize=(1.3 * (cols + 1), 1.3 * images))
    for i in range(images):
        row = [x[i]] + [adv[k, i] for k in range(cols)]
        for j, img in enumerate(row):
            ax = axes[i, j]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("original" if j == 0 else f"gen {j - 1}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure3(curves: dict, path: Path, title: str | None = None) -> None:
    """Accuracy against the L2 size of PGD attacks, one line per model (Figure 3 of the paper); a point
    whose result holds "ci95" [low, high] gets that interval as its error bar, one holding "std" (a mean
    over seeds) ± std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for i, (name, curve) in enumerate(curves.items()):
        eps = [r["eps"] for r in curve["results"]]
        acc = [r["accuracy"] for r in curve["results"]]
        bars = all("ci95" in r for r in curve["results"]) or all("std" in r for r in curve["results"])
        if bars:
            err = ([[r["std"] for r in curve["results"]]] * 2 if "std" in curve["results"][0] else
                   [[a - r["ci95"][0] for a, r in zip(acc, curve["results"])],
                    [r["ci95"][1] - a for a, r in zip(acc, curve["results"])]])
            dodge = 0.006 * (i - (len(curves) - 1) / 2)   # side by side, so that the bars stay readable
            ax.errorbar([e + dodge for e in eps], acc, yerr=err, marker="o", markersize=3, capsize=3, label=name)
        else:
            ax.plot(eps, acc, marker="o", label=name)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("PGD-L2 eps (pixels in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)   # beside the axes: never over a curve
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def render_report(preset: str, p: Preset, results: dict) -> str:
    t = results["table1"]
    rows, curves = t["rows"], results["curves"]
    n = next(iter(curves.values()))["n"]
    lines = [f"# advgen reproduction of Jung (2024), preset `{preset}`", "",
             f"advgen {results['version']} (commit {results['git_commit'] or 'unknown'}); machine: {results['machine']}.",
             "", DATA_CAVEAT, "",
             "## Settings", "",
             f"- Data: CIFAR-10, {p.train_subset or 50000} training images"
             f"{' (seeded, class-balanced subset)' if p.train_subset else ''}; first {n} test images.",
             f"- Base: ResNet-20, standard training, {p.base_epochs} epochs, SGD lr {p.base_lr} (Nesterov momentum 0.9, "
             f"weight decay 5e-4, cosine), batch {p.batch_size}, random crop + flip.",
             f"- Min-max (eq. 1): from the base, {p.robust_epochs} epochs, SGD lr {p.robust_lr}; PGD-{p.attack.norm.upper()} "
             f"eps {p.attack.eps}, {p.attack.steps} steps of {p.attack.step_size}.",
             f"- Generator (eq. 2-5): from the base, {p.robust_epochs} epochs, SGD lr {p.robust_lr}; "
             f"{p.generator.bank.n} generators ({p.generator.bank.depth} conv layers of width {p.generator.bank.width}, "
             f"{'residual' if p.generator.bank.residual else 'direct'}), {p.generator.bank.bound} bound s = {p.generator.bank.size}, "
             f"generator SGD lr {p.generator.lr}.",
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


def plot_runs(run_dirs: list[Path], path: Path) -> Path:
    """Training curves of runs side by side: the per-step training loss and accuracy (metrics.csv,
    a running mean over ~1% of the steps), and per epoch the test accuracy and the PGD-watch accuracy
    (run.json). Each run is one colour, labelled by its folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import METRICS_FILE
    from .errors import UserError
    from .training.metrics import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, run in enumerate(map(Path, run_dirs)):
        if not (run / RUN_FILE).exists():
            raise UserError(f"{run} holds no run ({RUN_FILE} missing)")
        c, rec = f"C{i % 10}", read_json(run / RUN_FILE)
        if (run / METRICS_FILE).exists():
            m = read_metrics(run / METRICS_FILE)
            k = max(1, len(m["step"]) // 100)
            smooth = lambda v: [sum(v[max(0, j - k + 1):j + 1]) / len(v[max(0, j - k + 1):j + 1])  # noqa: E731
                                for j in range(len(v))]
            axes[0].plot(m["step"], smooth(m["loss"]), color=c, label=run.name)
            axes[1].plot(m["step"], [100 * a for a in smooth(m["accuracy"])], color=c, alpha=0.5)
        rows = rec.get("epochs", [])
        ends = [sum(r.get("steps", 0) for r in rows[:j + 1]) for j in range(len(rows))]
        axes[1].plot(ends, [100 * r["test_acc"] for r in rows], "o-", color=c, label=f"{run.name} test")
        watch = [(e, r["watch_acc"]) for e, r in zip(ends, rows) if "watch_acc" in r]
        if watch:
            axes[2].plot([w[0] for w in watch], [100 * w[1] for w in watch], "s-", color=c, label=run.name)
    for ax, title in zip(axes, ("training loss", "accuracy % (line: training batches; dots: test)",
                                "PGD-watch accuracy %")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
