"""Wide residual networks for CIFAR (Zagoruyko & Komodakis 2016) in RobustBench's layout.

WRN-d-k: a 3x3 stem of 16 channels, three groups of n = (d - 4) / 6 pre-activation blocks of 16k, 32k
and 64k channels (strides 1, 2, 2), BatchNorm + ReLU, global average pooling, a linear layer with bias.
WRN-28-10 has 36.5M parameters, WRN-34-10 46.2M (10 classes).

The module and buffer names are those of RobustBench's `model_zoo/architectures/wide_resnet.py` (itself
from the TRADES code), so its checkpoints load by name: `conv1`, `block{1,2,3}.layer.{j}.{bn1, conv1,
bn2, conv2, convShortcut}`, `bn1`, `fc`. Its forward, re-stated: a block whose input and output widths
are equal (`equalInOut`) adds its raw input x to conv2(relu(bn2(conv1(relu(bn1(x)))))); a block that
changes width pre-activates first, a = relu(bn1(x)), and adds convShortcut(a) (1x1, the block's stride)
to conv2(relu(bn2(conv1(a)))). Dropout (RobustBench's dropRate, 0 for every model it ships) is left out:
inference is the same. RobustBench's optional `sub_block1` (built by some of its models but never called
in the forward) is not built; advgen.checkpoint drops its keys from a file, saying so.
Inputs: (B, C, H, W) normalized images; the layouts and the parameter counts are those of 32x32 RGB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _WideBlock(nn.Module):
    """RobustBench's wide_resnet.BasicBlock (see the module docstring), without dropout."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        if not self.equal_in_out:   # upstream's name, kept so that its checkpoints' keys match
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)  # noqa: N815

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        skip = x if self.equal_in_out else self.convShortcut(a)
        return skip + self.conv2(self.relu2(self.bn2(self.conv1(a))))


class _Group(nn.Module):
    """n blocks of one width; the first one takes the stride (RobustBench's NetworkBlock, key `layer`)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                     for j in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor (depth = 6n + 4, n >= 1 blocks per group); (B, in_channels, H, W) -> (B, num_classes)."""

    # a module RobustBench builds in some models (WideResNet(sub_block1=True)) and never calls in forward
    unused_upstream_prefixes = ("sub_block1.",)

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
            raise ValueError(f"WideResNet needs depth = 6n + 4 (n >= 1) and widen_factor >= 1, "
                             f"got {depth}, {widen_factor}")
        n, widths = (depth - 4) // 6, (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _Group(n, widths[0], widths[1], 1)
        self.block2 = _Group(n, widths[1], widths[2], 2)
        self.block3 = _Group(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():   # RobustBench's initialization: He normal (fan-out) convs, BN 1/0, fc bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.avg_pool2d(out, out.shape[-2:]).flatten(1))  # global mean (upstream: 8x8 pooling of 32x32 inputs)
