"""The model registry: architectures, parameter counts, the Normalize first layer, option-A shortcuts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import advgen
from advgen.errors import UserError
from advgen.models import MODELS, Normalize, build_model
from advgen.models.normalize import CIFAR10_MEAN, CIFAR10_STD
from advgen.models.resnet_cifar import CifarResNet, _BasicBlock


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_0_27m_parameters():
    assert n_params(build_model("resnet20")) == 269_722


@pytest.mark.parametrize("name,millions", [("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85),
                                           ("resnet110", 1.7), ("preact_resnet18", 11.2)])
def test_parameter_counts_match_the_documented_sizes(name, millions):
    assert round(n_params(build_model(name)) / 1e6, 2 if millions < 1 else 1) == millions


# the full-size WideResNets (36M, 46M parameters) are left out here: tests/test_wide_resnet.py checks
# their layout and forward on narrow instances and builds WRN-28-10 once, for its parameter count
@pytest.mark.parametrize("name", sorted(n for n in MODELS if not n.startswith("wrn")))
def test_every_model_maps_images_to_logits(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])                    # depends on the input
    assert isinstance(model[0], Normalize)
    sd = model.state_dict()
    assert torch.equal(sd["0.mean"].flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.equal(sd["0.std"].flatten(), torch.tensor(CIFAR10_STD))
    assert all(p is not model[0].mean and p is not model[0].std for p in model.parameters())


def test_models_train_mode_forward_and_backward():
    model = build_model("resnet20").train()
    x = torch.rand(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_num_classes_100():
    model = build_model("resnet20", num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    assert model[1].fc.out_features == 100
    assert n_params(model) == 269_722 + 90 * 65
    assert MODELS["preact_resnet18"](100)[1].fc.out_features == 100


def test_unknown_model_is_user_error():
    with pytest.raises(UserError, match="resnet20"):
        build_model("resnet19")


def test_normalize_is_per_channel():
    norm = Normalize()
    x = torch.rand(4, 3, 8, 8)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    assert list(dict(norm.named_parameters())) == []
    assert set(norm.state_dict()) == {"mean", "std"}


def test_option_a_shortcut_has_no_parameters():
    model = build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19                                        # 1 stem + 9 blocks x 2, no 1x1 shortcut convs
    assert all(c.kernel_size == (3, 3) for c in convs)
    blocks = [m for m in model.modules() if isinstance(m, _BasicBlock)]
    assert len(blocks) == 9
    for b in blocks:
        own = {n for n, _ in b.named_parameters()}
        assert own == {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"}


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = _BasicBlock(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert (s[:, :8] == 0).all() and (s[:, 24:] == 0).all()
    same = _BasicBlock(16, 16, 1)
    assert same.shortcut(x) is x


@pytest.mark.parametrize("n,depth", [(3, 20), (5, 32), (9, 56)])
def test_cifar_resnet_depth(n, depth):
    net = CifarResNet(n)
    weighted = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == depth


def test_registry_exported_at_top_level():
    assert advgen.MODELS is MODELS
    assert set(MODELS) == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "preact_resnet18",
                           "preact_resnet18_v2", "wrn28_10", "wrn34_10"}
