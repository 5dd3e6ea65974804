"""The applications built on the library: reproduce (the paper's Table 1 and Figures 2-3), compare
(methods at several budgets and seeds), zoo (the shipped models), plot, export, and the paper's
campaign report. Each hands evaluation an EvalProtocol and training a recipe or a TrainConfig."""
from __future__ import annotations

from ..errors import CheckpointError, RunDirError, UserError
from ..training import train

DATA_CAVEAT = ("Data: the offline CIFAR-10 copy is JPEG-derived (mean absolute pixel error about 6/255 against "
               "the official batches); absolute accuracies on it can sit a few points below published CIFAR-10 "
               "figures, while comparisons between methods on the same images are sound.")


def curve(result: dict, key: str = "pgd_l2") -> dict:
    """A protocol result's curve as the figures draw it: {"results": [{"eps", "accuracy", "ci95", ...}],
    "checks"}, radii ascending."""
    points = sorted(((float(e), d) for e, d in result[key].items()), key=lambda t: t[0])
    return {"results": [{"eps": e, **d} for e, d in points], "checks": result.get("checks", []), "n": result["n"]}


def train_stage(cfg, train_set, test_set, run_dir, device, app: str, **train_kwargs) -> None:
    """Train a stage of an app into run_dir, continuing a stopped one (resume=True). A folder that cannot be
    continued (other settings, a damaged state, in use) is a UserError naming the app's own way out, not
    train's --resume/--force advice."""
    try:
        train(cfg, train_set, test_set, out_dir=run_dir, device=device, resume=True, **train_kwargs)
    except (CheckpointError, RunDirError) as e:
        why = str(e).split("; pass", 1)[0].removeprefix("--resume: ")
        raise UserError(f"{why}; {app} cannot continue it: give {app} another --out, or remove {run_dir}") from None
