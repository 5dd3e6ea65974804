"""The fast-AT peers as training methods: N-FGSM (de Jorge et al. 2022), Free-AT (Shafahi et al. 2019) and
TRADES (Zhang et al. 2019), each through the registry, against hand-computed references, resumed after a
kill, end to end through advgen.train and the CLI, at L2 and Linf."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from synth_cifar import tiny_dataset, write_cifar
from torch.optim.optimizer import register_optimizer_step_post_hook

import advgen
from advgen.attacks import PGD
from advgen.attacks.pgd import L2, kl_from
from advgen.checkpoint import STATE_FILE
from advgen.cli import main
from advgen.apps.compare.plan import L2_ENTRIES as ENTRIES, passes_per_step
from advgen.config import from_dict
from advgen.training import TrainConfig
from advgen.errors import ConfigError, UserError
from advgen.training import METHODS, Setup, registered, train
from advgen.training.methods.free import FreeOptions
from advgen.training.methods.nfgsm import NFGSMOptions
from advgen.training.state import read_state
from advgen.training.methods.gradalign import GradAlignOptions, alignment
from advgen.training.methods.trades import TradesOptions

torch.set_num_threads(1)
CPU = torch.device("cpu")
NORMS = ["l2", "linf"]
EPS = {"l2": 0.5, "linf": 8 / 255}


def dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)


def build(name, model, options, **setup):
    """A method through the registry, as the loop builds it (no BN folding: exact references)."""
    return METHODS[name].cls(model, options, Setup(device=CPU, fold_bn=False, **setup))


def _sets():
    return tiny_dataset(48, 1), tiny_dataset(16, 2)


# ------------------------------------------------------------------------------------------------ N-FGSM

@pytest.mark.parametrize("norm", NORMS)
def test_nfgsm_is_not_projected_back_to_the_eps_ball(trained_tiny, norm):
    """‖δ‖ ≤ (k+1)·eps for every sample and > eps for many (the noise of 2 eps plus a step of eps, no
    projection); x_adv in [0, 1]; x, the model's mode and its .grad untouched."""
    model, eps, k = trained_tiny.model, EPS[norm], 2.0
    x, y = trained_tiny.x_test[:64], trained_tiny.y_test[:64]
    x_copy = x.clone()
    method = build("nfgsm", model, NFGSMOptions(norm=norm, eps=eps, k=k))
    adv = method.adversarial(x, y)
    d = dist(adv, x, norm)
    assert (d <= (k + 1) * eps + 1e-5).all()
    assert (d > 1.5 * eps).float().mean() > 0.5, d
    assert adv.min() >= 0 and adv.max() <= 1 and not adv.requires_grad
    assert torch.equal(x, x_copy) and not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", NORMS)
def test_nfgsm_equals_a_hand_computed_reference(tiny_model, norm):
    """noise uniform in the k·eps ball (from the method's seed: the run's seed + 1 at the first batch),
    clipped to the image, one step of eps along sign(g) (Linf) or g/‖g‖ (L2) from the noisy point, the
    result clipped to [0, 1] and nothing else."""
    torch.manual_seed(0)
    model = tiny_model()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    eps, k, seed = EPS[norm], 2.0, 5
    adv = build("nfgsm", model, NFGSMOptions(norm=norm, eps=eps, k=k), seed=seed).adversarial(x, y)

    g = torch.Generator().manual_seed(seed + 1)
    if norm == "linf":
        noise = (torch.rand(x.shape, generator=g) * 2 - 1) * (k * eps)
    else:
        noise = L2.random_start(x.shape, k * eps, g)   # uniform in the L2 ball (tested in test_attacks)
    eta = ((x + noise).clamp(0, 1) - x).requires_grad_(True)
    model.eval()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x + eta), y), eta)
    step = grad.sign() if norm == "linf" else grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expect = (x + eta.detach() + eps * step).clamp(0, 1)
    torch.testing.assert_close(adv, expect, atol=1e-6, rtol=0)
    if norm == "linf":   # some pixels really leave the eps-box (a projection would have clamped them)
        assert ((adv - x).abs() > 1.5 * eps).any()


