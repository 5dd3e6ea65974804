"""Foreign checkpoints in the layouts people have: akamaster/pytorch_resnet_cifar10 ResNet-20..110 and the
fast-AT / RobustBench PreAct-ResNet-18. The reference nets below are small reimplementations written for
these tests with those layouts' public module names and forward passes; advgen must load their files with
the same logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advgen
import advgen.cli
from advgen.checkpoint import load_model
from advgen.errors import CheckpointError, UserError
from advgen.models.normalize import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, Normalize, parse_stats
from settled import settled


class AkaBlock(nn.Module):
    """Basic block with option-A shortcut: stride-2 subsampling, planes//4 zero channels on each side."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.down = stride != 1 or cin != planes
        self.planes = planes

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        skip = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4)) if self.down else x
        return F.relu(out + skip)


class AkaResNet(nn.Module):
    """conv1, bn1, layer1..layer3 (n blocks each), linear; global average pooling."""

    def __init__(self, n, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for s, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), 1):
            setattr(self, f"layer{s}", nn.Sequential(*[AkaBlock(cin if j == 0 else planes, planes,
                                                                 stride if j == 0 else 1) for j in range(n)]))
            cin = planes
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(out, out.size(3)).flatten(1))


class PreActV2Block(nn.Module):
    """Pre-activation block; the 1x1 shortcut conv (shortcut.0) sees the pre-activated input (RobustBench
    PreActBlockV2, pytorch-cifar)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class PreActV2ResNet18(nn.Module):
    """conv1, layer1..layer4 (2 blocks each), bn, linear; avg_pool2d(4) on the 4x4 map."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin = 64
        for s, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{s}", nn.Sequential(PreActV2Block(cin, planes, stride), PreActV2Block(planes, planes, 1)))
            cin = planes
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.avg_pool2d(F.relu(self.bn(out)), 4).flatten(1))


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name,n,suffix", [("resnet20", 3, ".th"), ("resnet32", 5, ".pth.tar"), ("resnet44", 7, ".pt"),
                                           ("resnet56", 9, ".pth"), ("resnet110", 18, ".th")])
def test_akamaster_files_load_with_identical_logits(tmp_path, name, n, suffix):
    ref = settled(AkaResNet(n), seed=n)
    sd = ref.state_dict()
    assert "layer1.0.conv1.weight" in sd and "linear.weight" in sd and not any("shortcut" in k for k in sd)
    path = tmp_path / f"{name}{suffix}"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "best_prec1": 91.25, "epoch": 200}, path)
    loaded = load_model(path, model_name=name, normalize=(IMAGENET_MEAN, IMAGENET_STD))
    expect = logits(nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), ref), X)
    assert torch.equal(logits(loaded, X), expect)   # identical: the same operations in the same order


