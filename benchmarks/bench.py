"""advgen speed benchmark (issue: the generator method at the cost of standard training).

Times, in one process with repetitions interleaved (A B C ... A B C ...):
  * seconds per training epoch of standard, generator (paper bank, N = 32), FGSM-RS, min-max PGD-10,
    min-max PGD-40 (the paper's setting), N-FGSM and the gradient generators without and with a step
    after (the campaign's gen-gradient-l2 and gen-sdi-l2) on the same CIFAR-10 subset, ResNet-20, batch 128;
    medians, spread, and the ratios of the issue; images per second of standard training against the
    machine's FP32 peak (printed with how it was computed);
  * PGD-L2 (20 steps) robust accuracy on the first N test images with advgen (as `advgen eval` runs it:
    a BatchNorm-folded channels-last copy, the copy's cost included) and with foolbox's L2PGD, same
    model, images, eps, steps and step size; the ratio of their times (foolbox part skipped, with
    "foolbox": null, if foolbox is not installed).
Training runs with TrainConfig's defaults (so channels-last on the CPU, BatchNorm-folded attacks in
min-max). Writes OUT/bench.json and OUT/bench.md. Usage (see benchmarks/README.md):
  python benchmarks/bench.py --data-dir ../shared/data [--train-subset 1280] [--reps 3] [--eval-n 1000]
Smoke run (seconds): --train-subset 256 --reps 1 --eval-n 20 --base-epochs 1 --base-subset 256
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import advgen
from advgen.data import balanced_subset, first_n, load_cifar
from advgen.evaluation import robust_accuracy
from advgen.models.folding import inference_copy
from advgen.recipes import recipe_config
from advgen.training import TrainConfig

HERE = Path(__file__).resolve().parent


def cpu_peak_gflops() -> tuple[float | None, str]:
    """FP32 peak = cores × FMA lanes × 2 FMA pipes × 2 flops × clock, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "unknown (no /proc/cpuinfo)"
    flags = re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))
    lanes = 8 if "avx2" in flags else 4  # fp32 lanes of a 256-bit FMA (AVX-512 on AMD Zen 4 runs as 2 x 256)
    cores = torch.get_num_threads()
    peak = cores * lanes * 2 * 2 * mhz / 1000
    return peak, f"{cores} threads x {lanes} fp32 lanes x 2 FMA pipes x 2 flop x {mhz:.0f} MHz = {peak:.0f} GFLOP/s"


def train_flops_per_image(model: torch.nn.Module) -> float:
    """Multiply-adds of one forward pass (convs and linear) x 2 flops x 3 (forward + backward)."""
    macs = []

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            macs.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, torch.nn.Linear):
            macs.append(m.in_features * m.out_features)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 32, 32))
    for h in hs:
        h.remove()
    return sum(macs) * 2 * 3


# the recipes timed (recipes.py): Table 1's three, and the full-data campaign's other methods
BENCH_RECIPES = ("standard", "gen-paper", "fgsm-rs-l2", "pgd10-l2", "minmax-paper", "nfgsm-l2", "gen-gradient-l2",
                 "gen-sdi-l2")


def method_configs(batch: int) -> dict[str, TrainConfig]:
    """Each benchmarked recipe's config for one epoch from scratch (lr 0.01, seed 0, batch `batch`)."""
    return {name: recipe_config(name, model="resnet20", batch_size=batch, epochs=1, lr=0.01, seed=0, init=None)
            for name in BENCH_RECIPES}