def test_nfgsm_draws_new_noise_every_batch(tiny_model):
    method = build("nfgsm", tiny_model(), NFGSMOptions(norm="linf"))
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    assert not torch.equal(method.adversarial(x, y), method.adversarial(x, y))
    assert method.state_dict() == {"attack_seed": 2}


# ------------------------------------------------------------------------------------------------ Free-AT

def _free_by_hand(model, batches, eps, m, norm, lr=0.05, reset_each_batch=False):
    """Algorithm 1 of Shafahi et al. written out: (final weights, final δ, δ seen by each replay)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    delta = torch.zeros_like(batches[0][0])
    seen = []
    for x, y in batches:
        if reset_each_batch:
            delta = torch.zeros_like(delta)
        for _ in range(m):
            d = delta[:x.shape[0]].clone().requires_grad_(True)
            seen.append(d.detach().clone())
            loss = F.cross_entropy(model((x + d).clamp(0, 1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            g = d.grad
            if norm == "linf":
                new = (d.detach() + eps * g.sign()).clamp(-eps, eps)
            else:
                new = d.detach() + eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                new = new * (eps / new.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(max=1)
            delta[:x.shape[0]] = new
    return model.state_dict(), delta, seen


@pytest.mark.parametrize("norm", NORMS)
def test_free_replays_each_batch_m_times_and_carries_delta(tiny_model, norm):
    """m classifier updates per batch (m − 1 through Setup.descend, the last by the loop), δ carried from
    replay to replay and from batch to batch (a smaller batch uses δ's first rows): weights and δ equal a
    hand-written Algorithm 1, and differ from a version that resets δ at each batch."""
    eps, m = EPS[norm], 3
    model = tiny_model()
    model.train()
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % 10),
               (torch.rand(6, 3, 32, 32, generator=g), torch.arange(6) % 10)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updates = []

    def descend(loss):   # what the loop's Run.descend does
        updates.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()

    method = build("free", model, FreeOptions(norm=norm, eps=eps, replays=m), descend=descend)
    assert method.passes == m
    for i, (x, y) in enumerate(batches):
        loss, logits, labels = method.loss(x, y)          # one loop step
        assert len(updates) == i * m + m - 1
        descend(loss)
        method.after_step()
        assert len(updates) == (i + 1) * m and logits.shape == (x.shape[0], 10) and labels is y

    weights, delta, seen = _free_by_hand(ref_model, batches, eps, m, norm)
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(method.delta, delta)
    assert (dist(method.delta, torch.zeros_like(delta), norm) <= eps + 1e-6).all()
    assert seen[m].abs().sum() > 0                         # batch 2 starts from batch 1's δ, not from 0
    other, _, _ = _free_by_hand(copy.deepcopy(tiny_model()), batches, eps, m, norm, reset_each_batch=True)
    assert any(not torch.equal(other[k], v) for k, v in weights.items())


def test_free_makes_m_optimizer_steps_per_batch_in_the_loop_and_counts_m_passes():
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, a, kw: steps.append(1))
    try:
        cfg = TrainConfig(method="free", options=FreeOptions(norm="linf", replays=4), epochs=1, batch_size=16)
        _, rec = train(cfg, *_sets(), progress=False)
    finally:
        handle.remove()
    (row,) = rec["epochs"]
    assert row["steps"] == 3 and row["passes"] == 12 and len(steps) == 12


def test_free_needs_the_loops_update():
    method = build("free", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), FreeOptions())
    with pytest.raises(RuntimeError, match="Setup.descend"):
        method.loss(torch.rand(2, 3, 32, 32), torch.arange(2))


class Crash(Exception):
    pass


def test_a_killed_free_run_resumes_bit_identically(tmp_path):
    """Killed in the middle of a batch's replays (classifier already updated twice in that step): the
    resumed run redoes the step from the saved state (weights, optimizer, δ) and ends with the very
    weights of an uninterrupted run."""
    cfg = lambda: TrainConfig(method="free", options=FreeOptions(norm="l2", eps=0.5, replays=3), epochs=2,  # noqa: E731
                              batch_size=16, seed=1, lr=0.05)
    torch.manual_seed(0)
    ref, ref_rec = train(cfg(), *_sets(), out_dir=tmp_path / "ref", progress=False)
    free_cls = METHODS["free"].cls

    class Dying(free_cls):
        forwards = 0

        def _forward(self, x, y):
            Dying.forwards += 1
            if Dying.forwards == 3 * 4 + 3:    # the third replay of the fifth step (epoch 2, batch 2)
                raise Crash()
            return super()._forward(x, y)

    with registered("free", Dying):
        torch.manual_seed(0)
        with pytest.raises(Crash):
            train(cfg(), *_sets(), out_dir=tmp_path / "run", progress=False, checkpoint_every=1)
    state, header = read_state(tmp_path / "run" / STATE_FILE)
    assert (header["epoch"], header["step"]) == (2, 1)
    assert state["method"]["delta"].shape == (16, 3, 32, 32) and state["method"]["delta"].abs().sum() > 0
    torch.manual_seed(99)
    model, rec = train(cfg(), *_sets(), out_dir=tmp_path / "run", progress=False, resume=True)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    strip = lambda r: [{k: v for k, v in e.items() if k != "seconds"} for e in r["epochs"]]  # noqa: E731
    assert strip(rec) == strip(ref_rec)


# ------------------------------------------------------------------------------------------------ TRADES

@pytest.mark.parametrize("norm", NORMS)
def test_trades_loss_is_ce_plus_beta_kl_by_hand(tiny_model, norm):
    """loss = CE(f(x), y) + β·(1/B)·Σ_i Σ_k p_ik (log p_ik − log q_ik), p = softmax f(x), q = softmax f(x'),
    in value and in gradient (the clean prediction is not detached), on the method's own x'."""
    torch.manual_seed(0)
    model = tiny_model()
    model.train()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    beta = 6.0
    method = build("trades", model, TradesOptions(norm=norm, eps=EPS[norm], steps=3, beta=beta))
    seen = {}
    attack = method.adversarial
    method.adversarial = lambda x, y: seen.setdefault("x_adv", attack(x, y))
    loss, logits_adv, labels = method.loss(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    x_adv = seen["x_adv"]
    assert (dist(x_adv, x, norm) <= EPS[norm] + 1e-5).all() and not torch.equal(x_adv, x)
    out, out_adv = model(x), model(x_adv)
    log_p, log_q = out.log_softmax(1), out_adv.log_softmax(1)
    ce = -log_p[torch.arange(8), y].mean()
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    expect = ce + beta * kl
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_adv, out_adv)
    assert labels is y and kl > 0
    for g, h in zip(grads, torch.autograd.grad(expect, list(model.parameters()), retain_graph=True)):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    detached = ce + beta * (log_p.detach().exp() * (log_p.detach() - log_q)).sum(1).mean()
    g_det = torch.autograd.grad(detached, list(model.parameters()))
    assert any(not torch.allclose(g, h, rtol=1e-3, atol=1e-6) for g, h in zip(grads, g_det))


@pytest.mark.parametrize("norm", NORMS)
def test_trades_attack_is_kl_pgd_from_the_clean_prediction(tiny_model, norm):
    """x' = PGD ascending KL(softmax f(x) ‖ softmax f(x')) (eval mode), K steps of 2·eps/K from
    x + 0.001·N(0, 1), seeded from the run's seed + 1 at the first batch; a CE attack gives another x'."""
    torch.manual_seed(0)
    model = tiny_model()
    model.train()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    eps, seed = EPS[norm], 4
    method = build("trades", model, TradesOptions(norm=norm, eps=eps, steps=3), seed=seed)
    assert method.options.step == pytest.approx(2 * eps / 3) and method.passes == 5
    adv = method.adversarial(x, y)
    assert model.training
    model.eval()
    with torch.no_grad():
        p = model(x).softmax(1)
    expect = PGD(model, norm=norm, eps=eps, steps=3, step_size=2 * eps / 3, start_std=1e-3, keep="last",
                 objective="kl", seed=seed + 1)(x, p)
    assert torch.equal(adv, expect)
    ce = PGD(model, norm=norm, eps=eps, steps=3, step_size=2 * eps / 3, keep="last", seed=seed + 1)(x, y)
    assert not torch.allclose(adv, ce)


@pytest.mark.parametrize("norm", NORMS)
def test_trades_pgd_increases_the_kl(trained_tiny, norm):
    """KL-PGD from x + 0.001·N(0, 1): the KL to the clean prediction grows far beyond its start and beyond
    random noise of the same radius, inside the ball and [0, 1]; the loss PGD reports is that KL."""
    model, eps = trained_tiny.model, {"l2": 1.0, "linf": 0.03}[norm]
    x = trained_tiny.x_test[:64]
    with torch.no_grad():
        p = model(x).softmax(1)
    kl = lambda xa: kl_from(model(xa), p).detach()  # noqa: E731
    start = PGD(model, norm=norm, eps=eps, steps=1, step_size=1e-12, start_std=1e-3, keep="last",
                objective="kl", seed=3)(x, p)
    adv = PGD(model, norm=norm, eps=eps, steps=10, rel_step=0.2, start_std=1e-3, keep="last",
              objective="kl", seed=3)(x, p)
    noise = (x + L2.random_start(x.shape, eps, torch.Generator().manual_seed(0)) if norm == "l2"
             else x + eps * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    assert (dist(adv, x, norm) <= eps + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    assert kl(adv).mean() > 10 * kl(start).mean() and kl(adv).mean() > 3 * kl(noise).mean()
    assert (kl(adv) >= kl(start)).float().mean() > 0.95
    with torch.no_grad():  # the objective: KL(p || q) summed over classes, per sample
        q = model(adv).log_softmax(1)
        torch.testing.assert_close(kl(adv), (p * (p.clamp_min(1e-30).log() - q)).sum(1), rtol=1e-4, atol=1e-6)


def test_pgd_objective_settings_are_checked():
    model = torch.nn.Linear(1, 1)
    with pytest.raises(UserError, match="keep='last'"):
        PGD(model, objective="kl")
    with pytest.raises(UserError, match="unknown objective"):
        PGD(model, objective="hinge", keep="last")
    with pytest.raises(UserError, match="start_std needs random_start"):
        PGD(model, start_std=0.001, random_start=False)
    assert PGD(model).settings()["objective"] == "ce"


# ---------------------------------------------------------------------------------------------- GradAlign

def test_alignment_is_the_mean_cosine_over_rows_with_both_gradients():
    g = torch.randn(4, 3, 2, 2)
    assert alignment(g, 2 * g).item() == pytest.approx(1.0) and alignment(g, -g).item() == pytest.approx(-1.0)
    h = g.clone()
    h[0] = 0   # a sample whose gradient vanished (a saturated loss) does not count, as in the authors' code
    other = torch.randn(4, 3, 2, 2)
    want = torch.nn.functional.cosine_similarity(g[1:].flatten(1), other[1:].flatten(1)).mean()
    assert alignment(h, other).item() == pytest.approx(want.item(), rel=1e-5)
    assert alignment(torch.zeros(2, 3), torch.ones(2, 3)).item() == 0.0


def test_gradalign_lambda_follows_the_authors_linf_rule_and_l2_needs_one():
    assert GradAlignOptions(norm="linf").weight == pytest.approx(0.2)
    assert GradAlignOptions(norm="linf", eps=16 / 255).weight == pytest.approx(2.0, abs=0.005)   # theirs: 2.000
    assert GradAlignOptions(norm="linf", eps=12 / 255).weight == pytest.approx(0.632, abs=0.001)  # theirs: 0.632
    assert GradAlignOptions(norm="l2", eps=0.5, align=0.3).weight == 0.3
    with pytest.raises(ConfigError, match="align has no default at L2"):
        GradAlignOptions(norm="l2").validate()


def test_gradalign_regulariser_is_differentiated_through_the_noisy_gradient(tiny_model):
    """The loss is CE at x + eps·sign(g1) plus λ(1 − cos(g1, g2)); the parameters' gradient differs from
    λ = 0's by exactly the regulariser's, so g2 keeps its graph (double backpropagation); x_adv is FGSM
    from zero, on the ball's corners."""
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    grads, losses, ce = {}, {}, {}
    for lam in (0.0, 5.0):
        model = tiny_model()   # the same weights and BatchNorm statistics for both (seeded)
        method = build("gradalign", model, GradAlignOptions(norm="linf", eps=8 / 255, align=lam), seed=3)
        model.zero_grad()
        loss, logits, _ = method.loss(x, y)
        loss.backward()
        grads[lam] = torch.cat([p.grad.flatten() for p in model.parameters()])
        losses[lam], ce[lam] = loss.item(), torch.nn.functional.cross_entropy(logits, y).item()
    assert losses[0.0] == pytest.approx(ce[0.0], rel=1e-6) and losses[5.0] > ce[5.0] + 0.01
    assert not torch.allclose(grads[0.0], grads[5.0])
    method = build("gradalign", model, GradAlignOptions(norm="linf", eps=8 / 255), seed=3)
    seen = []

    def forward(xa):   # the training forward: what it is given is x_adv
        seen.append(xa)
        return model(xa)
    method.train_model = forward
    method.loss(x, y)
    d = (seen[0] - x).abs()
    inside = (x > 8 / 255) & (x < 1 - 8 / 255)   # not clipped by [0, 1]
    assert torch.allclose(d[inside], torch.full_like(d[inside], 8 / 255), atol=1e-6)


