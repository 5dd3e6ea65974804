"""Data-parallel training under torchrun on the CPU (gloo, 2 processes), the run-folder lock, and the
CUDA paths (skipped without a GPU). The jobs are tiny: 48 images, global batch 16, 2 epochs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synth_cifar import tiny_dataset, write_cifar

import advgen
from advgen.cli import main
from advgen.training import TrainConfig
from advgen.data import Batches
from advgen.errors import CheckpointError, RunDirError
from advgen.training import train
from advgen.training.rundir import hold_run_dir

torch.set_num_threads(1)
HERE = Path(__file__).parent
SRC = Path(advgen.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
       "ADVGEN_DIST_TIMEOUT": "60"}
cuda = pytest.mark.cuda   # skipped without a CUDA device (conftest.py)

pytestmark = pytest.mark.multiprocess   # every test here starts worker processes or torchrun


def torchrun(*args, n: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def worker(mode: str, out: Path, *which: str) -> subprocess.CompletedProcess:
    return torchrun(HERE / "ddp_worker.py", mode, out, *which)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ------------------------------------------------------------------------------------------ sharding

def test_shards_cover_every_image_once_with_one_process_augmentation():
    ds = tiny_dataset(50, 1)   # 3 batches of 16, 2 images dropped as in one process
    one = Batches(ds, 16, seed=4)
    ranks = [Batches(ds, 16, seed=4, rank=r, world=2) for r in range(2)]
    for epoch in (1, 2):
        shards = [b.shard(epoch) for b in ranks]
        assert all(s.numel() == 24 for s in shards)
        assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
        assert sorted(torch.cat(shards).tolist()) == sorted(one.shard(epoch).tolist())
        # rank r holds rows [8r, 8r+8) of every global batch, augmented as one process augments them
        for (x1, y1), (xa, ya), (xb, yb) in zip(one.epoch(epoch), ranks[0].epoch(epoch), ranks[1].epoch(epoch)):
            assert torch.equal(x1, torch.cat([xa, xb])) and torch.equal(y1, torch.cat([ya, yb]))
    with pytest.raises(advgen.errors.UserError, match="divisible by the 3 processes"):
        Batches(ds, 16, world=3)


# ------------------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = worker("run", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_processes_make_one_run(uninterrupted):
    rec = json.loads((uninterrupted / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["finished"] and len(rec["epochs"]) == 2
    assert rec["epochs"][0]["steps"] == 3          # 48 images / global batch 16
    r0, r1 = (load_file(uninterrupted / f"rank-{r}.safetensors") for r in (0, 1))
    _same(r0, r1)   # classifier (DDP) and generator bank (averaged ascent) identical on both ranks
    assert any(k.startswith("generators.") for k in r0)
    saved = load_file(uninterrupted / "model.safetensors")
    assert all(torch.equal(saved[k], r0[f"model.{k}"]) for k in saved)


def test_two_processes_match_one_process(tmp_path):
    """The same global batch over 2 ranks: the same data and augmentation, gradients averaged over
    the ranks instead of the batch. A BatchNorm-free model makes this the same arithmetic up to float
    rounding: the weights agree to 1e-5 after 6 SGD steps."""
    from conftest import make_tiny
    sys.path.insert(0, str(HERE))
    from ddp_worker import STANDARD, sets
    r = worker("standard", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    torch.manual_seed(STANDARD.seed)
    model, rec = train(TrainConfig.from_dict(STANDARD.to_dict()), *sets(), out_dir=tmp_path / "one", progress=False,
                       model=make_tiny(batchnorm=False))
    two = load_file(tmp_path / "two" / "model.safetensors")
    one = model.state_dict()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
    rec2 = json.loads((tmp_path / "two" / "run.json").read_text())
    for a, b in zip(rec["epochs"], rec2["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]


def test_kill_both_ranks_and_resume_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "run"
    r = worker("kill:4", out)   # both ranks SIGKILLed inside step 4 (epoch 2, step 1)
    assert r.returncode != 0 and not (out / "rank-0.safetensors").exists()
    header = json.loads(json.dumps(advgen.io.read_tensors(out / "state.safetensors")[1]))
    assert (header["epoch"], header["step"], header["world_size"]) == (2, 0, 2)
    r = worker("resume", out)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        _same(load_file(out / f"rank-{rank}.safetensors"), load_file(uninterrupted / f"rank-{rank}.safetensors"))
    strip = lambda rec: [{k: v for k, v in e.items() if k != "seconds"} for e in rec["epochs"]]  # noqa: E731
    assert strip(json.loads((out / "run.json").read_text())) == strip(json.loads((uninterrupted / "run.json").read_text()))


def test_trades_two_training_forwards_in_one_ddp_call(tmp_path):
    """TRADES' f(x) and f(x') go through DDP as one call (Forwards): the job trains to the end with the
    classifier identical on both ranks (DDP's all-reduce ran every step)."""
    r = worker("trades", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["finished"] and rec["epochs"][-1]["passes"] == 3 * (2 + 2)
    r0, r1 = (load_file(tmp_path / "run" / f"rank-{r}.safetensors") for r in (0, 1))
    _same(r0, r1)   # each rank trained on its own shard: equal only through the all-reduce


def test_memory_buffers_agree_on_every_rank_and_resume_bit_identical(tmp_path):
    """Generator memory under 2 ranks: each step's rows reach both ranks (a sample trained by rank 1 in
    epoch 1 may be read by rank 0 in epoch 2), the state holds the buffer once (rank 0's), and a killed
    run resumes to the very weights and buffers of an uninterrupted one."""
    from advgen.training.state import read_state
    whole = tmp_path / "whole"
    r = worker("run", whole, "memory")
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (load_file(whole / f"rank-{r}.safetensors") for r in (0, 1))
    _same(r0, r1)
    memory = r0["memory"]
    assert memory.dtype == torch.float16 and memory.shape == (48, 3, 32, 32)
    assert (memory.float().flatten(1).norm(dim=1) > 0.25).all()   # every image written, on both ranks
    out = tmp_path / "run"
    r = worker("kill:4", out, "memory")   # inside epoch 2's first step: its δ_prev come from epoch 1
    assert r.returncode != 0
    state, header = read_state(out / "state.safetensors")
    assert (header["epoch"], header["step"]) == (2, 0)
    saved = [m["memory"] for m in state["method"]]
    assert saved[0].dtype == torch.float16 and saved[0].shape == (48, 3, 32, 32) and saved[1] is None
    r = worker("resume", out, "memory")
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        _same(load_file(out / f"rank-{rank}.safetensors"), load_file(whole / f"rank-{rank}.safetensors"))


def test_other_world_size_is_refused(tmp_path):
    sys.path.insert(0, str(HERE))
    from ddp_worker import CONFIG, sets
    out = tmp_path / "run"
    r = worker("kill:2", out)
    assert r.returncode != 0 and (out / "state.safetensors").exists()
    with pytest.raises(CheckpointError, match="trained by 2 processes and cannot be resumed exactly by 1"):
        train(TrainConfig.from_dict(CONFIG.to_dict()), *sets(), out_dir=out, progress=False, resume=True)


def test_failing_rank_ends_the_job_and_keeps_the_state(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    r = worker("raise:4", out)   # rank 1 raises inside step 4
    took = time.perf_counter() - t0
    assert r.returncode != 0 and "rank 1 fails on purpose" in r.stderr
    assert took < 45, f"the job took {took:.0f} s to end"
    header = advgen.io.read_tensors(out / "state.safetensors")[1]
    assert (header["epoch"], header["step"]) == (2, 0)   # the last good state, readable


def test_cli_under_torchrun_train_and_eval(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=20)   # 80 training images
    out = tmp_path / "run"
    args = ["-m", "advgen", "train", "--method", "standard", "--model", "resnet20", "--device", "cpu",
            "--epochs", "1", "--batch-size", "16", "--data-dir", data, "--out", out]
    r = torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("test accuracy") == 1 and "(2 processes)" in r.stdout   # rank 0 alone prints
    rec = json.loads((out / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["epochs"][0]["steps"] == 5
    r = torchrun(*args[:-1], tmp_path / "odd", "--batch-size", "15")
    assert r.returncode != 0 and "must be divisible by the 2 processes" in r.stderr
    # eval over 2 shards: clean accuracy exactly that of one process
    ev = ["eval", str(out), "--device", "cpu", "--data-dir", str(data), "--eps", "0,0.25", "--steps", "2"]
    r = torchrun("-m", "advgen", *ev, "--out", tmp_path / "two.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(ev + ["--out", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two["n"] == one["n"] == 20 and two["processes"] == 2
    assert two["clean"] == one["clean"]


def test_sigterm_to_torchrun_stops_both_ranks_saved_and_resumable(tmp_path):
    """SIGTERM to torchrun (what a cluster scheduler sends): the agent forwards it to both ranks, they
    agree to stop after the same step, rank 0 saves, the job exits non-zero with the resume command;
    resuming under torchrun ends with the weights of a run left alone, bit for bit."""
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)   # 80 training images: 5 steps an epoch
    args = ["-m", "advgen", "train", "--method", "standard", "--model", "resnet20", "--device", "cpu",
            "--epochs", "10", "--batch-size", "16", "--schedule", "constant", "--data-dir", data,
            "--checkpoint-every", "1"]
    r = torchrun(*args, "--out", tmp_path / "alone", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *map(str, args), "--out", str(out)]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "state.safetensors").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before the signal"
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "SIGTERM received" in err and "--resume" in err, err[-3000:]
    header = advgen.io.read_tensors(out / "state.safetensors")[1]
    assert header["world_size"] == 2 and 0 < header["epoch"] * 5 + header["step"] < 50
    assert not (out / "run.json").exists() or not json.loads((out / "run.json").read_text()).get("finished")
    r = torchrun(*args, "--out", out, "--resume", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same(load_file(out / "model.safetensors"), load_file(tmp_path / "alone" / "model.safetensors"))


# ------------------------------------------------------------------------------------------ the lock

def _holder(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from advgen.training.rundir import hold_run_dir\n"
            f"with hold_run_dir({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_live_run_folder_is_locked_and_a_dead_lock_is_not(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        for extra in ([], ["--force"], ["--resume"]):
            code = main(["train", "--method", "standard", "--device", "cpu", "--epochs", "1", "--batch-size", "16",
                         "--data-dir", str(data), "--out", str(out), *extra])
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, err
            assert f"in use by another advgen process (pid {holder.pid} on host" in err
        with pytest.raises(RunDirError, match="in use"):
            train(TrainConfig(method="standard", epochs=1, batch_size=16), tiny_dataset(16, 1), tiny_dataset(16, 2),
                  out_dir=out, progress=False)
    finally:
        holder.kill()          # SIGKILL: the kernel drops its lock
        holder.wait()
    with hold_run_dir(out), hold_run_dir(out):   # free again; re-entrant in one process
        pass


# ------------------------------------------------------------------------------------------ CUDA

@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_precision_step_and_timing(tmp_path, precision):
    from conftest import make_tiny
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    cfg = TrainConfig(method="standard", epochs=1, batch_size=16, precision=precision)
    model, rec = train(cfg, tiny_dataset(48, 1), tiny_dataset(16, 2), device="cuda", progress=False,
                       model=make_tiny())
    assert rec["precision"]["training"] == precision
    assert rec["epochs"][0]["seconds"] > 0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_data_placement_rules():
    from advgen.data import data_placement
    ds = tiny_dataset(16, 1)
    for mode in ("auto", "device", "host"):   # a CPU run has nothing to copy: the data are where it trains
        assert data_placement(ds, torch.device("cpu"), mode) == "device"
    with pytest.raises(advgen.errors.UserError, match="auto, device or host"):
        data_placement(ds, torch.device("cpu"), "gpu")


@cuda
def test_host_path_gives_the_device_batches_and_the_same_training(tmp_path):
    """Training images left on the host (pinned, copied one batch ahead on a side stream) give the very
    batches, indices and augmentation of images on the device, and so the same weights."""
    from conftest import make_tiny
    dev = torch.device("cuda")
    ds = tiny_dataset(48, 1)
    on_device, on_host = Batches(ds.to(dev), 16, seed=3), Batches(ds, 16, seed=3, device=dev)
    pairs = list(zip(on_device.epoch(1, where=True), on_host.epoch(1, where=True)))
    assert len(pairs) == 3
    for (a, ya, wa), (b, yb, wb) in pairs:
        assert b.is_cuda and wb.idx.is_cuda
        assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(wa.idx, wb.idx)
    weights = []
    for data_on in ("device", "host"):
        torch.manual_seed(0)
        model, _ = train(TrainConfig(method="standard", epochs=1, batch_size=16), ds, tiny_dataset(16, 2),
                         device=dev, progress=False, model=make_tiny(), data_on=data_on)
        weights.append(model.state_dict())
    _same(*weights)


@cuda
def test_cuda_resume_restores_cuda_rng(tmp_path):
    from advgen.training.state import rng_state, set_rng_state
    dev = torch.device("cuda")
    state = rng_state(dev)
    a = torch.rand(4, device=dev)
    set_rng_state(state, dev)
    assert torch.equal(a, torch.rand(4, device=dev))


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs 2 CUDA devices")
def test_ddp_over_nccl(tmp_path):
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    r = torchrun("-m", "advgen", "train", "--method", "generator", "--device", "cuda", "--epochs", "1",
                 "--batch-size", "16", "--data-dir", data, "--out", tmp_path / "run", "--precision", "fp16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
