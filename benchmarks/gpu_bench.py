"""Training throughput per method and precision, images per second (the timed part of gpu_check.sh).

For every method (standard, FGSM-RS, N-FGSM, min-max PGD-10, TRADES-10, Free-AT m=8, the generator
bank of the paper) and every precision asked for (fp32, bf16, fp16), one run of `--epochs` epochs of
ResNet-20 on `--train-subset` CIFAR-10 images, batch `--batch-size`, through advgen.train (so with every
default of a real run: channels-last only on the CPU, BatchNorm-folded attacks, fp32 evaluation); the
figure is the LAST epoch's training seconds (CUDA events on a GPU; the first epoch pays for cuDNN's
autotuning and the caching allocator's warm-up), as images/s = images of that epoch / seconds, and
passes/s (forward-backward passes of the classifier). A configuration that fails (bf16 on a GPU without
it) is recorded with its error and the others go on.

    python benchmarks/gpu_bench.py --data-dir ../shared/data --device cuda --out OUT.json
    python benchmarks/gpu_bench.py --data-dir DIR --device cpu --train-subset 64 --batch-size 32 \\
        --methods standard,fgsm --precisions fp32 --epochs 1      # smoke run on the CPU (tests/test_speed.py)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from advgen.io import machine_description
from advgen.config import AttackConfig
from advgen.training import TrainConfig
from advgen.data import balanced_subset, first_n, load_cifar
from advgen.devices import indexed
from advgen.training import train
from advgen.training.methods.free import FreeOptions
from advgen.training.methods.minmax import FGSMOptions
from advgen.training.methods.generator import generator_preset
from advgen.training.methods.nfgsm import NFGSMOptions
from advgen.training.methods.trades import TradesOptions

METHODS = {   # name -> (TrainConfig.method, options): the settings of the README's comparisons
    "standard": ("standard", lambda: None),
    "fgsm": ("fgsm", lambda: FGSMOptions(norm="linf", eps=8 / 255)),
    "nfgsm": ("nfgsm", lambda: NFGSMOptions(norm="l2", eps=0.5)),
    "minmax_pgd10": ("minmax", lambda: AttackConfig(norm="l2", eps=0.5, steps=10)),
    "trades": ("trades", lambda: TradesOptions(norm="l2", eps=0.5, steps=10)),
    "free": ("free", lambda: FreeOptions(norm="l2", eps=0.5, replays=8)),
    "generator": ("generator", lambda: generator_preset("paper")),
}


def run_one(name: str, precision: str, train_set, test_set, device, epochs: int, batch_size: int) -> dict:
    method, options = METHODS[name]
    cfg = TrainConfig(method=method, options=options(), epochs=epochs, batch_size=batch_size, lr=0.05,
                      schedule="constant", precision=precision)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        _, rec = train(cfg, train_set, test_set, device=device, progress=False)
    except Exception as e:   # recorded, the other configurations go on
        return {"method": name, "precision": precision, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    last = rec["epochs"][-1]
    images = last["steps"] * batch_size
    return {"method": name, "precision": precision, "trained_in": rec["precision"]["training"],
            "images_per_second": images / last["seconds"],
            "passes_per_second": last["passes"] * batch_size / last["seconds"],
            "seconds_last_epoch": last["seconds"], "epoch_seconds": [r["seconds"] for r in rec["epochs"]],
            "wall_seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<14}{'precision':<10}{'images/s':>10}{'passes/s':>10}  note"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<14}{r['precision']:<10}{'-':>10}{'-':>10}  {r['error']}")
        else:
            lines.append(f"{r['method']:<14}{r['precision']:<10}{r['images_per_second']:>10.0f}"
                         f"{r['passes_per_second']:>10.0f}  last epoch {r['seconds_last_epoch']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--train-subset", type=int, default=5120)
    p.add_argument("--test-subset", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = indexed(args.device)
    train_set, test_set = load_cifar("cifar10", args.data_dir)
    train_set, test_set = balanced_subset(train_set, args.train_subset, 0), first_n(test_set, args.test_subset)
    rows = []
    for precision in args.precisions.split(","):
        for name in args.methods.split(","):
            rows.append(run_one(name, precision, train_set, test_set, device, args.epochs, args.batch_size))
            print(table(rows[-1:]).splitlines()[1], flush=True)
    print(f"\n{machine_description(device)}; ResNet-20, batch {args.batch_size}, {args.train_subset} CIFAR-10 images, "
          f"the last of {args.epochs} epochs timed\n{table(rows)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine_description(device), "train_subset": args.train_subset,
                                              "batch_size": args.batch_size, "epochs": args.epochs, "rows": rows},
                                             indent=1))
    return 1 if all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
