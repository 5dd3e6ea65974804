"""One helper for the tests that compare an independently written network with advgen's."""

from __future__ import annotations

import torch
from torch import nn


def settled(net: nn.Module, seed: int) -> nn.Module:
    """`net` with random weights, non-default BatchNorm affine and statistics (one train-mode pass over 8
    random images) and non-zero Linear biases, in eval mode: a layout mapping that drops or swaps any of
    them changes the logits."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.1, 0.1)
    net.train()
    with torch.no_grad():
        net(torch.rand(8, 3, 32, 32))
    return net.eval()
