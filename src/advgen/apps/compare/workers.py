"""Independent jobs in parallel worker processes, one device each: what `advgen compare --jobs N` runs on.

`run_jobs(jobs, workers=N, devices=[...], threads=T)` keeps up to N worker processes busy, one per job,
each started fresh with the `spawn` context; the k-th of the N worker slots always gets
devices[k % len(devices)], and every worker `OMP_NUM_THREADS` = torch threads = T. A job is a module-level
function and its (picklable) arguments, called in the worker as fn(*args, device=..., log_file=...); it writes
its results to files of its own (compare: a run folder), so nothing comes back but how it ended.

Why one spawned `multiprocessing.Process` per job, and not a pool or `advgen` subprocesses:
- spawn, not fork: a forked child inherits the parent's torch threads, OpenMP state and CUDA context,
  none of which survive a fork; a spawned one starts clean, with its thread count set before torch loads.
- a process per job, not a ProcessPoolExecutor: the parent knows which job each process runs, so a
  worker that dies (SIGKILL, the OOM killer) is named by its job and the others go on; a pool marks
  itself broken and fails every pending job with it, without saying which died.
- Python objects, not a command line: the job's arguments (a compare preset, its entries, the training
  method's registry entry) are pickled, so presets and methods registered at run time
  (training.method.registered) reach the workers as they are in the parent.

Output: the job's function sends the worker's stdout, stderr and logging to its log file
(send_output_to), once it may write there. How it ended comes back on a pipe: done, failed (a one-line
reason; the traceback is in the log) or stopped by a signal; a worker that sends nothing was killed.

Signals. A worker stops at SIGINT or SIGTERM the way `advgen train` does (training.control.STOP: inside
the training steps it finishes the step, saves the state and exits; elsewhere at once), except that
while such a stop is pending it ignores further signals, so a Ctrl-C that reaches the whole process
group and the parent's own SIGTERM to it count once. The parent, stopped by a signal (the CLI turns
it into Interrupted), sends SIGTERM to every worker and waits for them to save; a second signal while
it waits kills them (their last saved state is kept). A worker whose parent dies stops itself the same
way (a thread watches the parent).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...errors import Interrupted, UserError, WorkersFailed

log = logging.getLogger(__name__)

REASON_CHARS = 400   # a worker's one-line reason is cut here: it travels through a pipe and into one line
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class Job:
    """One unit of work: label names it in messages ("fgsm_rs seed 0"), log is the file its worker's
    output goes to (named in messages), fn(*args, device=torch.device, log_file=Path) does it in the worker."""

    label: str
    log: Path
    fn: Callable
    args: tuple = ()


@dataclass
class _Running:
    job: Job
    process: multiprocessing.Process
    conn: multiprocessing.connection.Connection
    slot: int
    device: object
    t0: float = field(default_factory=time.perf_counter)

    def outcome(self) -> tuple[str, str, bool]:
        """(kind, reason, saved) of a worker that has exited: kind done, error or stopped."""
        msg = None
        try:
            if self.conn.poll():
                msg = self.conn.recv()
        except (EOFError, OSError):   # it died before it could say
            pass
        finally:
            self.conn.close()
        code = self.process.exitcode
        if msg is not None and (msg[0] == "done") == (code == 0):
            return msg
        if code is not None and code < 0:
            return "error", f"killed by {signal.Signals(-code).name}", False
        return "error", f"exited with code {code}", False


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a cgroup cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """CPU threads of each of `workers` processes: the CPUs shared out, at least 1."""
    return max(1, cpu_count() // workers)


def run_jobs(jobs: list[Job], *, workers: int, devices: list, threads: int) -> None:
    """Run every job in a worker process, at most `workers` at once; return when all have ended.

    devices: torch.devices, handed out round-robin over the worker slots; threads: OMP_NUM_THREADS and
    torch threads of each worker. One INFO line per job started and per job finished (with its wall
    seconds). A job that fails does not stop the others: WorkersFailed names every failed job and its
    log once all have ended. Stopped by a signal (Interrupted or KeyboardInterrupt): the running
    workers are stopped as the module docstring says and the exception raised again (Interrupted
    naming the stopped jobs).
    """
    if workers < 1:
        raise UserError(f"the number of worker processes must be >= 1, got {workers}")
    ctx = multiprocessing.get_context("spawn")
    pending, running, free = deque(jobs), {}, list(range(workers))
    failed, done = [], 0
    level = logging.getLogger().getEffectiveLevel()
    try:
        while pending or running:
            while pending and free:
                slot = free.pop(0)
                job, device = pending.popleft(), devices[slot % len(devices)]
                run = _start(ctx, job, device, threads, level, slot)
                running[run.process.sentinel] = run
                log.info("%s: started on %s (log %s)", job.label, device, job.log)
            for sentinel in multiprocessing.connection.wait(list(running)):
                run = running.pop(sentinel)
                run.process.join()
                free.append(run.slot)
                free.sort()
                kind, reason, _ = run.outcome()
                seconds = time.perf_counter() - run.t0
                if kind == "done":
                    done += 1
                    log.info("%s: done in %.1f s on %s", run.job.label, seconds, run.device)
                else:
                    failed.append(f"{run.job.label} {'stopped' if kind == 'stopped' else 'failed'} after "
                                  f"{seconds:.0f} s: {reason} (log: {run.job.log})")
                    log.error("%s", failed[-1])
    except BaseException as e:
        if not running:
            raise
        stopped = _stop(list(running.values()))
        if isinstance(e, Interrupted):
            raise Interrupted(e.signum, f"{e}; stopped the {len(stopped)} running worker(s) "
                                        f"({', '.join(r.job.label for r in stopped)})",
                              saved=all(r.saved for r in stopped)) from None
        raise
    if failed:
        raise WorkersFailed(failed, done)


@dataclass
class _Stopped:
    job: Job
    saved: bool


def _stop(runs: list[_Running]) -> list[_Stopped]:
    """SIGTERM every worker and wait for it (it saves its training state first); at a second signal
    while waiting, SIGKILL them all (the state they saved last is kept)."""
    for r in runs:
        if r.process.is_alive():
            r.process.terminate()
    try:
        for r in runs:
            r.process.join()
    except BaseException:
        for r in runs:
            r.process.kill()
        for r in runs:
            r.process.join()
        raise
    out = []
    for r in runs:
        kind, _, saved = r.outcome()
        out.append(_Stopped(r.job, saved or kind == "done"))
    return out



def _start(ctx, job: Job, device, threads: int, level: int, slot: int) -> _Running:
    recv, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_worker, args=(job, device, threads, level, send), name=f"advgen {job.label}")
    # The stop signals are blocked from before the start until the process is recorded here: one arriving
    # in between would leave it unstopped. The child inherits the mask and unblocks once its handlers
    # are in place, so a stop during its start-up waits for them too. multiprocessing's resource tracker,
    # started with the first process, unblocks these signals itself: it is started before the block.
    # The thread count goes in through the environment: OpenMP reads it when torch loads in the child.
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with _environment(OMP_NUM_THREADS=str(threads)):
            process.start()
        run = _Running(job, process, recv, slot, device)
    except BaseException:
        recv.close()
        raise
    finally:
        send.close()   # the child holds its own end; EOF on recv then means it has exited
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return run


@contextlib.contextmanager
def _environment(**values: str):
    """os.environ with these values for the block (a spawned child takes the environment at start)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:REASON_CHARS]


