"""The cost of data parallelism on this machine: one `advgen train` as 2 ranks x 1 thread (torchrun,
gloo) against 1 rank x 2 threads, the same global batch, data and settings; repetitions interleaved.

Each configuration runs as its own command (as a user would run it), fresh run folder each time; the
time is the seconds per epoch the run records (training steps only, the slowest rank under DDP), so
start-up and evaluation are left out. Writes OUT/ddp.json and prints a table. Usage:

  python benchmarks/ddp.py --data-dir ../shared/data [--method generator] [--train-subset 1280]
                           [--epochs 1] [--reps 2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

CONFIGS = {  # name -> (processes, threads per process)
    "1 rank x 2 threads": (1, 2),
    "2 ranks x 1 thread": (2, 1),
}


def run_once(name: str, args, out: Path) -> dict:
    procs, threads = CONFIGS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "advgen"]
                if procs > 1 else [sys.executable, "-m", "advgen"])
    cmd = [*launcher, "train", "--method", args.method, "--device", "cpu", "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--train-subset", str(args.train_subset), "--test-subset", "100",
           "--data-dir", str(args.data_dir), "--out", str(out), "--schedule", "constant"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rec = json.loads((out / "run.json").read_text())
    seconds = [e["seconds"] for e in rec["epochs"]]
    assert rec.get("world_size", 1) == procs
    return {"seconds_per_epoch": statistics.median(seconds), "images_per_s": args.train_subset // args.batch_size
            * args.batch_size / statistics.median(seconds)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--method", default="generator")
    p.add_argument("--train-subset", type=int, default=1280)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    results: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in CONFIGS:
                results[name].append(run_once(name, args, Path(tmp) / f"{rep}-{CONFIGS[name][0]}"))
                print(f"rep {rep + 1} {name}: {results[name][-1]['seconds_per_epoch']:.2f} s/epoch", flush=True)
    med = {k: statistics.median(r["seconds_per_epoch"] for r in v) for k, v in results.items()}
    ratio = med["2 ranks x 1 thread"] / med["1 rank x 2 threads"]
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "method": args.method,
              "train_subset": args.train_subset, "batch_size": args.batch_size, "epochs": args.epochs,
              "reps": args.reps, "runs": results, "median_seconds_per_epoch": med,
              "ddp_over_threads": ratio}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ddp.json").write_text(json.dumps(report, indent=2))
    print(f"{'configuration':<22} {'s/epoch (median)':>17}")
    for k, v in med.items():
        print(f"{k:<22} {v:>17.2f}")
    print(f"2 ranks x 1 thread / 1 rank x 2 threads = {ratio:.2f}")


if __name__ == "__main__":
    main()
