"""Checkpoints: safetensors round trip, corrupt and foreign files, atomic writes, no unpickling."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import advgen
from advgen import checkpoint
from advgen.checkpoint import save_model
from advgen.io import atomic_write, read_json, read_tensors, save_tensors, write_json
from advgen.errors import CheckpointError, UserError
from advgen.models import Normalize, build_model
from advgen.models.resnet_cifar import CifarResNet
from synth_cifar import System, Touch


def trained_looking(name="resnet20", num_classes=10, seed=0) -> nn.Module:
    """A model whose BatchNorm statistics are not the defaults, so buffers must round-trip too."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes).train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))
    return model.eval()


def outputs(model, seed=1):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def save(path, model, name="resnet20", num_classes=10, **extra):
    save_model(path, model, {"model": name, "num_classes": num_classes, **extra})


def test_round_trip(tmp_path):
    model = trained_looking()
    save(tmp_path / "model.safetensors", model, epoch=3)
    loaded = advgen.load_model(tmp_path / "model.safetensors")
    assert not loaded.training and not any(m.training for m in loaded.modules())
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=0, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a run folder resolves to its model.safetensors
    torch.testing.assert_close(outputs(advgen.load_model(tmp_path)), outputs(model), atol=0, rtol=0)
    _, meta = read_tensors(tmp_path / "model.safetensors")
    assert meta == {"model": "resnet20", "num_classes": 10, "epoch": 3}


def test_round_trip_100_classes(tmp_path):
    model = trained_looking(num_classes=100)
    save(tmp_path / "m.safetensors", model, num_classes=100)
    loaded = advgen.load_model(tmp_path / "m.safetensors")
    assert outputs(loaded).shape == (2, 100)
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=0, rtol=0)


def test_tensors_without_meta_need_a_model_name(tmp_path):
    model = trained_looking()
    save_tensors(tmp_path / "bare.safetensors", model)
    with pytest.raises(CheckpointError, match="architecture"):
        advgen.load_model(tmp_path / "bare.safetensors")
    loaded = advgen.load_model(tmp_path / "bare.safetensors", model_name="resnet20")
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=0, rtol=0)
    with pytest.raises(CheckpointError):
        advgen.load_model(tmp_path / "bare.safetensors", model_name="resnet32")


def test_save_tensors_meta_round_trip(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    save_tensors(tmp_path / "t.safetensors", tensors, {"x": [1, 2], "s": "é"})
    got, meta = read_tensors(tmp_path / "t.safetensors")
    assert set(got) == {"a", "b"} and torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"])
    assert meta == {"x": [1, 2], "s": "é"}


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 64,                          # garbage
    b"",                                             # empty
    b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ",  # a header that is not JSON
])
def test_garbage_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        advgen.load_model(path)


def test_random_bytes_are_checkpoint_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        path = tmp_path / f"r{i}.safetensors"
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
        with pytest.raises(CheckpointError):
            advgen.load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 4])
def test_truncated_file_is_checkpoint_error(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save(path, trained_looking())
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if isinstance(keep, int) else raw[:int(len(raw) * keep)])
    with pytest.raises(CheckpointError):
        advgen.load_model(path)


def test_checkpoint_of_another_architecture(tmp_path):
    model = trained_looking("resnet20")
    save(tmp_path / "lies.safetensors", model, name="resnet32")          # header names another model
    with pytest.raises(CheckpointError, match="architecture"):
        advgen.load_model(tmp_path / "lies.safetensors")
    save(tmp_path / "classes.safetensors", model, num_classes=100)       # another head
    with pytest.raises(CheckpointError):
        advgen.load_model(tmp_path / "classes.safetensors")
    torch.save(model[1].state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError):
        advgen.load_model(tmp_path / "foreign.pt", model_name="preact_resnet18", normalize="cifar10")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        advgen.load_model(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        advgen.load_model(tmp_path)                                       # a folder without model.safetensors
    with pytest.raises(CheckpointError, match="does not exist"):
        advgen.load_model(tmp_path / "nothing.pt", model_name="resnet20")


def test_checkpoint_error_is_user_error():
    assert issubclass(CheckpointError, UserError)


# ------------------------------------------------------------------------------------------ foreign files

def bare_resnet20(seed=0):
    torch.manual_seed(seed)
    net = CifarResNet(3).train()
    with torch.no_grad():
        net(torch.rand(8, 3, 32, 32))
    return net.eval()


def reference(net):
    return nn.Sequential(Normalize(), net).eval()


def test_foreign_state_dict_loads_with_key_mapping(tmp_path):
    net = bare_resnet20()
    assert not any(k.startswith("0.") or k.startswith("1.") for k in net.state_dict())
    torch.save(net.state_dict(), tmp_path / "foreign.pt")
    loaded = advgen.load_model(tmp_path / "foreign.pt", model_name="resnet20", normalize="cifar10")
    assert not loaded.training
    torch.testing.assert_close(outputs(loaded), outputs(reference(net)), atol=0, rtol=0)
    torch.testing.assert_close(loaded[0].mean.flatten(), torch.tensor((0.4914, 0.4822, 0.4465)))


def test_foreign_wrapped_dataparallel_names(tmp_path):
    net = bare_resnet20(seed=3)
    sd = {("module." + k).replace("module.fc.", "module.linear."): v for k, v in net.state_dict().items()}
    assert "module.linear.weight" in sd
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "foreign.pth")
    loaded = advgen.load_model(tmp_path / "foreign.pth", model_name="resnet20", normalize="cifar10")
    torch.testing.assert_close(outputs(loaded), outputs(reference(net)), atol=0, rtol=0)


def test_foreign_file_needs_a_model_name(tmp_path):
    torch.save(bare_resnet20().state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="--model"):
        advgen.load_model(tmp_path / "foreign.pt")


def test_foreign_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        advgen.load_model(tmp_path / "list.pt", model_name="resnet20")
    (tmp_path / "junk.pt").write_bytes(b"not a zip and not a pickle")
    with pytest.raises(CheckpointError):
        advgen.load_model(tmp_path / "junk.pt", model_name="resnet20")


@pytest.mark.parametrize("evil", [Touch, System])
@pytest.mark.parametrize("wrap", [False, True])
def test_malicious_pt_is_refused_without_side_effect(tmp_path, evil, wrap):
    marker = tmp_path / "pwned"
    obj = evil(marker)
    if wrap:
        obj = {**bare_resnet20().state_dict(), "extra": obj}
    torch.save(obj, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="evil.pt"):
        advgen.load_model(tmp_path / "evil.pt", model_name="resnet20")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ atomic writes

def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.bin"]
    save(tmp_path / "sub" / "model.safetensors", build_model("resnet20"))
    write_json(tmp_path / "sub" / "run.json", {"a": 1})
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.bin", "model.safetensors", "run.json"]
    assert read_json(tmp_path / "sub" / "run.json") == {"a": 1}


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", broken_fsync)
    with pytest.raises(UserError, match="f.bin"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_into_unwritable_place(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(UserError):
        atomic_write(blocker / "child.bin", b"data")                      # parent is a file


def test_read_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_json(tmp_path / "run.json")
    (tmp_path / "run.json").write_text("{half")
    with pytest.raises(CheckpointError):
        read_json(tmp_path / "run.json")
