"""Crash-safe, resumable training: kills, signals, divergence, run folders that hold a run."""
from __future__ import annotations

import dataclasses
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
from advgen.checkpoint import STATE_FILE
from advgen.io import read_tensors
from advgen.cli import main
from advgen.config import AttackConfig
from advgen.training import TrainConfig
from advgen.training.methods.generator import GeneratorOptions
from advgen.errors import CheckpointError, RunDirError, TrainingDiverged
from advgen.models.generators import BankConfig
from advgen.training import METHODS, metrics, registered, train
from advgen.training.state import read_state

torch.set_num_threads(1)
SRC = Path(advgen.__file__).resolve().parents[1]

# 48 training images in batches of 16: 3 steps per epoch, 2 epochs
CONFIGS = {
    "standard": TrainConfig(method="standard", epochs=2, batch_size=16, seed=3),
    "minmax": TrainConfig(method="minmax", epochs=2, batch_size=16, lr=0.05,
                          options=AttackConfig(steps=2, eps=0.5, step_size=0.3)),
    "fgsm": TrainConfig(method="fgsm", epochs=2, batch_size=16, options=AttackConfig(norm="linf", eps=8 / 255)),
    "generator": TrainConfig(method="generator", epochs=2, batch_size=16, options=GeneratorOptions(
        bank=BankConfig(n=4, assign="random", grad_input=True, width=4, depth=2), momentum=0.9, steps=2,
        warmup_epochs=1, reinit_every=2, clean_fraction=0.25)),
    # memory across epochs: epoch 2 reads the buffer epoch 1 wrote (and a crash in epoch 2 must restore it)
    "gen_memory": TrainConfig(method="generator", epochs=2, batch_size=16, options=GeneratorOptions(
        bank=BankConfig(n=4, assign="random", bound="l2", size=0.5, grad_input=True, grad_skip=True, width=4,
                        depth=2), memory=True, step_after=True, momentum=0.9, clean_fraction=0.25)),
    "gen_control": TrainConfig(method="generator", epochs=2, batch_size=16, options=GeneratorOptions(
        bank=BankConfig(bound="l2", size=0.5), memory=True, step_after=True, start="memory")),
}


class Crash(Exception):
    """Stands for a kill: raised part-way, nothing after it runs."""


def _sets():
    return tiny_dataset(48, 1), tiny_dataset(16, 2)


def _copy(cfg: TrainConfig) -> TrainConfig:
    return TrainConfig.from_dict(cfg.to_dict())


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"


def _same_metrics(rec_a: dict, rec_b: dict) -> None:
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rec_a["epochs"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rec_b["epochs"]]
    assert rec_a["config"] == rec_b["config"]


_REFERENCE: dict = {}


def reference(method: str, tmp_path_factory) -> Path:
    """An uninterrupted run of CONFIGS[method] (once per session)."""
    if method not in _REFERENCE:
        out = tmp_path_factory.mktemp(f"ref-{method}")
        torch.manual_seed(0)
        train(_copy(CONFIGS[method]), *_sets(), out_dir=out, progress=False)
        _REFERENCE[method] = out
    return _REFERENCE[method]


def _crashing(method: str, at_call: int):
    """The method with a loss() that raises Crash on its at_call-th call (mid-step: that step is lost),
    registered in its place for a `with` block."""
    base = METHODS[method].cls
    calls = {"n": 0}

    def loss(self, x, y, **where):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Crash()
        return base.loss(self, x, y, **where)

    return registered(method, type("Crashing", (base,), {"loss": loss}))


