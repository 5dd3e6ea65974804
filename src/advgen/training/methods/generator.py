"""Adversarial training with a bank of generator networks (Jung 2024, eq. 2-5).

Every step: x_adv = g_ω(x) from the bank, one forward of the classifier on it, one backward of
L = CE(f(x_adv), y). The classifier's optimizer descends L (θ' = θ − η ∂L/∂θ); the bank's optimizer
is built with maximize=True, so the same gradients make it ascend L (ω' = ω + η ∂L/∂ω). Both come
from ONE forward and ONE backward pass.

Variants beyond the paper (GeneratorOptions): the bound shaped by the threat model, Adam, several
ascent steps, a random assignment of samples to generators, re-drawing the weakest generator, an input
gradient as a second input of φ (one extra forward and backward, the cost of FGSM), clean samples in
each batch, a warm-up of the bound s; and variants that do what one gradient step cannot: recursions,
a gradient step after the bank (step_after), and memory across epochs (memory).

Memory across epochs (memory=True). The method keeps each training sample's last adversarial
perturbation δ_i = x_adv,i − x_i (pixel units) in a buffer M (N_train, C, H, W) on the classifier's
device, zeros at the start, in the dataset's frame: a batch reads its rows into its own crop and flip
(data.Where.gather; pixels the crop takes from the padding read 0) and writes the new δ back
un-cropped and un-flipped (Where.scatter_), so a perturbation stays on the pixels it was made for. A
row holds one visit's δ: the pixels that visit's crop cut off are set to 0, not kept from an earlier
visit (two visits' parts together could exceed the L2 bound), so every stored and every read δ_prev is
within the bound s. The bank sees δ_prev as C more input channels, φ_k(x, [∇L,] δ_prev)
(models/generators.py, in units of the bound): the prior-guided initialisation of FGSM-PGI (Jia et al.
2022) and the accumulated perturbations of ATTA (Zheng et al. 2020), with a network deciding how to use
them. The intended strong variant is memory + options.bank.grad_input + step_after:

    x1 = φ(x, ∇L(x), δ_prev),   x_adv = clip(x + P_s(x1 + α·d(∇L(x1)) − x)),   δ = x_adv − x stored

with d the norm's unit ascent direction (g/‖g‖₂ for l2, sign g for box and linf), α = step_size
(default s), P_s the projection onto the s-ball, clip to [0, 1]; 3 passes per step. step_project=False
drops P_s after the step, as N-FGSM drops its clip (de Jorge et al. 2022): the training perturbation
reaches s + α, while the bank's own output stays in the s-ball (the threat model the run is watched and
evaluated at); not with memory, whose stored δ must lie in the bound.
- dtype: float16, half of float32's memory: 50,000 CIFAR-10 images take 50,000·3·32·32·2 B ≈ 307 MB,
  10,000 about 61 MB. Its rounding (relative 2⁻¹¹: under 10⁻⁴ in pixel units for |δ| ≤ 0.2) is far
  below the 1/255 step of an 8-bit image; a stored δ meets the bound s up to that rounding.
- gradient flow: δ_prev is a constant input (the buffer never holds a graph: δ is detached before it is
  stored); the bank's ascent gradient flows through its output x1 alone, as without memory (the step's
  direction is a constant too). The bank is not credited with what its δ does at the sample's next
  visit: no back-propagation across epochs.
- the first visit of every sample reads zeros; a sample is read again one epoch later.
- resume: the buffer is part of state_dict(), so a killed and resumed run is bit-identical.
- torchrun: every rank holds the whole buffer. After each step the ranks all-gather the rows they
  wrote (two all-gathers: the dataset indices, and the rows as B·C·H·W float16 values in the dataset
  frame), so the buffers stay identical on every rank: a sample trained by rank 1 in one epoch may fall
  to rank 0 in the next, and reads the δ rank 1 made. The buffer is saved once, in rank 0's method
  state (the other ranks store None: their copy is the same), and a resume hands rank 0's copy to every
  rank (Dist.share), so the state file holds one buffer whatever the world size.

The control without the network (start="memory", with memory and step_after):

    x0 = clip(x + δ_prev),   x_adv = clip(x + P_s(x0 + α·d(∇L(x0)) − x)),   δ = x_adv − x stored

each sample's previous perturbation is the start of one gradient step: FGSM-PGI's prior-guided
initialisation without its gradient momentum and its regulariser, and with zeros on the first visit
(FGSM-PGI starts its first epoch from random noise). Everything else is the generator method's own
(bound, step, input gradient, buffer, DDP, state); the bank is not built and its settings (n, width,
depth, assign, optimizer, lr) are unused, so comparing it with memory + step_after tells what the
network adds over the memory itself. 2 passes per step (1 gradient + the training pass).

Names: the method is GeneratorMethod ("generator"), its options GeneratorOptions, the networks a
GeneratorBank configured by a BankConfig, the RNG that assigns samples to generators `assign_rng`,
the buffer of previous perturbations `memory`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...attacks.pgd import NORMS, eval_mode
from ...data import Where, to_device
from ...errors import UserError, check_field
from ...flags import option
from ...models.generators import BankConfig, GeneratorBank
from ..method import Method, register

STARTS = ("bank", "memory")     # where x_adv comes from: the bank, or (the control) the previous perturbation
MEMORY_DTYPE = torch.float16    # of the buffer of previous perturbations (half of float32's bytes)


@dataclass
class GeneratorOptions:
    """How the generator bank is trained (eq. 5) and the variants beyond the paper."""

    bank: BankConfig = field(default_factory=BankConfig)
    optimizer: str = option("sgd", "--gen-optimizer", "the generators' optimizer", choices=("sgd", "adam"))
    lr: float = option(0.005, "--gen-lr", "the generators' learning rate (paper: SGD 0.005)")
    momentum: float = option(0.0, "--gen-momentum", "SGD momentum of the generators")
    steps: int = option(1, "--gen-steps", "generator ascent steps per classifier step (more cost passes)")
    clean_fraction: float = option(0.0, "--clean-fraction", "share of each batch left clean (eq. 2 uses 0)")
    warmup_epochs: float = option(0.0, "--gen-warmup", "epochs of linear warm-up of the bound size s from 0")
    reinit_every: int = option(0, "--gen-reinit-every", "every this many steps, re-draw the weakest generator (0: never)")
    # variants that do what one gradient step cannot (each costs one more gradient evaluation):
    recursions: int = option(1, "--gen-recursions", "K: apply the bank K times, each on its own output and the "
                             "gradient there (needs --gen-grad-input; K gradient evaluations; Jang et al. 2019)")
    step_after: bool = option(False, "--gen-step-after", "a gradient step from the bank's output, projected onto the "
                              "bound: the bank learns the start of the step (FGSM-SDI, Jia et al. 2022; one more gradient)")
    step_size: float | None = option(None, "--gen-step-size", "size of that step in pixel units (default: the bound s)")
    step_project: bool = option(True, "--gen-step-project", "project the stepped sample onto the bound s; off: "
                                "only clip to [0, 1], so the perturbation reaches s + step (N-FGSM's choice, de "
                                "Jorge et al. 2022)")
    memory: bool = option(False, "--gen-memory", "keep each sample's last perturbation (float16 on the device, about "
                          "6 KB per CIFAR image) and show it to the bank (FGSM-PGI style; no extra pass)")
    start: str = option("bank", "--gen-start", "memory: the control without the network, one gradient step from "
                        "each sample's previous perturbation (needs --gen-memory, --gen-step-after)", choices=STARTS)

    def validate(self) -> None:
        self.bank.validate()
        check_field(self.optimizer in ("sgd", "adam"), "options.optimizer", f"must be sgd or adam, got {self.optimizer!r}")
        check_field(math.isfinite(self.lr) and self.lr > 0, "options.lr", f"must be > 0, got {self.lr}")
        check_field(0 <= self.momentum < 1, "options.momentum", f"must lie in [0, 1), got {self.momentum}")
        check_field(self.steps >= 1, "options.steps", f"must be >= 1, got {self.steps}")
        check_field(0 <= self.clean_fraction < 1, "options.clean_fraction",
                    f"must lie in [0, 1), got {self.clean_fraction}")
        check_field(self.warmup_epochs >= 0, "options.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check_field(self.reinit_every >= 0, "options.reinit_every", f"must be >= 0, got {self.reinit_every}")
        check_field(self.recursions >= 1, "options.recursions", f"must be >= 1, got {self.recursions}")
        check_field(self.recursions == 1 or self.bank.grad_input, "options.recursions",
                    "above 1 needs options.bank.grad_input (each application sees the gradient at its input)")
        check_field(self.step_size is None or (math.isfinite(self.step_size) and self.step_size > 0),
                    "options.step_size", f"must be > 0, got {self.step_size}")
        check_field(self.step_project or self.step_after, "options.step_project",
                    "off needs options.step_after (it is the step that is not projected)")
        check_field(self.step_project or not self.memory, "options.step_project",
                    "off cannot be combined with options.memory (the stored perturbations must lie in the bound)")
        check_field(self.bank.assign != "all" or (self.recursions == 1 and not self.step_after),
                    "options.bank.assign", "all cannot be combined with recursions or step_after")
        check_field(self.bank.assign != "all" or not self.memory, "options.memory",
                    "cannot be combined with options.bank.assign all (N perturbations of each sample, one buffer row)")
        check_field(not self.bank.memory_input or self.memory, "options.bank.memory_input",
                    "needs options.memory (the method keeps the perturbations the bank reads; "
                    "options.memory alone sets it)")
        check_field(self.start in STARTS, "options.start", f"unknown: {self.start!r}; choose from {', '.join(STARTS)}")
        if self.start == "memory":   # the control: no bank, one step from the previous perturbation
            check_field(self.memory and self.step_after, "options.start",
                        "memory needs options.memory and options.step_after (x0 = x + δ_prev, then the step)")
            for name, unused in (("steps", self.steps != 1), ("recursions", self.recursions != 1),
                                 ("reinit_every", self.reinit_every != 0),
                                 ("warmup_epochs", self.warmup_epochs != 0)):
                check_field(not unused, f"options.{name}", "acts on the bank, which start memory does not build")
            check_field(not self.bank.grad_input, "options.bank.grad_input",
                        "feeds the bank, which start memory does not build (it would cost a pass for nothing)")

    @property
    def passes(self) -> int:
        """Forward-backward passes of the classifier per training step (gradient evaluations + the
        training pass); one extra forward and backward per extra ascent step."""
        grads = self.recursions * self.bank.grad_input + self.step_after
        return (1 + grads) * self.steps


GENERATOR_PRESETS = ("paper", "gradient")


def generator_preset(name: str) -> GeneratorOptions:
    """Named generator settings. "paper": Jung 2024 as published (32 generators, box bound s = 0.2, SGD
    0.005). "gradient": advgen's recommendation from its equal-time comparison (docs/results.md): the generators
    also see the input gradient and start as the FGSM-L2 step they learn to correct (grad_skip), with
    the L2 bound at the evaluation's eps (0.5) and Adam 1e-3; one more forward and backward per step."""
    if name == "paper":
        return GeneratorOptions(bank=BankConfig(n=32, bound="box", size=0.2), optimizer="sgd", lr=0.005)
    if name == "gradient":
        return GeneratorOptions(bank=BankConfig(n=32, bound="l2", size=0.5, grad_input=True, grad_skip=True),
                                optimizer="adam", lr=1e-3)
    raise UserError(f"unknown generator preset {name!r}; choose from {', '.join(GENERATOR_PRESETS)}")


