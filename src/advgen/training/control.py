"""Small helpers the step loop calls for its side concerns: stop requests, the time budget, step timing.

Signal handlers belong to the entry point (cli.py installs them); they talk to the loop through a
StopFlag: while the loop is inside its training steps (`armed`) a request is only recorded, and the loop
finishes the step, saves and raises Interrupted; outside the steps the handler stops at once.
"""
from __future__ import annotations

import time

import torch


class StopFlag:
    """A stop requested by a signal (its number), honoured by the loop after the current step."""

    def __init__(self):
        self.signum: int | None = None
        self.armed = False

    def request(self, signum: int) -> bool:
        """Record a stop; False when it cannot wait for the end of a step (not armed, or a second one)."""
        if self.armed and self.signum is None:
            self.signum = signum
            return True
        return False

    def reset(self) -> None:
        self.signum, self.armed = None, False


STOP = StopFlag()   # the process's one flag: signals are process-wide


class StepTimer:
    """Seconds of training steps: CUDA events on CUDA (device time, no host sync to start), else perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.start()

    def _event(self):
        """A timing event recorded on `device`'s current stream (not the current device's)."""
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> None:
        self.host_t0 = time.perf_counter()
        if self.cuda:
            self.t0 = self._event()
        else:
            self.t0 = time.perf_counter()

    def host_elapsed(self) -> float:
        """Seconds since start() by the host clock (no sync: on CUDA it runs ahead of the device)."""
        return time.perf_counter() - self.host_t0

    def elapsed(self) -> float:
        """Seconds since start(); on CUDA it waits for the recorded work to finish."""
        if self.cuda:
            end = self._event()
            end.synchronize()
            return self.t0.elapsed_time(end) / 1000
        return time.perf_counter() - self.t0


class Budget:
    """The time budget of a run, on its clock ("wall": seconds elapsed; "process": this process's CPU
    seconds). `spent` counts only training steps: the loop pauses it around saves and evaluations."""

    def __init__(self, seconds: float | None, clock: str, spent: float = 0.0):
        self.seconds, self.spent = seconds, spent
        self.clock = time.process_time if clock == "process" else time.perf_counter
        self.t0: float | None = None

    def resume(self) -> None:
        self.t0 = self.clock()

    def pause(self) -> None:
        if self.t0 is not None:
            self.spent += self.clock() - self.t0
            self.t0 = None

    def exhausted(self) -> bool:
        if self.seconds is None:
            return False
        running = self.clock() - self.t0 if self.t0 is not None else 0.0
        return self.spent + running >= self.seconds
