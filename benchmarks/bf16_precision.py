"""How much of an L2 perturbation survives bf16 autocast at the classifier's first convolution.

Under `--amp` on the CPU, autocast casts the first convolution's input, the normalized image
(x - mean) / std, to bfloat16 (8 bits of mantissa: a step of 2^-7 between 1 and 2). A perturbation
δ far below that step is partly rounded away, so the attack the model sees is not the one the threat
model says. This measures, on the first N test images and δ random on the L2 sphere of radius eps
(clipped to [0, 1]), the relative error ‖(bf16(n(x+δ)) − bf16(n(x))) − (n(x+δ) − n(x))‖ / ‖n(x+δ) − n(x)‖
per image, and prints its median and quartiles at each eps.

    PYTHONPATH=src python benchmarks/bf16_precision.py --data-dir ../shared/data [--n 256] [--eps 0.05 0.5 2]
"""
from __future__ import annotations

import argparse

import torch

from advgen.data import first_n, load_dataset
from advgen.models.normalize import CIFAR10_MEAN, CIFAR10_STD


def relative_error(x: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """Per-image relative error (shape [N]) of a random L2-eps perturbation of x ([N, 3, H, W] in [0, 1])
    after the normalized input is cast to bfloat16."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    x_adv = (x + eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    a, b = (x_adv - mean) / std, (x - mean) / std
    exact = a - b
    seen = a.bfloat16().float() - b.bfloat16().float()
    return (seen - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1).clamp_min(1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.25, 0.5, 2.0])
    args = p.parse_args()
    x = first_n(load_dataset("cifar10", args.data_dir)[1], args.n).images.float() / 255
    print(f"first {args.n} test images; relative error of the perturbation seen in bf16: median [quartiles]")
    for eps in args.eps:
        q = torch.quantile(relative_error(x, eps), torch.tensor([0.25, 0.5, 0.75])).tolist()
        print(f"L2 eps {eps:g}: {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]")


if __name__ == "__main__":
    main()
