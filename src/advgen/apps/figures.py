"""The paper's figures: Figure 2 (what the generators make) and Figure 3 (accuracy against attack size)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import read_tensors
from ..models.generators import BankConfig, GeneratorBank


def figure2(gen_file: Path, test_set, path: Path, images: int = 6, generators: int = 6) -> None:
    """Originals (left column) beside the samples of several generators (Figure 2 of the paper)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def time_to_robustness(paths: dict, path: Path, eps: float, title: str | None = None) -> None:
    """Robust accuracy against training minutes (log axis), one line per way of getting there: paths
    maps a label to its points [{"seconds", "pgd"}] (accuracy in [0, 1]), drawn in seconds order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for label, points in paths.items():
        pts = sorted((p["seconds"] / 60, p["pgd"]) for p in points)
        ax.plot([m for m, _ in pts], [a for _, a in pts], marker="o", markersize=3, label=label)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xscale("log")
    ticks = [t for t in (0.1, 0.3, 1, 3, 10, 20, 60, 120, 240, 480, 960)
             if min(p["seconds"] for ps in paths.values() for p in ps) / 60 / 2 <= t
             <= 2 * max(p["seconds"] for ps in paths.values() for p in ps) / 60]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("training minutes (log scale)")
    ax.set_ylabel(f"PGD-L2 {eps:g} accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