def _compare_runs(ref: Path, out: Path) -> None:
    _assert_same_weights(load_file(ref / "model.safetensors"), load_file(out / "model.safetensors"))
    if (ref / "generators.safetensors").exists():
        _assert_same_weights(load_file(ref / "generators.safetensors"), load_file(out / "generators.safetensors"))
    _same_metrics(json.loads((ref / "run.json").read_text()), json.loads((out / "run.json").read_text()))
    # the per-step log: every step once, with the same numbers (seconds aside)
    steps = lambda d: [r.split(",")[:5] for r in (d / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert steps(ref) == steps(out) and [int(r[0]) for r in steps(out)[1:]] == list(range(1, len(steps(out))))


@pytest.mark.parametrize("method, every, crash_at", [
    ("standard", None, 4),   # first step of epoch 2: resumes from the epoch-end state
    ("minmax", 2, 4),        # mid-epoch, one step after a checkpoint
    ("fgsm", 1, 2),
    ("generator", 2, 5),     # bank, its momentum, its rng, re-draws (global rng), warm-up, attack seed
    ("gen_memory", 2, 5),    # + the buffer of previous perturbations, mid-epoch 2
    ("gen_control", None, 6),  # the control without a bank: the buffer alone, from the epoch-end state
])
def test_crash_then_resume_is_bit_identical(method, every, crash_at, tmp_path, tmp_path_factory):
    ref = reference(method, tmp_path_factory)
    out = tmp_path / "run"
    with _crashing(CONFIGS[method].method, crash_at):
        torch.manual_seed(0)
        with pytest.raises(Crash):
            train(_copy(CONFIGS[method]), *_sets(), out_dir=out, progress=False, checkpoint_every=every)
    state, meta = read_state(out / STATE_FILE)
    done = crash_at - 1   # steps completed before the crash; the state is saved every `every` and at epoch ends
    assert (meta["epoch"] - 1) * 3 + meta["step"] == max(done // 3 * 3, done // every * every if every else 0)
    if getattr(CONFIGS[method].options, "memory", False):   # one float16 row per training image, written
        memory = state["method"]["memory"]
        assert memory.dtype == torch.float16 and memory.shape == (48, 3, 32, 32)
        assert (memory.float().flatten(1).norm(dim=1) > 0).float().mean() >= 0.75
    with pytest.raises(RunDirError, match="already holds a run"):
        train(_copy(CONFIGS[method]), *_sets(), out_dir=out, progress=False)
    torch.manual_seed(12345)  # the resumed run restores every RNG; the caller's seed must not matter
    model, record = train(_copy(CONFIGS[method]), *_sets(), out_dir=out, progress=False, resume=True)
    _compare_runs(ref, out)
    assert [r["epoch"] for r in record["epochs"]] == [1, 2]


def test_kill_during_a_save_and_during_evaluation(tmp_path, tmp_path_factory, monkeypatch):
    """A write cut short leaves the previous state (and no stray file); so does a kill in the evaluation."""
    ref = reference("generator", tmp_path_factory)
    out = tmp_path / "run"
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += Path(dst).name == STATE_FILE
        if calls["n"] == 5:   # the 5th state write (steps 1, 2, 3, epoch end, then step 4): cut short
            raise Crash()
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        torch.manual_seed(0)
        with pytest.raises(Crash):
            train(_copy(CONFIGS["generator"]), *_sets(), out_dir=out, progress=False, checkpoint_every=1)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == sorted(["state.safetensors", "model.safetensors",
                                                            "generators.safetensors", "run.json", "metrics.csv"])
    _, meta = read_state(out / STATE_FILE)
    assert (meta["epoch"], meta["step"]) == (2, 0)   # step 3 + eval of epoch 1 saved; step 4 (epoch 2) lost

    with monkeypatch.context() as m:   # now die in the evaluation of epoch 2
        m.setattr(metrics, "accuracy", lambda *a, **k: (_ for _ in ()).throw(Crash()))   # fault injection
        with pytest.raises(Crash):
            train(_copy(CONFIGS["generator"]), *_sets(), out_dir=out, progress=False, resume=True)
    _, meta = read_state(out / STATE_FILE)
    assert (meta["epoch"], meta["step"], meta["finished"]) == (2, 3, False)
    train(_copy(CONFIGS["generator"]), *_sets(), out_dir=out, progress=False, resume=True)
    _compare_runs(ref, out)
    _, meta = read_state(out / STATE_FILE)
    assert meta["finished"]
    # resuming a finished run changes nothing
    before = (out / "model.safetensors").read_bytes()
    _, record = train(_copy(CONFIGS["generator"]), *_sets(), out_dir=out, progress=False, resume=True)
    assert (out / "model.safetensors").read_bytes() == before and len(record["epochs"]) == 2


def test_nonfinite_loss_stops_and_keeps_last_good_state(tmp_path, monkeypatch):
    base = METHODS["standard"].cls
    calls = {"n": 0}

    def loss(self, x, y):
        calls["n"] += 1
        value, logits, labels = base.loss(self, x, y)
        return (value * float("nan") if calls["n"] == 5 else value), logits, labels

    out = tmp_path / "run"
    torch.manual_seed(0)
    with registered("standard", type("NaN", (base,), {"loss": loss})), pytest.raises(TrainingDiverged) as e:
        train(_copy(CONFIGS["standard"]), *_sets(), out_dir=out, progress=False, checkpoint_every=1)
    msg = str(e.value)
    assert "epoch 2, step 2/3" in msg and "loss is nan" in msg and "(epoch 2, step 1/3) is kept" in msg
    _, meta = read_state(out / STATE_FILE)
    assert (meta["epoch"], meta["step"]) == (2, 1)
    tensors, _ = read_tensors(out / STATE_FILE)
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())
    assert json.loads((out / "run.json").read_text())["epochs"][0]["epoch"] == 1  # epoch 1's result stays


def test_nonfinite_weight_is_never_saved(tmp_path, monkeypatch):
    base = METHODS["standard"].cls
    calls = {"n": 0}

    def after_step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            self.model[1].bn1.running_var.fill_(float("inf"))  # train-mode loss stays finite

    out = tmp_path / "run"
    torch.manual_seed(0)
    with registered("standard", type("Inf", (base,), {"after_step": after_step})), \
            pytest.raises(TrainingDiverged, match=r"weights became non-finite \(1.bn1.running_var\)"):
        train(_copy(CONFIGS["standard"]), *_sets(), out_dir=out, progress=False, checkpoint_every=1)
    _, meta = read_state(out / STATE_FILE)
    assert (meta["epoch"], meta["step"]) == (1, 1)


def test_resume_refuses_other_settings_other_data_and_damaged_state(tmp_path, tmp_path_factory):
    ref = reference("standard", tmp_path_factory)
    out = tmp_path / "run"
    out.mkdir()
    (out / STATE_FILE).write_bytes((ref / STATE_FILE).read_bytes())
    other = _copy(CONFIGS["standard"])
    other.lr = 0.05
    with pytest.raises(CheckpointError, match=r"other settings: lr 0.1 \(now 0.05\)"):
        train(other, *_sets(), out_dir=out, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="training data differ"):
        train(_copy(CONFIGS["standard"]), tiny_dataset(48, 7), tiny_dataset(16, 2), out_dir=out,
              progress=False, resume=True)
    raw = (ref / STATE_FILE).read_bytes()
    for damaged in (raw[: len(raw) // 2], os.urandom(2000), b""):
        (out / STATE_FILE).write_bytes(damaged)
        with pytest.raises(CheckpointError, match="cannot be resumed"):
            train(_copy(CONFIGS["standard"]), *_sets(), out_dir=out, progress=False, resume=True)


# ------------------------------------------------------------------------------------------- the CLI

def _args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--method", "generator", "--generators", "4", "--gen-assign", "random", "--gen-reinit-every", "3",
            "--gen-width", "4", "--epochs", "2", "--batch-size", "16", "--test-subset", "16", "--data-dir", str(data),
            "--device", "cpu", "--out", str(out), *extra]


def _spawn(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, "-m", "advgen.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"exited early: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Synthetic CIFAR: 80 training images, 5 steps of 16 per epoch."""
    root = tmp_path_factory.mktemp("cli")
    data = write_cifar(root / "data", per_batch=16, n_test=16)
    return root, data


@pytest.mark.multiprocess
def test_sigkill_at_any_moment_then_resume_is_bit_identical(cli_runs):
    root, data = cli_runs
    ref, victim = root / "ref", root / "victim"
    p_ref = _spawn(_args(data, ref))                                   # runs alongside the victim
    p = _spawn(_args(data, victim, "--checkpoint-every", "1"))
    _wait_for(victim / STATE_FILE, p)
    time.sleep(0.3)
    p.kill()                                                           # SIGKILL, mid-step or mid-write
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    _, meta = read_state(victim / STATE_FILE)                          # whatever was on disk is a valid state
    assert not meta["finished"]
    p = _spawn(_args(data, victim, "--resume"))
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert p_ref.wait() == 0, p_ref.communicate()
    assert not list(victim.glob(".*.tmp"))
    _compare_runs(ref, victim)


def test_sigterm_saves_and_says_how_to_resume(cli_runs):
    root, data = cli_runs
    ref, out = root / "ref", root / "term"
    if not (ref / "run.json").exists():
        assert main(_args(data, ref)) == 0
    p = _spawn(_args(data, out, "--checkpoint-every", "3"))
    _wait_for(out / STATE_FILE, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGTERM after epoch" in last and "the training state is saved in" in last
    assert "resume with: advgen train" in last and last.endswith("--checkpoint-every 3 --resume")
    _, meta = read_state(out / STATE_FILE)
    assert not meta["finished"] and (meta["epoch"] - 1) * 5 + meta["step"] >= 3
    assert main(_args(data, out, "--checkpoint-every", "3", "--resume")) == 0
    _compare_runs(ref, out)


def test_sigint_in_process_finishes_the_step_then_exits_130(cli_runs, monkeypatch, capsys):
    root, data = cli_runs
    out = root / "int"
    base = METHODS["generator"].cls
    calls = {"n": 0}

    def loss(self, x, y):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C, in the middle of step 2
        return base.loss(self, x, y)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with registered("generator", type("Int", (base,), {"loss": loss})):
        assert main(_args(data, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT after epoch 1, step 2/5" in err and "--resume" in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers   # restored
    _, meta = read_state(out / STATE_FILE)
    assert (meta["epoch"], meta["step"]) == (1, 2)
    assert main(_args(data, out, "--force")) == 0   # --force starts over
    _, meta = read_state(out / STATE_FILE)
    assert meta["finished"]


def test_cli_run_folder_rules(cli_runs, tmp_path, capsys):
    """A folder holding a run (finished or started) is refused before the data load, one line, exit 2."""
    root, data = cli_runs
    ref = root / "ref"
    if not (ref / "run.json").exists():
        assert main(_args(data, ref)) == 0
    before = (ref / "model.safetensors").read_bytes()
    cases = [
        (_args(tmp_path / "nodata", ref), "already holds a run (state.safetensors, run.json, model.safetensors"),
        (_args(data, ref, "--resume", "--force"), "give --resume or --force, not both"),
        (_args(data, tmp_path / "nothing", "--resume"), "does not exist; there is no run to resume"),
        (_args(data, ref, "--checkpoint-every", "0"), "--checkpoint-every must be >= 1 step, got 0"),
        (_args(data, ref, "--epochs", "3", "--resume"), "other settings: epochs 2 (now 3)"),
    ]
    capsys.readouterr()
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run.json").write_text("{}")
    assert main(_args(data, legacy, "--resume")) == 2
    assert "without a saved training state" in capsys.readouterr().err
    assert (ref / "model.safetensors").read_bytes() == before   # nothing was overwritten
    assert main(_args(data, ref, "--resume")) == 0               # finished: nothing to do
    assert (ref / "model.safetensors").read_bytes() == before


def test_time_budget_ends_early_and_resumes_as_finished(tmp_path):
    cfg = _copy(CONFIGS["standard"])
    cfg.time_budget, cfg.schedule = 1e-9, "constant"   # spent after the first step
    out = tmp_path / "run"
    torch.manual_seed(0)
    _, rec = train(cfg, *_sets(), out_dir=out, progress=False)
    assert rec["finished"] and [(r["epoch"], r["steps"]) for r in rec["epochs"]] == [(1, 1)]
    _, meta = read_state(out / STATE_FILE)
    assert meta["finished"] and meta["out_of_time"]
    before = (out / "model.safetensors").read_bytes()
    _, again = train(_copy(cfg), *_sets(), out_dir=out, progress=False, resume=True)
    assert again["epochs"] == rec["epochs"] and (out / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_reproduce_resumes_a_stopped_stage(tmp_path, monkeypatch, caplog, capsys):
    from advgen.apps import reproduce as report
    smoke = report.PRESETS["smoke"]   # the smoke preset with a 2-step inner PGD: seconds, not half a minute
    monkeypatch.setitem(report.PRESETS, "smoke2", dataclasses.replace(
        smoke, stage_options={"minmax": {"steps": 2, "step_size": 0.05}}, eval_steps=2))
    data = write_cifar(tmp_path / "data", per_batch=32, n_test=32)
    out = tmp_path / "repro"
    argv = ["reproduce", "--preset", "smoke2", "--data-dir", str(data), "--device", "cpu", "--out", str(out)]
    base = METHODS["generator"].cls

    def loss(self, x, y):   # Ctrl-C in the first step of the generator stage
        if self.step_count == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return base.loss(self, x, y)

    with registered("generator", type("Int", (base,), {"loss": loss})):
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT after epoch 1, step 1/" in err and f"resume with: advgen {' '.join(argv)}" in err
    _, meta = read_state(out / "generator" / STATE_FILE)
    assert (meta["epoch"], meta["step"], meta["finished"]) == (1, 1, False)
    stamp = (out / "minmax" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert any("resuming" in r.message and "generator" in r.message for r in caplog.records)
    assert (out / "report.md").exists() and (out / "minmax" / "model.safetensors").stat().st_mtime_ns == stamp


def test_reproduce_names_its_own_way_out_of_a_stage_it_cannot_continue(tmp_path, capsys):
    """A stage folder holding another run: reproduce says to use another --out or remove the folder, not
    train's --resume / --force, which reproduce does not have."""
    from advgen.cli import main
    from synth_cifar import write_cifar
    data = write_cifar(tmp_path / "data", per_batch=32, n_test=32)
    out = tmp_path / "repro"
    assert main(["train", "--method", "standard", "--epochs", "1", "--batch-size", "16", "--data-dir", str(data),
                 "--device", "cpu", "--out", str(out / "base")]) == 0        # not what reproduce's base is
    assert main(["reproduce", "--preset", "smoke", "--data-dir", str(data), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "give reproduce another --out, or remove" in err and "--force" not in err and err.count("\n") == 1
