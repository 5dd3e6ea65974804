"""fp16 made correct, tested on the CPU (autocast float16 and torch.amp.GradScaler("cpu") run here, slowly):
the GradScaler's state is resumed, Free-AT never steps δ with a non-finite gradient, the generator's
extra ascent steps go through the scaler, and attack passes run in fp32 so their gradients do not
underflow."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from synth_cifar import tiny_dataset
from torch import nn

from advgen.checkpoint import STATE_FILE
from advgen.config import AttackConfig
from advgen.training import TrainConfig
from advgen.models.generators import BankConfig
from advgen.training import METHODS, Setup, registered, train
from advgen.training.methods.free import FreeAT, FreeOptions
from advgen.training.methods.generator import GeneratorOptions
from advgen.training.methods.minmax import MinMax
from advgen.training.methods.minmax import FGSMOptions
from advgen.training.methods.gradalign import GradAlignOptions
from advgen.training.methods.nfgsm import NFGSMOptions
from advgen.training.state import read_state
from advgen.training.methods.trades import TradesOptions

torch.set_num_threads(1)
CPU = torch.device("cpu")


def hot_model(mult: float = 30.0) -> nn.Module:
    """A tiny classifier whose logits are `mult` times larger than usual: at the GradScaler's starting
    scale (65536) its fp16 backward overflows for the first steps, so the scale moves (halves) early."""
    from conftest import make_tiny
    torch.manual_seed(0)
    model = make_tiny()
    with torch.no_grad():
        model[1][-1].weight.mul_(mult)
    return model


def _sets(n: int = 48):
    return tiny_dataset(n, 1), tiny_dataset(16, 2)


class Crash(Exception):
    pass


def _crash_at(method: str, call: int):
    base, calls = METHODS[method].cls, {"n": 0}

    def loss(self, x, y, **where):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash()
        return base.loss(self, x, y, **where)
    return registered(method, type("Crashing", (base,), {"loss": loss}))


@pytest.mark.parametrize("method, options", [
    ("standard", None),
    ("generator", GeneratorOptions(bank=BankConfig(n=2, width=4, depth=2), steps=2)),
])
def test_fp16_kill_and_resume_is_bit_identical(tmp_path, method, options):
    """The scale halves in the first steps (overflows at 65536); a run killed after step 4 and resumed
    continues from the saved scale and growth tracker, and ends with the very weights of a run left alone
    (before the scaler was saved, the resumed run restarted at 65536, overflowed and skipped steps)."""
    cfg = lambda: TrainConfig(method=method, options=options, epochs=2, batch_size=16, lr=0.01,  # noqa: E731
                              precision="fp16")
    train(cfg(), *_sets(), out_dir=tmp_path / "whole", progress=False, model=hot_model())
    out = tmp_path / "run"
    with _crash_at(method, 5), pytest.raises(Crash):
        train(cfg(), *_sets(), out_dir=out, progress=False, model=hot_model(), checkpoint_every=1)
    state, header = read_state(out / STATE_FILE)
    assert (header["epoch"], header["step"]) == (2, 1)
    assert state["scaler"]["scale"] < 65536.0 and state["scaler"]["_growth_tracker"] >= 1
    torch.manual_seed(123)
    train(cfg(), *_sets(), out_dir=out, progress=False, model=hot_model(1.0), resume=True)
    for name in ("model.safetensors", *(["generators.safetensors"] if method == "generator" else [])):
        a, b = load_file(tmp_path / "whole" / name), load_file(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = lambda d: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                      for r in json.loads((d / "run.json").read_text())["epochs"]]
    assert rows(tmp_path / "whole") == rows(out)


def test_free_at_never_steps_delta_with_a_nonfinite_gradient():
    """L2 Free-AT under fp16: the scaler's starting scale overflows the first replays' backward; the
    gradient on δ is then inf, its L2 direction inf / inf = NaN. δ keeps its value for that replay
    (the scaler skips the classifier's step likewise) and the run trains on; before, δ became NaN for
    good and the run ended in TrainingDiverged."""
    seen = []
    base = METHODS["free"].cls

    class Spy(base):
        def _ascend(self):
            seen.append(bool(torch.isfinite(self.leaf.grad).all()))
            super()._ascend()
            assert torch.isfinite(self.delta).all()

    cfg = TrainConfig(method="free", epochs=1, batch_size=16, lr=0.01, precision="fp16",
                      options=FreeOptions(norm="l2", eps=0.5, replays=4))
    with registered("free", Spy):
        model, rec = train(cfg, *_sets(), progress=False, model=hot_model(100.0))
    assert not all(seen) and any(seen)   # some replays overflowed, the others stepped
    assert rec["finished"] and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_free_at_ascent_keeps_delta_where_the_gradient_is_not_finite(norm):
    method = FreeAT(nn.Identity(), FreeOptions(norm=norm, eps=0.5, replays=1), Setup(device=CPU))
    method.delta = torch.full((2, 3, 4, 4), 0.01)
    for bad in (float("inf"), float("nan")):
        before = method.delta.clone()
        method.leaf = before.clone().requires_grad_(True)
        method.leaf.grad = torch.ones_like(before)
        method.leaf.grad[1, 0, 0, 0] = bad
        method._ascend()
        assert torch.equal(method.delta, before)
    method.leaf = method.delta.clone().requires_grad_(True)
    method.leaf.grad = torch.ones_like(method.delta)
    method._ascend()
    assert not torch.equal(method.delta, before) and torch.isfinite(method.delta).all()


def test_generator_extra_ascent_steps_go_through_the_scaler(monkeypatch):
    """steps=2: per loop step one extra ascent step of the bank, then the classifier's and the bank's
    own: three optimizer steps through the GradScaler (before: the extra one bypassed it, unscaled and
    unchecked), each on a scaled loss."""
    calls = []
    real_step, real_scale = torch.amp.GradScaler.step, torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt, *a, **k: (calls.append(type(opt).__name__),
                                                                                   real_step(self, opt, *a, **k))[1])
    scaled = []
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, t: (scaled.append(1), real_scale(self, t))[1])
    cfg = TrainConfig(method="generator", epochs=1, batch_size=16, lr=0.01, precision="fp16",
                      options=GeneratorOptions(bank=BankConfig(n=2, width=4, depth=2), steps=2))
    model, rec = train(cfg, *_sets(), progress=False, model=hot_model())
    assert len(calls) == 3 * 3 and len(scaled) == 2 * 3   # 3 steps of 3 optimizer steps, 2 scaled losses each
    assert rec["finished"] and all(torch.isfinite(p).all() for p in model.parameters())


ATTACKERS = {
    "minmax": AttackConfig(norm="l2", eps=0.5, steps=2, step_size=0.3),
    "fgsm": FGSMOptions(norm="linf", eps=8 / 255),
    "nfgsm": NFGSMOptions(norm="l2", eps=0.5),
    "trades": TradesOptions(norm="l2", eps=0.5, steps=2),
    "gradalign": GradAlignOptions(norm="linf", eps=8 / 255),
    "generator": GeneratorOptions(bank=BankConfig(n=2, width=4, depth=2, bound="l2", size=0.5, grad_input=True),
                                  step_after=True),
}


@pytest.mark.parametrize("method", sorted(ATTACKERS))
def test_attack_passes_run_in_fp32_under_fp16(method):
    """Every pass of an attack (eval mode: PGD, FGSM, N-FGSM's step, TRADES' clean prediction and KL-PGD,
    the generator's input gradient) runs in fp32 under fp16 training; the training forwards in fp16."""
    from conftest import make_tiny
    torch.manual_seed(0)
    model = make_tiny()
    seen = []
    model[1][0].register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    cfg = TrainConfig(method=method, options=ATTACKERS[method], epochs=1, batch_size=16, lr=0.01,
                      precision="fp16", fold_bn_attack=False)   # attacks on the classifier itself: seen by the hook
    train(cfg, *_sets(32), progress=False, model=model)
    assert {d for t, d in seen if t} == {torch.float16}
    attack = [d for t, d in seen if not t]
    assert len(attack) > 2 and set(attack) == {torch.float32}


def test_pgd_inside_fp16_training_does_not_underflow():
    """A classifier whose input gradient is below fp16's smallest step: in fp16 the attack's gradient is 0
    and PGD does not move (‖δ‖ = 0); in fp32, as the attack passes now run, it reaches the L2 ball's
    boundary. The training step around it is still under fp16 autocast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        model[1].weight.normal_(0, 1e-9)          # 0 once cast to fp16
    x, y = 0.1 + 0.8 * torch.rand(8, 3, 32, 32), torch.arange(8)   # away from the [0, 1] clip
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(xg)
    (g16,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg)
    assert logits.dtype == torch.float16 and g16.abs().max() == 0   # what an fp16 attack pass would see
    setup = Setup(device=CPU, fold_bn=False, precision="fp16")
    method = MinMax(model, AttackConfig(norm="l2", eps=0.5, steps=5, step_size=0.2, random_start=False), setup)
    with torch.autocast("cpu", dtype=torch.float16):
        adv = method.adversarial(x, y)
    assert adv.dtype == torch.float32
    torch.testing.assert_close((adv - x).flatten(1).norm(dim=1), torch.full((8,), 0.5), atol=1e-4, rtol=0)
