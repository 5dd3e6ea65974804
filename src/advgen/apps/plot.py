"""`advgen plot`: the training curves of runs (loss, accuracy, the watched PGD accuracy) in one PNG."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import METRICS_FILE, RUN_FILE
from ..errors import UserError
from ..io import read_json
from ..training.metrics import read_metrics


def plot_runs(run_dirs: list[Path], path: Path) -> Path:
    """Training curves of runs side by side: the per-step training loss and accuracy (metrics.csv,
    a running mean over ~1% of the steps), and per epoch the test accuracy and the PGD-watch accuracy
    (run.json). Each run is one colour, labelled by its folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


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
