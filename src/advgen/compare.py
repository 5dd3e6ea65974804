"""`advgen compare`: every method and variant from the same base model, for the same wall-clock budget.

Each entry is fine-tuned from one base model (constant SGD learning rate, stopped by
TrainConfig.time_budget), then evaluated on the same first N test images with PGD-L2 (many steps,
restarts, each sample's worst case kept) and AutoAttack (APGD-CE + APGD-T) at the same radii. The
report gives clean / PGD / AutoAttack accuracy, the PGD − AutoAttack gap (a variant whose gap exceeds
3 points is not called robust: its PGD number is inflated by masked gradients), the budget (on the
chosen clock), the wall-clock seconds and the steps trained; pareto.png plots robust accuracy against
the budget.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .attacks import FGSM, PGD, AutoAttack
from .checkpoint import RUN_FILE, atomic_write, git_commit, load_model, read_json, write_json
from .config import AttackConfig, TrainConfig
from .evaluate import LARGE_EPS, accuracy, robust_accuracy, sanity_checks
from .models.generators import BankConfig
from .training.generator import GeneratorOptions
from .speed import inference_copy
from .report import DATA_CAVEAT, machine_description, run_complete

log = logging.getLogger(__name__)

GAP_LIMIT = 0.03  # PGD minus AutoAttack accuracy above which a variant is not called robust


@dataclass
class Entry:
    """One contender: TrainConfig fields over the preset's common ones, and its budget in units."""

    name: str
    label: str
    overrides: dict
    budget_units: float


def _gen(bank: dict, **train) -> dict:
    return {"method": "generator", "options": GeneratorOptions(bank=BankConfig(**bank), **train)}


def _minmax(k: int, eps: float = 0.5) -> dict:
    return {"method": "minmax", "options": AttackConfig(norm="l2", eps=eps, steps=k, step_size=2.5 * eps / k)}


L2_BANK = {"bound": "l2", "size": 0.5}
ENTRIES = [
    Entry("pgd10", "min-max PGD-10 (L2 0.5)", _minmax(10), 5.0),
    Entry("gen_grad", "generators seeing the input gradient, L2 0.5, Adam 1e-3",
          _gen({**L2_BANK, "grad_input": True}, optimizer="adam", lr=1e-3), 1.0),
    Entry("gen_grad_skip", "gradient generators starting at the FGSM step (grad skip), L2 0.5, Adam 1e-3",
          _gen({**L2_BANK, "grad_input": True, "grad_skip": True}, optimizer="adam", lr=1e-3), 1.0),
    Entry("fgsm_rs", "FGSM-RS (Wong et al. 2020, L2 0.5)",
          {"method": "fgsm", "options": AttackConfig(norm="l2", eps=0.5, steps=1)}, 1.0),
    Entry("gen_paper", "generators as in the paper (box s=0.2, SGD 0.005)",
          _gen({"bound": "box", "size": 0.2}, optimizer="sgd", lr=0.005), 1.0),
    Entry("gen_l2", "generators, L2 bound 0.5, Adam 1e-3", _gen(L2_BANK, optimizer="adam", lr=1e-3), 1.0),
    Entry("pgd2", "min-max PGD-2 (L2 0.5)", _minmax(2), 1.0),
]


@dataclass
class ComparePreset:
    train_subset: int | None
    test_subset: int
    base_epochs: int
    unit_seconds: float             # the budget of one unit; PGD-10 gets 5 units
    lr: float = 0.01                # constant fine-tuning learning rate of every classifier
    eval_eps: list[float] = field(default_factory=lambda: [0.25, 0.5])
    pgd_steps: int = 50
    pgd_restarts: int = 2
    aa_attacks: list[str] = field(default_factory=lambda: ["apgd-ce", "apgd-t"])
    aa_targets: int = 3
    watch_subset: int = 200
    batch_size: int = 128
    seed: int = 0
    entries: list[Entry] = field(default_factory=lambda: list(ENTRIES))


COMPARE_PRESETS = {
    # a CPU run: about 1 hour on one core (without --base, 10 more minutes for the base)
    "quick": ComparePreset(train_subset=10000, test_subset=200, base_epochs=15, unit_seconds=96.0,
                           entries=[e for e in ENTRIES if e.name not in ("pgd2", "gen_l2")]),
    # every stage in seconds, for the tests; its numbers mean nothing
    "smoke": ComparePreset(train_subset=256, test_subset=24, base_epochs=1, unit_seconds=1.0, pgd_steps=3,
                           pgd_restarts=1, aa_targets=1, watch_subset=16, batch_size=64,
                           entries=[e for e in ENTRIES if e.name in ("pgd2", "gen_l2")]),
    # GPU-scale: full training set, 1,000 test images
    "full": ComparePreset(train_subset=None, test_subset=1000, base_epochs=100, unit_seconds=600.0),
}