@register("generator", GeneratorOptions, "a bank of generator networks trained by gradient ascent (Jung 2024)")
class GeneratorMethod(Method):
    def __init__(self, model, options: GeneratorOptions, setup):
        super().__init__(model, options, setup)
        g = options
        self.warmup_steps = g.warmup_epochs * setup.steps_per_epoch
        self.step_count = 0
        self.assign_rng = torch.Generator().manual_seed(setup.seed + 17)
        # (N_train, C, H, W) float16, made at the first step (the image size comes with the batch)
        self.memory: torch.Tensor | None = None
        self.bank = self.opt = None
        if g.start == "memory":   # the control: no network
            return
        # the bank keeps a copy of its config: the warm-up ramps only the bank's own s
        self.bank = GeneratorBank(dataclasses.replace(g.bank, memory_input=g.memory),
                                  channels=setup.in_channels).to(setup.device)
        if setup.channels_last:
            self.bank.to(memory_format=torch.channels_last)  # grouped convs ~0.7x the time in NHWC on the CPU
        setup.dist.broadcast_module(self.bank)   # one bank: rank 0's initial weights on every rank
        params = self.bank.parameters()
        if g.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=g.lr, maximize=True)
        else:
            self.opt = torch.optim.SGD(params, lr=g.lr, momentum=g.momentum, maximize=True)
        self.gen_loss = torch.zeros(g.bank.n, device=setup.device)   # per-generator loss since the last re-draw
        self.gen_seen = torch.zeros(g.bank.n, device=setup.device)

    def modules(self):
        return {} if self.bank is None else {"generators": self.bank}

    @property
    def passes(self) -> int:
        return self.options.passes

    @property
    def per_sample(self) -> bool:
        return self.options.memory

    def state_dict(self) -> dict:
        state = {"step_count": self.step_count, "assign_rng": self.assign_rng.get_state()}
        if self.bank is not None:
            state.update(bank=self.bank.state_dict(), opt=self.opt.state_dict(), gen_loss=self.gen_loss,
                         gen_seen=self.gen_seen)
        if self.options.memory:   # once, in rank 0's state: every rank holds the same buffer
            state["memory"] = self.memory if self.setup.dist.main else None
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.assign_rng.set_state(state["assign_rng"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
            self.opt.load_state_dict(state["opt"])
            self.gen_loss.copy_(state["gen_loss"])
            self.gen_seen.copy_(state["gen_seen"])
        if self.options.memory:
            memory = self.setup.dist.share(lambda: state["memory"])   # rank 0's buffer, on every rank
            self.memory = None if memory is None else memory.to(self.setup.device, MEMORY_DTYPE, copy=True)

    def _input_grad(self, x, y):
        """∇x CE(f(x), y), scaled to unit RMS per sample (the extra input of gradient-informed φ).

        One forward and one input-only backward, as FGSM's: the classifier runs in eval mode with its
        parameters frozen (as in the PGD/FGSM attacks), so no parameter gradients are computed and the
        BatchNorm running statistics are not moved by this extra pass.
        """
        with self.setup.attack_passes():   # fp32 under fp16 autocast (Setup.attack_passes)
            x = x.detach().float().requires_grad_(True)
            with eval_mode(self.model):
                (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x), y, reduction="sum"), x)
        rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
        return grad / rms.view(-1, 1, 1, 1)

    # ------------------------------------------------------------------------ memory across epochs
    def _buffer(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer M (N_train, C, H, W) float16, zeros until a sample is first perturbed."""
        if self.memory is None:
            n = self.setup.train_size
            if n < 1:
                raise ValueError("options.memory keeps a row per training image: Setup.train_size must be set")
            self.memory = torch.zeros((n, *x.shape[1:]), dtype=MEMORY_DTYPE, device=self.setup.device)
        return self.memory

    def _recall(self, where: Where, x: torch.Tensor) -> torch.Tensor:
        """δ_prev of the batch's rows in its augmented frame: (B, C, H, W) in x's dtype and layout."""
        return where.gather(self._buffer(x)).to(x.dtype).contiguous(memory_format=self.setup.memory_format)

    def _remember(self, where: Where, delta: torch.Tensor) -> None:
        """Store δ (B, C, H, W) in the batch's frame as the whole of the rows `where` names (pixels this
        crop cut off become 0: kept from an earlier visit, they would add to this δ and could leave the
        L2 ball); under torchrun every rank then receives every other rank's rows, so the buffers stay
        identical."""
        store = self._buffer(delta)
        store.index_fill_(0, where.idx, 0)
        where.scatter_(store, delta.detach())   # no graph into the buffer: δ_prev is a constant next time
        dist = self.setup.dist
        if dist.active:
            store[dist.all_gather_rows(where.idx)] = dist.all_gather_rows(store[where.idx])

    # ------------------------------------------------------------------------ the adversarial sample
    def _generate(self, x, y, prev=None):
        """-> (x_adv, labels, k): the bank's sample (K recursions, then the optional gradient step);
        prev (B, C, H, W): each sample's previous perturbation (with memory), the control's start."""
        g, bank = self.options, self.options.bank
        norm = NORMS["linf" if bank.bound in ("box", "linf") else "l2"]
        if g.start == "memory":   # the control: the previous perturbation is where the step starts
            x_cur, k = (x + prev).clamp(0, 1), torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        else:
            # one assignment of samples to generators for every recursion
            # drawn on the host (the stream every device shares, resumed with the method's state) and
            # moved without a host sync
            perm = (to_device(torch.randperm(x.shape[0], generator=self.assign_rng), x.device)
                    if bank.assign == "random" else None)
            x_cur = x
            for _ in range(g.recursions):
                grad = self._input_grad(x_cur, y) if bank.grad_input else None
                x_cur, k = self.bank(x_cur, grad, perm=perm, memory=prev)
                if g.recursions > 1:
                    x_cur = (x + norm.project(x_cur - x, bank.size)).clamp(0, 1)
        if g.step_after:
            # the step's direction is a constant of the bank's ascent (first order, as FGSM-SDI): the
            # bank's gradient flows through x_cur alone
            d = norm.direction(self._input_grad(x_cur, y))
            step = bank.size if g.step_size is None else g.step_size
            delta = x_cur + step * d - x
            x_cur = (x + (norm.project(delta, bank.size) if g.step_project else delta)).clamp(0, 1)
        if bank.assign == "all":
            y = y.repeat(bank.n)
        return x_cur, y, k

    def loss(self, x, y, where: Where | None = None):
        """where: the batch's dataset indices and augmentation (data.Where), needed with memory."""
        g = self.options
        if g.memory and where is None:
            raise ValueError("options.memory keeps state per training sample: call loss(x, y, where=Where) "
                             "(the training loop does, as per_sample is True)")
        prev = self._recall(where, x) if g.memory else None
        if self.warmup_steps:
            self.bank.cfg.size = g.bank.size * min(1.0, (self.step_count + 1) / self.warmup_steps)
        for _ in range(g.steps - 1):  # extra ascent steps on the generators alone
            x_adv, ya, _ = self._generate(x, y, prev)
            loss = F.cross_entropy(self.model(x_adv), ya)
            self.opt.zero_grad(set_to_none=True)
            # through the GradScaler under fp16, as the step's own ascent: scaled so that the fp16
            # gradients do not underflow, unscaled and skipped on inf or NaN by the scaler's step
            grads = torch.autograd.grad(self.setup.scale(loss), list(self.bank.parameters()))
            for p, gr in zip(self.bank.parameters(), grads):
                p.grad = gr
            self.setup.dist.average_grads(self.bank.parameters())
            self.setup.step(self.opt, update=True)
        n_clean = int(round(g.clean_fraction * x.shape[0]))
        x_adv, ya, k = self._generate(x[n_clean:], y[n_clean:], None if prev is None else prev[n_clean:])
        if g.memory:   # the clean rows keep what they held
            self._remember(where[n_clean:], x_adv - x[n_clean:])
        inputs = torch.cat([x[:n_clean], x_adv]) if n_clean else x_adv
        labels = torch.cat([y[:n_clean], ya]) if n_clean else ya
        logits = self.train_model(inputs)
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        if g.reinit_every:
            with torch.no_grad():
                adv_loss = per_sample[n_clean:]
                self.gen_loss.index_add_(0, k, adv_loss)
                self.gen_seen.index_add_(0, k, torch.ones_like(adv_loss))
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        return per_sample.mean(), logits, labels

    def after_step(self):
        """Called after the joint backward: the generators' ascent step (and an occasional re-draw)."""
        self.step_count += 1
        if self.bank is None:   # the control has nothing to ascend
            return
        dist = self.setup.dist
        dist.average_grads(self.bank.parameters())   # under torchrun: the ascent on the whole global batch
        self.setup.step(self.opt)
        if self.options.reinit_every and self.step_count % self.options.reinit_every == 0:
            loss, seen = self.gen_loss.clone(), self.gen_seen.clone()
            dist.sum_(loss, seen)   # the weakest over every rank's samples
            weakest = int(torch.argmin(loss / seen.clamp_min(1)))
            self.bank.reset_generator([weakest])
            dist.broadcast_module(self.bank)   # rank 0's re-drawn weights
            for p in self.bank.parameters():  # forget that generator's optimizer history with the rest
                self.opt.state.pop(p, None)
            self.gen_loss.zero_()
            self.gen_seen.zero_()
