"""CIFAR ResNets: the He et al. (2016) 6n+2 family and PreAct-ResNet-18 in its two forwards.

ResNet-{20,32,44,56,110}: three stages of 16/32/64 channels, n basic blocks each (n = 3, 5, 7, 9, 18),
option-A shortcuts (stride-2 subsampling and zero-padded channels, no parameters). Parameter counts:
ResNet-20 0.27M, -32 0.46M, -44 0.66M, -56 0.85M, -110 1.7M.
PreAct-ResNet-18 (He et al. 2016b, 11.2M parameters): the model of the fast-adversarial-training
literature (Wong et al. 2020; Rice et al. 2020). Two forwards share its weights' names: the 1x1
shortcut conv of a block that changes shape sees either the block's raw input x (locuslab/fast_adversarial
CIFAR10/preact_resnet.py, N-FGSM, GradAlign, RobustBench's PreActBlock as in Wong2020Fast) or the
pre-activated relu(bn1(x)) (pytorch-cifar, RobustBench's PreActBlockV2 as in Rice2020Overfitting, and
advgen before it offered both). `shortcut_preact` picks one.
Every model is `Sequential(Normalize, net)`: inputs are pixels in [0, 1], shape (B, C, H, W); C is
`in_channels` (3 by default) and, thanks to global average pooling, any H, W >= 1 work (the layouts and
the parameter counts above are those of 32x32 RGB inputs).

Module names differ from the public implementations (akamaster/pytorch_resnet_cifar10, fast-AT /
RobustBench): the blocks are one `layers` Sequential instead of `layer1..layerK`; `stages` and
`blocks_per_stage` let advgen.checkpoint map those files' keys explicitly.
"""
import torch
import torch.nn.functional as F
from torch import nn


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin  # option A: extra channels of the shortcut are zeros
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) (He et al. 2016, section 4.2): 3 stages of n blocks; `layers[s * n + j]` is block j
    of stage s (the public layout's `layer{s+1}.{j}`)."""

    stages = 3

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.blocks_per_stage = n
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.avg_pool2d(out, out.shape[-2:]).flatten(1))  # global mean, as the public layouts take it


class _PreActBlock(nn.Module):
    """Pre-activation basic block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut, where the shortcut
    is x, or a 1x1 conv (when stride or width change) of x (shortcut_preact False) or of relu(bn1(x))
    (shortcut_preact True)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut_preact: bool = False):
        super().__init__()
        self.shortcut_preact = shortcut_preact
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            skip = x
        else:
            skip = self.shortcut(out if self.shortcut_preact else x)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18: four stages of two pre-activation blocks, 64..512 channels, a BatchNorm + ReLU
    before the pooling (the fast-AT layout; RobustBench's PreActResNet with bn_before_fc=True).
    shortcut_preact: False, the shortcut conv sees the block's raw input (fast-AT, RobustBench
    PreActBlock); True, the pre-activated input (RobustBench PreActBlockV2)."""

    stages = 4
    blocks_per_stage = 2

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, shortcut_preact: bool = False):
        super().__init__()
        self.shortcut_preact = shortcut_preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_PreActBlock(cin, cout, stride, shortcut_preact), _PreActBlock(cout, cout, 1, shortcut_preact)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.avg_pool2d(out, out.shape[-2:]).flatten(1))  # global mean, as the public layouts take it
