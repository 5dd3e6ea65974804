"""`advgen reproduce --preset speedrun`: time to robustness — a robust CIFAR-10 ResNet-20 from scratch,
timed, with its curve of robustness against training seconds (docs/speedrun.md).

Into OUT: run/ (the training run of recipe speedrun-l2, a snapshot of the classifier after every epoch),
curve.json (PGD-L2 at the recipe's radius on the evaluation images after each epoch, against the training
seconds spent so far), eval.json (the final model under the full protocol: PGD-50 with 2 restarts and the
standard AutoAttack), speedrun.json and speedrun.md (the summary: seconds, precision, machine, command)
and speedrun.png (the curve beside the zoo's path: the 40-epoch base, then N-FGSM fine-tuning).
Every part resumes: run the same command again.

Training seconds are the training steps' own (each epoch row's `seconds`, the clock stopped for the
end-of-epoch test accuracy, the snapshots and the saves); the summary also gives the wall-clock seconds of
the training call when it ran in one go.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import RUN_FILE, load_model, zoo_cards
from ..data import load_subsets
from ..errors import UserError
from ..evaluation import EvalProtocol, evaluate
from ..io import atomic_write, read_json, read_tensors, write_json
from ..recipes import recipe_config
from . import DATA_CAVEAT, figures, train_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedrunPreset:
    """recipe: what trains (from scratch); train_subset: None for all 50,000 images; eval_images: the
    first N test images of the curve and the final evaluation; epochs: None for the recipe's; curve_steps:
    PGD steps of each curve point (one restart); full: the final evaluation at full strength (else the
    quick protocol, for tests)."""

    recipe: str = "speedrun-l2"
    train_subset: int | None = None
    eval_images: int = 1000
    epochs: int | None = None
    batch_size: int | None = None
    curve_steps: int = 20
    full: bool = True
    seed: int = 0


SPEEDRUN_PRESETS = {
    # the setting: all the data, 1,000 test images, AutoAttack at the end (about an hour of 2 cores)
    "speedrun": SpeedrunPreset(),
    # every part in seconds (the test suite); its numbers mean nothing
    "speedrun-smoke": SpeedrunPreset(train_subset=256, eval_images=32, epochs=2, batch_size=64, curve_steps=2,
                                     full=False),
}


def _config(p: SpeedrunPreset):
    changes = dict(seed=p.seed, train_subset=p.train_subset, test_subset=p.eval_images)
    changes.update({k: v for k, v in (("epochs", p.epochs), ("batch_size", p.batch_size)) if v is not None})
    return recipe_config(p.recipe, **changes)


def speedrun(preset: str, out: Path, *, data_dir=None, download: bool = False, device="cpu",
             command: str | None = None) -> Path:
    """Train the preset's recipe from scratch into OUT/run, draw its curve, evaluate it; return the path
    of OUT/speedrun.md. `command`: the command line to record (the CLI passes its own)."""
    p = SPEEDRUN_PRESETS[preset]
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(p)
    if cfg.init is not None:
        raise UserError(f"recipe {p.recipe} starts from {cfg.init}: a speedrun starts from scratch")
    train_set, test_set = load_subsets("cifar10", data_dir, download=download, train_subset=p.train_subset,
                                       test_subset=p.eval_images, seed=p.seed)
    run_dir = out / "run"
    steps_per_epoch = len(train_set) // cfg.batch_size   # training drops a partial last batch
    fresh = not run_dir.exists()   # the wall clock means something only for a training call run in one go
    summary_path = out / "speedrun.json"
    wall = read_json(summary_path).get("wall_seconds") if summary_path.exists() else None
    if not (run_dir / RUN_FILE).exists() or not read_json(run_dir / RUN_FILE).get("finished"):
        torch.manual_seed(p.seed)
        start = time.perf_counter()
        train_stage(cfg, train_set, test_set, run_dir, device, "the speedrun",
                    snapshots=[e * steps_per_epoch for e in range(1, cfg.epochs)])
        wall = time.perf_counter() - start if fresh else None
    record = read_json(run_dir / RUN_FILE)
    points = time_to_robustness(run_dir, record, test_set, p, device, out / "curve.json")
    model = load_model(run_dir, device=device)
    # chunks of 100 images, each saved as it ends: AutoAttack on a chunk of 500 takes over an hour on two CPU
    # cores, and a stopped evaluation resumes from its last saved chunk
    protocol = (EvalProtocol.full("l2", eps=(0.0, 0.25, 0.5), aa_eps=(0.5,), seed=p.seed, batch_size=100) if p.full
                else EvalProtocol.quick("l2", steps=p.curve_steps, seed=p.seed))
    log.info("speedrun: %s", protocol.describe())
    result = evaluate(model, test_set.images.to(device), test_set.labels.to(device), protocol,
                      progress_file=out / "eval.json", restart_stale=True)
    write_json(out / "eval.json", result)
    summary = summarize(preset, p, cfg, record, points, result, command, wall)
    write_json(summary_path, summary)
    eps = summary["eps"]
    figures.time_to_robustness({f"{p.recipe} (from scratch, {summary['threads']} threads)": points, **zoo_path(eps)},
                               out / "speedrun.png", eps, title=f"first {points[-1]['n']} test images")
    path = out / "speedrun.md"
    atomic_write(path, render(summary).encode())
    return path


def time_to_robustness(run_dir: Path, record: dict, test_set, p: SpeedrunPreset, device, path: Path) -> list[dict]:
    """PGD-L2 accuracy at the recipe's radius on the evaluation images after each epoch (the run's
    snapshots, then its final model), against the training seconds spent until then; the points already
    in `path` are kept (resumable; a run folder carried without its snapshots keeps their points)."""
    eps = record["config"]["options"]["eps"]
    done = {pt["step"]: pt for pt in (read_json(path)["points"] if path.exists() else [])}
    images, labels = test_set.images.to(device), test_set.labels.to(device)
    files = sorted((run_dir / "snapshots").glob("step-*.safetensors"), key=lambda f: int(f.stem[5:]))
    for file in [*files, run_dir / "model.safetensors"]:
        meta = read_tensors(file)[1]
        final = file.parent == run_dir
        step = sum(r["steps"] for r in record["epochs"]) if final else int(meta["step"])
        if step not in done:
            model = load_model(file, device=device)
            result = evaluate(model, images, labels, EvalProtocol(norm="l2", eps=(0.0, eps), steps=p.curve_steps,
                                                                   seed=p.seed, checks=False))
            seconds = sum(r["seconds"] for r in record["epochs"]) if final else float(meta["seconds"])
            done[step] = {"step": step, "seconds": seconds, "clean": result["clean"]["accuracy"],
                          "pgd": result["pgd_l2"][str(eps)]["accuracy"], "n": result["n"]}
            write_json(path, {"eps": eps, "steps": p.curve_steps, "points": sorted(done.values(), key=lambda d: d["step"])})
    return sorted(done.values(), key=lambda d: d["step"])


def zoo_path(eps: float) -> dict:
    """The zoo's way to a robust model as curve points: resnet20-base (standard training), then
    resnet20-nfgsm fine-tuned from it; their training seconds (one thread, a shared machine) and PGD
    accuracy at `eps` from their cards' full evaluations (PGD-50, 2 restarts). Empty if a card is missing
    or was not evaluated at eps."""
    cards = {c["name"]: c for c in zoo_cards()}
    try:
        base, tuned = cards["resnet20-base"], cards["resnet20-nfgsm"]
        base_s = sum(base["epoch_seconds"])
        points = [{"seconds": base_s, "pgd": base["eval"]["pgd_l2"][str(eps)]["accuracy"]},
                  {"seconds": base_s + sum(tuned["epoch_seconds"]), "pgd": tuned["eval"]["pgd_l2"][str(eps)]["accuracy"]}]
    except KeyError:
        return {}
    return {"zoo: resnet20-base, then nfgsm fine-tuning (1 thread)": points}


def summarize(preset: str, p: SpeedrunPreset, cfg, record: dict, points: list[dict], result: dict,
              command: str | None, wall: float | None) -> dict:
    """speedrun.json: what trained, for how long, on what, and what it holds."""
    rows = record["epochs"]
    eps = str(cfg.options.eps)
    aa = result.get("autoattack_l2", {}).get(eps)
    return {"preset": preset, "settings": dataclasses.asdict(p), "recipe": p.recipe, "config": record["config"],
            "train_seconds": sum(r["seconds"] for r in rows), "epoch_seconds": [r["seconds"] for r in rows],
            "wall_seconds": wall, "threads": torch.get_num_threads(), "precision": record.get("precision"),
            "machine": rows[-1].get("machine"), "train_images": record["train_images"], "command": command,
            "version": record.get("version"), "git_commit": record.get("git_commit"), "eps": float(eps),
            "clean": result["clean"], "pgd": result["pgd_l2"][eps], "autoattack": aa, "curve": points,
            "checks": result.get("checks", [])}


def render(s: dict) -> str:
    pct = lambda d: f"{100 * d['accuracy']:.1f}% [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"  # noqa: E731
    lines = [f"# advgen speedrun: recipe `{s['recipe']}`, preset `{s['preset']}`", "", DATA_CAVEAT, "",
             f"- Trained from scratch on {s['train_images']} images: **{s['train_seconds']:.0f} s of training** "
             f"({len(s['epoch_seconds'])} epochs: {', '.join(f'{t:.0f}' for t in s['epoch_seconds'])} s)"
             + (f"; {s['wall_seconds']:.0f} s wall-clock for the training call" if s["wall_seconds"] else "") + ".",
             f"- {s['threads']} threads; precision {(s['precision'] or {}).get('training')}; machine: {s['machine']}.",
             f"- Command: `{s['command']}`" if s["command"] else "- Command: (API call)",
             f"- advgen {s['version']}, commit {s['git_commit']}.", "",
             f"| clean | PGD-L2 {s['eps']:g} | AutoAttack-L2 {s['eps']:g} |", "|---|---|---|",
             f"| {pct(s['clean'])} | {pct(s['pgd'])} | {pct(s['autoattack']) if s['autoattack'] else 'not run'} |", "",
             f"## Time to robustness (PGD-L2 {s['eps']:g}, {s['settings']['curve_steps']} steps, one restart, "
             f"first {s['curve'][-1]['n']} test images)", "",
             "| training seconds | step | clean | PGD |", "|---|---|---|---|"]
    lines += [f"| {pt['seconds']:.0f} | {pt['step']} | {100 * pt['clean']:.1f}% | {100 * pt['pgd']:.1f}% |"
              for pt in s["curve"]]
    lines += ["", "![time to robustness](speedrun.png)", "", "## Sanity checks", ""]
    lines += [f"- [{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}" for c in s["checks"]] or ["- none run"]
    return "\n".join(lines) + "\n"