def plain_pytorch_epoch(train_set, batch: int, seed: int) -> float:
    """Seconds of one epoch of the plain PyTorch loop a user would write for the same ResNet-20: NCHW,
    SGD (lr 0.01, Nesterov momentum 0.9, weight decay 5e-4), random crop (4-pixel zero padding) and
    horizontal flip on float tensors per batch, batch `batch`; the reference for advgen's standard step."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    model = advgen.build_model("resnet20").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images, labels = train_set.images, train_set.labels
    order = torch.randperm(len(labels), generator=g)
    t0 = time.perf_counter()
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i:i + batch]
        x = F.pad(images[idx].float().div(255), (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2, batch), generator=g).tolist()
        x = torch.stack([x[j, :, dy[j]:dy[j] + 32, dx[j]:dx[j] + 32] for j in range(batch)])
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def bench_training(train_set, test_set, reps: int, batch: int) -> dict:
    cfgs = method_configs(batch)
    secs = {k: [] for k in [*cfgs, "plain_pytorch"]}
    for rep in range(reps):
        for name in secs:  # interleaved: every method once per repetition
            torch.manual_seed(rep)
            if name == "plain_pytorch":
                secs[name].append(plain_pytorch_epoch(train_set, batch, rep))
            else:
                _, rec = advgen.train(cfgs[name], train_set, test_set, progress=False)
                secs[name].append(rec["epochs"][0]["seconds"])
            print(f"rep {rep + 1}/{reps} {name}: {secs[name][-1]:.2f} s/epoch", file=sys.stderr, flush=True)

    def ratio(a, b):
        return summary([x / y for x, y in zip(secs[a], secs[b])])

    return {"seconds_per_epoch": {k: summary(v) for k, v in secs.items()},
            "ratios": {"gen-paper/standard": ratio("gen-paper", "standard"),
                       "pgd10-l2/gen-paper": ratio("pgd10-l2", "gen-paper"),
                       "minmax-paper/gen-paper": ratio("minmax-paper", "gen-paper"),
                       "fgsm-rs-l2/gen-paper": ratio("fgsm-rs-l2", "gen-paper"),
                       **{f"pgd10-l2/{m}": ratio("pgd10-l2", m) for m in ("nfgsm-l2", "gen-gradient-l2", "gen-sdi-l2")},
                       # above 1: advgen's standard step is faster than the plain loop
                       "plain_pytorch/standard": ratio("plain_pytorch", "standard")}}


def bench_eval(model, x, y, eps: float, steps: int, reps: int) -> dict:
    try:
        import foolbox as fb
    except ImportError:
        fb = None
        print("foolbox is not installed: timing advgen alone", file=sys.stderr)

    rel = 2.5 / steps
    times = {"advgen": [], "foolbox": []}
    accs = {}
    for rep in range(reps):
        t0 = time.perf_counter()
        fast = inference_copy(model)  # what advgen.evaluate() attacks; its cost is part of the time
        accs["advgen"] = robust_accuracy(fast, x, y, lambda e: advgen.PGD(fast, norm="l2", eps=e, steps=steps,
                                                                        rel_step=rel, seed=rep), [eps], 500,
                                         memory_format=torch.channels_last)[0]
        times["advgen"].append(time.perf_counter() - t0)
        if fb is None:
            print(f"rep {rep + 1}/{reps} eval: advgen {times['advgen'][-1]:.1f} s", file=sys.stderr, flush=True)
            continue
        fmodel = fb.PyTorchModel(model.eval(), bounds=(0, 1))
        attack = fb.attacks.L2PGD(rel_stepsize=rel, steps=steps, random_start=True)
        t0 = time.perf_counter()
        ok = 0
        for i in range(0, x.shape[0], 500):
            _, _, success = attack(fmodel, x[i:i + 500], y[i:i + 500], epsilons=[eps])
            ok += (~success[0]).sum().item()
        times["foolbox"].append(time.perf_counter() - t0)
        accs["foolbox"] = ok / x.shape[0]
        print(f"rep {rep + 1}/{reps} eval: advgen {times['advgen'][-1]:.1f} s, foolbox {times['foolbox'][-1]:.1f} s",
              file=sys.stderr, flush=True)
    if fb is None:
        accs["foolbox"] = None
    return {"eps": eps, "steps": steps, "rel_step": rel, "n": x.shape[0], "accuracy": accs,
            "seconds": {k: summary(v) if v else None for k, v in times.items()},
            "foolbox/advgen": summary([f / a for f, a in zip(times["foolbox"], times["advgen"])])
            if fb is not None else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parents[1] / "shared" / "data"))
    p.add_argument("--train-subset", type=int, default=1280)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--eval-model", help="trained run folder for the evaluation timing (default: train a base here)")
    p.add_argument("--base-epochs", type=int, default=4, help="epochs of the base trained for the evaluation timing")
    p.add_argument("--base-subset", type=int, default=5000, help="training images of that base")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    train_all, test_all = load_cifar("cifar10", args.data_dir)
    train_set = balanced_subset(train_all, args.train_subset, 0)
    test_small = first_n(test_all, 100)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "train_subset": args.train_subset, "batch_size": args.batch_size, "reps": args.reps}
    peak, how = cpu_peak_gflops()
    result["training"] = bench_training(train_set, test_small, args.reps, args.batch_size)
    std = result["training"]["seconds_per_epoch"]["standard"]["median"]
    ips = (len(train_set) // args.batch_size) * args.batch_size / std
    flops = train_flops_per_image(advgen.build_model("resnet20"))
    result["standard_throughput"] = {"images_per_second": ips, "gflop_per_image": flops / 1e9,
                                     "peak_gflops": peak, "peak_how": how,
                                     "peak_images_per_second": peak / (flops / 1e9) if peak else None,
                                     "fraction_of_peak": ips * flops / 1e9 / peak if peak else None}

    if args.eval_model:
        model = advgen.load_model(args.eval_model)
    else:
        cfg = TrainConfig(method="standard", epochs=args.base_epochs, seed=0)
        model, _ = advgen.train(cfg, balanced_subset(train_all, args.base_subset, 0), test_small, progress=False)
    test = first_n(test_all, args.eval_n)
    result["eval"] = bench_eval(model, test.float_images(), test.labels, eps=0.5, steps=20, reps=args.reps)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (out / "bench.md").write_text(md)
    print(md)
    return 0


def render(r: dict) -> str:
    t, s, e = r["training"], r["standard_throughput"], r["eval"]
    fmt = lambda d: f"{d['median']:.2f} ({d['min']:.2f}–{d['max']:.2f})"
    lines = [f"Machine: {r['machine']['platform']}, torch {r['machine']['torch']}, {r['machine']['threads']} threads. "
             f"ResNet-20, batch {r['batch_size']}, {r['train_subset']} CIFAR-10 training images, "
             f"{r['reps']} interleaved repetitions; median (min–max).", "",
             "| method | seconds per epoch |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in t["seconds_per_epoch"].items()]
    lines += ["", "| ratio | median (min–max) |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in t["ratios"].items()]
    lines += ["", f"Standard training: {s['images_per_second']:.0f} images/s; {s['gflop_per_image']:.3f} GFLOP per image "
              f"(forward + backward); FP32 peak {s['peak_how']} → {s['peak_images_per_second']:.0f} images/s; "
              f"fraction of peak {100 * s['fraction_of_peak']:.0f}%.", "",
              f"PGD-L2 evaluation, eps {e['eps']}, {e['steps']} steps of {e['rel_step']:.3f}·eps, random start, "
              f"first {e['n']} test images:", "",
              "| tool | seconds | robust accuracy |", "|---|---|---|",
              f"| advgen | {fmt(e['seconds']['advgen'])} | {100 * e['accuracy']['advgen']:.1f}% |"]
    if e["foolbox/advgen"] is None:
        lines += ["", "foolbox is not installed: no comparison.", ""]
    else:
        lines += [f"| foolbox L2PGD | {fmt(e['seconds']['foolbox'])} | {100 * e['accuracy']['foolbox']:.1f}% |",
                  "", f"foolbox / advgen time: {fmt(e['foolbox/advgen'])}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