def test_akamaster_file_of_old_pytorch_without_batch_counters_loads(tmp_path):
    ref = settled(AkaResNet(3), seed=1)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, tmp_path / "old.th")
    torch.testing.assert_close(logits(load_model(tmp_path / "old.th", model_name="resnet20", normalize="cifar10"), X),
                               logits(nn.Sequential(Normalize(), ref), X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wrapper", ["model", "net", "state_dict"])
def test_preact_v2_resnet18_loads_with_identical_logits_cifar100(tmp_path, wrapper):
    ref = settled(PreActV2ResNet18(num_classes=100), seed=2)
    sd = ref.state_dict()
    assert "layer2.0.shortcut.0.weight" in sd and "bn.weight" in sd and "layer1.0.shortcut.0.weight" not in sd
    torch.save({wrapper: sd, "epoch": 30}, tmp_path / "preact.pth")
    loaded = load_model(tmp_path / "preact.pth", model_name="preact_resnet18_v2", num_classes=100,
                        normalize=(CIFAR100_MEAN, CIFAR100_STD))
    expect = logits(nn.Sequential(Normalize(CIFAR100_MEAN, CIFAR100_STD), ref), X)
    got = logits(loaded, X)
    assert got.shape == (4, 100)
    assert torch.equal(got, expect)


def test_mismatch_lists_missing_unexpected_keys_and_shapes_in_the_files_spelling(tmp_path):
    torch.save({"state_dict": {"module." + k: v for k, v in AkaResNet(5).state_dict().items()}}, tmp_path / "r32.th")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "r32.th", model_name="resnet20", normalize="imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "r32.th does not fit this architecture (resnet20, 10 classes, 3 channels)" in msg
    # blocks 3 and 4 of each stage do not exist in a ResNet-20: reported under their own names, not shifted
    assert "72 unexpected keys: module.layer1.3.bn1.bias" in msg and "Sequential" not in msg
    assert "missing keys" not in msg and "shape" not in msg

    sd = PreActV2ResNet18().state_dict()
    del sd["bn.weight"], sd["bn.bias"]
    sd["linear.weight"] = torch.zeros(7, 512)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "broken.pt", model_name="preact_resnet18", normalize="none")
    msg = str(e.value)
    assert "2 missing keys: 1.bn.bias, 1.bn.weight" in msg
    assert "1 shape mismatches (file vs model): linear.weight (7, 512) vs (10, 512)" in msg


def test_option_b_shortcuts_are_not_silently_dropped(tmp_path):
    sd = {"module." + k: v for k, v in AkaResNet(3).state_dict().items()}
    sd["module.layer2.0.shortcut.0.weight"] = torch.zeros(32, 16, 1, 1)
    torch.save(sd, tmp_path / "optb.th")
    with pytest.raises(CheckpointError, match="1 unexpected keys: module.layer2.0.shortcut.0.weight"):
        load_model(tmp_path / "optb.th", model_name="resnet20", normalize="imagenet")


def test_parse_stats():
    assert parse_stats("cifar100", 3) == (CIFAR100_MEAN, CIFAR100_STD)
    assert parse_stats("none", 1) == ((0.0,), (1.0,))
    assert parse_stats("0.5,0.4,0.3/0.2,0.2,0.1", 3) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.1))
    assert parse_stats("0.5/0.25", 2) == ((0.5, 0.5), (0.25, 0.25))
    for bad in ("0.5,0.5/0.2,0.2", "0.5", "x/y", "0.5/0", "imagenett", "0.5/nan"):
        with pytest.raises(UserError):
            parse_stats(bad, 3)


def test_cli_eval_foreign_file_with_normalize_and_its_errors(tmp_path, capsys):
    from synth_cifar import write_cifar
    write_cifar(tmp_path / "data")
    ref = settled(AkaResNet(3), seed=4)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "r20.th")
    argv = ["eval", str(tmp_path / "r20.th"), "--model", "resnet20", "--data-dir", str(tmp_path / "data"),
            "--device", "cpu", "--eps", "0", "--steps", "1", "--out", str(tmp_path / "r.json")]
    assert advgen.cli.main(argv + ["--normalize", "imagenet"]) == 0
    assert advgen.cli.main(argv + ["--normalize", "0.5,0.5/0.2,0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["advgen: error: normalization has 2 channels, the images 3"]
    own = tmp_path / "own.safetensors"
    advgen.checkpoint.save_model(own, advgen.build_model("resnet20"), {"model": "resnet20", "num_classes": 10})
    assert advgen.cli.main(["eval", str(own), "--normalize", "none", "--device", "cpu"]) == 2
    assert "applies to foreign" in capsys.readouterr().err


@pytest.mark.parametrize("container", ["model_state_dict", None])
@pytest.mark.parametrize("prefix", ["model.", "module.model."])
@pytest.mark.parametrize("arch", ["resnet20", "preact_resnet18", "wrn10_2"])
def test_other_containers_and_model_prefixes_load_strictly(tmp_path, monkeypatch, arch, prefix, container):
    """{'model_state_dict': ...} or a bare dict, keys under 'model.' (RobustBench's normalize wrapper) or
    'module.model.', for the akamaster ResNet-20, the PreAct-ResNet-18 and a (narrow) WideResNet."""
    from advgen.models import MODELS, wide_resnet
    from test_preact_forwards import UpstreamPreActResNet18
    from test_wide_resnet import RefWideResNet
    monkeypatch.setitem(MODELS, "wrn10_2", wide_resnet(10, 2))
    ref = settled({"resnet20": lambda: AkaResNet(3), "preact_resnet18": lambda: UpstreamPreActResNet18(v2=False),
                   "wrn10_2": lambda: RefWideResNet(10, 2)}[arch](), seed=7)
    sd = {prefix + k: v for k, v in ref.state_dict().items() if k not in ("mu", "sigma")}
    torch.save({container: sd, "epoch": 3} if container else sd, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", model_name=arch, normalize="none")
    expect = ref if arch != "preact_resnet18" else _without_normalization(ref)
    assert torch.equal(logits(loaded, X), logits(expect, X))


def _without_normalization(net):
    """The reference PreAct with its mu / sigma at mean 0, std 1 (the file above leaves them out)."""
    net.mu.zero_()
    net.sigma.fill_(1.0)
    return net
