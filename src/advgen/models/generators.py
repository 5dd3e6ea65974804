"""A bank of N adversarial sample generators run as one batched computation (Jung 2024, eq. 3).

Each generator is a small CNN φ_k: `depth` 3x3 convolutions of `width` channels with ReLUs between them.
The N generators are one stack of grouped convolutions (groups = N): the batch is split into N equal
parts, part k is stacked into channel group k, so a single conv call runs all N networks.

With grad_input, φ_k also sees g = ∇x CE(f(x), y) at unit RMS (channels C..2C of its input); with
grad_skip, ψ_k(x, g) = g + net_k(x, g): at initialisation the bank is the one-step gradient attack
(FGSM, L2 step along g under the l2 bound), and the networks learn a correction (no extra cost: one add).

The output ψ_k(x) is turned into an adversarial sample by the bound:
- "box"  (eq. 3):  g(x) = min(max(φ(x), x − s), x + s) with φ(x) = x + ψ(x) (residual) or ψ(x);
- "l2":            g(x) = x + s · ψ(x) / ‖ψ(x)‖₂  (spends the whole L2 budget s);
- "linf":          g(x) = x + s · tanh(ψ(x)).
and finally clipped to the image range [0, 1]. s is in pixel units (images in [0, 1]).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_field
from ..flags import option

BOUNDS = ("box", "l2", "linf")
ASSIGNMENTS = ("split", "random", "all")


@dataclass
class BankConfig:
    """Architecture and bound of the generator bank. Paper preset: n=32, bound='box', size=0.2."""

    n: int = option(32, "--generators", "number of generator networks N")
    bound: str = option("box", "--gen-bound-type", "box: eq. (3); l2: s*psi/||psi||_2; linf: s*tanh(psi)", choices=BOUNDS)
    size: float = option(0.2, "--gen-bound", "s: the bound size in [0, 1] pixel units (box half-width or the radius)")
    depth: int = option(3, "--gen-depth", "conv layers per generator")
    width: int = option(16, "--gen-width", "channels of the hidden layers")
    residual: bool = option(True, "--gen-residual", "phi(x) = x + psi(x) (true) or psi(x) (box bound only)")
    grad_input: bool = option(False, "--gen-grad-input", "phi also sees the input gradient (one more forward and "
                              "backward per step)")
    grad_skip: bool = option(False, "--gen-grad-skip", "with --gen-grad-input: psi = gradient + net, so the bank starts "
                             "as the FGSM step")
    memory_input: bool = False  # φ also sees the sample's previous perturbation (set from GeneratorOptions.memory)
    assign: str = option("split", "--gen-assign", "split: the batch cut in N parts; random: random parts; all: every "
                         "generator on every sample", choices=ASSIGNMENTS)

    def validate(self) -> None:
        check_field(self.n >= 1, "options.bank.n", f"must be >= 1, got {self.n}")
        check_field(self.bound in BOUNDS, "options.bank.bound", f"unknown: {self.bound!r}; choose from {', '.join(BOUNDS)}")
        check_field(math.isfinite(self.size) and self.size > 0, "options.bank.size", f"must be > 0, got {self.size}")
        check_field(self.depth >= 1, "options.bank.depth", f"must be >= 1, got {self.depth}")
        check_field(self.width >= 1, "options.bank.width", f"must be >= 1, got {self.width}")
        check_field(self.assign in ASSIGNMENTS, "options.bank.assign",
                    f"unknown: {self.assign!r}; choose from {', '.join(ASSIGNMENTS)}")
        check_field(not self.grad_skip or self.grad_input, "options.bank.grad_skip", "needs bank.grad_input")


class GeneratorBank(nn.Module):
    """N generators as grouped convolutions. forward(x (B,C,H,W) in [0,1], grad=None, memory=None) ->
    (x_adv, sample->generator)."""

    def __init__(self, cfg: BankConfig, channels: int = 3):
        super().__init__()
        cfg.validate()
        # a private copy: the training loop's warm-up changes self.cfg.size, not the run's config
        self.cfg, self.channels = dataclasses.replace(cfg), channels
        n, w = cfg.n, cfg.width
        cin = channels * (1 + cfg.grad_input + cfg.memory_input)   # [x, g, δ_prev / unit] along channels
        sizes = [cin] + [w] * (cfg.depth - 1) + [channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(n * a, n * b, 3, padding=1, groups=n) for a, b in zip(sizes[:-1], sizes[1:]))
        self.reset_generator(range(n))

    @torch.no_grad()
    def reset_generator(self, ks) -> None:
        """Re-draw the weights of generators ks (PyTorch's default conv init, per generator)."""
        for conv in self.convs:
            cout = conv.out_channels // self.cfg.n
            fresh = nn.Conv2d(conv.in_channels // self.cfg.n, cout, 3, padding=1).to(conv.weight)
            for k in ks:
                nn.init.kaiming_uniform_(fresh.weight, a=math.sqrt(5))
                bound = 1 / math.sqrt(fresh.weight[0].numel())
                nn.init.uniform_(fresh.bias, -bound, bound)
                conv.weight[k * cout:(k + 1) * cout] = fresh.weight
                conv.bias[k * cout:(k + 1) * cout] = fresh.bias

    def psi(self, inp: torch.Tensor) -> torch.Tensor:
        """Run all N networks on grouped input (M, N*cin, H, W) -> (M, N*C, H, W)."""
        for i, conv in enumerate(self.convs):
            inp = conv(inp)
            if i < len(self.convs) - 1:
                inp = F.relu(inp)
        return inp

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                perm: torch.Tensor | None = None, *,
                memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x_adv, k): k (B,) is the generator of each sample.

        grad (B,C,H,W): the input gradient at unit RMS (with grad_input); memory (B,C,H,W): each sample's
        previous perturbation δ_prev in pixel units, ‖δ_prev‖ ≤ s in the bound's norm (with memory_input;
        zeros for a sample never perturbed before).

        Sample j of the (optionally shuffled) batch goes to generator j mod N, slot j // N: the batch
        viewed as (ceil(B/N), N*C, H, W) is exactly the grouped-conv layout, with no copy when N | B.
        For assign='all', x_adv is (N*B, C, H, W), generator-major, and k says which generator.
        perm: the shuffle of assign='random' (B,), drawn from `generator` when not given (a caller that
        applies the bank several times passes one perm to keep each sample's generator).
        """
        n, c = self.cfg.n, self.channels
        if self.cfg.grad_input and grad is None:
            raise ValueError("this generator bank takes the input gradient: pass grad=")
        if self.cfg.memory_input and memory is None:
            raise ValueError("this generator bank takes each sample's previous perturbation: pass memory=")
        parts = [x] + ([grad] if self.cfg.grad_input else [])
        if self.cfg.memory_input:
            parts.append(memory / self.memory_unit(x))
        inp = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        b, cin, h, w = inp.shape
        if self.cfg.assign == "all":
            psi = self.psi(inp.repeat(1, n, 1, 1))               # (B, N*C, H, W)
            psi = psi.view(b, n, c, h, w).transpose(0, 1).reshape(n * b, c, h, w)
            if self.cfg.grad_skip:
                psi = psi + grad.repeat(n, 1, 1, 1)
            k = torch.arange(n, device=x.device).repeat_interleave(b)
            return self._bound(psi, x.repeat(n, 1, 1, 1)), k
        if self.cfg.assign != "random":
            perm = None
        elif perm is None:
            perm = torch.randperm(b, generator=generator)
        perm = perm.to(x.device) if perm is not None else None
        src = inp if perm is None else inp[perm]
        m = -(-b // n)
        if m * n > b:  # pad the last slot row; those outputs are dropped
            src = torch.cat([src, src.new_zeros(m * n - b, cin, h, w)])
        psi = self.psi(src.reshape(m, n * cin, h, w)).reshape(m * n, c, h, w)[:b]  # reshape: channels-last input
        if self.cfg.grad_skip:
            psi = psi + src[:b, c:2 * c]   # the gradient's channels (δ_prev's, if any, follow them)
        k = torch.arange(b, device=x.device) % n
        if perm is not None:
            inv = torch.argsort(perm)
            psi, k = psi[inv], k[inv]
        return self._bound(psi, x), k

    def memory_unit(self, x: torch.Tensor) -> float:
        """The size of a perturbation that fills the bound, per pixel: s (box, linf) or s / √D (l2)."""
        s = self.cfg.size
        return s / math.sqrt(x[0].numel()) if self.cfg.bound == "l2" else s

    def _bound(self, psi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.size
        if self.cfg.bound == "box":
            phi = x + psi if self.cfg.residual else psi
            adv = torch.minimum(torch.maximum(phi, x - s), x + s)
        elif self.cfg.bound == "l2":
            norm = psi.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            adv = x + s * psi / norm
        else:
            adv = x + s * torch.tanh(psi)
        return adv.clamp(0, 1)
