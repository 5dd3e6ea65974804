"""The run folder: what may be written where, and what a finished epoch leaves in it.

A folder holding a run (finished or started) is never overwritten by accident: it is refused unless
resume (continue from its state) or force (delete its run files and start over). Files:
model.safetensors (the classifier, with its architecture in the metadata), the method's modules
(generators.safetensors for the generator bank), run.json (config and per-epoch metrics; written
last, so it marks a complete save), state.safetensors (the resumable state, training/state.py).

While a process writes a run folder it holds an OS lock on RUN_DIR/.lock (fcntl.flock, for the run's
life; under torchrun rank 0 holds it): a second process on the same folder is refused, even with resume
or force, with the holder's pid, host and start time read from the file. The kernel drops the lock
when its process dies, however it dies, so a killed run never blocks its resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import os
import socket
from pathlib import Path

from torch import nn

from .._version import __version__
from ..checkpoint import MODEL_FILE, RUN_FILE, RUN_FILES, STATE_FILE, save_model
from ..io import check_writable, save_tensors, write_json
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


LOCK_FILE = ".lock"
_HELD: dict[Path, list] = {}   # folders this process holds: path -> [open lock file, depth]


@contextlib.contextmanager
def hold_run_dir(out: str | Path):
    """Hold the run folder's lock for the block (created with the folder if missing); RunDirError
    naming the holder if another process holds it. Re-entrant within a process (the CLI takes it before
    loading the data, train() again)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = out.resolve()
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [_lock(out), 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if not _HELD[key][1]:
            f = _HELD.pop(key)[0]
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _lock(out: Path):
    try:
        f = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = " ".join(f.read().split()) or "another process"
        f.close()
        raise RunDirError(f"--out {out} is in use by another advgen process ({holder}); wait for it to end or "
                          "choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
    f.flush()
    return f
