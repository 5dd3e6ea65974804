"""What a comparison writes: compare.json, compare.md (the mean ± std table and the contrasts against the
references, each with its Welch interval) and the curves, all from the rows read back from the run folders."""
from __future__ import annotations

from pathlib import Path

from ...evaluation import mean_std, welch_interval
from ...io import atomic_write, write_json
from ...training import TrainConfig
from .. import DATA_CAVEAT


def _radius(e: float, norm: str) -> str:
    k = e * 255
    return f"{round(k)}/255" if norm == "linf" and abs(k - round(k)) < 1e-6 else f"{e:g}"


def write_report(results: dict, out: Path, suffix: str = "") -> Path:
    """The comparison's outputs from its results: OUT/compare{suffix}.json, compare{suffix}.md (which shows
    curves{suffix}.png) and the plots curves{suffix}.png (against passes) and curves{suffix}-seconds.png;
    returns the path of the .md. A suffix keeps several comparisons apart in one folder (docs/)."""
    out = Path(out)
    write_json(out / f"compare{suffix}.json", results)
    plot_curves(results, out / f"curves{suffix}.png")
    plot_curves(results, out / f"curves{suffix}-seconds.png", axis="seconds")
    co_plot = f"overfitting{suffix}.png" if plot_overfitting(results, out / f"overfitting{suffix}.png") else None
    path = out / f"compare{suffix}.md"
    atomic_write(path, render(results, plot=f"curves{suffix}.png", co_plot=co_plot).encode())
    return path


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
                    "failed": sorted({c["name"] for r in rs for c in r["checks"] if not c["passed"]}),
                    # catastrophic overfitting: (seeds where it showed, seeds that watched for it)
                    "overfit": (sum(bool(r.get("catastrophic_overfitting")) for r in rs),
                                sum(r.get("catastrophic_overfitting") is not None for r in rs))})
    return out


