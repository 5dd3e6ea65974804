"""GPU defects found by reading the code (issue #30, item 3), tested on the CPU with fake devices where the
logic runs without a GPU, and on CUDA (marked `cuda`, skipped without one; benchmarks/gpu_check.sh runs
them first thing on a GPU machine)."""
from __future__ import annotations

import torch
from synth_cifar import tiny_dataset

from advgen import devices
from advgen.cli import distributed_job, resolve_device
from advgen.data import Batches

torch.set_num_threads(1)


def fake_gpus(monkeypatch, count: int = 4, current: int = 0) -> list:
    """torch.cuda as seen by code on a machine with `count` GPUs (nothing runs on them); returns the list
    set_device calls are recorded in."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    return calls


# ------------------------------------------------------------------------------- (a) index-less devices

def test_an_index_less_device_is_resolved_to_the_one_tensors_report(monkeypatch):
    fake_gpus(monkeypatch, current=2)
    assert devices.indexed("cuda") == torch.device("cuda", 2)
    assert devices.indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert devices.indexed("cpu") == torch.device("cpu") and devices.indexed("mps") == torch.device("mps", 0)
    # what the data path compares: tensors moved with .to("cuda") report cuda:<current>
    assert torch.device("cuda") != torch.device("cuda", 2) and devices.indexed("cuda") == torch.device("cuda", 2)


def test_cli_and_batches_resolve_cuda_to_cuda_n(monkeypatch):
    fake_gpus(monkeypatch, current=0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    b = Batches(tiny_dataset(32, 1), 16, device="cuda")
    assert b.device == torch.device("cuda", 0)   # equal to where data moved .to("cuda") are: no host path


# ------------------------------------------------------------------------------- (b) cuda:N in one process

def test_single_process_cuda_n_becomes_the_current_device(monkeypatch):
    calls = fake_gpus(monkeypatch)
    with distributed_job("cuda:3") as (dist, device):
        assert device == torch.device("cuda", 3) and not dist.active
    assert calls == [torch.device("cuda", 3)]
    calls.clear()
    with distributed_job("cpu") as (_, device):
        assert device == torch.device("cpu")
    assert calls == []


def test_train_scopes_its_gpu():
    s = devices.scope(torch.device("cuda", 3))
    assert isinstance(s, torch.cuda.device) and s.idx == 3   # entered by train() around the whole run
    with devices.scope(torch.device("cpu")):
        pass


def test_step_timer_records_on_the_runs_device(monkeypatch):
    from advgen.training.control import StepTimer
    streams, recorded = [], []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: streams.append(d) or f"stream of {d}")
    StepTimer(torch.device("cuda", 2))
    assert streams == [torch.device("cuda", 2)] and recorded == ["stream of cuda:2"]

