"""The bf16-vs-fp32 A/B that decides `--precision auto` (issue #30; docs/gpu-and-precision.md).

Each recipe is trained once per (precision, seed), every arm at the same steps, then evaluated in fp32
with `advgen eval --full` (PGD-50 x 2 restarts and the standard AutoAttack at the recipe's radius) on the
first --test-subset test images. The report pairs the arms by seed: bf16 − fp32 per seed, its mean and
95% t-interval, against the seed spread of fp32 alone (the issue's rule: bf16 loses more than the seed
spread → auto stays fp32). Runs go in parallel (--jobs), which on a GPU fills a card a ResNet-20 leaves idle.

    python benchmarks/precision_ab.py --data-dir DATA --out runs/precision-ab --device cuda \\
        [--recipes nfgsm-l2,gen-sdi-l2] [--seeds 0,1,2] [--train-subset N] [--test-subset 500] [--jobs 12]
    python benchmarks/precision_ab.py --out runs/precision-ab --report-only
    python benchmarks/precision_ab.py ... --precisions bf16 --train-only   # where bf16 is native; the fp32
        # arms and every evaluation (fp32) run later on any machine, by the same command without the flags

Output: OUT/RECIPE-PRECISION-sSEED/ (run folder, eval.json, log), OUT/report.json and OUT/report.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from advgen.evaluation.stats import mean_std, paired_interval
from advgen.recipes import RECIPES, recipe_config


def arm_name(recipe: str, precision: str, seed: int) -> str:
    return f"{recipe}-{precision}-s{seed}"


def run_arm(args, recipe: str, precision: str, seed: int) -> int:
    """Train one arm and evaluate it; skips what a finished earlier call left. Returns the exit status."""
    run = args.out / arm_name(recipe, precision, seed)
    norm, radius = recipe_config(recipe).threat
    env = dict(os.environ, OMP_NUM_THREADS="1")
    advgen = [sys.executable, "-m", "advgen"]
    steps = []
    if not (run / "model.safetensors").is_file():
        steps.append(advgen + ["train", "--recipe", recipe, "--precision", precision, "--seed", str(seed),
                               "--data-dir", args.data_dir, "--device", args.device, "--out", str(run), "--force"]
                     + (["--train-subset", str(args.train_subset)] if args.train_subset else []))
    evaluated = (run / "eval.json").is_file() and "clean" in json.loads((run / "eval.json").read_text())
    if not args.train_only and not evaluated:
        steps.append(advgen + ["eval", str(run), "--full", "--norm", norm, "--eps", f"0,{radius}",
                               "--aa-eps", str(radius),
                               "--test-subset", str(args.test_subset), "--data-dir", args.data_dir,
                               "--device", args.device, "--out", str(run / "eval.json"), "--force"])
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{arm_name(recipe, precision, seed)}.log", "a") as log:
        for cmd in steps:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if rc:
                return rc
    return 0


def report(out: Path) -> dict:
    """report.json / report.md of the finished arms in out."""
    arms = {}
    for ev in sorted(out.glob("*-s*/eval.json")):
        result = json.loads(ev.read_text())
        if "clean" not in result:
            continue
        recipe, precision, seed = ev.parent.name.rsplit("-", 2)
        run = json.loads((ev.parent / "run.json").read_text())
        norm = "linf" if "autoattack_linf" in result else "l2"
        (radius,) = result[f"autoattack_{norm}"]
        arms[(recipe, precision, int(seed[1:]))] = {
            "clean": result["clean"]["accuracy"], "pgd": result[f"pgd_{norm}"][radius]["accuracy"],
            "aa": result[f"worst_case_{norm}"][radius]["accuracy"], "n": result["n"],
            "seconds_per_epoch": statistics.median(e["seconds"] for e in run["epochs"][1:] or run["epochs"]),
            "precision": run["precision"], "radius": f"{norm} {radius}",
            "checks": all(c["passed"] for c in result["checks"])}
    rows, lines = [], ["| recipe | precision | seeds | clean % | PGD % | AutoAttack % (worst case) | s/epoch | checks |",
                       "|---|---|---|---|---|---|---|---|"]
    for recipe in sorted({r for r, _, _ in arms}):
        for precision in sorted({p for r, p, _ in arms if r == recipe}):
            seeds = sorted(s for r, p, s in arms if (r, p) == (recipe, precision))
            cells = {k: mean_std([100 * arms[recipe, precision, s][k] for s in seeds]) for k in ("clean", "pgd", "aa")}
            sec = statistics.median(arms[recipe, precision, s]["seconds_per_epoch"] for s in seeds)
            ok = all(arms[recipe, precision, s]["checks"] for s in seeds)
            rows.append({"recipe": recipe, "precision": precision, "seeds": seeds, **cells, "seconds_per_epoch": sec})
            lines.append(f"| {recipe} | {precision} | {len(seeds)} | "
                         + " | ".join(f"{cells[k]['mean']:.1f} ± {cells[k]['std']:.1f}" for k in ("clean", "pgd", "aa"))
                         + f" | {sec:.2f} | {'all passed' if ok else 'FAILED'} |")
    pairs, speed = [], []
    others = sorted({p for _, p, _ in arms} - {"fp32"})
    lines += ["", "Paired by seed, against fp32 (points; 95% t-interval over seeds), beside fp32's seed spread (std):", ""]
    for recipe in sorted({r for r, _, _ in arms}):
        for other in others:
            seeds = sorted(s for r, p, s in arms if (r, p) == (recipe, "fp32") and (recipe, other, s) in arms)
            if len(seeds) < 2:
                continue
            for k in ("clean", "pgd", "aa"):
                d = [100 * (arms[recipe, other, s][k] - arms[recipe, "fp32", s][k]) for s in seeds]
                m, lo, hi = paired_interval(d)
                spread = statistics.stdev(100 * arms[recipe, "fp32", s][k] for s in seeds)
                pairs.append({"recipe": recipe, "precision": other, "metric": k, "seeds": seeds, "diffs": d,
                              "mean": m, "ci95": [lo, hi], "fp32_seed_std": spread})
                lines.append(f"- {recipe} {k}, {other} − fp32: {m:+.1f} [{lo:+.1f}, {hi:+.1f}] over {len(seeds)} "
                             f"seeds (fp32 seed std {spread:.1f}; per seed {', '.join(f'{x:+.1f}' for x in d)})")
    for r in (x for x in rows if x["precision"] == "fp32"):
        for b in (x for x in rows if x["recipe"] == r["recipe"] and x["precision"] != "fp32"):
            speed.append(f"- {r['recipe']}: fp32 / {b['precision']} seconds per epoch = "
                         f"{r['seconds_per_epoch'] / b['seconds_per_epoch']:.2f}")
    lines += ["", "Speed (median seconds per epoch over seeds; arms ran side by side, so ratios only):", ""] + speed
    first = next(iter(arms.values()), None)
    doc = {"arms": {arm_name(*k): v for k, v in arms.items()}, "rows": rows, "paired": pairs}
    head = [f"# precision A/B ({len(arms)} arms; {first['n'] if first else 0} test images; radius "
            f"{first['radius'] if first else '-'})", ""]
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    (out / "report.md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", default=os.environ.get("ADVGEN_DATA"))
    p.add_argument("--device", default="auto")
    p.add_argument("--recipes", default="nfgsm-l2,gen-sdi-l2")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int, default=500)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--train-only", action="store_true",
                   help="train the arms and stop (bf16 training needs native bf16; evaluation is fp32 anywhere)")
    args = p.parse_args()
    if not args.report_only:
        if not args.data_dir:
            p.error("--data-dir (or $ADVGEN_DATA) is needed to train")
        for r in args.recipes.split(","):
            if r not in RECIPES:
                p.error(f"unknown recipe {r!r}")
        arms = [(r, pr, int(s)) for r in args.recipes.split(",") for s in args.seeds.split(",")
                for pr in args.precisions.split(",")]
        args.out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda a: run_arm(args, *a), arms))
        for a, rc in zip(arms, codes):
            if rc:
                print(f"{arm_name(*a)}: exit {rc} (see {args.out / arm_name(*a)}.log)", file=sys.stderr)
    report(args.out)


if __name__ == "__main__":
    main()