def contrasts(summary: list[dict], eps: str, ref: str = "nfgsm-l2", slow: str = "pgd10-l2", seeds: int = 3) -> list[dict]:
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
    # what the robust difference cost in clean accuracy: a gain bought with clean accuracy may be no more than
    # the trade a larger training radius makes (docs/results.md, gen-nfgsm at Linf 8/255)
    cd, clo, chi = welch_interval(a["clean"], b["clean"])
    return {**c, "diff": d, "ci95": [lo, hi], "sd": sd, "clean_diff": cd, "clean_ci95": [clo, chi],
            "verdict": "yes" if wins(d, sd) else "no"}


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
    norm = results["settings"].get("norm", "l2")
    ax.set_ylabel(f"accuracy (%) at {norm.upper()} eps {_radius(float(eps), norm)}")
    ax.set_title(f"open/dashed: PGD-{results['settings']['pgd_steps']}; filled squares: AutoAttack. Mean ± std "
                 f"over the seeds in the legend, first {results['n_test']} CIFAR-10 test images", fontsize=8)
    ax.grid(alpha=0.3)
    # below the axes: ten entries with their descriptions would cover the curves
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.13), ncol=1, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_overfitting(results: dict, path: Path) -> bool:
    """The catastrophic-overfitting watch of every run that kept one (rows["watch"]): one panel per entry,
    PGD accuracy on the watched images (solid) and FGSM accuracy (dashed) against the passes trained, one
    colour per seed, a red cross where the check fired. False (nothing written) if no run watched."""
    runs = [r for r in results["rows"] if r.get("watch")]
    if not runs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in runs))
    cols = min(3, len(names))
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), sharey=True, squeeze=False)
    seeds = sorted({r["seed"] for r in runs})
    for ax, name in zip(axes.flat, names):
        for r in (r for r in runs if r["name"] == name):
            c = f"C{seeds.index(r['seed']) % 10}"
            xs = [p["passes"] for p in r["watch"]]
            ax.plot(xs, [100 * p["pgd"] for p in r["watch"]], color=c, marker="o", ms=3, label=f"seed {r['seed']} PGD")
            ax.plot(xs, [100 * p["fgsm"] for p in r["watch"]], color=c, ls="--", label=f"seed {r['seed']} FGSM")
            co = [p for p in r["watch"] if p["overfit"]]
            ax.plot([p["passes"] for p in co], [100 * p["pgd"] for p in co], "rx", ms=9, mew=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("forward-backward passes of a batch", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy on the watched images (%)", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    norm = results["settings"].get("norm", "l2")
    eps = results["settings"]["pgd_eps"][-1]
    fig.suptitle(f"catastrophic-overfitting watch at {norm.upper().replace('INF', 'inf')} {_radius(float(eps), norm)}"
                 f"\nPGD solid, FGSM dashed; a red cross where the check fired", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _delta(c: dict) -> str:
    if c["verdict"] == "pending":
        return f"pending ({c['seeds'][0]} / {c['seeds'][1]} seeds)"
    return _interval(c["diff"], c["ci95"])


def _interval(d: float, ci: list[float]) -> str:
    return f"{100 * d:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _seeds(points: list[dict]) -> str:
    """How many seeds an entry's points average: "3 seeds", or "1-3 seeds" while some are still missing."""
    lo, hi = min(q["seeds"] for q in points), max(q["seeds"] for q in points)
    return f"{hi} seed{'s' * (hi > 1)}" if lo == hi else f"{lo}-{hi} seeds"


def render(results: dict, plot: str = "curves.png", co_plot: str | None = None) -> str:
    """compare.md: the settings in words, the mean ± std table per entry and budget, the plot `plot` and,
    where the runs watched for catastrophic overfitting, the watch's figure `co_plot`."""
    s = results["settings"]
    norm = s.get("norm", "l2")
    N = norm.upper().replace("INF", "inf")
    summary = summarize(results["rows"])
    pgd_eps = [str(e) for e in s["pgd_eps"]]
    aa_eps = [str(e) for e in s["aa_eps"]]
    def fmt(v):   # one value (the base, a single seed) has no spread to show
        return "–" if v is None else f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["n"] > 1 else "")
    head = ["entry", "units", "steps", "passes", "seconds", "seeds", "clean"] + \
        [f"PGD {_radius(float(e), norm)}" for e in pgd_eps] + [f"AA {_radius(float(e), norm)}" for e in aa_eps] + \
        ["CO", "checks"]
    aa = "standard AutoAttack" if s["aa_attacks"] is None else \
        f"AutoAttack {' + '.join(s['aa_attacks'])} ({s['aa_targets']} target classes)"
    lines = [f"# advgen compare, preset `{results['preset']}`", "",
             f"advgen {results['version']} (commit {results['git_commit'] or 'unknown'}); machine: "
             f"{results['machine']}.", "", DATA_CAVEAT, "",
             f"Every entry is fine-tuned from the same base ({results['base']}) on {s['train_subset'] or 50000} "
             f"training images with SGD lr {s['lr']} (constant), seeds {s['seeds']}. One budget unit is "
             f"{s['unit_passes']} forward-backward passes of a batch of {s['batch_size']}; an entry whose step costs P "
             f"passes trains units·{s['unit_passes']}/P steps (each step one batch: steps·{s['batch_size']} images seen). Evaluation on the first {results['n_test']} test "
             f"images: PGD-{N} {s['pgd_steps']} steps of 2.5·eps/{s['pgd_steps']}, {s['pgd_restarts']} restarts "
             f"ascending {' / '.join(s.get('pgd_objectives', ['ce']))} in turn (worst case kept); {aa} at {N} "
             f"{', '.join(_radius(float(e), norm) for e in aa_eps)} on "
             f"{'every budget' if s['aa_every_budget'] else 'the final model of each run'}. Accuracies in %, "
             f"mean ± std over seeds; with n = {results['n_test']} one sample is {100 / results['n_test']:.1f} points.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["name"], f"{r['budget_units']:g}", f"{r['steps']['mean']:.0f}", f"{r['passes']['mean']:.0f}",
                 f"{r['seconds']['mean']:.0f}",
                 str(r["seeds"]), fmt(r["clean"])] + [fmt(r["pgd"].get(e)) for e in pgd_eps] + \
                [fmt(r["autoattack"].get(e)) for e in aa_eps] + [f"{r['overfit'][0]}/{r['overfit'][1]}" if r["overfit"][1] else "–"] + \
                ["FAILED: " + "; ".join(r["failed"]) if r["failed"] else "ok"]
        lines.append("| " + " | ".join(cells) + " |")
    eps = pgd_eps[-1]
    lines += ["", f"Against the references at {N} {_radius(float(eps), norm)} (the research issue's target; AA where both sides ran "
              "AutoAttack, else PGD; Δ in points with the Welch 95% interval over seeds; a verdict needs 3 seeds "
              "a side). N-FGSM at equal budget: a win is Δ ≥ 2 and beyond one std of the difference; clean Δ is "
              "what it cost in clean accuracy (a gain bought with clean accuracy may be no more than the trade "
              "N-FGSM makes at a larger training radius: check it there). PGD-10 at "
              "≤ 1/3 of its passes: held when Δ ≥ −1.", "",
              "| entry | vs N-FGSM: units, attack | Δ | clean Δ | win | vs PGD-10: units / PGD-10's, passes | Δ | within 1 |",
              "|---|---|---|---|---|---|---|---|"]
    for c in contrasts(summary, eps, ref=f"nfgsm-{norm}", slow=f"pgd10-{norm}"):
        r, q = c["vs_ref"], c["vs_slow"]
        clean = _interval(r["clean_diff"], r["clean_ci95"]) if r and "clean_diff" in r else "–"
        lines.append(f"| {c['name']} | " + (f"{r['units']:g}, {r['attack']} | {_delta(r)} | {clean} | {r['verdict']}"
                                            if r else "– | – | – | –") + " | " +
                     (f"{q['units']:g} / {q['other_units']:g}, {q['passes_ratio']:.2f}×, {q['attack']} | "
                      f"{_delta(q)} | {q['verdict']}" if q else "– | – | –") + " |")
    lines += ["", f"![robust accuracy against the training budget]({plot})", ""]
    if co_plot:
        lines += [f"Catastrophic overfitting (CO column: seeds where the check fired / seeds watched). After each "
                  f"epoch of {s['train_subset'] or 50000} images every run measured PGD-{N} ({TrainConfig.watch_steps} steps) and FGSM "
                  f"(no random start) accuracy on the first {s['watch_subset']} test images at its training "
                  f"radius; the check fires when PGD accuracy falls below half its best while FGSM accuracy holds "
                  f"(Wong et al. 2020), or lies 10 points or more under FGSM accuracy and below a quarter of it "
                  f"(overfitting from the start). One panel per entry, one line per seed:", "",
                  f"![the catastrophic-overfitting watch of every run]({co_plot})", ""]
    lines += [
              "Entries: " + "; ".join(f"`{r['name']}` {r['label']}" for r in summary if r["budget_units"] ==
                                      min(q["budget_units"] for q in summary if q["name"] == r["name"])), ""]
    return "\n".join(lines)
