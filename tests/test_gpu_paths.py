"""GPU defects found by reading the code (issue #30, item 3), tested on the CPU with fake devices where the
logic runs without a GPU, and on CUDA (marked `cuda`, skipped without one; benchmarks/gpu_check.sh runs
them first thing on a GPU machine)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from synth_cifar import tiny_dataset, write_cifar

import advgen
from advgen import data, devices
from advgen.cli.args import resolve_device
from advgen.cli.train import distributed_job
from advgen.data import Batches
from advgen.training import distributed

torch.set_num_threads(1)
HERE = Path(__file__).parent
SRC = Path(advgen.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
       "ADVGEN_DIST_TIMEOUT": "60"}


def worker(mode: str, out: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py MODE OUT under torchrun: 2 processes, gloo on the CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), mode, str(out)]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


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



# ------------------------------------------------------------------------------- (c) one download per node

def cifar_archive(path: Path) -> str:
    """A tiny CIFAR-10 archive in the official layout (cifar-10-batches-py/ of 80 + 16 images) at `path`;
    returns its md5."""
    root = write_cifar(path.parent / "src", per_batch=16, n_test=16)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """LAYOUTS["cifar10"] pointing at a local archive (file:// URL); -> the layout."""
    md5 = cifar_archive(tmp_path / "archive" / "cifar-10-python.tar.gz")
    layout = dataclasses.replace(data.LAYOUTS["cifar10"], url=(tmp_path / "archive" / "cifar-10-python.tar.gz").as_uri(),
                                 md5=md5)
    monkeypatch.setitem(data.LAYOUTS, "cifar10", layout)
    return layout


def test_a_download_racing_another_into_the_same_folder(tmp_path, fake_cifar, monkeypatch):
    """Another process (a second node on a shared file system) downloads and extracts into the same
    folder while this one is mid-download: each writes its own temporary file and extraction folder, so
    both succeed and the data are whole (before, the other truncated and renamed away this one's .part)."""
    root = tmp_path / "data"
    real, nested = data.urllib.request.urlopen, []

    class Racing(io.BytesIO):
        def read(self, n=-1):
            chunk = super().read(min(n, 4096))
            if not nested and self.tell() > 8192:   # the other process runs to the end now
                nested.append(1)
                data.download(fake_cifar, root)
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout=None):
        with real(url) as r:
            body, headers = r.read(), r.headers
        resp = Racing(body)
        resp.headers = headers
        return resp
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    data.download(fake_cifar, root)
    assert nested
    train, test = data.load_cifar("cifar10", root)
    assert (len(train), len(test)) == (80, 16)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_extraction_is_renamed_into_place_whole(tmp_path, fake_cifar, monkeypatch):
    """While the archive is being extracted, the data folder does not exist yet (a rank that finds it
    reads whole files), and no temporary folder is left behind."""
    root = tmp_path / "data"
    real, seen = tarfile.TarFile.extractall, []

    def extractall(self, path, *a, **k):
        real(self, path, *a, **k)
        seen.append((root / "cifar-10-batches-py").exists())
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    data.download(fake_cifar, root)
    assert seen == [False] and (root / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.multiprocess
def test_torchrun_downloads_once_per_node(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "archive.md5").write_text(cifar_archive(out / "archive.tar.gz"))
    r = worker("download", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "downloads.log").read_text() == "rank 0\n"   # local rank 0 alone; rank 1 waited
    assert [(out / f"rank-{k}.txt").read_text() for k in (0, 1)] == ["80", "80"]


# ------------------------------------------------------------------------------- (d) long evaluations

@pytest.mark.multiprocess
def test_a_sharded_evaluation_may_outlast_the_collective_timeout(tmp_path):
    """Rank 1's shard takes 8 s, the job's collective timeout is 3 s: the gather of the shards waits in
    the patient group (before, rank 0 timed out and the evaluation failed)."""
    r = worker("slow_eval", tmp_path, env={"ADVGEN_DIST_TIMEOUT": "3", "SLOW_EVAL_S": "8"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 16 and result["processes"] == 2


# ------------------------------------------------------------------------------- (f) gathers to rank 0

def test_rank_0_does_not_send_its_own_part_through_the_gather(monkeypatch):
    """gather_object pads every rank's pickle to the largest: rank 0's large part (the generator's memory
    buffer) must not enter it, or every rank sends that many bytes at every save."""
    sent = []

    def gather_object(obj, out, dst=0, group=None):
        sent.append(obj)
        if out is not None:
            out[:] = [obj, {"rank": 1}]
    monkeypatch.setattr(distributed.tdist, "gather_object", gather_object)
    big = {"memory": torch.zeros(1000, 3, 32, 32, dtype=torch.float16)}
    parts = distributed.Dist(0, 2).gather(big)
    assert sent == [None] and parts[0] is big and parts[1] == {"rank": 1}
    sent.clear()
    assert distributed.Dist(1, 2).gather({"rank": 1}) is None and sent == [{"rank": 1}]


# ------------------------------------------------------------------------------- (e) the run-folder lock

MOUNTS = ("/dev/root / ext4 rw 0 0\n"
          "server:/export /mnt/shared nfs4 rw,vers=4.2 0 0\n"
          "server:/x /mnt/shared/with\\040space nfs rw 0 0\n"
          "tmpfs /mnt/shared/tmp tmpfs rw 0 0\n")


def test_the_file_system_type_of_a_folder():
    from advgen.training.rundir import fs_type
    assert fs_type(Path("/mnt/shared/runs/a"), MOUNTS) == "nfs4"
    assert fs_type(Path("/mnt/shared/tmp/a"), MOUNTS) == "tmpfs"          # the longest mount point wins
    assert fs_type(Path("/mnt/shared/with space/a"), MOUNTS) == "nfs"
    assert fs_type(Path("/mnt/sharedother"), MOUNTS) == "ext4"            # a prefix of a name is not a parent
    assert fs_type(Path("/x"), "") == ""


@pytest.fixture
def no_flock(monkeypatch):
    """A file system whose flock raises ENOSYS (as some FUSE and network file systems do)."""
    import errno

    from advgen.training import rundir

    def flock(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(rundir.fcntl, "flock", flock)
    return rundir


def test_without_flock_the_o_excl_lock_holds_the_folder(tmp_path, no_flock):
    rundir = no_flock
    out = tmp_path / "run"
    with rundir.hold_run_dir(out):   # before: OSError ENOSYS out of every advgen train
        held = json.loads((out / rundir.EXCL_LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] and "since" in held["holder"]
        with pytest.raises(advgen.errors.RunDirError, match=f"in use by another advgen process \\(pid {os.getpid()} "
                                                            "on host .*lock file .*\\.lock\\.excl"):
            rundir._lock(out)   # a second holder (the same pid: alive, so never stale)
        with rundir.hold_run_dir(out):   # re-entrant in one process
            pass
        assert (out / rundir.EXCL_LOCK_FILE).exists()
    assert not (out / rundir.EXCL_LOCK_FILE).exists()   # released at the end


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_o_excl_lock_is_taken_over_and_a_live_one_is_not(tmp_path, no_flock, caplog, monkeypatch):
    import socket
    import time
    rundir = no_flock
    out = tmp_path / "run"
    out.mkdir()
    lock = out / rundir.EXCL_LOCK_FILE
    write = lambda host, pid: lock.write_text(json.dumps({"host": host, "pid": pid, "token": "t",  # noqa: E731
                                                          "holder": f"pid {pid} on host {host} since then"}))
    write(socket.gethostname(), _dead_pid())   # this host, a process that is gone: stale at once
    with rundir.hold_run_dir(out):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over a stale lock" in caplog.text and "on this host is gone" in caplog.text
    write("node-7", 4242)                      # another host, refreshed just now: alive for all we know
    with pytest.raises(advgen.errors.RunDirError, match="pid 4242 on host node-7"):
        rundir._lock(out)
    old = time.time() - rundir.STALE_S - 5     # ... and unrefreshed for longer than STALE_S: stale
    os.utime(lock, (old, old))
    with rundir.hold_run_dir(out):
        pass


def test_the_o_excl_lock_is_refreshed_while_held(tmp_path, no_flock, monkeypatch):
    import time
    rundir = no_flock
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    with rundir.hold_run_dir(out):
        lock = out / rundir.EXCL_LOCK_FILE
        os.utime(lock, (1, 1))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 5


def test_a_network_file_system_gets_the_o_excl_lock(tmp_path, monkeypatch):
    from advgen.training import rundir
    monkeypatch.setattr(rundir, "fs_type", lambda path: "nfs4")   # flock works, but may be node-local there
    out = tmp_path / "run"
    with rundir.hold_run_dir(out):
        assert (out / rundir.EXCL_LOCK_FILE).exists() and not (out / rundir.LOCK_FILE).exists()


# ------------------------------------------------------------------------------- (g) CUDA RNG per rank

def fake_cuda_rng(monkeypatch) -> list:
    """torch.cuda's RNG functions over fake per-device states (a state names its device); returns the
    list of (state, device index) restores."""
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([torch.device(device).index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(
        (int(state[0]), torch.device(device).index)))

    def every_gpu(*a):
        raise AssertionError("every visible GPU's RNG: the other GPUs are other ranks'")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    return restored


def test_the_state_saves_and_restores_this_ranks_gpu_only(monkeypatch):
    """1 node x 8 GPUs resumed as 2 x 4: rank 5 saved cuda:5's RNG and restores it onto its cuda:1 (before:
    every visible GPU's were saved, and restoring 8 onto a node of 4 raised IndexError, reported as a
    damaged state)."""
    from advgen.training.state import rng_state, set_rng_state
    restored = fake_cuda_rng(monkeypatch)
    state = rng_state(torch.device("cuda", 5))
    assert int(state["cuda_device"][0]) == 5 and "cuda" not in state
    set_rng_state(state, torch.device("cuda", 1))
    assert restored == [(5, 1)]
    # a state written before: every visible GPU's RNG; the entry of this device's index, if any
    restored.clear()
    old = {k: v for k, v in state.items() if k != "cuda_device"}
    set_rng_state({**old, "cuda": [torch.tensor([k]) for k in range(8)]}, torch.device("cuda", 1))
    set_rng_state({**old, "cuda": [torch.tensor([k]) for k in range(2)]}, torch.device("cuda", 3))
    assert restored == [(1, 1)]


# ------------------------------------------------------------------------------- (j) host syncs

def test_an_epochs_augmentation_reaches_the_device_in_one_copy(monkeypatch):
    """The epoch's order and augmentation draws are copied once per epoch (not once per batch), and they
    are the very draws the batch-by-batch stream gives (the same batches on every device)."""
    from advgen.data import _augment_draws, _augment_with, shard_rows
    copies = []
    real = data.to_device
    monkeypatch.setattr(data, "to_device", lambda t, device: copies.append(tuple(t.shape)) or real(t, device))
    ds = tiny_dataset(80, 1)
    for rank, world, start in ((0, 1, 0), (1, 2, 2)):
        copies.clear()
        b = Batches(ds, 16, seed=3, rank=rank, world=world)
        got = list(b.epoch(2, start, where=True))
        assert len(got) == 5 - start and len(copies) == 2   # the order, then the packed draws
        order, g = b.position(2, start)                     # the reference: drawn batch by batch
        for i, (x, y, w) in zip(range(start, 5), got):
            idx = order[i * 16:(i + 1) * 16]
            offs, flip = _augment_draws(16, g, b.pad)
            part = shard_rows(16, rank, world)
            want = _augment_with(ds.images[idx[part]], offs[:, part], flip[part], b.pad).float().div(255)
            assert torch.equal(x, want) and torch.equal(w.offs, offs[:, part]) and torch.equal(w.flip, flip[part])


def test_attack_noise_is_drawn_on_the_gpu(monkeypatch):
    """Random starts and noise come from a generator on the GPU the batch is on (no host-to-device copy
    per batch); on the CPU from the CPU generator, as always."""
    from advgen.attacks import pgd
    made = []

    class Gen:
        def __init__(self, device="cpu"):
            made.append(torch.device(device))

        def manual_seed(self, seed):
            return self
    monkeypatch.setattr(pgd.torch, "Generator", Gen)
    pgd.generator(3, torch.device("cuda", 1))
    pgd.generator(3, torch.device("cpu"))
    pgd.generator(3, torch.device("mps", 0))   # MPS: the CPU's (then copied), as before
    assert made == [torch.device("cuda", 1), torch.device("cpu"), torch.device("cpu")]


def test_the_one_draw_l2_start_is_uniform_in_the_ball():
    """The GPU's L2 random start (one (b, d + 2) draw instead of b per-row draws): uniform in the ball,
    (r / eps)^d ~ U(0, 1) and isotropic, as the per-row CPU one (tests/test_attacks.py)."""
    from advgen.attacks.pgd import L2
    for shape, eps, n in (((3,), 0.7, 20000), ((3, 2, 2), 0.5, 4000)):
        d = torch.Size(shape).numel()
        delta = L2.one_draw_start((n, *shape), eps, torch.Generator().manual_seed(0)).double()
        assert delta.shape == (n, *shape)
        r = delta.flatten(1).norm(dim=1)
        assert (r <= eps * (1 + 1e-6)).all()
        u = (r / eps) ** d
        ks = (torch.sort(u).values - (torch.arange(n, dtype=torch.double) + 0.5) / n).abs().max()
        assert abs(u.mean().item() - 0.5) < 0.02 and ks < 1.63 / n ** 0.5 * 1.5
        v = delta.flatten(1) / r[:, None]
        assert v.mean(0).abs().max() < 0.04
        torch.testing.assert_close(v.T @ v / n, torch.eye(d, dtype=torch.double) / d, atol=0.02, rtol=0)
    # the CPU keeps its per-row stream: row 0 does not depend on the batch size
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(L2.random_start((1, 3, 8, 8), 1.0, g())[0], L2.random_start((5, 3, 8, 8), 1.0, g())[0])


def test_buffers_are_broadcast_in_one_call_per_dtype(monkeypatch):
    """Before every step under torchrun rank 0's BatchNorm buffers reach every rank: one broadcast per
    dtype (float statistics, int64 batch counters), not one per tensor."""
    from conftest import make_tiny
    calls = []

    def broadcast(t, src=0):
        calls.append((t.dtype, t.numel()))
        t.fill_(7)   # what rank 0 sent
    monkeypatch.setattr(distributed.tdist, "broadcast", broadcast)
    model = make_tiny()
    distributed.Dist(1, 2).broadcast_module(model, buffers_only=True)
    buffers = list(model.buffers())
    assert len(buffers) == 8 and len(calls) == 2 and {c[0] for c in calls} == {torch.float32, torch.int64}
    assert all(bool((b == 7).all()) for b in buffers)
    calls.clear()
    distributed.Dist(1, 2).broadcast_module(model)   # parameters too
    assert len(calls) == 2 and sum(n for _, n in calls) == sum(t.numel() for t in [*model.parameters(), *buffers])


# ------------------------------------------------------------------------------- on a CUDA GPU

def _cfg(method: str = "standard", **kw):
    from advgen.config import AttackConfig
    from advgen.training import TrainConfig
    from advgen.models.generators import BankConfig
    from advgen.training.methods.free import FreeOptions
    from advgen.training.methods.generator import GeneratorOptions
    from advgen.training.methods.minmax import FGSMOptions
    from advgen.training.methods.nfgsm import NFGSMOptions
    from advgen.training.methods.trades import TradesOptions
    options = {"standard": None, "minmax": AttackConfig(norm="l2", eps=0.5, steps=3),
               "fgsm": FGSMOptions(norm="linf", eps=8 / 255), "nfgsm": NFGSMOptions(norm="l2", eps=0.5),
               "trades": TradesOptions(norm="l2", eps=0.5, steps=2), "free": FreeOptions(norm="l2", eps=0.5, replays=2),
               "generator": GeneratorOptions(bank=BankConfig(n=4, width=4, depth=2, assign="random", bound="l2",
                                                             size=0.5, grad_input=True), memory=True,
                                             step_after=True, steps=2)}[method]
    return TrainConfig(**{"method": method, "options": options, "epochs": 1, "batch_size": 16, "lr": 0.01, **kw})


@pytest.mark.cuda
def test_index_less_cuda_keeps_the_data_on_the_gpu(monkeypatch):
    """--device cuda: the data go to the GPU and are used there; before, cuda:0 != cuda sent them down
    the host path, whose pin_memory() raised on a CUDA tensor."""
    from advgen.training import train
    pinned = []
    real = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t.device) or real(t, *a))
    _, rec = train(_cfg(), tiny_dataset(48, 1), tiny_dataset(16, 2), device="cuda", progress=False, data_on="device")
    assert rec["device"].startswith("cuda:") and all(d.type == "cpu" for d in pinned)


@pytest.mark.cuda
def test_one_process_on_the_last_gpu_runs_there():
    from advgen.training import METHODS, registered, train
    n = torch.cuda.device_count() - 1
    seen = []
    base = METHODS["standard"].cls

    class Spy(base):
        def loss(self, x, y):
            seen.append((torch.cuda.current_device(), x.device.index))
            return super().loss(x, y)
    before = torch.cuda.current_device()
    with registered("standard", Spy):
        train(_cfg(), tiny_dataset(48, 1), tiny_dataset(16, 2), device=f"cuda:{n}", progress=False)
    assert set(seen) == {(n, n)} and torch.cuda.current_device() == before   # scoped, restored after


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["standard", "minmax", "fgsm", "nfgsm", "trades", "free", "generator"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_make_no_host_sync(method, precision):
    """A few training steps of each method under torch.cuda.set_sync_debug_mode("error"): any host sync
    (a .item(), a copy from pageable memory, a nonzero) raises. fp16 is left out: GradScaler.step reads
    its inf check on the host (one sync per step, torch's own)."""
    from advgen.training.loop import Run, _train_step
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    from conftest import make_tiny
    dev = devices.indexed("cuda")
    train_set, test_set = tiny_dataset(64, 1), tiny_dataset(16, 2)
    run = Run(_cfg(method, precision=precision), make_tiny(), train_set, test_set, dev)
    autocast = run.precision.autocast(dev)
    run.model.train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, *where in run.batches.epoch(1, where=run.method.per_sample):
            loss, logits, labels = _train_step(run, x, y, autocast, *where)
            run.meter.update(loss, logits, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert run.step == 4 and bool(torch.isfinite(run.meter.loss_sum))


@pytest.mark.cuda
def test_kill_and_resume_on_cuda(tmp_path):
    """A run killed part-way resumes on the GPU and finishes; the state holds this GPU's RNG. Bit-identity
    is not asserted: cuDNN may pick non-deterministic kernels (docs/gpu-and-precision.md); the weights
    must agree closely, and whether they agree exactly is printed for the record."""
    from safetensors.torch import load_file
    from advgen.training import METHODS, registered, train
    from advgen.training.state import read_state
    cfg = lambda: _cfg("minmax", epochs=2)  # noqa: E731
    torch.manual_seed(0)
    train(cfg(), tiny_dataset(48, 1), tiny_dataset(16, 2), out_dir=tmp_path / "whole", device="cuda", progress=False)
    base, calls = METHODS["minmax"].cls, {"n": 0}

    def loss(self, x, y):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return base.loss(self, x, y)
    torch.manual_seed(0)
    with registered("minmax", type("Crashing", (base,), {"loss": loss})), pytest.raises(KeyboardInterrupt):
        train(cfg(), tiny_dataset(48, 1), tiny_dataset(16, 2), out_dir=tmp_path / "run", device="cuda",
              progress=False, checkpoint_every=1)
    state, _ = read_state(tmp_path / "run" / "state.safetensors")
    assert "cuda_device" in state["rng"]
    train(cfg(), tiny_dataset(48, 1), tiny_dataset(16, 2), out_dir=tmp_path / "run", device="cuda", progress=False,
          resume=True)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    print("CUDA resume bit-identical:", all(torch.equal(a[k], b[k]) for k in a))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)


@pytest.mark.cuda
def test_compile_on_cuda():
    """--compile on a GPU (a tiny classifier, so that it compiles in seconds; gpu_check.sh also trains a
    ResNet-20 with --compile from the command line)."""
    from conftest import make_tiny
    from advgen.training import train
    model, rec = train(_cfg("minmax", compile=True), tiny_dataset(48, 1), tiny_dataset(16, 2), device="cuda",
                       progress=False, model=make_tiny())
    assert rec["finished"] and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_attack_noise_on_cuda_stays_in_the_ball():
    from advgen.attacks.pgd import L2, generator
    g = generator(0, torch.device("cuda", torch.cuda.current_device()))
    assert g.device.type == "cuda"
    delta = L2.random_start((256, 3, 32, 32), 0.5, g)
    assert delta.is_cuda and bool((delta.flatten(1).norm(dim=1) <= 0.5 + 1e-5).all())
