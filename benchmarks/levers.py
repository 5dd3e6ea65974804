"""Interleaved A/B timings of single speed levers (the table in benchmarks/README.md).

Each lever is a pair of callables: A (the baseline) and B (the candidate) doing the same work. They run
A B A B ... in this one process on one thread, and the lever's figure is the median over pairs of
time(B) / time(A): below 1 the candidate is faster. Interleaving and per-pair ratios cancel most of the
drift of a shared, busy machine; absolute times are printed too but mean little there.

  PYTHONPATH=src python benchmarks/levers.py [LEVER ...] [--pairs 11] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advgen.attacks.pgd import PGD, L2, eval_mode
from advgen.data import augment
from advgen.models import build_model
from advgen.models.generators import GeneratorBank, BankConfig
from advgen.models.folding import BNFolder, inference_copy

B = 128


def interleaved(a, b, pairs: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        a()
        b()
    ta, tb, ratios = [], [], []
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)   # alternate who goes first
        t = {}
        for f in order:  # a callable may return its own seconds (the training steps of an epoch)
            t0 = time.perf_counter()
            out = f()
            t[f] = out if isinstance(out, float) else time.perf_counter() - t0
        ta.append(t[a])
        tb.append(t[b])
        ratios.append(t[b] / t[a])
    return {"ratio": statistics.median(ratios), "n": pairs, "a_ms": 1e3 * statistics.median(ta),
            "b_ms": 1e3 * statistics.median(tb), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def batch(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_step_pair(a_kwargs: dict, b_kwargs: dict):
    def make(channels_last=False, foreach=None, amp=False):
        torch.manual_seed(0)
        model = build_model("resnet20").train()
        x, y = batch()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True,
                              foreach=foreach)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    return make(**a_kwargs), make(**b_kwargs)


def lever_train_channels_last():
    return train_step_pair({}, {"channels_last": True})


def lever_train_sgd_foreach():
    return train_step_pair({"foreach": False}, {"foreach": True})


def lever_train_amp_bf16():
    return train_step_pair({}, {"amp": True})


def _minmax_pair(steps: int, folded_channels_last: bool):
    torch.manual_seed(0)
    model = build_model("resnet20").train()
    x, y = batch()
    # running statistics away from their init, as in training
    with torch.no_grad():
        model(x)
    plain = PGD(model, norm="l2", eps=0.5, steps=steps, rel_step=2.5 / steps, seed=1)
    folder = BNFolder(model, channels_last=folded_channels_last)
    xf = x.contiguous(memory_format=torch.channels_last) if folded_channels_last else x

    def a():
        plain(x, y)

    def b():  # per batch: refresh the folded copy from the live weights, then attack it
        PGD(folder.refresh(), norm="l2", eps=0.5, steps=steps, rel_step=2.5 / steps, seed=1)(xf, y)
    return a, b


def lever_minmax_fold_pgd10():
    return _minmax_pair(10, False)


def lever_minmax_fold_cl_pgd10():
    return _minmax_pair(10, True)


def lever_minmax_fold_pgd40():
    return _minmax_pair(40, False)


def lever_eval_fold():
    """The attack of `advgen eval`: plain eval-mode model vs speed.inference_copy (fold + channels_last)."""
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x, y = batch()
    fast = inference_copy(model)
    xf = x.contiguous(memory_format=torch.channels_last)
    return (lambda: PGD(model, norm="l2", eps=0.5, steps=20, seed=1)(x, y),
            lambda: PGD(fast, norm="l2", eps=0.5, steps=20, seed=1)(xf, y))


def lever_pgd_bookkeeping_where():
    """The per-step best-iterate bookkeeping alone: masked writes vs torch.where."""
    x, y = batch()
    delta = torch.randn_like(x) * 0.01
    logits = torch.randn(B, 10)
    loss = torch.rand(B)
    y = logits.argmax(1)      # as in PGD: the loss rises every step and few samples are fooled
    y[:8] = (y[:8] + 1) % 10

    def masked():
        best, best_loss = x.clone(), torch.full((B,), -math.inf)
        best_hit = torch.zeros(B, dtype=torch.bool)
        for t in range(10):
            hit = logits.argmax(1) != y
            better = ~best_hit & (hit | (loss + t > best_loss))
            best[better] = (x + delta)[better]
            best_loss[better] = (loss + t)[better]
            best_hit |= hit & better

    def where():
        best, best_loss = x.clone(), torch.full((B,), -math.inf)
        best_hit = torch.zeros(B, dtype=torch.bool)
        for t in range(10):
            hit = logits.argmax(1) != y
            better = ~best_hit & (hit | (loss + t > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), x + delta, best)
            best_loss = torch.where(better, loss + t, best_loss)
            best_hit |= hit & better
    return masked, where


def lever_l2_random_start():
    """The per-row randn loop vs one draw of rows padded to a multiple of 16 values (another stream)."""
    shape = (B, 3, 32, 32)

    def loop():
        L2.random_start(shape, 0.5, torch.Generator().manual_seed(0))

    def one_draw():
        d = 3 * 32 * 32
        z = torch.randn(B, -(-(d + 2) // 16) * 16, generator=torch.Generator().manual_seed(0))[:, :d + 2]
        (0.5 * z[:, :d] / z.norm(dim=1, keepdim=True)).view(shape)
    return loop, one_draw


def lever_eval_mode_toggle():
    """eval_mode() around a PGD call: with vs without freezing the parameters (one PGD-1 call)."""
    torch.manual_seed(0)
    model = build_model("resnet20").train()
    x, y = batch(n=32)

    def toggle():
        with eval_mode(model), torch.enable_grad():
            xd = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xd), y), xd)

    def keep():
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.enable_grad():
                xd = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(xd), y), xd)
        finally:
            for m, mode in modes:
                m.training = mode
    return toggle, keep


def _augment_4d(images, generator, pad=4):
    """data.augment before the lever: the same gather as a 4-D advanced index."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    ar_w = torch.arange(w)
    rows = offs[0, :, None] + torch.arange(h)
    cols = offs[1, :, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def lever_augment_flat_index():
    """data.augment's gather: 4-D advanced index (before) vs one flat index into the padded batch (now)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)
    assert torch.equal(_augment_4d(imgs, torch.Generator().manual_seed(1)),
                       augment(imgs, torch.Generator().manual_seed(1)))
    return (lambda: _augment_4d(imgs, torch.Generator().manual_seed(1)),
            lambda: augment(imgs, torch.Generator().manual_seed(1)))


def lever_bank_channels_last():
    """Generator bank (N=32) forward + backward: NCHW vs channels_last input/weights."""
    torch.manual_seed(0)
    x, _ = batch()
    bank_a = GeneratorBank(BankConfig())
    bank_b = copy.deepcopy(bank_a).to(memory_format=torch.channels_last)
    xb = x.contiguous(memory_format=torch.channels_last)

    def run(bank, inp):
        def f():
            adv, _ = bank(inp)
            adv.sum().backward()
        return f
    return run(bank_a, x), run(bank_b, xb)


_DATA = {}


def _epoch(method: str, **kw):
    """One training epoch of `method` on 1280 CIFAR-10 images (ResNet-20, batch 128) -> seconds of its steps."""
    from advgen.config import AttackConfig
    from advgen.training import TrainConfig
    from advgen.data import balanced_subset, first_n, load_cifar
    from advgen.training import train
    if not _DATA:
        tr, te = load_cifar("cifar10", Path(__file__).resolve().parents[2] / "shared" / "data")
        _DATA.update(train=balanced_subset(tr, 1280, 0), test=first_n(te, 100))
    options = AttackConfig(norm="l2", eps=0.5, steps=10, step_size=0.125) if method == "minmax" else None
    cfg = TrainConfig(method=method, options=options, epochs=1, lr=0.01, seed=0, **kw)

    def run():
        torch.manual_seed(0)
        return float(train(cfg, _DATA["train"], _DATA["test"], progress=False)[1]["epochs"][0]["seconds"])
    return run


def lever_epoch_standard_channels_last():
    return _epoch("standard", channels_last=False), _epoch("standard", channels_last=True)


def lever_epoch_generator_channels_last():
    return _epoch("generator", channels_last=False), _epoch("generator", channels_last=True)


def lever_epoch_minmax10_channels_last():
    return (_epoch("minmax", channels_last=False, fold_bn_attack=False),
            _epoch("minmax", channels_last=True, fold_bn_attack=False))


def lever_epoch_minmax10_fold():
    return (_epoch("minmax", channels_last=True, fold_bn_attack=False),
            _epoch("minmax", channels_last=True, fold_bn_attack=True))


def lever_epoch_generator_vs_standard():
    """Not a lever: the issue's ratio generator / standard epoch, both with the defaults."""
    return _epoch("standard"), _epoch("generator")


LEVERS = {k[len("lever_"):]: v for k, v in globals().items() if k.startswith("lever_")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("levers", nargs="*", help=f"default: all of {', '.join(LEVERS)}")
    p.add_argument("--pairs", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.levers or LEVERS:
        a, b = LEVERS[name]()
        r = interleaved(a, b, args.pairs)
        print(f"{name:28s} B/A {r['ratio']:.3f} (min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f}, n={r['n']}); "
              f"A {r['a_ms']:.1f} ms, B {r['b_ms']:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