def entry_config(p: ComparePreset, e: Entry, base: Path, clock: str) -> TrainConfig:
    fields = {k: (copy.deepcopy(v)) for k, v in e.overrides.items()}
    return TrainConfig(model="resnet20", epochs=1000, lr=p.lr, schedule="constant", batch_size=p.batch_size,
                       seed=p.seed, train_subset=p.train_subset, test_subset=p.test_subset, init=str(base),
                       watch_subset=p.watch_subset, time_budget=p.unit_seconds * e.budget_units,
                       budget_clock=clock, **fields)


def evaluate_entry(model, x, y, p: ComparePreset) -> dict:
    """Clean accuracy, PGD-L2 (worst case over restarts) and AutoAttack at every eps of the preset."""
    model = inference_copy(model, channels_last=False)
    out = {"clean": accuracy(model, x, y), "pgd": {}, "autoattack": {}}
    pgd = robust_accuracy(model, x, y, lambda e: PGD(model, norm="l2", eps=e, steps=p.pgd_steps,
                                                     rel_step=2.5 / p.pgd_steps, restarts=p.pgd_restarts,
                                                     seed=p.seed), p.eval_eps)
    fgsm = robust_accuracy(model, x, y, lambda e: FGSM(model, norm="l2", eps=e, seed=p.seed), p.eval_eps)
    k = min(200, x.shape[0])
    large = robust_accuracy(model, x[:k], y[:k], lambda e: PGD(model, norm="l2", eps=e, steps=20, rel_step=0.1),
                            [LARGE_EPS["l2"]])[0]
    aa = robust_accuracy(model, x, y, lambda e: AutoAttack(model, norm="l2", eps=e, attacks=p.aa_attacks,
                                                           targets=p.aa_targets, seed=p.seed), p.eval_eps)
    for e, a_pgd, a_aa in zip(p.eval_eps, pgd, aa):
        out["pgd"][str(e)], out["autoattack"][str(e)] = a_pgd, a_aa
    out["checks"] = sanity_checks("l2", [0.0] + p.eval_eps, [out["clean"]] + pgd, [out["clean"]] + fgsm, large,
                                  x.shape[0])
    return out


def gap_check(ev: dict, n: int) -> dict:
    """PGD must not exceed AutoAttack by more than GAP_LIMIT at any eps (accuracies are multiples of 1/n)."""
    stronger = [e for e in ev["pgd"] if ev["pgd"][e] - ev["autoattack"][e] > GAP_LIMIT + 0.5 / n]
    return {"name": f"PGD within {100 * GAP_LIMIT:.0f} points of AutoAttack", "passed": not stronger,
            "detail": "ok" if not stronger else f"PGD overstates robustness at eps {', '.join(stronger)}"}


