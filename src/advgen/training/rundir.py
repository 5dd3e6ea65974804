"""The run folder: what may be written where, and what a finished epoch leaves in it.

A folder holding a run (finished or started) is never overwritten by accident: it is refused unless
resume (continue from its state) or force (delete its run files and start over). Files:
model.safetensors (the classifier, with its architecture in the metadata), the method's modules
(generators.safetensors for the generator bank), run.json (config and per-epoch metrics; written
last, so it marks a complete save), state.safetensors (the resumable state, training/state.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from .. import __version__
from ..checkpoint import MODEL_FILE, RUN_FILE, RUN_FILES, STATE_FILE, check_writable, save_model, save_tensors, write_json
from ..errors import RunDirError, UserError, check


def check_run_dir(out: str | Path, *, resume: bool = False, force: bool = False) -> None:
    """Refuse an --out folder that holds a run (finished or started) unless resume or force is given.

    resume: the folder must hold a resumable state, or no run at all (a run killed before its first
    save), but not a run without a state. Nothing is deleted here (see prepare_run_dir).
    """
    out = Path(out)
    check(not (resume and force), "give --resume or --force, not both")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    found = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        if found and STATE_FILE not in found:
            raise RunDirError(f"--resume: {out} holds a run without a saved training state ({STATE_FILE}); "
                              "it cannot be resumed (--force starts it over)")
    elif found and not force:
        raise RunDirError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue "
                          "it, --force to start it over, or choose another folder")


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> bool:
    """Check the folder's policy, make it writable, drop temporary files of cut-short writes, and with
    force delete the old run's files. Returns whether there is a state to resume from."""
    check_run_dir(out, resume=resume, force=force)
    check_writable(out)
    for f in RUN_FILES:
        for tmp in out.glob(f".{f}.*.tmp"):
            tmp.unlink(missing_ok=True)
    if force:
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
    return resume and (out / STATE_FILE).exists()


def save_run(out: Path, model: nn.Module, modules: dict[str, nn.Module], record: dict, model_meta: dict) -> None:
    """Write the weights (and the method's modules) first, run.json last: run.json marks a complete save.

    model_meta names the architecture ("model", "num_classes"), the method and its config.
    """
    save_model(out / MODEL_FILE, model, {**model_meta, "version": __version__, "git_commit": record["git_commit"]})
    for name, module in modules.items():
        cfg = getattr(module, "cfg", None)
        save_tensors(out / f"{name}.safetensors", module, {"config": dataclasses.asdict(cfg)} if cfg is not None else {})
    write_json(out / RUN_FILE, record)
