"""Carry long runs across machines through git.

A session's background jobs end when it stops and the next session may get a fresh machine, so what a
long job has made must be committed to survive. `save` copies a folder of runs (the campaign's stages,
a comparison's runs) into the repository; `restore` copies it back before the job is started again,
which then resumes where it stopped.

    python tools/carry.py save RUNS KEEP [--light] [--keep-weights base] [--max-mb 20]
    python tools/carry.py restore KEEP RUNS

save: every file directly in RUNS, and every run folder below it without its lock and the temp files of
writes in progress (advgen writes every file atomically, so a save of running jobs is consistent file by
file, and a resumed run drops the metrics rows its state does not hold). A finished run
(run.json says "finished") leaves out its training state (state.safetensors: only needed to resume);
an unfinished one keeps it and its snapshots, so it resumes exactly. --light: a finished run keeps
only its records (*.json, *.csv, *.txt, *.log) and the weights not evaluated yet (a snapshot without
its eval-step-N.json, the final model before every budget is evaluated), except that the folders
named by --keep-weights keep all (a comparison needs only its evaluations and the base it fine-tunes
from). --max-mb: an unfinished run whose files come to more is not saved (a gen_mem run's state holds a
perturbation per training image, 65 MB: too large for git; a new machine trains it again), and what an
earlier save kept of it stays as it was. Files in KEEP that RUNS no longer makes are left alone; those
it would no longer save (the state of a run that has finished since, weights evaluated since) are removed.
restore: KEEP's files over RUNS's.
save refuses (exit 2) a KEEP that git ignores, such as a folder under one called runs/: its commit would
hold nothing, and the runs it was to carry would be lost with the machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

RECORDS = {".json", ".csv", ".txt", ".log"}


def finished(run: Path) -> bool:
    rec = run / "run.json"
    return rec.exists() and bool(json.loads(rec.read_text()).get("finished"))


def evaluated(path: Path, run: Path) -> bool:
    """Whether the weights file `path` of a finished comparison run has its evaluation in `run`: a
    snapshot snapshots/step-N.safetensors its eval-step-N.json, the final model.safetensors the
    eval-step file of the run's last step (the sum of its epochs' steps in run.json)."""
    if path.parent.name == "snapshots":
        return (run / f"eval-{path.stem}.json").exists()
    last = sum(e["steps"] for e in json.loads((run / "run.json").read_text()).get("epochs", []))
    return (run / f"eval-step-{last}.json").exists()


def transient(path: Path) -> bool:
    """A run's lock, or the temp file of a write in progress (atomic_write's): a save of running jobs meets them."""
    return path.name == ".lock" or (path.name.startswith(".") and path.suffix == ".tmp")


def wanted(path: Path, run: Path, light: bool) -> bool:
    """Whether save copies `path`, a file of the run folder `run`."""
    if transient(path):
        return False
    if not finished(run):
        return True
    if path.name == "state.safetensors":
        return False
    return not light or path.suffix in RECORDS or not evaluated(path, run)


def copy_tree(src: Path, dst: Path, keep=lambda p: True) -> int:
    n = 0
    for f in sorted(src.rglob("*")):
        if f.is_file() and keep(f):
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            n += 1
    return n


def git_ignores(path: Path) -> bool:
    """Whether the git work tree holding `path` ignores it (False outside a work tree or without git)."""
    probe = path.resolve() / "carried"   # the folder may not exist yet; ask about a file inside it
    parent = next((p for p in probe.parents if p.is_dir()), Path("/"))
    try:
        r = subprocess.run(["git", "-C", str(parent), "check-ignore", "-q", str(probe)], capture_output=True)
    except FileNotFoundError:
        return False
    return r.returncode == 0


def save(runs: Path, keep: Path, light: bool, keep_weights: set[str], max_mb: float | None = None) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    for f in sorted(runs.iterdir()):
        if f.is_file() and not transient(f):
            shutil.copy2(f, keep / f.name)
        elif f.is_dir():
            lite = light and f.name not in keep_weights
            mb = sum(p.stat().st_size for p in f.rglob("*") if p.is_file() and wanted(p, f, lite)) / 2**20
            if max_mb is not None and not finished(f) and mb > max_mb:
                print(f"left out {f.name}: in progress, {mb:.0f} MB to save, over --max-mb {max_mb:g}")
                continue
            n = copy_tree(f, keep / f.name, lambda p, run=f, lite=lite: wanted(p, run, lite))
            for old in (keep / f.name).rglob("*"):   # what an earlier save kept and this one would not
                src = f / old.relative_to(keep / f.name)
                if old.is_file() and src.exists() and not wanted(src, f, lite):
                    old.unlink()
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
    p.add_argument("--max-mb", type=float, help="leave out an unfinished run whose files come to more MB")
    a = p.parse_args(argv)
    if not a.src.is_dir():
        print(f"carry.py: no folder {a.src}", file=sys.stderr)
        return 2
    if a.mode == "save":
        if git_ignores(a.dst):
            print(f"carry.py: git ignores {a.dst} (see `git check-ignore -v`): a commit would carry nothing; "
                  "choose another folder", file=sys.stderr)
            return 2
        save(a.src, a.dst, a.light, set(a.keep_weights.split(",")), a.max_mb)
    else:
        print(f"restored {copy_tree(a.src, a.dst)} files into {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
