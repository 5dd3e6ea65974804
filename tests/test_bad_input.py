"""Bad input gets one clear line and exit code 2, never a traceback; nothing in a file is ever run."""
from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth_cifar import batch_dict, write_cifar

from advgen.checkpoint import MODEL_FILE, load_model, save_model
from advgen.io import atomic_write, save_tensors, write_json
from advgen.cli import main
from advgen.data import _parse_batch
from advgen.errors import CheckpointError, DataError, UserError
from advgen.models import build_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("data"), per_batch=16, n_test=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A folder holding a valid (untrained) ResNet-20 checkpoint."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_model(out / MODEL_FILE, build_model("resnet20"), {"model": "resnet20", "num_classes": 10})
    return out


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:   # argparse's errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if not l.startswith("WARNING ")]   # the synthetic data's size warning
    assert len(lines) == 1 and lines[0].startswith("advgen: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------- arguments and values

TRAIN = ["train", "--device", "cpu", "--epochs", "1", "--batch-size", "16"]
BAD_ARGS = [
    (["--method", "standard", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--method", "standard", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--method", "standard", "--lr", "nan"], "--lr must be > 0, got nan"),
    (["--method", "standard", "--momentum", "1"], "--momentum must lie in [0, 1), got 1.0"),
    (["--method", "standard", "--seed", "-1"], "--seed must lie in 0..4294967295, got -1"),
    (["--method", "standard", "--train-subset", "0"], "--train-subset must be >= 1, got 0"),
    (["--method", "standard", "--checkpoint-every", "-2"], "--checkpoint-every must be >= 1 step, got -2"),
    (["--method", "minmax", "--attack-eps", "nan"], "--attack-eps must be > 0, got nan"),
    (["--method", "minmax", "--attack-eps", "-0.1"], "--attack-eps must be > 0, got -0.1"),
    (["--method", "minmax", "--attack-steps", "0"], "--attack-steps must be >= 1, got 0"),
    (["--method", "generator", "--generators", "0"], "--generators must be >= 1, got 0"),
    (["--method", "generator", "--gen-bound", "0"], "--gen-bound must be > 0, got 0.0"),
    (["--method", "generator", "--gen-bound=-inf"], "--gen-bound must be > 0, got -inf"),
    (["--method", "generator", "--gen-lr", "nan"], "--gen-lr must be > 0, got nan"),
    (["--method", "generator", "--gen-start", "memory"],
     "--gen-start memory needs options.memory and options.step_after"),
    (["--method", "generator", "--gen-memory", "true", "--gen-assign", "all"],
     "--gen-memory cannot be combined with options.bank.assign all"),
    (["--method", "generator", "--gen-preset", "gradient", "--gen-memory", "true", "--gen-step-after", "true",
      "--gen-start", "memory"], "--gen-grad-input feeds the bank, which start memory does not build"),
    (["--method", "generator", "--gen-memory", "maybe"], "argument --gen-memory: expected true or false, got 'maybe'"),
    (["--method", "generator", "--gen-start", "sample"], "argument --gen-start: invalid choice: 'sample'"),
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
    (["--method", "standard", "--model", "resnet7"], "--model unknown: 'resnet7'; choose from preact_resnet18"),
    (["--method", "standard", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--method", "standard", "--init", "/nonexistent/run"], "--init /nonexistent/run: no such checkpoint"),
]


@pytest.mark.parametrize("extra, needle", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_train_arguments(extra, needle, tmp_path, capsys):
    code, err = _cli(TRAIN + ["--out", tmp_path / "run", "--data-dir", tmp_path / "nodata"] + extra, capsys)
    assert code == 2 and needle in _one_error_line(err)
    assert not (tmp_path / "run").exists() or not [p for p in (tmp_path / "run").iterdir() if p.name != ".lock"]


@pytest.mark.parametrize("extra, needle", [
    (["--train-subset", "1000"], "--train-subset 1000 exceeds the 80 training images"),
    (["--test-subset", "1000"], "--test-subset 1000 exceeds the 16 test images"),
    (["--batch-size", "500"], "batch size 500 exceeds the 80 training images"),
    (["--watch-subset", "17"], "--watch-subset 17 exceeds the 16 test images"),
])
def test_bad_values_that_depend_on_the_data(extra, needle, data, tmp_path, capsys):
    code, err = _cli(TRAIN + ["--method", "standard", "--data-dir", data, "--out", tmp_path / "r"] + extra, capsys)
    assert code == 2 and needle in _one_error_line(err)


@pytest.mark.parametrize("extra, needle", [
    (["--eps", "-1"], "argument --eps: expected finite numbers >= 0, got '-1'"),
    (["--eps", "0,nan"], "argument --eps: expected finite numbers >= 0, got '0,nan'"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--restarts", "0"], "--restarts must be >= 1, got 0"),
    (["--pgd-objective", "kl"], "--pgd-objective: expected ce, margin or a comma list of them, got 'kl'"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--rel-step", "-1"], "--rel-step must be > 0, got -1.0"),
    (["--step-size", "nan"], "--step-size must be > 0, got nan"),
    (["--attack", "bogus"], "argument --attack: invalid choice: 'bogus'"),
    (["--test-subset", "17"], "test subset 17 must lie in 1..16"),
    (["--out", "/proc/advgen-nowhere/eval.json"], "cannot write to /proc/advgen-nowhere"),
])
def test_bad_eval_arguments(extra, needle, run_dir, data, capsys):
    code, err = _cli(["eval", run_dir, "--data-dir", data, "--device", "cpu", "--steps", "1"] + extra, capsys)
    assert code == 2 and needle in _one_error_line(err)


def test_unknown_preset(tmp_path, capsys):
    code, err = _cli(["reproduce", "--preset", "bogus", "--out", tmp_path], capsys)
    assert code == 2 and "invalid choice: 'bogus'" in _one_error_line(err)


# ------------------------------------------------------------------------------------------------ data

class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _data_cases(marker: Path) -> dict[str, tuple[bytes, str]]:
    good = pickle.dumps(batch_dict(16, 2), protocol=4)

    def variant(**change) -> bytes:
        d = batch_dict(16, 2)
        for k, v in change.items():
            d[k.encode()] = v(d[k.encode()]) if callable(v) else v
        return pickle.dumps(d, protocol=4)

    return {
        "truncated": (good[: len(good) // 2], "is not a valid CIFAR batch (pickle data was truncated)"),
        "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "data_batch_2"),
        "empty": (b"", "is truncated or corrupt (EOFError)"),
        "not a dict": (pickle.dumps([1, 2], protocol=4), "is not a CIFAR batch (holds list, not dict)"),
        "wrong shape": (variant(data=lambda a: a[:, :100]), "must be a uint8 array of shape (n, 3072), got uint8 (16, 100)"),
        "wrong dtype": (variant(data=lambda a: a.astype(np.float32)), "got float32 (16, 3072)"),
        "label out of range": (variant(labels=lambda l: l[:-1] + [10]), "labels must lie in 0..9"),
        "float label": (variant(labels=lambda l: l[:-1] + [2.5]), "labels are not integers"),
        "label count": (variant(labels=lambda l: l[:5]), "b'labels' must be a list of 16 labels"),
        "malicious pickle": (pickle.dumps(_Evil(marker), protocol=2),
                             "is not a valid CIFAR batch (forbidden global posix.system)"),
        "malicious payload inside": (variant(labels=_Evil(marker)), "forbidden global posix.system"),
    }


@pytest.mark.parametrize("case", list(_data_cases(Path("x"))))
def test_bad_data_file(case, run_dir, tmp_path, capsys):
    root = write_cifar(tmp_path / "d", per_batch=16, n_test=16)
    marker = tmp_path / "PWNED"
    raw, needle = _data_cases(marker)[case]
    path = root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(raw)
    code, err = _cli(["eval", run_dir, "--data-dir", root, "--device", "cpu", "--eps", "0"], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(path) in line and needle in line
    assert not marker.exists(), "the pickle ran code"


def test_missing_data(run_dir, tmp_path, capsys):
    code, err = _cli(["eval", run_dir, "--data-dir", tmp_path / "none", "--device", "cpu"], capsys)
    assert code == 2 and "no cifar-10-batches-py/ in" in _one_error_line(err)
    root = write_cifar(tmp_path / "d", per_batch=16, n_test=16)
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    code, err = _cli(["eval", run_dir, "--data-dir", root, "--device", "cpu"], capsys)
    assert code == 2 and "cannot read" in _one_error_line(err) and "data_batch_4: No such file" in err


def _mutations():
    good = pickle.dumps(batch_dict(4, 1), protocol=4)
    flips = st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=8)
    return st.one_of(
        st.binary(max_size=300),
        flips.map(lambda fs: _apply(good, fs)),
        st.integers(0, len(good)).map(lambda n: good[:n]),
        st.tuples(st.integers(0, len(good)), st.binary(min_size=1, max_size=20)).map(
            lambda t: good[:t[0]] + t[1] + good[t[0]:]),
    )


def _apply(raw: bytes, flips) -> bytes:
    b = bytearray(raw)
    for i, v in flips:
        b[i] = v
    return bytes(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_mutations())
def test_fuzz_batch_loader_only_valid_data_or_data_error(raw, tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    try:
        x, y = _parse_batch(path, b"labels", 10)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (3, 32, 32)
    assert y.dtype == np.int64 and y.shape == (x.shape[0],) and (y.size == 0 or (y.min() >= 0 and y.max() < 10))


# ------------------------------------------------------------------------------------------ checkpoints

def test_bad_checkpoints(run_dir, tmp_path, capsys):
    good = (run_dir / MODEL_FILE).read_bytes()
    other = tmp_path / "resnet32.safetensors"
    save_model(other, build_model("resnet32"), {"model": "resnet20", "num_classes": 10})  # lies about itself
    wrong_classes = tmp_path / "c100.safetensors"
    save_model(wrong_classes, build_model("resnet20", 100), {"model": "resnet20", "num_classes": 10})
    weird = tmp_path / "weird.safetensors"
    save_tensors(weird, build_model("resnet20"), {"model": "resnet20", "num_classes": "ten"})
    alien = tmp_path / "alien.safetensors"
    save_tensors(alien, build_model("resnet20"), {"model": "os.system", "num_classes": 10})
    files = {"truncated.safetensors": good[: len(good) // 3], "random.safetensors": os.urandom(3000),
             "empty.safetensors": b""}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    cases = [
        (tmp_path / "missing.safetensors", "missing.safetensors does not exist"),
        (tmp_path / "truncated.safetensors", "is not a valid safetensors checkpoint"),
        (tmp_path / "random.safetensors", "is not a valid safetensors checkpoint"),
        (tmp_path / "empty.safetensors", "is not a valid safetensors checkpoint"),
        (other, "does not fit this architecture (resnet20, 10 classes, 3 channels): 72 unexpected keys: "
                "1.layers.9.bn1.bias, 1.layers.9.bn1.num_batches_tracked"),
        (wrong_classes, "does not fit this architecture"),
        (weird, "has malformed metadata (num_classes 'ten')"),
        (alien, "holds an unknown architecture 'os.system'"),
    ]
    for path, needle in cases:
        code, err = _cli(["eval", path, "--data-dir", tmp_path / "nodata", "--device", "cpu"], capsys)
        line = _one_error_line(err)
        assert code == 2 and needle in line and str(path) in line, line


class _EvilTensorHolder:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_pytorch_files_load_weights_only(tmp_path, capsys):
    torch.manual_seed(1)
    ours = build_model("resnet20").eval()
    # a ResNet-20 saved elsewhere: DataParallel's 'module.' prefix, 'linear' head, no Normalize layer
    foreign = {"module." + k.replace("fc.", "linear."): v for k, v in ours[1].state_dict().items()}
    path = tmp_path / "resnet20.pth"
    torch.save({"state_dict": foreign, "epoch": 200}, path)
    loaded = load_model(path, model_name="resnet20", normalize="cifar10")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))

    code, err = _cli(["eval", path, "--device", "cpu"], capsys)
    assert code == 2 and "is a foreign PyTorch file: name its architecture (--model)" in _one_error_line(err)

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _EvilTensorHolder(marker)}, evil)
    code, err = _cli(["eval", evil, "--model", "resnet20", "--device", "cpu"], capsys)
    assert code == 2 and "is not a loadable weights-only PyTorch file" in _one_error_line(err)
    raw_pickle = tmp_path / "evil2.pth"
    raw_pickle.write_bytes(pickle.dumps(_EvilTensorHolder(marker), protocol=2))   # a bare pickle, not a zip
    with pytest.raises(CheckpointError, match="not a loadable weights-only PyTorch file"):
        load_model(raw_pickle, model_name="resnet20")
    assert not marker.exists(), "a checkpoint ran code"

    wrong = tmp_path / "resnet32.pt"
    torch.save(build_model("resnet32")[1].state_dict(), wrong)
    with pytest.raises(CheckpointError, match="does not fit this architecture"):
        load_model(wrong, model_name="resnet20", normalize="cifar10")


# ------------------------------------------------------------------------------ unwritable, full disk

def test_full_disk_leaves_no_file_that_looks_valid(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(UserError, match=r"cannot write .*model.safetensors: No space left on device"):
        save_tensors(target, {"w": torch.zeros(3)}, {"model": "resnet20"})
    assert list(tmp_path.iterdir()) == []               # neither the target nor a temporary file
    monkeypatch.undo()

    atomic_write(target, b"old and valid")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(UserError, match="Disk quota exceeded"):
        write_json(target, {"new": 1})
    assert target.read_bytes() == b"old and valid" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_disk_full_during_training_keeps_the_last_state(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] >= 6:          # the disk fills up after a few saves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["train", "--method", "standard", "--device", "cpu", "--epochs", "1", "--batch-size", "16",
            "--data-dir", data, "--out", out, "--checkpoint-every", "1"]
    code, err = _cli(argv, capsys)
    assert code == 2 and "No space left on device" in _one_error_line(err) and "state.safetensors" in err
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["metrics.csv", "state.safetensors"]   # no stray temporary file
    monkeypatch.undo()
    code, _ = _cli(argv + ["--resume"], capsys)   # the state left behind is valid and resumable
    assert code == 0


def test_unwritable_out_folder(data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, needle in [("/proc/advgen-nowhere", "cannot write to /proc/advgen-nowhere"),
                        (tmp_path / "file", "exists and is not a folder"),
                        (tmp_path / "file" / "sub", "Not a directory")]:
        code, err = _cli(["train", "--method", "standard", "--device", "cpu", "--data-dir", tmp_path / "nodata",
                          "--out", out], capsys)
        assert code == 2 and needle in _one_error_line(err), err   # refused before the data are read


def test_a_failed_train_leaves_no_folder_behind(tmp_path, capsys):
    """A run that fails before its first save (here: more training images asked for than the data have)
    removes the folder it made, lock file and all; a folder that existed before is left as it was."""
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    out = tmp_path / "new" / "run"
    assert main(["train", "--method", "standard", "--train-subset", "1000", "--data-dir", str(data),
                 "--device", "cpu", "--out", str(out)]) == 2
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(["train", "--method", "standard", "--train-subset", "1000", "--data-dir", str(data),
                 "--device", "cpu", "--out", str(mine)]) == 2
    assert mine.is_dir()


def test_eval_out_never_overwrites_what_is_not_its_own(tmp_path, capsys):
    """advgen eval --out: a run's own files, a folder, or an existing file that is no advgen evaluation are
    refused before any attack runs (exit 2, nothing touched); --force replaces such a file; the same
    evaluation resumes from its own file."""
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=8)
    run = tmp_path / "run"
    assert main(["train", "--method", "standard", "--epochs", "1", "--batch-size", "16", "--data-dir", str(data),
                 "--device", "cpu", "--out", str(run)]) == 0
    record = (run / "run.json").read_bytes()
    ev = ["eval", str(run), "--data-dir", str(data), "--device", "cpu", "--eps", "0,0.25", "--steps", "2"]
    assert main(ev + ["--out", str(run / "run.json")]) == 2
    assert "a run's own file" in capsys.readouterr().err and (run / "run.json").read_bytes() == record
    assert main(ev + ["--out", str(tmp_path)]) == 2 and "is a folder" in capsys.readouterr().err
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    assert main(ev + ["--out", str(mine)]) == 2
    assert "not an advgen evaluation" in capsys.readouterr().err and mine.read_text() == '{"mine": true}'
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert main(ev + ["--out", str(blocked / "e.json")]) == 2       # an unwritable place: refused up front
    capsys.readouterr()
    assert main(ev + ["--out", str(mine), "--force"]) == 0
    assert "pgd_l2" in json.loads(mine.read_text())
    assert main(ev + ["--out", str(mine)]) == 0                      # its own evaluation: resumed, all done
    other = ["eval", str(run), "--data-dir", str(data), "--device", "cpu", "--eps", "0,0.5", "--steps", "2"]
    assert main(other + ["--out", str(mine)]) == 2                   # another evaluation's file: refused
    assert "other settings" in capsys.readouterr().err
