"""WideResNet-28-10 / -34-10 in RobustBench's layout. The reference below is written for this test from
RobustBench's model_zoo/architectures/wide_resnet.py forward (BasicBlock with its equalInOut rule,
NetworkBlock `layer`, optional never-called `sub_block1`). Narrow, shallow instances keep it cheap; the
full-size WRN-28-10 is built once, for its parameter count (WRN-34-10 on the meta device)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advgen
from advgen.errors import CheckpointError
from advgen.models import MODELS, wide_resnet
from advgen.models.wide_resnet import WideResNet
from settled import settled


class RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))          # the block input itself is replaced by its pre-activation
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefWideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes=10, sub_block1=False, mu_sigma=None):
        super().__init__()
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        n = (depth - 4) // 6
        if mu_sigma is not None:
            self.register_buffer("mu", torch.tensor(mu_sigma[0]).view(1, 3, 1, 1))
            self.register_buffer("sigma", torch.tensor(mu_sigma[1]).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        if sub_block1:
            self.sub_block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RefNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RefNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def forward(self, x):
        if hasattr(self, "mu"):
            x = (x - self.mu) / self.sigma
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.nChannels))


X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def out(model):
    with torch.no_grad():
        return model.eval()(X)


@pytest.mark.parametrize("depth,widen", [(10, 2), (16, 1)])   # widen 1: block1 keeps its width, no convShortcut
def test_keys_and_forward_match_robustbench(depth, widen):
    ref = settled(RefWideResNet(depth, widen), seed=depth)
    ours = WideResNet(depth, widen)
    assert list(ours.state_dict()) == list(ref.state_dict())          # names and order
    assert ("block1.layer.0.convShortcut.weight" in ref.state_dict()) == (widen != 1)
    assert "block2.layer.0.convShortcut.weight" in ref.state_dict()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(out(ours), out(ref))


@pytest.fixture
def small_wrn(monkeypatch):
    """A WRN-10-2 under the registry name "wrn10_2", so the loading path runs as for wrn28_10."""
    monkeypatch.setitem(MODELS, "wrn10_2", wide_resnet(10, 2))
    return "wrn10_2"


def test_robustbench_checkpoint_with_sub_block1_and_mu_sigma_loads(tmp_path, small_wrn):
    """Carmon2019Unlabeled-style: WideResNet(sub_block1=True) saved under module.; Rice2020OverfittingNet-
    style mu / sigma inside. The never-called sub_block1 is dropped; everything else loads strictly."""
    stats = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    ref = settled(RefWideResNet(10, 2, sub_block1=True, mu_sigma=stats), seed=4)
    sd = ref.state_dict()
    assert any(k.startswith("sub_block1.") for k in sd)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 76}, tmp_path / "wrn.pt")
    loaded = advgen.load_model(tmp_path / "wrn.pt", model_name=small_wrn)
    assert torch.equal(out(loaded), out(ref))
    torch.testing.assert_close(loaded[0].std.flatten(), torch.tensor(stats[1]))


def test_wrn_file_missing_a_weight_is_refused(tmp_path, small_wrn):
    sd = settled(RefWideResNet(10, 2), seed=1).state_dict()
    del sd["block2.layer.0.convShortcut.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="1 missing keys: 1.block2.layer.0.convShortcut.weight"):
        advgen.load_model(tmp_path / "broken.pt", model_name=small_wrn, normalize="cifar10")


def test_full_size_parameter_counts():
    wrn28 = MODELS["wrn28_10"]()                                      # the one full-size build
    assert sum(p.numel() for p in wrn28.parameters()) == 36_479_194
    assert list(wrn28[1].state_dict())[:3] == ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"]
    with torch.device("meta"):
        wrn34 = WideResNet(34, 10)
    assert sum(p.numel() for p in wrn34.parameters()) == 46_160_474
    assert len(wrn34.block1.layer) == 5 and len(wrn28[1].block1.layer) == 4


def test_bad_depth():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(27, 10)
