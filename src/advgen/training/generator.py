"""Adversarial training with a bank of generator networks (Jung 2024, eq. 2-5).

Every step: x_adv = g_ω(x) from the bank, one forward of the classifier on it, one backward of
L = CE(f(x_adv), y). The classifier's optimizer descends L (θ' = θ − η ∂L/∂θ); the generators'
optimizer is built with maximize=True, so the same gradients make it ascend L (ω' = ω + η ∂L/∂ω).
Both come from ONE forward and ONE backward pass.

Variants beyond the paper (GeneratorTraining): the bound shaped by the threat model, Adam, several
ascent steps, a random assignment of samples to generators, re-drawing the weakest generator, an input
gradient as a second input of φ (one extra forward and backward, the cost of FGSM), clean samples in
each batch, a warm-up of the bound s.
"""
import torch
import torch.nn.functional as F

from ..attacks.pgd import eval_mode
from ..models.generators import GeneratorBank


class Generator:
    def __init__(self, model, cfg, steps_per_epoch: int):
        g = cfg.generator
        self.model, self.cfg = model, g
        first = next(model.parameters())
        dev = first.device
        self.bank = GeneratorBank(g.bank).to(dev)  # the bank copies its config: the warm-up ramps only its own s
        # follow the classifier's layout as training decided it (cfg.channels_last is None under "auto")
        if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
            self.bank.to(memory_format=torch.channels_last)  # grouped convs ~0.7x the time in NHWC on the CPU
        params = self.bank.parameters()
        if g.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=g.lr, maximize=True)
        else:
            self.opt = torch.optim.SGD(params, lr=g.lr, momentum=g.momentum, maximize=True)
        self.size = g.bank.size
        self.warmup_steps = g.warmup_epochs * steps_per_epoch
        self.step_count = 0
        self.rng = torch.Generator().manual_seed(cfg.seed + 17)
        self.gen_loss = torch.zeros(g.bank.n, device=dev)   # per-generator loss since the last re-draw
        self.gen_seen = torch.zeros(g.bank.n, device=dev)

    def _input_grad(self, x, y):
        """∇x CE(f(x), y), scaled to unit RMS per sample (the extra input of gradient-informed φ).

        One forward and one input-only backward, as FGSM's: the classifier runs in eval mode with its
        parameters frozen (as in the PGD/FGSM attacks), so no parameter gradients are computed and the
        BatchNorm running statistics are not moved by this extra pass.
        """
        x = x.detach().requires_grad_(True)
        with eval_mode(self.model):
            (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x), y, reduction="sum"), x)
        rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
        return grad / rms.view(-1, 1, 1, 1)

    def _generate(self, x, y):
        grad = self._input_grad(x, y) if self.cfg.bank.grad_input else None
        x_adv, k = self.bank(x, grad, generator=self.rng)
        if self.cfg.bank.assign == "all":
            y = y.repeat(self.cfg.bank.n)
        return x_adv, y, k

    def loss(self, x, y):
        if self.warmup_steps:
            self.bank.cfg.size = self.size * min(1.0, (self.step_count + 1) / self.warmup_steps)
        for _ in range(self.cfg.steps - 1):  # extra ascent steps on the generators alone
            x_adv, ya, _ = self._generate(x, y)
            loss = F.cross_entropy(self.model(x_adv), ya)
            self.opt.zero_grad(set_to_none=True)
            grads = torch.autograd.grad(loss, list(self.bank.parameters()))
            for p, gr in zip(self.bank.parameters(), grads):
                p.grad = gr
            self.opt.step()
        n_clean = int(round(self.cfg.clean_fraction * x.shape[0]))
        x_adv, ya, k = self._generate(x[n_clean:], y[n_clean:])
        inputs = torch.cat([x[:n_clean], x_adv]) if n_clean else x_adv
        labels = torch.cat([y[:n_clean], ya]) if n_clean else ya
        logits = self.model(inputs)
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        if self.cfg.reinit_every:
            with torch.no_grad():
                adv_loss = per_sample[n_clean:]
                self.gen_loss.index_add_(0, k, adv_loss)
                self.gen_seen.index_add_(0, k, torch.ones_like(adv_loss))
        self.opt.zero_grad(set_to_none=True)
        return per_sample.mean(), logits, labels

    def after_step(self):
        """Called after the joint backward: the generators' ascent step (and an occasional re-draw)."""
        self.opt.step()
        self.step_count += 1
        if self.cfg.reinit_every and self.step_count % self.cfg.reinit_every == 0:
            weakest = int(torch.argmin(self.gen_loss / self.gen_seen.clamp_min(1)))
            self.bank.reset_generator([weakest])
            for p in self.bank.parameters():  # forget that generator's optimizer history with the rest
                self.opt.state.pop(p, None)
            self.gen_loss.zero_()
            self.gen_seen.zero_()