# ---------------------------------------------------------------------------------- end to end, CLI

PEERS = {"nfgsm": (NFGSMOptions, {}, 2), "free": (FreeOptions, {"replays": 2}, 2),
         "trades": (TradesOptions, {"steps": 2}, 4), "gradalign": (GradAlignOptions, {"align": 0.5}, 5)}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(PEERS))
def test_each_peer_trains_end_to_end(name, norm, tmp_path):
    kind, extra, passes = PEERS[name]
    cfg = TrainConfig(method=name, options=kind(norm=norm, **extra), epochs=1, batch_size=16, lr=0.05)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in advgen.build_model("resnet20").state_dict().items()}
    torch.manual_seed(0)
    model, rec = train(cfg, *_sets(), out_dir=tmp_path / "r", progress=False)
    (row,) = rec["epochs"]
    assert row["steps"] == 3 and row["passes"] == 3 * passes and torch.isfinite(torch.tensor(row["train_loss"]))
    assert not model.training and rec["finished"]
    assert any(not torch.equal(init[k], v) for k, v in model.state_dict().items() if k in init)
    saved = json.loads((tmp_path / "r" / "run.json").read_text())["config"]
    assert saved["method"] == name and saved["options"]["norm"] == norm


@pytest.mark.parametrize("name, flags, expect", [
    ("nfgsm", ["--nfgsm-k", "1.5", "--attack-norm", "linf", "--attack-eps", "4/255"],
     {"k": 1.5, "norm": "linf", "eps": 4 / 255, "step_size": 4 / 255}),   # the step that ran: eps
    ("free", ["--free-replays", "2", "--attack-eps", "0.25"], {"replays": 2, "norm": "l2", "eps": 0.25}),
    ("trades", ["--trades-beta", "3", "--attack-norm", "linf", "--attack-step-size", "2/255"],
     {"beta": 3.0, "steps": 10, "step_size": 2 / 255, "norm": "linf"}),
])
def test_cli_trains_each_peer(name, flags, expect, tmp_path, capsys):
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=8)
    out = tmp_path / "run"
    assert main(["train", "--method", name, *flags, "--epochs", "1", "--batch-size", "20", "--data-dir", str(data),
                 "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    rec = json.loads((out / "run.json").read_text())
    options = rec["config"]["options"]
    assert {k: options[k] for k in expect} == expect
    assert rec["epochs"][0]["passes"] == 2 * passes_per_step(TrainConfig.from_dict(rec["config"]))


def test_cli_attack_steps_default_per_method(tmp_path):
    from advgen.cli import build_parser
    from advgen.cli.train import train_config_from_args
    parse = lambda *a: train_config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path), *a]))  # noqa: E731
    assert parse("--method", "trades").options.steps == 10
    assert parse("--method", "minmax").options.steps == 40
    assert parse("--method", "trades", "--attack-steps", "5").options.steps == 5


