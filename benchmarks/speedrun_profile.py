"""Where an epoch of the speedrun's training goes (issue: time to robustness), by part.

Runs STEPS training steps of a recipe (default speedrun-l2) on CIFAR-10 with the training loop's own
objects (loop.Run: the same batches, method, optimizer and schedule as `advgen train`), timing each part
of each step with a wall clock: data (drawing and augmenting the batch), attack (the method's adversarial
example: for N-FGSM the BatchNorm fold and one forward-backward to the input), forward (the classifier on
the adversarial batch, train mode, and the loss), backward, optimizer (SGD and the schedule); then the
end-of-epoch evaluation (clean accuracy on the test images the run evaluates). Prints each part's
seconds per epoch (its median per step x steps per epoch) and share, and writes --json.

  OMP_NUM_THREADS=2 python benchmarks/speedrun_profile.py --data-dir ../shared/data [--steps 60] [--json F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from advgen.data import load_subsets
from advgen.io import machine_description
from advgen.recipes import recipe_config
from advgen.training.loop import Run, build_classifier
from advgen.training.metrics import evaluate_epoch


def profile(recipe: str, data_dir: str, steps: int, eval_images: int) -> dict:
    torch.manual_seed(0)
    cfg = recipe_config(recipe, test_subset=eval_images)
    train_set, test_set = load_subsets("cifar10", data_dir, test_subset=eval_images)
    device = torch.device("cpu")
    run = Run(cfg, build_classifier(cfg, train_set), train_set, test_set, device)
    parts = {k: [] for k in ("data", "attack", "forward", "backward", "optimizer")}
    batches = iter(run.batches.epoch(1, 0))
    run.model.train()
    for i in range(steps + 3):   # the first 3 steps warm up and are not counted
        t = [time.perf_counter()]
        x, y = next(batches)[:2]
        x = x.contiguous(memory_format=run.setup.memory_format)
        t.append(time.perf_counter())
        x_adv = run.method.adversarial(x, y) if hasattr(run.method, "adversarial") else x
        t.append(time.perf_counter())
        loss = F.cross_entropy(run.method.train_model(x_adv), y)
        t.append(time.perf_counter())
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        run.opt.step()
        run.sched.step()
        t.append(time.perf_counter())
        if i >= 3:
            for k, a, b in zip(parts, t, t[1:]):
                parts[k].append(b - a)
    start = time.perf_counter()
    evaluate_epoch(run.model, run.test_set.images, run.test_set.labels, watch=0, watch_norm="l2", watch_eps=0.5,
                   watch_steps=1)
    evaluation = time.perf_counter() - start
    per_epoch = {k: statistics.median(v) * run.steps_per_epoch for k, v in parts.items()}
    per_epoch["evaluation"] = evaluation
    total = sum(per_epoch.values())
    return {"recipe": recipe, "steps_timed": steps, "steps_per_epoch": run.steps_per_epoch,
            "eval_images": eval_images, "threads": torch.get_num_threads(), "machine": machine_description(device),
            "seconds_per_epoch": per_epoch, "total": total, "share": {k: v / total for k, v in per_epoch.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--recipe", default="speedrun-l2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-images", type=int, default=10000, help="the end-of-epoch test accuracy's images")
    ap.add_argument("--json")
    a = ap.parse_args()
    r = profile(a.recipe, a.data_dir, a.steps, a.eval_images)
    print(f"{r['recipe']}: {r['steps_timed']} steps timed, {r['threads']} threads; {r['machine']}")
    print("| part | seconds per epoch | share |\n|---|---|---|")
    for k, v in r["seconds_per_epoch"].items():
        print(f"| {k} | {v:.1f} | {100 * r['share'][k]:.0f}% |")
    print(f"| total | {r['total']:.1f} | |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
