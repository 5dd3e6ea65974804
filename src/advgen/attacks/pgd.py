"""Projected gradient descent (Madry et al. 2018) with L2 and Linf threat models, and FGSM.

One loop serves every threat model; a norm contributes three hooks: `random_start` (a point drawn
uniformly in the eps-ball), `direction` (the steepest-ascent step of unit size for that norm) and
`project` (back onto the eps-ball). Pixels are in [0, 1]; eps and step sizes are in those units.

The loop ascends an `objective`, a per-sample loss of (logits, y) named in OBJECTIVES: the cross-entropy
(Madry et al.; the default), the margin loss (Carlini & Wagner 2017), or TRADES's KL divergence from
the clean prediction (Zhang et al. 2019), where y holds that prediction as probabilities.
"""
from __future__ import annotations

import contextlib
import math
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch.Generator seeded with `seed` on the device the random numbers are for, where it is a GPU
    (CUDA draws need no host work and no host-to-device copy, which would make the host wait for the
    GPU at every batch), else on the CPU (the draws are then moved with .to(x)). The CPU streams are
    those advgen always drew; on CUDA a seed gives other (equally distributed) draws than on the CPU."""
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of (B, ...) as (B, 1, 1, 1)-broadcastable."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class Linf:
    @staticmethod
    def random_start(shape, eps: float, g: torch.Generator) -> torch.Tensor:
        """Uniform in the cube [-eps, eps]^d, on g's device."""
        return (torch.rand(shape, generator=g, device=g.device) * 2 - 1) * eps

    @staticmethod
    def direction(grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    @staticmethod
    def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
        return delta.clamp(-eps, eps)


class L2:
    @staticmethod
    def random_start(shape, eps: float, g: torch.Generator) -> torch.Tensor:
        """Uniform in the L2 ball of radius eps (per row of `shape`), on g's device: on the CPU one draw
        per row (row i does not depend on the batch size), on a GPU one draw for the batch."""
        if g.device.type == "cpu":
            return L2.per_row_start(shape, eps, g)
        return L2.one_draw_start(shape, eps, g)

    @staticmethod
    def _in_ball(z: torch.Tensor, eps: float, shape) -> torch.Tensor:
        # uniform in the d-ball: the first d of d+2 i.i.d. normals, divided by the norm of all d+2
        # (Voelker et al. 2017)
        d = math.prod(shape[1:])
        return (eps * z[:, :d] / z.norm(dim=1, keepdim=True)).view(shape)

    @staticmethod
    def per_row_start(shape, eps: float, g: torch.Generator) -> torch.Tensor:
        """The CPU stream advgen always drew: each row from its own slice of the stream (torch's CPU
        normal kernel fills tensors of >= 16 values in blocks of 16 and redraws a ragged tail, so row 0
        of one (b, d + 2) draw would differ from a (1, d + 2) draw). b small draws: a Python loop, about
        1% of a CPU step (benchmarks/README.md), but b kernel launches on a GPU."""
        b, d = shape[0], math.prod(shape[1:])
        z = torch.stack([torch.randn(d + 2, generator=g, device=g.device) for _ in range(b)])
        return L2._in_ball(z, eps, shape)

    @staticmethod
    def one_draw_start(shape, eps: float, g: torch.Generator) -> torch.Tensor:
        """The same distribution in one (b, d + 2) draw on g's device (the GPU path)."""
        b, d = shape[0], math.prod(shape[1:])
        return L2._in_ball(torch.randn((b, d + 2), generator=g, device=g.device), eps, shape)

    @staticmethod
    def direction(grad: torch.Tensor) -> torch.Tensor:
        return grad / _flat_norm(grad).clamp_min(1e-12)

    @staticmethod
    def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
        return delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


NORMS = {"linf": Linf, "l2": L2}


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE(softmax(logits), y) per sample: logits (B, K), y (B,) int64 labels -> (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def kl_from(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) = Σ_k p_k (log p_k − log q_k) per sample, in nats: logits (B, K), p (B, K)
    probabilities (rows sum to 1) -> (B,). TRADES's inner objective (Zhang et al. 2019, eq. 5), with p
    the model's prediction on the clean image."""
    return F.kl_div(F.log_softmax(logits, dim=1), p, reduction="none").sum(dim=1)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{k≠y} z_k − z_y per sample, in logits: (B, K), y (B,) -> (B,); positive iff the sample is
    misclassified. The margin loss of Carlini & Wagner (2017, their f_6 with κ = ∞): unlike the
    cross-entropy it does not saturate once the true class's probability is near 1, so on robust
    models it finds adversarial samples the cross-entropy's vanishing gradient misses."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), -math.inf).amax(dim=1)
    return other - true


# what PGD ascends: name -> per-sample loss(logits, y); for "kl", y is a (B, K) distribution
OBJECTIVES = {"ce": cross_entropy, "margin": margin, "kl": kl_from}


@contextlib.contextmanager
def eval_mode(model: nn.Module, freeze: bool = True):
    """Put every module in eval mode and (freeze) its parameters out of the graph; restore both on exit.
    freeze=False: a pass whose result is itself differentiated in the parameters (GradAlign's regulariser)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(p.requires_grad and not freeze)  # frozen: the backward computes input gradients only
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


class PGD:
    """PGD attack: `PGD(model, norm="l2", eps=0.5, steps=20, rel_step=0.25)(x, y) -> x_adv`.

    Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks".
    Maximises the objective (default the cross-entropy) of model(x + δ) over ‖δ‖ ≤ eps (descends it
    towards `y` if targeted),
    with x + δ clipped to [0, 1] at every iterate. keep="worst" (evaluation): each sample keeps its worst
    case, the first iterate that fools the model, else the iterate of highest loss, over all steps and
    restarts. keep="last" (adversarial training, as Madry et al.): every step is taken and the final
    iterate is returned (of the last restart): a sample fooled early is still pushed further, so the
    classifier trains on full-strength perturbations.

    Args (keyword-only): norm "l2" | "linf"; eps radius in [0, 1] pixel units; steps ≥ 1;
    step_size absolute, or rel_step × eps (default 2.5 / steps, Madry's choice); random_start;
    restarts ≥ 1; targeted (then y holds the target classes); keep "worst" | "last"; seed for the
    random starts; objective "ce" | "margin" | "kl" (OBJECTIVES; "kl" takes y as (B, K) probabilities
    and needs keep="last", untargeted: without labels no sample counts as fooled), or a tuple of names:
    restart r ascends objective[r % len] (e.g. ("ce", "margin"): the margin restarts find what the
    cross-entropy's saturated gradient misses), while a sample never fooled keeps the iterate ranked
    highest by the first; start_std: the random start drawn from N(0, start_std²) per pixel instead of
    uniformly in the ball (TRADES: 0.001), then clipped to [0, 1] (needs random_start).
    x: (B, C, H, W) float in [0, 1]; y: (B,) int64 (or (B, K) for "kl"). The model runs in eval mode;
    its mode, its parameters' .grad and x are left as they were.
    """

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255, steps: int = 10,
                 step_size: float | None = None, rel_step: float | None = None,
                 random_start: bool = True, restarts: int = 1, targeted: bool = False, keep: str = "worst",
                 seed: int = 0, objective: str = "ce", start_std: float | None = None):
        check(norm in NORMS, f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
        check(math.isfinite(eps) and eps >= 0, f"eps must be a finite number >= 0, got {eps}")
        check(steps >= 1, f"steps must be >= 1, got {steps}")
        check(restarts >= 1, f"restarts must be >= 1, got {restarts}")
        check(keep in ("worst", "last"), f"keep must be worst or last, got {keep!r}")
        check(step_size is None or rel_step is None, "give step_size or rel_step, not both")
        for name, v in (("step size", step_size), ("relative step", rel_step), ("start_std", start_std)):
            check(v is None or (math.isfinite(v) and v > 0), f"{name} must be > 0, got {v}")
        objectives = (objective,) if isinstance(objective, str) else tuple(objective)
        check(len(objectives) >= 1, "objective needs at least one name")
        for o in objectives:
            check(o in OBJECTIVES, f"unknown objective {o!r}; choose from {', '.join(OBJECTIVES)}")
        check("kl" not in objectives or (objectives == ("kl",) and keep == "last" and not targeted),
              "objective 'kl' needs keep='last', an untargeted attack and no other objective")
        check(start_std is None or random_start, "start_std needs random_start")
        self.model, self.norm, self.eps, self.steps = model, norm, float(eps), steps
        self.step_size, self.rel_step = step_size, rel_step
        self.random_start, self.restarts, self.targeted, self.seed = random_start, restarts, targeted, seed
        self.keep, self.start_std, self.objectives = keep, start_std, objectives

    def settings(self) -> dict:
        """The attack's settings as plain values (for results files)."""
        return {"norm": self.norm, "eps": self.eps, "steps": self.steps, "step_size": self.alpha,
                "random_start": self.random_start, "restarts": self.restarts, "targeted": self.targeted,
                "keep": self.keep, "start_std": self.start_std,
                "objective": self.objectives[0] if len(self.objectives) == 1 else list(self.objectives)}

    def _objective(self, restart: int):
        """The per-sample loss restart r ascends."""
        return OBJECTIVES[self.objectives[restart % len(self.objectives)]]

    @property
    def alpha(self) -> float:
        """The absolute step size."""
        if self.step_size is not None:
            return self.step_size
        return (self.rel_step if self.rel_step is not None else 2.5 / self.steps) * self.eps

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.clone()
        ops = NORMS[self.norm]
        with eval_mode(self.model), torch.enable_grad():  # input gradients even if called under no_grad
            best = x.clone()
            best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
            best_hit = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for r in range(self.restarts):
                best, best_loss, best_hit = self._run(ops, x, y, r, best, best_loss, best_hit)
                if best_hit.all() and self.keep == "worst":
                    break
        return best

    def _run(self, ops, x, y, restart, best, best_loss, best_hit):
        """One restart -> (best, best_loss, best_hit), updated for the samples not yet fooled.

        The bookkeeping uses torch.where rather than masked writes (best[better] = ...): most samples
        improve at most steps, and the where is ~1.5x cheaper than gather + scatter of them
        (benchmarks/README.md)."""
        sign = -1.0 if self.targeted else 1.0
        if self.random_start:   # drawn on the GPU where x is on one (generator())
            g = generator(self.seed * 7919 + restart, x.device)
            if self.start_std is None:
                delta = ops.random_start(x.shape, self.eps, g).to(x)
            else:
                delta = (self.start_std * torch.randn(x.shape, generator=g, device=g.device)).to(x)
            delta = (x + delta).clamp(0, 1) - x
        else:
            delta = torch.zeros_like(x)
        alpha, ascend, rank = self.alpha, self._objective(restart), self._objective(0)
        if self.keep == "last":
            for _ in range(self.steps):
                delta = self._step(ops, x, y, delta, sign, alpha, ascend)
            return (x + delta).detach(), best_loss, best_hit
        for t in range(self.steps + 1):
            delta.requires_grad_(True)
            logits = self.model(x + delta)
            loss = ascend(logits, y)
            with torch.no_grad():
                hit = (logits.argmax(1) == y) if self.targeted else (logits.argmax(1) != y)
                score = loss if rank is ascend else rank(logits, y)   # one scale over all restarts
                better = ~best_hit & (hit | (sign * score > best_loss))
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x + delta, best)
                best_loss = torch.where(better, sign * score, best_loss)
                best_hit = best_hit | (hit & better)
            if t == self.steps or best_hit.all():
                return best, best_loss, best_hit
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                delta = ops.project(delta.detach() + sign * alpha * ops.direction(grad), self.eps)
                delta = (x + delta).clamp(0, 1) - x

    def _step(self, ops, x, y, delta, sign, alpha, ascend):
        """One ascent step of the loss `ascend` from delta (keep="last": no bookkeeping, no early stop)."""
        delta.requires_grad_(True)
        loss = ascend(self.model(x + delta), y).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = ops.project(delta.detach() + sign * alpha * ops.direction(grad), self.eps)
            return (x + delta).clamp(0, 1) - x


def FGSM(model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255, random_start: bool = False,
         rel_step: float | None = None, keep: str = "worst", seed: int = 0) -> PGD:
    """Fast gradient (sign) method, Goodfellow et al. 2015: one step of size eps (L2: along the normalised
    gradient). With random_start and rel_step=1.25 it is the FGSM-RS of Wong et al. 2020."""
    if rel_step is None:
        rel_step = 1.25 if random_start else 1.0
    return PGD(model, norm=norm, eps=eps, steps=1, rel_step=rel_step, random_start=random_start, keep=keep,
               seed=seed)