@pytest.mark.parametrize("argv, needle", [
    (["--method", "nfgsm", "--nfgsm-k", "-1"], "--nfgsm-k must be >= 0, got -1.0"),
    (["--method", "free", "--free-replays", "0"], "--free-replays must be >= 1, got 0"),
    (["--method", "trades", "--trades-beta", "-1"], "--trades-beta must be >= 0, got -1.0"),
    (["--method", "trades", "--attack-steps", "0"], "--attack-steps must be >= 1, got 0"),
    (["--method", "free", "--attack-eps", "-0.1"], "--attack-eps must be > 0, got -0.1"),
])
def test_peer_errors_name_the_cli_flag(argv, needle, tmp_path, capsys):
    assert main(["train", *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_compare_entries_of_the_peers_build_and_cost_what_they_say():
    """advgen compare's nfgsm / free / trades entries: options from their dicts, passes per step."""
    costs = {}
    for e in ENTRIES:
        if e.method in PEERS:
            cfg = TrainConfig(method=e.method, options=from_dict(METHODS[e.method].options, e.options()))
            cfg.validate()
            costs[e.name] = passes_per_step(cfg)
    assert costs == {"nfgsm-l2": 2, "free-l2": 8, "trades-l2": 12}


def test_every_linf16_entry_trains_and_watches_at_16_255():
    """linf16-quick moves each recipe to 16/255 whatever holds its radius (an attack's eps, a generator
    bank's bound); PGD-10's step, in pixel units in its recipe, follows as eps/4. Before, the preset's
    `eps` override was merged as a key and the generator entries were refused."""
    from pathlib import Path

    from advgen.apps.compare.plan import COMPARE_PRESETS, entry_config
    from advgen.training.config import at_radius
    from advgen.errors import ConfigError
    p = COMPARE_PRESETS["linf16-quick"]
    for e in p.entries:
        cfg, _ = entry_config(p, e, 0, Path("base"))
        cfg.validate()
        assert cfg.threat == ("linf", 16 / 255) and cfg.watch_threat == ("linf", 16 / 255), e.name
        if e.method == "generator":
            assert cfg.options.bank.size == 16 / 255 and cfg.options.step_size is None   # the step is the bound
    pgd10 = entry_config(p, next(e for e in p.entries if e.name == "pgd10-linf"), 0, Path("base"))[0]
    assert pgd10.options.step == 4 / 255
    with pytest.raises(ConfigError, match="no threat model"):
        at_radius(METHODS["standard"].options(), 16 / 255)
