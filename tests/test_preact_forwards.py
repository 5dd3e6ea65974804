"""PreAct-ResNet-18's two forwards: `preact_resnet18` (the fast-AT one: the 1x1 shortcut conv sees the
block's raw input) and `preact_resnet18_v2` (it sees relu(bn1(x))). The reference below is written for
this test from the upstream forwards (locuslab/fast_adversarial CIFAR10/preact_resnet.py; RobustBench
model_zoo/architectures/resnet.py PreActBlock, PreActBlockV2 and PreActResNet(bn_before_fc=True)); both
must give advgen's logits exactly on the same state dict. advgen's own files saved before the variant
was recorded hold the v2 forward and must still load as trained."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advgen
from advgen import checkpoint
from advgen.checkpoint import save_model
from advgen.io import read_tensors, save_tensors
from advgen.errors import CheckpointError, ConfigError
from advgen.models import Normalize, build_model
from advgen.models.normalize import CIFAR10_MEAN, CIFAR10_STD
from settled import settled


class UpstreamPreActBlock(nn.Module):
    """One upstream block; `v2` picks RobustBench's PreActBlockV2 forward, else PreActBlock's (= fast-AT's)."""

    def __init__(self, cin, planes, stride, v2):
        super().__init__()
        self.v2 = v2
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            skip = self.shortcut(out) if self.v2 else self.shortcut(x)
        else:
            skip = x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        out += skip
        return out


class UpstreamPreActResNet18(nn.Module):
    """conv1, layer1..4 of two blocks, bn + relu, avg_pool2d(4), linear; mu / sigma buffers in front (RobustBench)."""

    def __init__(self, v2, num_classes=10):
        super().__init__()
        self.register_buffer("mu", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin = 64
        for s, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{s}", nn.Sequential(UpstreamPreActBlock(cin, planes, stride, v2),
                                                     UpstreamPreActBlock(planes, planes, 1, v2)))
            cin = planes
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1((x - self.mu) / self.sigma)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.view(out.size(0), -1))


X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture(scope="module")
def upstream_state():
    """A RobustBench-style file's contents: PreAct keys, mu and sigma; the same weights serve both forwards."""
    return settled(UpstreamPreActResNet18(v2=False), seed=3).state_dict()


@pytest.mark.parametrize("name,v2", [("preact_resnet18", False), ("preact_resnet18_v2", True)])
def test_each_forward_matches_its_upstream_reference_exactly(tmp_path, upstream_state, name, v2):
    ref = UpstreamPreActResNet18(v2=v2)
    ref.load_state_dict(upstream_state)
    torch.save({"state_dict": {"module." + k: v for k, v in upstream_state.items()}}, tmp_path / "rb.pt")
    loaded = advgen.load_model(tmp_path / "rb.pt", model_name=name)   # mu / sigma carried by the file
    assert torch.equal(logits(loaded), logits(ref))


def test_the_two_forwards_differ_on_the_same_weights(tmp_path, upstream_state):
    torch.save(upstream_state, tmp_path / "rb.pt")
    fast = logits(advgen.load_model(tmp_path / "rb.pt", model_name="preact_resnet18"))
    v2 = logits(advgen.load_model(tmp_path / "rb.pt", model_name="preact_resnet18_v2"))
    assert (fast - v2).abs().max() > 1e-3   # same keys, another function: the name matters


def _v2_model(seed: int) -> nn.Sequential:
    return settled(build_model("preact_resnet18_v2"), seed)


def test_file_written_the_old_way_loads_as_the_v2_forward(tmp_path):
    """advgen before the variants: metadata {"model": "preact_resnet18"}, no "variant", the v2 forward."""
    trained = _v2_model(seed=5)
    old = tmp_path / "old.safetensors"
    save_tensors(old, trained, {"model": "preact_resnet18", "num_classes": 10, "method": "fgsm", "epoch": 15})
    assert "variant" not in read_tensors(old)[1]
    assert checkpoint.saved_architecture(old) == "preact_resnet18_v2"
    assert torch.equal(logits(advgen.load_model(old)), logits(trained))
    # a file saved now records its variant, and each name loads as its own forward
    fast = settled(build_model("preact_resnet18"), seed=6)
    for name, model in (("preact_resnet18", fast), ("preact_resnet18_v2", trained)):
        path = tmp_path / f"{name}.safetensors"
        save_model(path, model, {"model": name, "num_classes": 10})
        assert read_tensors(path)[1]["variant"] == advgen.models.VARIANTS[name]
        assert checkpoint.saved_architecture(path) == name
        assert torch.equal(logits(advgen.load_model(path)), logits(model))


def test_inconsistent_variant_metadata_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_tensors(path, _v2_model(seed=1), {"model": "preact_resnet18", "num_classes": 10,
                                           "variant": "shortcut-on-preactivation"})
    with pytest.raises(CheckpointError, match="inconsistent metadata"):
        advgen.load_model(path)


def test_init_from_an_old_preact_file_refuses_the_fast_at_forward(tmp_path):
    """--init of an old file (the v2 forward) into --model preact_resnet18 would load the same keys into
    another function: refused by name; into preact_resnet18_v2 it loads."""
    from advgen.training import TrainConfig
    from advgen.training.loop import build_classifier
    from synth_cifar import tiny_dataset
    old = tmp_path / "old.safetensors"
    trained = _v2_model(seed=2)
    save_tensors(old, trained, {"model": "preact_resnet18", "num_classes": 10})
    data = tiny_dataset(10, 0)
    with pytest.raises(ConfigError, match="holds preact_resnet18_v2, not preact_resnet18"):
        build_classifier(TrainConfig(model="preact_resnet18", init=str(old)), data)
    model = build_classifier(TrainConfig(model="preact_resnet18_v2", init=str(old)), data)
    assert torch.equal(logits(model), logits(trained))


def test_resuming_a_state_from_before_the_variants(tmp_path):
    """A training state without "variant" of a preact_resnet18 run trained the v2 forward: resuming it
    as preact_resnet18 is refused (the settings differ), as preact_resnet18_v2 it is accepted."""
    from advgen.training import TrainConfig
    from advgen.training.loop import _resume_state
    from advgen.training.state import write_state
    old_cfg = TrainConfig(model="preact_resnet18").to_dict()
    del old_cfg["init_normalize"]                       # a setting the old advgen did not have
    write_state(tmp_path / "state.safetensors", {"x": torch.zeros(1)}, {"version": "0.1.0", "config": old_cfg})
    with pytest.raises(CheckpointError, match="model 'preact_resnet18_v2' \\(now 'preact_resnet18'\\)"):
        _resume_state(tmp_path, TrainConfig(model="preact_resnet18"))
    state, _ = _resume_state(tmp_path, TrainConfig(model="preact_resnet18_v2"))
    assert torch.equal(state["x"], torch.zeros(1))


def test_normalize_first_then_net():
    model = build_model("preact_resnet18_v2")
    assert isinstance(model[0], Normalize) and model[1].shortcut_preact
    assert not build_model("preact_resnet18")[1].shortcut_preact
