"""PGD (L2 / Linf), FGSM and the attack factory: threat-model constraints, side effects, reproducibility,
strength (against the trained tiny model and against foolbox 3), and the uniform L2 random start."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import advgen
from advgen.attacks import FGSM, PGD, AutoAttack
from advgen.attacks.pgd import L2, Linf
from advgen.errors import UserError

NORMS = ["l2", "linf"]
EPS = {"l2": 1.5, "linf": 0.04}            # where the tiny model is partly broken
BIG_EPS = {"l2": 2.5, "linf": 0.07}        # where it is mostly broken


def dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)


def per_sample_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def batch(tt, n=64, start=0):
    return tt.x_test[start:start + n], tt.y_test[start:start + n]


@pytest.mark.parametrize("random_start", [True, False])
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_respects_ball_and_box_and_leaves_x(trained_tiny, norm, random_start):
    x, y = batch(trained_tiny)
    x_copy = x.clone()
    for eps in (EPS[norm], BIG_EPS[norm] * 4):
        adv = PGD(trained_tiny.model, norm=norm, eps=eps, steps=10, random_start=random_start)(x, y)
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert (dist(adv, x, norm) <= eps + 1e-5).all()
        assert adv.min() >= 0 and adv.max() <= 1
        assert not adv.requires_grad
    assert torch.equal(x, x_copy)


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_reaches_the_boundary_of_the_ball(trained_tiny, norm):
    """Unfooled samples end at (or near) the boundary of the ball: the attack uses its budget."""
    x, y = batch(trained_tiny, 32)
    eps = EPS[norm] / 4
    adv = PGD(trained_tiny.model, norm=norm, eps=eps, steps=10, random_start=False)(x, y)
    d = dist(adv, x, norm)
    assert (d > 0.9 * eps).float().mean() > 0.9


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_restores_modes_and_parameter_flags(trained_tiny, norm):
    model = copy.deepcopy(trained_tiny.model)
    x, y = batch(trained_tiny, 16)
    # a mixed state: train mode except one BatchNorm in eval; first conv frozen
    model.train()
    model[1][1].eval()
    model[1][0].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    bn_stats = copy.deepcopy(model[1][4].state_dict())
    PGD(model, norm=norm, eps=EPS[norm], steps=3)(x, y)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model[1][4].state_dict().items():               # ran in eval mode: BN statistics untouched
        assert torch.equal(v, bn_stats[k]), k
    # eval stays eval
    model.eval()
    PGD(model, norm=norm, eps=EPS[norm], steps=3)(x, y)
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_pgd_restores_state_when_the_model_raises(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    with pytest.raises(RuntimeError):
        PGD(model, norm="l2", eps=1.0, steps=2)(torch.rand(2, 5, 32, 32), torch.zeros(2, dtype=torch.long))
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_breaks_the_tiny_model(trained_tiny, norm):
    x, y = batch(trained_tiny, 200)
    model = trained_tiny.model
    clean = advgen.accuracy(model, x, y)
    assert clean > 0.9
    adv = PGD(model, norm=norm, eps=BIG_EPS[norm], steps=10)(x, y)
    assert advgen.accuracy(model, adv, y) < 0.25
    # random noise of the same size hardly hurts: the attack is what breaks it
    noise = torch.randn_like(x)
    if norm == "l2":
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * BIG_EPS[norm]
    else:
        noise = noise.sign() * BIG_EPS[norm]
    assert advgen.accuracy(model, (x + noise).clamp(0, 1), y) > 0.8


@pytest.mark.parametrize("norm", NORMS)
def test_single_example_equals_slice_of_batch_with_random_start(trained_tiny, norm):
    x, y = batch(trained_tiny, 16)
    attack = PGD(trained_tiny.model, norm=norm, eps=EPS[norm], steps=8, random_start=True, seed=5)
    full = attack(x, y)
    alone = attack(x[:1], y[:1])
    torch.testing.assert_close(alone[0], full[0], atol=1e-5, rtol=0)
    assert not torch.equal(full[0], x[0])
    # a different seed gives a different start
    other = PGD(trained_tiny.model, norm=norm, eps=EPS[norm], steps=8, random_start=True, seed=6)(x[:1], y[:1])
    assert not torch.allclose(other, alone)


@pytest.mark.parametrize("norm", NORMS)
def test_every_slice_equals_single_attack_without_random_start(trained_tiny, norm):
    x, y = batch(trained_tiny, 12)
    attack = PGD(trained_tiny.model, norm=norm, eps=EPS[norm], steps=8, random_start=False)
    full = attack(x, y)
    for i in range(12):
        torch.testing.assert_close(attack(x[i:i + 1], y[i:i + 1])[0], full[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_is_deterministic_for_a_seed(trained_tiny, norm):
    x, y = batch(trained_tiny, 16)
    a = PGD(trained_tiny.model, norm=norm, eps=EPS[norm], steps=5, seed=3)(x, y)
    b = PGD(trained_tiny.model, norm=norm, eps=EPS[norm], steps=5, seed=3)(x, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("norm", NORMS)
def test_restarts_never_weaken_the_attack(trained_tiny, norm):
    x, y = batch(trained_tiny, 96)
    model = trained_tiny.model
    kw = dict(norm=norm, eps=EPS[norm], steps=4, random_start=True, seed=11)
    one = PGD(model, restarts=1, **kw)(x, y)
    three = PGD(model, restarts=3, **kw)(x, y)
    with torch.no_grad():
        fooled1 = model(one).argmax(1) != y
        fooled3 = model(three).argmax(1) != y
    assert 0 < fooled1.sum() < len(y)                      # a setting where restarts can matter
    assert (fooled3 | ~fooled1).all()                      # fooled with 1 restart -> fooled with 3
    assert fooled3.sum() >= fooled1.sum()
    torch.testing.assert_close(three[fooled1], one[fooled1])   # restart 0 is shared; its hit is kept
    neither = ~fooled1 & ~fooled3
    l1, l3 = per_sample_loss(model, one, y), per_sample_loss(model, three, y)
    assert (l3[neither] >= l1[neither] - 1e-5).all()
    assert (dist(three, x, norm) <= EPS[norm] + 1e-5).all()


@pytest.mark.parametrize("norm", NORMS)
def test_targeted_attack_moves_predictions_to_the_target(trained_tiny, norm):
    x, y = batch(trained_tiny, 64)
    model = trained_tiny.model
    target = (y + 3) % 10
    eps = BIG_EPS[norm] * 2
    adv = PGD(model, norm=norm, eps=eps, steps=20, targeted=True)(x, target)
    untargeted = PGD(model, norm=norm, eps=eps, steps=20)(x, y)
    with torch.no_grad():
        pred = model(adv).argmax(1)
        pred_untargeted = model(untargeted).argmax(1)
    assert (pred == target).float().mean() > 0.8
    assert (pred == target).float().mean() > (pred_untargeted == target).float().mean() + 0.3
    assert (dist(adv, x, norm) <= eps + 1e-5).all()


def test_pgd_works_under_no_grad(trained_tiny):
    x, y = batch(trained_tiny, 16)
    attack = PGD(trained_tiny.model, norm="l2", eps=EPS["l2"], steps=5)
    with torch.no_grad():
        adv = attack(x, y)
    assert torch.equal(adv, attack(x, y))
    assert not torch.equal(adv, x)


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_returns_x(trained_tiny, norm):
    x, y = batch(trained_tiny, 8)
    adv = PGD(trained_tiny.model, norm=norm, eps=0.0, steps=5)(x, y)
    assert torch.equal(adv, x) and adv is not x
    assert torch.equal(FGSM(trained_tiny.model, norm=norm, eps=0.0)(x, y), x)


@pytest.mark.parametrize("norm", NORMS)
def test_fgsm_is_one_step_pgd(trained_tiny, norm):
    model = trained_tiny.model
    x, y = batch(trained_tiny, 64)
    eps = EPS[norm]
    f = FGSM(model, norm=norm, eps=eps)
    assert isinstance(f, PGD) and f.steps == 1 and f.alpha == pytest.approx(eps) and not f.random_start
    adv = f(x, y)
    assert torch.equal(adv, PGD(model, norm=norm, eps=eps, steps=1, rel_step=1.0, random_start=False)(x, y))
    # by hand: one step of size eps along sign(grad) (Linf) or grad / |grad| (L2), clipped to [0, 1];
    # a sample keeps x where the step does not raise its loss or it is misclassified already
    xg = x.clone().requires_grad_(True)
    logits0 = model(xg)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits0, y, reduction="sum"), xg)
    step = grad.sign() if norm == "linf" else grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    cand = (x + eps * step).clamp(0, 1)
    with torch.no_grad():
        l0 = F.cross_entropy(logits0, y, reduction="none")
        logits1 = model(cand)
        l1 = F.cross_entropy(logits1, y, reduction="none")
        keep = (logits0.argmax(1) == y) & ((logits1.argmax(1) != y) | (l1 > l0))
    expect = torch.where(keep.view(-1, 1, 1, 1), cand, x)
    assert keep.float().mean() > 0.5
    torch.testing.assert_close(adv, expect, atol=1e-5, rtol=0)
    for p in model.parameters():
        p.grad = None


def test_fgsm_rs_settings():
    model = torch.nn.Linear(1, 1)
    f = FGSM(model, norm="linf", eps=0.1, random_start=True)
    assert f.random_start and f.steps == 1 and f.alpha == pytest.approx(0.125)


def test_default_step_size_is_madry():
    p = PGD(torch.nn.Linear(1, 1), norm="l2", eps=0.5, steps=10)
    assert p.alpha == pytest.approx(0.125)
    assert PGD(torch.nn.Linear(1, 1), eps=0.5, steps=10, rel_step=0.1).alpha == pytest.approx(0.05)
    assert PGD(torch.nn.Linear(1, 1), eps=0.5, steps=10, step_size=0.01).alpha == 0.01
    s = p.settings()
    assert s["norm"] == "l2" and s["eps"] == 0.5 and s["steps"] == 10 and s["step_size"] == pytest.approx(0.125)


# -------------------------------------------------------------------------------- random starts, projections

def test_l2_random_start_is_uniform_in_the_ball_d3():
    n, eps, d = 20000, 0.7, 3
    delta = L2.random_start((n, d), eps, torch.Generator().manual_seed(0)).double()
    assert delta.shape == (n, d)
    r = delta.norm(dim=1)
    assert (r <= eps * (1 + 1e-6)).all()
    u = (r / eps) ** d                                     # P(r <= t eps) = t^d  <=>  (r/eps)^d ~ U(0, 1)
    assert abs(u.mean().item() - 0.5) < 0.01
    q = torch.quantile(u, torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))
    torch.testing.assert_close(q, torch.tensor([0.25, 0.5, 0.75], dtype=torch.double), atol=0.015, rtol=0)
    ks = (torch.sort(u).values - (torch.arange(n, dtype=torch.double) + 0.5) / n).abs().max()
    assert ks < 0.015                                      # 1.63 / sqrt(n) = 0.0115 at the 1% level
    # isotropic directions: mean ~ 0, second moment ~ I / d
    v = delta / r[:, None]
    assert v.mean(0).abs().max() < 0.02
    torch.testing.assert_close(v.T @ v / n, torch.eye(d, dtype=torch.double) / d, atol=0.015, rtol=0)


def test_l2_random_start_is_uniform_in_the_ball_image_shaped():
    n, eps, shape = 4000, 0.5, (3, 2, 2)
    d = math.prod(shape)
    delta = L2.random_start((n, *shape), eps, torch.Generator().manual_seed(1)).double()
    assert delta.shape == (n, *shape)
    r = delta.flatten(1).norm(dim=1)
    assert (r <= eps * (1 + 1e-6)).all()
    u = (r / eps) ** d
    assert abs(u.mean().item() - 0.5) < 0.02
    ks = (torch.sort(u).values - (torch.arange(n, dtype=torch.double) + 0.5) / n).abs().max()
    assert ks < 0.03
    assert (delta.flatten(1) / r[:, None]).mean(0).abs().max() < 0.04


def test_l2_random_start_rows_do_not_depend_on_batch_size():
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    full = L2.random_start((5, 3, 32, 32), 1.0, g())
    one = L2.random_start((1, 3, 32, 32), 1.0, g())
    torch.testing.assert_close(one[0], full[0], atol=1e-6, rtol=0)


def test_linf_random_start_is_uniform_in_the_cube():
    delta = Linf.random_start((5000, 3, 4, 4), 0.1, torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 0.1
    assert delta.min() < -0.099 and delta.max() > 0.099
    assert abs(delta.mean().item()) < 0.002
    assert abs((delta.abs() < 0.05).float().mean().item() - 0.5) < 0.01


def test_projections_and_directions():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 3, 4, 4, generator=g)
    norms = delta.flatten(1).norm(dim=1)
    eps = norms.median().item()
    p = L2.project(delta, eps)
    pn = p.flatten(1).norm(dim=1)
    inside = norms <= eps
    torch.testing.assert_close(p[inside], delta[inside])                     # inside: unchanged
    torch.testing.assert_close(pn[~inside], torch.full_like(pn[~inside], eps))   # outside: onto the sphere
    torch.testing.assert_close(p[~inside] / pn[~inside].view(-1, 1, 1, 1),
                               delta[~inside] / norms[~inside].view(-1, 1, 1, 1))  # same direction
    torch.testing.assert_close(L2.direction(delta).flatten(1).norm(dim=1), torch.ones(6))
    assert torch.equal(Linf.project(delta, 0.3), delta.clamp(-0.3, 0.3))
    assert torch.equal(Linf.direction(delta), delta.sign())


# -------------------------------------------------------------------------------- against foolbox 3

@pytest.mark.parametrize("norm,eps,steps,step", [("l2", 1.5, 10, 0.3), ("linf", 0.04, 10, 0.008)])
def test_pgd_matches_foolbox(trained_tiny, norm, eps, steps, step):
    fb = pytest.importorskip("foolbox")
    model = copy.deepcopy(trained_tiny.model).eval()
    x, y = batch(trained_tiny, 200)
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    cls = fb.attacks.L2PGD if norm == "l2" else fb.attacks.LinfPGD
    _, clipped, success = cls(rel_stepsize=step / eps, steps=steps, random_start=False)(
        fmodel, x, y, epsilons=[eps])
    fb_acc = 1 - success[0].float().mean().item()
    assert (dist(clipped[0], x, norm) <= eps + 1e-4).all()
    adv = PGD(trained_tiny.model, norm=norm, eps=eps, steps=steps, step_size=step, random_start=False)(x, y)
    ours = advgen.accuracy(trained_tiny.model, adv, y)
    assert 0.1 < fb_acc < 0.9                                          # a setting where strength shows
    assert ours <= fb_acc + 0.01
    assert ours >= fb_acc - 0.05


# -------------------------------------------------------------------------------- validation and factory

@pytest.mark.parametrize("kwargs", [
    dict(eps=-0.1), dict(eps=float("nan")), dict(eps=float("inf")), dict(steps=0), dict(steps=-3),
    dict(norm="l1"), dict(norm="L2"), dict(restarts=0), dict(step_size=0.0), dict(step_size=-1.0),
    dict(rel_step=float("nan")), dict(step_size=0.1, rel_step=0.1),
])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        PGD(torch.nn.Linear(1, 1), **kwargs)


def test_bad_fgsm_and_autoattack_settings():
    m = torch.nn.Linear(1, 1)
    with pytest.raises(UserError):
        FGSM(m, eps=float("nan"))
    with pytest.raises(UserError):
        FGSM(m, norm="l1")
    with pytest.raises(UserError):
        AutoAttack(m, norm="l1")
    with pytest.raises(UserError):
        AutoAttack(m, eps=-1.0)


def test_the_attack_names_of_advgen_01_keep_their_norm():
    """`--attack pgd-linf` etc. still mean what they meant; `fgsm` and `autoattack` alone, which were Linf,
    are refused without --norm rather than silently read as L2."""
    from advgen.cli import build_parser
    from advgen.cli.eval import protocol_from_args
    parse = lambda *a: protocol_from_args(build_parser().parse_args(["eval", "RUN", *a]))  # noqa: E731
    for name, (attack, norm) in {"pgd-l2": ("pgd", "l2"), "pgd-linf": ("pgd", "linf"), "fgsm-l2": ("fgsm", "l2"),
                                 "autoattack-l2": ("autoattack", "l2")}.items():
        p = parse("--attack", name)
        assert (p.attack, p.norm) == (attack, norm)
    assert parse().norm == "l2" and parse().eps == (0.0, 0.25, 0.5)
    assert parse("--norm", "linf").eps == (0.0, 4 / 255, 8 / 255)        # the norm's own radii, not 0.25/0.5
    assert parse("--attack", "fgsm", "--norm", "linf").attack == "fgsm"
    for bare in ("fgsm", "autoattack"):
        with pytest.raises(UserError, match="--norm"):
            parse("--attack", bare)
    with pytest.raises(UserError, match="contradicts"):
        parse("--attack", "pgd-l2", "--norm", "linf")


def test_autoattack_eps_zero_and_apgd(trained_tiny):
    pytest.importorskip("pyautoattack")
    model = copy.deepcopy(trained_tiny.model).train()
    x, y = batch(trained_tiny, 32)
    assert torch.equal(AutoAttack(model, norm="l2", eps=0.0)(x, y), x)
    eps = BIG_EPS["l2"]
    adv = AutoAttack(model, norm="l2", eps=eps, attacks=["apgd-ce"])(x, y)
    assert (dist(adv, x, "l2") <= eps + 1e-4).all() and adv.min() >= 0 and adv.max() <= 1
    assert advgen.accuracy(model, adv, y) < 0.25
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_keep_last_returns_the_final_iterate_at_full_strength(trained_tiny):
    """Training attacks (keep="last") take every step even on samples fooled early: the final iterate sits
    on the eps-sphere for L2 when nothing is clipped, and its loss is at least the worst-case one's on
    samples the worst-case mode froze at their first fooling iterate."""
    import torch.nn.functional as F
    model, x, y = trained_tiny.model, trained_tiny.x_test[:64], trained_tiny.y_test[:64]
    kw = dict(norm="l2", eps=1.0, steps=10, rel_step=0.25, random_start=False)
    worst = PGD(model, keep="worst", **kw)(x, y)
    last = PGD(model, keep="last", **kw)(x, y)
    with torch.no_grad():
        lw = F.cross_entropy(model.eval()(worst), y, reduction="none")
        ll = F.cross_entropy(model(last), y, reduction="none")
    fooled_early = model(worst).argmax(1) != y
    assert fooled_early.any()
    assert (ll[fooled_early] >= lw[fooled_early] - 1e-4).float().mean() > 0.9
    assert ((last - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()
    with pytest.raises(UserError):
        PGD(model, keep="best")


def test_margin_loss_values():
    from advgen.attacks.pgd import margin
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, -1.0]])
    torch.testing.assert_close(margin(logits, torch.tensor([0, 0])), torch.tensor([-0.5, 4.0]))


class _Saturated(torch.nn.Module):
    """A linear classifier with logits scaled so far that softmax is exactly one-hot in float32: the
    cross-entropy's input gradient is exactly zero, the margin's is not (gradient masking by saturation)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 4 * 4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 48, generator=torch.Generator().manual_seed(0)))
            self.lin.bias.zero_()

    def forward(self, x):
        return 1e4 * self.lin(x.flatten(1))


