"""Carry long runs across machines through git.

A session's background jobs end when it stops and the next session may get a fresh machine, so what a
long job has made must be committed to survive. `save` copies a folder of runs (the campaign's stages,
a comparison's runs) into the repository; `restore` copies it back before the job is started again,
which then resumes where it stopped.

    python experiments/carry.py save RUNS KEEP [--light] [--keep-weights base]
    python experiments/carry.py restore KEEP RUNS

save: every file directly in RUNS, and every run folder below it without its lock. A finished run
(run.json says "finished") leaves out its training state (state.safetensors: only needed to resume);
an unfinished one keeps it and its snapshots, so it resumes exactly. --light: a finished run keeps
only its records (*.json, *.csv, *.txt, *.log), not its weights, except the folders named by
--keep-weights (a comparison needs only its evaluations and the base it fine-tunes from). Files in
KEEP that RUNS no longer makes are left alone, but for the
training state of a run that has finished since. restore: KEEP's files over RUNS's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

RECORDS = {".json", ".csv", ".txt", ".log"}


def finished(run: Path) -> bool:
    rec = run / "run.json"
    return rec.exists() and bool(json.loads(rec.read_text()).get("finished"))


def wanted(path: Path, run: Path, light: bool) -> bool:
    """Whether save copies `path`, a file of the run folder `run`."""
    if path.name == ".lock":
        return False
    if not finished(run):
        return True
    if path.name == "state.safetensors":
        return False
    return not light or path.suffix in RECORDS


def copy_tree(src: Path, dst: Path, keep=lambda p: True) -> int:
    n = 0
    for f in sorted(src.rglob("*")):
        if f.is_file() and keep(f):
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            n += 1
    return n


def save(runs: Path, keep: Path, light: bool, keep_weights: set[str]) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    for f in sorted(runs.iterdir()):
        if f.is_file() and f.name != ".lock":
            shutil.copy2(f, keep / f.name)
        elif f.is_dir():
            lite = light and f.name not in keep_weights
            n = copy_tree(f, keep / f.name, lambda p, run=f, lite=lite: wanted(p, run, lite))
            if finished(f):   # an earlier save of it, unfinished then, kept its state: no longer needed
                (keep / f.name / "state.safetensors").unlink(missing_ok=True)
            what = ("finished" if finished(f) else "in progress, with its state" if (f / "state.safetensors").exists()
                    else "not a run")
            print(f"saved {f.name}: {n} files ({what})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--light", action="store_true")
    p.add_argument("--keep-weights", default="base", help="comma-separated run folders whose weights --light keeps")
    a = p.parse_args(argv)
    if not a.src.is_dir():
        print(f"carry.py: no folder {a.src}", file=sys.stderr)
        return 2
    if a.mode == "save":
        save(a.src, a.dst, a.light, set(a.keep_weights.split(",")))
    else:
        print(f"restored {copy_tree(a.src, a.dst)} files into {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
