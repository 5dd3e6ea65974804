"""The run folder: what may be written where, and what a finished epoch leaves in it.

A folder holding a run (finished or started) is never overwritten by accident: it is refused unless
resume (continue from its state) or force (delete its run files and start over). Files:
model.safetensors (the classifier, with its architecture in the metadata), the method's modules
(generators.safetensors for the generator bank), run.json (config and per-epoch metrics; written
last, so it marks a complete save), state.safetensors (the resumable state, training/state.py).

While a process writes a run folder it holds a lock on it (for the run's life; under torchrun rank 0
holds it): a second process on the same folder is refused, even with resume or force, with the holder's
pid, host and start time read from the lock file. Two kinds:

- an OS lock on RUN_DIR/.lock (fcntl.flock) on local file systems: the kernel drops it when its process
  dies, however it dies, so a killed run never blocks its resume;
- RUN_DIR/.lock.excl, created with O_EXCL (atomic on NFSv3+ and the cluster file systems), on network
  file systems (where flock may be node-local: two nodes could both hold it) and wherever flock fails
  (ENOSYS, ENOLCK, EOPNOTSUPP). It holds host, pid, start time and a token; the holder refreshes its
  mtime every HEARTBEAT_S seconds and deletes it at the end. A lock left by a killed process is stale,
  and taken over with a warning, when its host is this host and its pid is gone, or else when it has
  not been refreshed for STALE_S seconds (10 minutes: a run on another node that dies blocks the folder
  that long, or until RUN_DIR/.lock.excl is deleted by hand).

Either way --out must be on a file system every process that may write the run sees (under torchrun
rank 0 writes; a resume may start on another node): a node-local folder cannot be locked against others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
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


log = logging.getLogger(__name__)

LOCK_FILE = ".lock"             # flock'ed
EXCL_LOCK_FILE = ".lock.excl"   # the O_EXCL lock of network file systems and of those without flock
HEARTBEAT_S = 60.0              # the O_EXCL lock's holder refreshes its mtime this often
STALE_S = 600.0                 # an O_EXCL lock of another host unrefreshed this long is stale
# file system types (/proc/mounts) whose flock may be node-local or missing: the O_EXCL lock instead
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
              "fuse.glusterfs", "fuse.sshfs", "9p", "afs", "panfs", "wekafs", "fuse.juicefs")
# what flock raises where the file system has no working flock
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
_HELD: dict[Path, list] = {}   # folders this process holds: path -> [lock, depth]


@contextlib.contextmanager
def hold_run_dir(out: str | Path):
    """Hold the run folder's lock for the block (created with the folder if missing); RunDirError
    naming the holder if another process holds it. Re-entrant within a process (the CLI takes it before
    loading the data, train() again)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    created = not out.exists()
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
            _HELD.pop(key)[0].release()
            if created:
                _remove_if_unused(out)


def _remove_if_unused(out: Path) -> None:
    """A folder this process made for a run that wrote nothing (it failed before its first save) goes
    again, rather than stay behind holding only its lock file."""
    try:
        if {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass   # another process's file appeared meanwhile, or the folder is not ours to remove: keep it


def _holder_line() -> str:
    return (f"pid {os.getpid()} on host {socket.gethostname()} since "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")


def _in_use(out: Path, holder: str) -> RunDirError:
    return RunDirError(f"--out {out} is in use by another advgen process ({holder}); wait for it to end or "
                       "choose another folder")


def fs_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system `path` is on: the /proc/mounts entry (text `mounts`, read if None)
    whose mount point is the longest prefix of the resolved path; "" where unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text(errors="replace")
        except OSError:
            return ""
    target, best, kind = str(Path(path).resolve()), -1, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])   # a space is \040
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def _lock(out: Path):
    """The run folder's lock: flock on a local file system; the O_EXCL lock file on a network file
    system or where flock does not work."""
    kind = fs_type(out)
    if kind in NETWORK_FS:
        return ExclusiveLock.acquire(out, f"{kind} file system")
    try:
        return FlockLock.acquire(out)
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        return ExclusiveLock.acquire(out, f"flock fails here: {e.strerror or e}")


class FlockLock:
    """fcntl.flock on RUN_DIR/.lock, the holder's line written in it."""

    def __init__(self, f):
        self.f = f

    @classmethod
    def acquire(cls, out: Path) -> "FlockLock":
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
            raise _in_use(out, holder) from None
        except OSError:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(_holder_line() + "\n")
        f.flush()
        return cls(f)

    def release(self) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


class ExclusiveLock:
    """RUN_DIR/.lock.excl created with O_EXCL, holding {"host", "pid", "since", "token", "holder"}, its
    mtime refreshed every HEARTBEAT_S seconds by a daemon thread; deleted by release()."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"advgen lock {path}", daemon=True)
        self.thread.start()

    @classmethod
    def acquire(cls, out: Path, why: str) -> "ExclusiveLock":
        path, token = out / EXCL_LOCK_FILE, secrets.token_hex(8)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token, "holder": _holder_line()}
        for attempt in (1, 2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _read_lock(path)
                stale = _stale(held, path)
                if attempt == 1 and stale:
                    log.warning("%s: taking over a stale lock (%s): %s", out, held.get("holder", "unreadable"), stale)
                    path.unlink(missing_ok=True)
                    continue
                raise _in_use(out, f"{held.get('holder', 'lock file unreadable')}; lock file {path}") from None
            except OSError as e:
                raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
            log.debug("%s locked by %s (%s)", out, path, why)
            return cls(path, token)
        raise AssertionError("unreachable")

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:   # deleted by hand: nothing to refresh
                pass

    def release(self) -> None:
        self.stop.set()
        self.thread.join()
        if _read_lock(self.path).get("token") == self.token:   # still ours (not taken over as stale)
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(held: dict, path: Path) -> str:
    """Why the O_EXCL lock `held` (read from `path`) is stale, or "" if it may be alive."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return f"process {held['pid']} on this host is gone"
        except PermissionError:   # alive, another user's
            return ""
        return ""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return "removed meanwhile"
    return f"not refreshed for {age:.0f} s (> {STALE_S:.0f} s)" if age > STALE_S else ""