def _worker(job: Job, device, threads: int, level: int, conn) -> None:
    """The worker process's main: set up threads, device, signals and logging, run the job, report."""
    import torch
    from ...training.control import STOP

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)   # CUDA events and new tensors without a device go to this one too
    _stop_on_signals(STOP)
    _stop_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)   # blocked by the parent (_start)
    try:
        job.fn(*job.args, device=device, log_file=job.log)
    except Interrupted as e:
        log.warning("%s", e)
        outcome, code = ("stopped", _one_line(e), e.saved), 128 + e.signum
    except UserError as e:
        log.error("%s", e)
        outcome, code = ("error", _one_line(e), False), 2
    except Exception as e:
        log.exception("%s failed", job.label)
        outcome, code = ("error", _one_line(f"{type(e).__name__}: {e}"), False), 1
    else:
        outcome, code = ("done", "", False), 0
    try:
        conn.send(outcome)
        conn.close()
    except OSError:   # the parent is gone (killed): there is no one to tell
        pass
    sys.exit(code)


def _stop_on_signals(stop) -> None:
    """SIGINT / SIGTERM: inside the training steps the first one asks the loop to stop after the current
    step (it saves the state, then raises Interrupted), and the ones after it are ignored while that
    stop is pending, so that the terminal's Ctrl-C to the whole process group and the parent's SIGTERM
    count once and never cut the save short. Elsewhere each one raises Interrupted at once (again at
    the next signal, should code that catches every Exception swallow it)."""
    def handler(signum, frame):
        if stop.signum is not None:
            return
        name = signal.Signals(signum).name
        if stop.request(signum):
            log.warning("%s received: finishing the current step, then saving", name)
            return
        raise Interrupted(signum, f"interrupted by {name}", saved=False)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


def _stop_with_parent() -> None:
    """A thread that sends this process SIGTERM when its parent dies (killed, it could not stop us)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="advgen parent watch", daemon=True).start()


def send_output_to(path: Path, header: str) -> None:
    """In a worker: append this process's stdout, stderr and logging to `path` (file descriptors 1
    and 2, so the output of C code goes there as well), after a line with the header and the time."""
    f = open(path, "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    f.close()
    sys.stderr.write(f"=== {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} pid {os.getpid()}: "
                     f"{header}\n")