def compare(preset: str, out: Path, *, data_dir=None, download=False, device="cpu", base: Path | None = None,
            clock: str = "wall") -> Path:
    """Run every missing stage of the comparison into `out`; return the path of compare.md."""
    from .data import load_subsets
    from .training import train

    p = COMPARE_PRESETS[preset]
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test_set = load_subsets("cifar10", data_dir, download=download, train_subset=p.train_subset,
                                       test_subset=p.test_subset, seed=p.seed)
    x, y = test_set.float_images().to(device), test_set.labels.to(device)

    if base is None:
        base = out / "base"
        cfg = TrainConfig(method="standard", epochs=p.base_epochs, lr=0.1, batch_size=p.batch_size, seed=p.seed,
                          train_subset=p.train_subset, test_subset=p.test_subset)
        if not run_complete(base, cfg):
            torch.manual_seed(p.seed)
            train(cfg, train_set, test_set, out_dir=base, device=device, resume=True)  # continue a stopped run
    rows = {}
    for e in [Entry("base", "base model (standard training)", {}, 0.0)] + p.entries:
        run_dir = base if e.name == "base" else out / e.name
        if e.name != "base":
            cfg = entry_config(p, e, base, clock)
            if run_complete(run_dir, cfg):
                log.info("%s: trained already", e.name)
            else:
                log.info("%s: training for %.0f s (%s clock)", e.name, cfg.time_budget, clock)
                torch.manual_seed(p.seed)
                train(cfg, train_set, test_set, out_dir=run_dir, device=device, resume=True)
        rec = read_json(run_dir / RUN_FILE)
        eval_path = out / f"{e.name}.eval.json"
        settings = {"eps": p.eval_eps, "pgd_steps": p.pgd_steps, "pgd_restarts": p.pgd_restarts,
                    "aa": p.aa_attacks, "aa_targets": p.aa_targets, "n": len(test_set)}
        if eval_path.exists() and read_json(eval_path).get("settings") == settings:
            ev = read_json(eval_path)
        else:
            log.info("%s: evaluating", e.name)
            ev = evaluate_entry(load_model(run_dir, device=device), x, y, p)
            ev["settings"] = settings
            write_json(eval_path, ev)
        # the gap verdict is recomputed from the stored accuracies, so a changed rule applies to old runs
        ev["checks"] = [c for c in ev["checks"] if not c["name"].startswith("PGD within")] + [gap_check(ev, len(test_set))]
        trained = e.name != "base"
        rows[e.name] = {"label": e.label, "budget_units": e.budget_units,
                        "budget_seconds": rec["config"]["time_budget"] if trained else 0.0,
                        "wall_seconds": sum(r["seconds"] for r in rec["epochs"]) if trained else 0.0,
                        "steps": sum(r.get("steps", 0) for r in rec["epochs"]) if trained else 0, **ev}

    results = {"preset": preset, "settings": dataclasses.asdict(p), "clock": clock,
               "machine": machine_description(device), "version": __version__, "git_commit": git_commit(),
               "base": str(base), "rows": rows}
    write_json(out / "compare.json", results)
    pareto(rows, p.eval_eps[-1], out / "pareto.png")
    path = out / "compare.md"
    atomic_write(path, render(results, p).encode())
    return path


def pareto(rows: dict, eps: float, path: Path) -> None:
    """Robust accuracy at eps against the training budget, AutoAttack (filled) and PGD (open) per entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, r) in enumerate(rows.items()):
        c = f"C{i % 10}"
        ax.scatter([r["budget_seconds"]], [r["autoattack"][str(eps)]], color=c, label=name, zorder=3)
        ax.scatter([r["budget_seconds"]], [r["pgd"][str(eps)]], facecolors="none", edgecolors=c, zorder=3)
    ax.set_xlabel("training budget, seconds (fine-tuning from the base)")
    ax.set_ylabel(f"accuracy at L2 eps {eps}")
    ax.set_title("filled: AutoAttack; open: PGD", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict, p: ComparePreset) -> str:
    rows = results["rows"]
    eps = [str(e) for e in p.eval_eps]
    head = ["entry", "budget s", "wall s", "steps", "clean"] + [f"PGD {e}" for e in eps] + [f"AA {e}" for e in eps] + \
           [f"PGD−AA {eps[-1]}", "checks", "what"]
    lines = [f"# advgen compare, preset `{results['preset']}`", "",
             f"advgen {results['version']} (commit {results['git_commit'] or 'unknown'}); machine: {results['machine']}; "
             f"budget clock: {results['clock']}.", "", DATA_CAVEAT, "",
             f"Every entry is fine-tuned from the same base ({results['base']}) on "
             f"{p.train_subset or 50000} training images with SGD lr {p.lr} (constant), for its budget: "
             f"{p.unit_seconds:.0f} s per unit ("
             + ", ".join(f"{e.name} {e.budget_units:g}" for e in p.entries) + "). Evaluation on the first "
             f"{p.test_subset} test images: PGD-L2 {p.pgd_steps} steps of 2.5·eps/{p.pgd_steps}, {p.pgd_restarts} "
             f"restarts (worst case kept); AutoAttack {' + '.join(p.aa_attacks)} ({p.aa_targets} target classes). "
             f"Accuracies in %.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        gap = r["pgd"][eps[-1]] - r["autoattack"][eps[-1]]
        failed = [c["name"] for c in r["checks"] if not c["passed"]]
        verdict = "FAILED: " + "; ".join(failed) if failed else "ok"
        cells = [name, f"{r['budget_seconds']:.0f}", f"{r['wall_seconds']:.0f}", str(r["steps"]),
                 f"{100 * r['clean']:.1f}"] + \
                [f"{100 * r['pgd'][e]:.1f}" for e in eps] + [f"{100 * r['autoattack'][e]:.1f}" for e in eps] + \
                [f"{100 * gap:+.1f}", verdict, r["label"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![robust accuracy against training time](pareto.png)", ""]
    return "\n".join(lines)
