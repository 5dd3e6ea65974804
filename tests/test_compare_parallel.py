"""`advgen compare --jobs N`: the rows of one process, failed workers named while the others finish and
are reused, a run folder in use left alone, bad --jobs / --devices refused before any work. Tiny
synthetic data and a one-entry cut of the smoke preset: the numbers mean nothing, only their equality."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from synth_cifar import write_cifar

from advgen.cli import main
from advgen.apps.compare.plan import COMPARE_PRESETS, Entry
from advgen.apps.compare.run import compare
from advgen.config import NoOptions
from advgen.training import Method, registered
from advgen.training.rundir import hold_run_dir

FGSM = Entry("fgsm-rs-l2", [1.0, 2.0])
TINY = dataclasses.replace(COMPARE_PRESETS["smoke"], train_subset=128, test_subset=8, pgd_eps=[0.5], pgd_steps=2,
                           entries=[FGSM])
BROKEN = dataclasses.replace(TINY, seeds=[0], entries=[FGSM, Entry("raises", method_name="raises"),
                                                       Entry("dies", method_name="dies")])
ROW_KEYS = ("name", "seed", "budget_units", "steps", "passes", "clean", "pgd", "autoattack")

pytestmark = pytest.mark.multiprocess   # every test here starts worker processes or torchrun


class Raises(Method):
    """A method whose first step raises. Module-level, so that a spawned worker can unpickle it."""

    def loss(self, x, y):
        raise RuntimeError("this method has no loss")


class Dies(Method):
    """A method whose first step kills its own process (SIGKILL, as the OOM killer would)."""

    def loss(self, x, y):
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def presets():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(COMPARE_PRESETS, "tiny", TINY)
        mp.setitem(COMPARE_PRESETS, "tiny-broken", BROKEN)
        yield


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """(root, data folder): root/j1 holds the tiny comparison done in this process (--jobs 1), its base
    in root/j1/base."""
    root = tmp_path_factory.mktemp("cmp")
    data = write_cifar(root / "data", per_batch=64, n_test=16)
    compare("tiny", root / "j1", data_dir=data, device="cpu")
    return root, data


def rows(out) -> list[dict]:
    return [{k: r[k] for k in ROW_KEYS} for r in json.loads((out / "compare.json").read_text())["rows"]]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def test_two_workers_give_the_rows_of_one_process(one_process, caplog):
    root, data = one_process
    caplog.set_level(logging.INFO)   # the workers log at the parent's level
    # one thread each, as the test process has: CPU kernels may round differently with other thread counts
    compare("tiny", root / "j2", data_dir=data, device="cpu", base=root / "j1" / "base", jobs=2, threads=1)
    one, two = rows(root / "j1"), rows(root / "j2")
    assert [(r["name"], r["seed"], r["budget_units"]) for r in two] == \
        [("base", 0, 0.0)] + [("fgsm-rs-l2", s, u) for s in (0, 1) for u in (1.0, 2.0)]
    assert two == one
    for s in (0, 1):   # each run's output went to its own log, from its own worker process
        text = (root / "j2" / f"fgsm-rs-l2-s{s}" / "compare.log").read_text()
        assert f"compare: fgsm-rs-l2 seed {s} on cpu, 1 CPU thread(s)" in text and "training 4 steps" in text
        assert not (root / "j1" / f"fgsm-rs-l2-s{s}" / "compare.log").exists()   # --jobs 1: on the console
        assert any(re.fullmatch(rf"fgsm-rs-l2 seed {s}: done in [0-9.]+ s on cpu", m) for m in caplog.messages)
    assert "by 2 worker processes on cpu, 1 CPU thread(s) each" in json.loads((root / "j2" / "compare.json")
                                                                                .read_text())["machine"]


def test_failed_workers_are_named_while_the_others_finish_and_are_reused(one_process, capsys):
    root, data = one_process
    out = root / "broken"
    argv = ["compare", "--preset", "tiny-broken", "--data-dir", data, "--device", "cpu", "--base", root / "j1" / "base",
            "--out", out, "--jobs", "2"]
    with registered("raises", Raises, NoOptions, "raises"), registered("dies", Dies, NoOptions, "dies"):
        code, _, err = run(argv, capsys)
        errors = [line for line in err.splitlines() if line.startswith("advgen: error:")]
        assert code == 1 and len(errors) == 2, err
        raised = next(line for line in errors if "raises seed 0 failed" in line)
        assert "RuntimeError: this method has no loss" in raised
        assert f"(log: {out / 'raises-s0' / 'compare.log'})" in raised
        killed = next(line for line in errors if "dies seed 0 failed" in line)
        assert "killed by SIGKILL" in killed and f"(log: {out / 'dies-s0' / 'compare.log'})" in killed
        assert "Traceback" in (out / "raises-s0" / "compare.log").read_text()   # the whole story is in the log
        assert "1 other job(s) finished" in err
        assert not (out / "compare.json").exists()   # no report from a comparison with holes
        assert (out / "fgsm-rs-l2-s0" / "eval-step-4.json").exists()   # the healthy run finished, evaluated
        before = (out / "fgsm-rs-l2-s0" / "model.safetensors").stat().st_mtime_ns

        code, _, err = run(argv + ["--entries", "fgsm_rs"], capsys)
    assert code == 0, err
    assert (out / "fgsm-rs-l2-s0" / "model.safetensors").stat().st_mtime_ns == before
    assert (out / "fgsm-rs-l2-s0" / "compare.log").read_text().count("\n=== ") == 0   # one worker ever wrote it
    # the broken entries' runs never finished: not in the report
    assert [(r["name"], r["seed"], r["budget_units"], r["steps"]) for r in rows(out)] == \
        [("base", 0, 0.0, 0), ("fgsm-rs-l2", 0, 1.0, 2), ("fgsm-rs-l2", 0, 2.0, 4)]


def test_a_run_folder_in_use_is_not_written(one_process, capsys):
    root, data = one_process
    out = root / "in-use"
    shutil.copytree(root / "j1", out, ignore=shutil.ignore_patterns(".lock"))
    victim = out / "fgsm-rs-l2-s1"
    (victim / "eval-step-4.json").unlink()   # an evaluation left to do: a task for that folder
    with hold_run_dir(victim):   # this process writes it, as another advgen compare would
        code, _, err = run(["compare", "--preset", "tiny", "--data-dir", data, "--device", "cpu", "--base",
                            root / "j1" / "base", "--out", out, "--jobs", "2"], capsys)
    assert code == 1
    assert "fgsm-rs-l2 seed 1 failed" in err and f"is in use by another advgen process (pid {os.getpid()}" in err
    assert not (victim / "eval-step-4.json").exists() and not (victim / "compare.log").exists()


@pytest.mark.parametrize("extra, message", [
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--jobs", "-2"], "--jobs must be >= 1"),
    (["--devices", "gpu0"], "argument --devices: expected auto, cpu, cuda, cuda:N or mps, got 'gpu0'"),
    (["--devices", "cpu,,cpu", "--jobs", "2"], "argument --devices: expected comma-separated devices"),
    (["--devices", "cpu,cpu,cpu", "--jobs", "2"], "--devices names 3 devices but --jobs 2 runs 2 worker(s)"),
    pytest.param(["--devices", "cpu,cuda:0", "--jobs", "2"], "--devices cuda:0: no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_jobs_and_devices_are_one_line_errors_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "cmp"
    code, _, err = run(["compare", "--preset", "tiny", "--data-dir", tmp_path / "no-data", "--device", "cpu",
                        "--out", out, *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


# a parent with the CLI's signal handlers, on a preset whose runs last minutes
LONG_COMPARE = """
import dataclasses, sys
from advgen.cli import main
from advgen.apps.compare.plan import COMPARE_PRESETS
from test_compare_parallel import FGSM, TINY
COMPARE_PRESETS["long"] = dataclasses.replace(TINY, unit_passes=4000,
                                              entries=[dataclasses.replace(FGSM, budgets=[1.0])])
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_the_workers_and_they_save_their_state(one_process):
    root, data = one_process
    out = root / "stopped"
    out.mkdir()
    shutil.copy(root / "j1" / "base.eval.json", out)   # the same evaluation settings: the base is not evaluated again
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", LONG_COMPARE, "compare", "--preset", "long", "--data-dir", str(data),
                             "--device", "cpu", "--base", str(root / "j1" / "base"), "--out", str(out), "--jobs", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    logs = [out / f"fgsm-rs-l2-s{s}" / "compare.log" for s in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while not all((f.parent / "run.json").exists() for f in logs):   # both past their first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)   # the parent only: it stops the workers
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM; stopped the 2 running worker(s) (fgsm-rs-l2 seed 0, fgsm-rs-l2 seed 1)" in err
    for f in logs:
        text = f.read_text()
        assert "interrupted by SIGTERM" in text and (f.parent / "state.safetensors").exists()
        assert "finished" not in json.loads((f.parent / "run.json").read_text())   # stopped short of its budget
        pid = int(re.search(r"^=== \S+ pid (\d+):", text, re.M).group(1))
        with pytest.raises(ProcessLookupError):   # the worker is gone
            os.kill(pid, 0)