def test_margin_restarts_break_what_the_saturated_cross_entropy_cannot():
    model = _Saturated()
    x = torch.rand(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)                       # every sample correct, with a huge logit gap
    kw = dict(norm="l2", eps=2.0, steps=20, random_start=False)
    fooled = lambda atk: (model(atk(x, y)).argmax(1) != y).float().mean().item()  # noqa: E731
    ce = PGD(model, restarts=2, **kw)
    both = PGD(model, restarts=2, objective=("ce", "margin"), **kw)
    assert fooled(ce) == 0.0                         # no gradient: CE-PGD never moves
    assert fooled(both) > 0.5                        # its margin restart does
    assert both.settings()["objective"] == ["ce", "margin"] and ce.settings()["objective"] == "ce"
    with pytest.raises(UserError, match="unknown objective"):
        PGD(model, objective=("ce", "dlr"))
    with pytest.raises(UserError, match="no other objective"):
        PGD(model, objective=("kl", "ce"), keep="last")


@pytest.mark.parametrize("norm", NORMS)
def test_a_second_objective_only_adds_fooled_samples(trained_tiny, norm):
    x, y = batch(trained_tiny, 96)
    model = trained_tiny.model
    kw = dict(norm=norm, eps=EPS[norm], steps=4, random_start=True, seed=11)
    one = PGD(model, restarts=1, **kw)(x, y)
    both = PGD(model, restarts=2, objective=("ce", "margin"), **kw)(x, y)
    with torch.no_grad():
        f1, f2 = model(one).argmax(1) != y, model(both).argmax(1) != y
    assert 0 < f1.sum() < len(y)
    assert bool((f2 | ~f1).all())                    # restart 0 is the CE attack itself; restart 1 only adds
    torch.testing.assert_close(both[f1], one[f1])
