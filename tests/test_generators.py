"""The generator bank (Jung 2024, eq. 3) and the generator training method (eq. 2-5, gradient reversal)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import advgen
from advgen.errors import UserError
from advgen.models.generators import GeneratorBank, BankConfig
from advgen.training.methods.generator import GeneratorMethod, GeneratorOptions
from advgen.training.method import Setup


def make_bank(seed=0, **kw) -> GeneratorBank:
    torch.manual_seed(seed)
    kw = {"n": 4, "width": 5, "depth": 3, **kw}
    return GeneratorBank(BankConfig(**kw))


def ref_psi(bank: GeneratorBank, k: int, inp: torch.Tensor) -> torch.Tensor:
    """Generator k run on its own: its slice of every grouped conv, as an ordinary conv (groups=1)."""
    n = bank.cfg.n
    for i, conv in enumerate(bank.convs):
        cout = conv.out_channels // n
        inp = F.conv2d(inp, conv.weight[k * cout:(k + 1) * cout], conv.bias[k * cout:(k + 1) * cout], padding=1)
        if i < len(bank.convs) - 1:
            inp = F.relu(inp)
    return inp


def ref_bound(psi, x, cfg):
    s = cfg.size
    if cfg.bound == "box":
        phi = x + psi if cfg.residual else psi
        adv = torch.clamp(phi, min=x - s, max=x + s)
    elif cfg.bound == "l2":
        adv = x + s * psi / psi.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        adv = x + s * torch.tanh(psi)
    return adv.clamp(0, 1)


def reference(bank, x, k, grad=None, memory=None, skip=None):
    """Expected output for samples x assigned to generators k (one generator at a time); grad and
    memory: the extra input channels as given, in this order; skip: added to ψ (grad_skip)."""
    inp = torch.cat([x] + [t for t in (grad, memory) if t is not None], 1)
    out = torch.empty_like(x)
    for j in range(bank.cfg.n):
        sel = k == j
        if sel.any():
            psi = ref_psi(bank, j, inp[sel]) + (0 if skip is None else skip[sel])
            out[sel] = ref_bound(psi, x[sel], bank.cfg)
    return out


def rand_images(b, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ bounds

@pytest.mark.parametrize("residual", [True, False])
def test_box_bound(residual):
    bank = make_bank(bound="box", size=0.05, residual=residual)
    x = rand_images(8)
    with torch.no_grad():
        adv, _ = bank(x)
    assert adv.shape == x.shape
    assert ((adv - x).abs() <= 0.05 + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    inner = (x > 0.05) & (x < 0.95)
    assert ((adv - x).abs()[inner] > 0.05 - 1e-6).float().mean() > 0.05   # the box is active somewhere


@pytest.mark.parametrize("residual", [True, False])
def test_box_bound_is_eq3(residual):
    """g(x) = min(max(φ(x), x − s), x + s) with φ = x + ψ (residual) or ψ, clipped to [0, 1]."""
    for size in (0.05, 10.0):
        bank = make_bank(bound="box", size=size, residual=residual, n=2)
        x = rand_images(4)
        with torch.no_grad():
            adv, k = bank(x)
            psi = torch.stack([ref_psi(bank, int(k[j]), x[j:j + 1])[0] for j in range(4)])
        phi = x + psi if residual else psi
        expect = torch.minimum(torch.maximum(phi, x - size), x + size).clamp(0, 1)
        torch.testing.assert_close(adv, expect, atol=1e-5, rtol=0)
        if size == 10.0:  # no effective box: the generator's output itself, clipped
            torch.testing.assert_close(adv, phi.clamp(0, 1), atol=1e-5, rtol=0)


def test_l2_bound():
    bank = make_bank(bound="l2", size=0.5)
    x = rand_images(8)
    with torch.no_grad():
        adv, _ = bank(x)
    d = (adv - x).flatten(1).norm(dim=1)
    assert (d <= 0.5 + 1e-5).all()
    assert adv.min() >= 0 and adv.max() <= 1
    # no clipping: the whole budget is spent
    x = torch.full((6, 3, 32, 32), 0.5)
    with torch.no_grad():
        adv, _ = bank(x)
    assert (adv - x).abs().max() < 0.5
    torch.testing.assert_close((adv - x).flatten(1).norm(dim=1), torch.full((6,), 0.5), atol=1e-5, rtol=0)


def test_linf_bound():
    bank = make_bank(bound="linf", size=0.03)
    x = rand_images(8)
    with torch.no_grad():
        adv, _ = bank(x)
    assert ((adv - x).abs() <= 0.03 + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > 0.001


# ------------------------------------------------------------------------------------------ batching

@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("b", [8, 7, 3, 1])
@pytest.mark.parametrize("bound", ["box", "l2", "linf"])
def test_bank_equals_separate_generators_split(b, depth, bound):
    bank = make_bank(depth=depth, bound=bound, size=0.1)
    x = rand_images(b)
    with torch.no_grad():
        adv, k = bank(x)
        assert torch.equal(k, torch.arange(b) % 4)                 # sample j -> generator j mod N
        torch.testing.assert_close(adv, reference(bank, x, k), atol=1e-5, rtol=0)


@pytest.mark.parametrize("b", [8, 7, 3])
def test_bank_equals_separate_generators_random(b):
    bank = make_bank(assign="random", size=0.1)
    x = rand_images(b)
    with torch.no_grad():
        adv, k = bank(x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(adv, reference(bank, x, k), atol=1e-5, rtol=0)
    counts = torch.bincount(k, minlength=4)
    assert counts.max() - counts.min() <= 1                       # parts as equal as possible
    # seeded: same generator seed, same assignment; some seed gives another one
    with torch.no_grad():
        _, k2 = bank(x, generator=torch.Generator().manual_seed(0))
        others = [bank(x, generator=torch.Generator().manual_seed(s))[1] for s in range(1, 6)]
    assert torch.equal(k, k2)
    assert any(not torch.equal(k, o) for o in others)


@pytest.mark.parametrize("b", [8, 5])
def test_bank_equals_separate_generators_all(b):
    bank = make_bank(assign="all", size=0.1)
    x = rand_images(b)
    with torch.no_grad():
        adv, k = bank(x)
    assert adv.shape == (4 * b, 3, 32, 32)
    assert torch.equal(k, torch.arange(4).repeat_interleave(b))      # generator-major
    for j in range(4):
        with torch.no_grad():
            expect = ref_bound(ref_psi(bank, j, x), x, bank.cfg)
        torch.testing.assert_close(adv[j * b:(j + 1) * b], expect, atol=1e-5, rtol=0)


def test_bank_with_input_gradient():
    bank = make_bank(grad_input=True, size=0.1)
    x = rand_images(6)
    grad = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adv, k = bank(x, grad)
        torch.testing.assert_close(adv, reference(bank, x, k, grad), atol=1e-5, rtol=0)
        assert not torch.allclose(adv, bank(x, torch.zeros_like(grad))[0])
    with pytest.raises(ValueError):
        bank(x)


def test_generators_differ():
    bank = make_bank(size=1.0, residual=False)
    x = rand_images(1).expand(4, -1, -1, -1)
    with torch.no_grad():
        adv, k = bank(x)
    assert torch.equal(k, torch.arange(4))
    assert not torch.allclose(adv[0], adv[1]) and not torch.allclose(adv[2], adv[3])


def test_reset_generator_changes_only_that_generator():
    bank = make_bank(n=4)
    before = copy.deepcopy(bank.state_dict())
    bank.reset_generator([2])
    for i, conv in enumerate(bank.convs):
        cout = conv.out_channels // 4
        for name in ("weight", "bias"):
            old, new = before[f"convs.{i}.{name}"], getattr(conv, name).detach()
            for k in range(4):
                sl = slice(k * cout, (k + 1) * cout)
                if k == 2:
                    assert not torch.equal(old[sl], new[sl]), (i, name)
                    assert new[sl].abs().max() <= 1 / (conv.in_channels // 4 * 9) ** 0.5 + 1e-6
                else:
                    assert torch.equal(old[sl], new[sl]), (i, name, k)


def test_generator_config_validation():
    for bad in (dict(n=0), dict(bound="sphere"), dict(size=0.0), dict(size=float("nan")), dict(depth=0),
                dict(width=0), dict(assign="roundrobin")):
        with pytest.raises(UserError):
            GeneratorBank(BankConfig(**bad))


# ------------------------------------------------------------------------------------------ the method

def _setup(model, steps_per_epoch=10):
    return Setup(device=torch.device("cpu"), steps_per_epoch=steps_per_epoch, seed=0)


def generator_method(model, n=8, size=0.05, lr=0.05, **gen):
    cfg = advgen.TrainConfig(method="generator", seed=0)
    cfg.options.lr = lr
    cfg.options.bank = BankConfig(n=n, size=size)
    for k, v in gen.items():
        setattr(cfg.options, k, v)
    cfg.validate()
    torch.manual_seed(0)
    return GeneratorMethod(model, cfg.options, _setup(model))


def measured_loss(method, model, x, y):
    """CE of the classifier on the bank's current output, same (deterministic 'split') assignment."""
    with torch.no_grad():
        x_adv, _ = method.bank(x)
        return F.cross_entropy(model(x_adv), y).item()


def test_generator_step_ascends_the_loss(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    x, y = trained_tiny.x_test[:64], trained_tiny.y_test[:64]
    method = generator_method(model)
    theta = copy.deepcopy(model.state_dict())
    before = measured_loss(method, model, x, y)
    loss, logits, labels = method.loss(x, y)
    assert loss.item() == pytest.approx(before, abs=1e-5)
    assert logits.shape == (64, 10) and torch.equal(labels, y)
    loss.backward()
    old = [p.detach().clone() for p in method.bank.parameters()]
    grads = [p.grad.clone() for p in method.bank.parameters()]
    method.after_step()
    # SGD with maximize=True: ω' = ω + η ∂L/∂ω
    for p, o, g in zip(method.bank.parameters(), old, grads):
        torch.testing.assert_close(p.detach(), o + 0.05 * g)
    after = measured_loss(method, model, x, y)
    assert after > before + 0.1, (before, after)
    for k, v in model.state_dict().items():                   # the classifier did not move
        if not k.endswith("running_mean") and not k.endswith("running_var") and "num_batches" not in k:
            assert torch.equal(v, theta[k]), k


def test_classifier_step_descends_the_loss(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    x, y = trained_tiny.x_test[:64], trained_tiny.y_test[:64]
    method = generator_method(model)
    omega = copy.deepcopy(method.bank.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = measured_loss(method, model, x, y)
    loss, _, _ = method.loss(x, y)
    opt.zero_grad()
    loss.backward()
    opt.step()                                                # no after_step: generators fixed
    after = measured_loss(method, model, x, y)
    assert after < before - 0.05, (before, after)
    for k, v in method.bank.state_dict().items():
        assert torch.equal(v, omega[k])


def test_loss_runs_the_classifier_once(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x, y = trained_tiny.x_test[:64], trained_tiny.y_test[:64]
    cfg = advgen.TrainConfig(method="generator")
    cfg.validate()
    method = GeneratorMethod(model, cfg.options, _setup(model))
    loss, _, _ = method.loss(x, y)
    assert calls == [64]
    loss.backward()
    method.after_step()
    assert calls == [64]


@pytest.mark.parametrize("gen,forwards", [(dict(steps=3), 3)])
def test_extra_ascent_steps_cost_extra_forwards(trained_tiny, gen, forwards):
    model = copy.deepcopy(trained_tiny.model).train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    method = generator_method(model, **gen)
    x, y = trained_tiny.x_test[:32], trained_tiny.y_test[:32]
    before = measured_loss(method, model, x, y)
    calls.clear()
    method.loss(x, y)
    assert len(calls) == forwards
    assert measured_loss(method, model, x, y) > before        # the extra steps ascended already


def test_input_gradient_variant_and_clean_fraction(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cfg = advgen.TrainConfig(method="generator")
    cfg.options.bank = BankConfig(n=4, grad_input=True)
    cfg.options.clean_fraction = 0.25
    cfg.validate()
    method = GeneratorMethod(model, cfg.options, _setup(model))
    x, y = trained_tiny.x_test[:32], trained_tiny.y_test[:32]
    loss, logits, labels = method.loss(x, y)
    assert calls == [24, 32]                                  # gradient pass on the adversarial part, then one pass
    assert torch.equal(labels, y)
    loss.backward()
    assert all(p.grad is not None for p in method.bank.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_train_loop_with_generator_method(tmp_path):
    """A smoke run of the real loop (ResNet-20, one epoch of 64 images) saving the generator bank."""
    from advgen.io import read_tensors
    from advgen.data import Dataset
    g = torch.Generator().manual_seed(0)
    ds = Dataset(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(64) % 10, 10)
    cfg = advgen.TrainConfig(method="generator", epochs=1, batch_size=32, lr=0.01)
    cfg.options.bank = BankConfig(n=4, width=4)
    torch.manual_seed(0)
    model, record = advgen.train(cfg, ds, first_16(ds), out_dir=tmp_path, progress=False)
    assert not model.training
    assert len(record["epochs"]) == 1 and record["epochs"][0]["epoch"] == 1
    assert 0 <= record["epochs"][0]["test_acc"] <= 1
    tensors, meta = read_tensors(tmp_path / "generators.safetensors")
    assert set(tensors) == {f"convs.{i}.{w}" for i in range(3) for w in ("weight", "bias")}
    assert meta["config"]["n"] == 4
    assert (tmp_path / "run.json").exists() and (tmp_path / "model.safetensors").exists()


def first_16(ds):
    from advgen.data import first_n
    return first_n(ds, 16)


def test_warmup_ramps_the_bound_without_touching_the_config(tiny_model):
    model = tiny_model().train()
    cfg = advgen.TrainConfig(method="generator")
    cfg.options.warmup_epochs = 1.0
    cfg.options.bank = BankConfig(n=4, size=0.2)
    method = GeneratorMethod(model, cfg.options, _setup(model))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    sizes = []
    for _ in range(12):
        loss, _, _ = method.loss(x, y)
        sizes.append(method.bank.cfg.size)
        assert cfg.options.bank.size == 0.2                  # the run's config still says s
        loss.backward()
        method.after_step()
    assert sizes[:3] == pytest.approx([0.02, 0.04, 0.06])
    assert sizes[9:] == pytest.approx([0.2] * 3)
    assert cfg.to_dict()["options"]["bank"]["size"] == 0.2


def test_reinit_bookkeeping(tiny_model):
    model = tiny_model().train()
    cfg = advgen.TrainConfig(method="generator")
    cfg.options.reinit_every = 2
    cfg.options.bank = BankConfig(n=4)
    method = GeneratorMethod(model, cfg.options, _setup(model))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    loss, _, _ = method.loss(x, y)
    assert method.gen_seen.tolist() == [2, 2, 2, 2]
    assert method.gen_loss.sum().item() == pytest.approx(loss.item() * 8, rel=1e-5)
    loss.backward()
    method.after_step()
    weights = copy.deepcopy(method.bank.state_dict())
    loss, _, _ = method.loss(x, y)
    weakest = int(torch.argmin(method.gen_loss / method.gen_seen))
    loss.backward()
    method.after_step()                                        # step 2: the weakest generator is re-drawn
    assert method.gen_seen.sum() == 0 and method.gen_loss.sum() == 0
    conv = method.bank.convs[0]
    cout = conv.out_channels // 4
    sl = slice(weakest * cout, (weakest + 1) * cout)
    # the re-drawn generator moved far more than one small SGD step moves the others
    moved = (conv.weight.detach() - weights["convs.0.weight"]).abs()
    others = torch.cat([moved[k * cout:(k + 1) * cout] for k in range(4) if k != weakest])
    assert moved[sl].mean() > 10 * others.mean()


# ------------------------------------------------------------------- variants beyond one gradient step

def _variant(model, **opts):
    cfg = advgen.TrainConfig(method="generator", seed=0)
    cfg.options.bank = BankConfig(n=4, bound="l2", size=0.5, grad_input=True, grad_skip=True, width=4)
    for k, v in opts.items():
        setattr(cfg.options, k, v)
    cfg.validate()
    torch.manual_seed(0)
    return GeneratorMethod(model, cfg.options, _setup(model))


@pytest.mark.parametrize("opts, gradients", [
    (dict(recursions=2), 2), (dict(recursions=3), 3), (dict(step_after=True), 2),
    (dict(recursions=2, step_after=True, step_size=0.2), 3)])
def test_variants_stay_in_the_ball_cost_their_passes_and_train_the_bank(trained_tiny, opts, gradients):
    model = copy.deepcopy(trained_tiny.model).train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    method = _variant(model, **opts)
    x, y = trained_tiny.x_test[:16], trained_tiny.y_test[:16]
    x_adv, _, _ = method._generate(x, y)
    assert len(calls) == gradients and method.passes == gradients + 1
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-4).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    calls.clear()
    loss, _, _ = method.loss(x, y)
    assert len(calls) == gradients + 1
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.bank.parameters())


def test_the_step_after_the_bank_moves_its_sample_along_the_gradient(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    x, y = trained_tiny.x_test[:16], trained_tiny.y_test[:16]
    plain = _variant(model)
    stepped = _variant(model, step_after=True, step_size=0.25)
    start, _, _ = plain._generate(x, y)               # same seed: the same bank, so the same start
    end, _, _ = stepped._generate(x, y)
    assert not torch.allclose(start, end)
    ce = lambda t: F.cross_entropy(model.eval()(t.detach()), y).item()  # noqa: E731
    assert ce(end) > ce(start)                        # a gradient step from the start raises the loss


def test_the_unprojected_step_leaves_the_ball_by_the_step_and_the_bank_still_learns(trained_tiny):
    """step_project=False (recipe gen-nfgsm-*): the stepped sample is clipped to [0, 1] only, so its
    perturbation exceeds the bound s (up to s + step) where the projected variant stays inside."""
    model = copy.deepcopy(trained_tiny.model).train()
    x, y = trained_tiny.x_test[:16], trained_tiny.y_test[:16]
    projected = _variant(model, step_after=True, step_size=0.5)
    free = _variant(model, step_after=True, step_size=0.5, step_project=False)
    inside, _, _ = projected._generate(x, y)
    outside, _, _ = free._generate(x, y)
    size = lambda t: (t - x).flatten(1).norm(dim=1)  # noqa: E731
    assert (size(inside) <= 0.5 + 1e-4).all()
    assert (size(outside) > 0.5 + 1e-3).any() and (size(outside) <= 1.0 + 1e-4).all()
    assert outside.min() >= 0 and outside.max() <= 1 and free.passes == 3
    loss, _, _ = free.loss(x, y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in free.bank.parameters())


def test_the_unprojected_step_needs_a_step_and_no_memory():
    cfg = advgen.TrainConfig(method="generator")
    cfg.options.step_project = False
    with pytest.raises(UserError, match="options.step_project off needs options.step_after"):
        cfg.validate()
    cfg.options.step_after = cfg.options.memory = True
    with pytest.raises(UserError, match="options.step_project off cannot be combined with options.memory"):
        cfg.validate()
    from advgen.recipes import recipe_config
    r = recipe_config("gen-nfgsm-linf")
    r.validate()
    assert r.threat == ("linf", 8 / 255) and not r.options.step_project and r.options.step_after


def test_recursions_need_the_input_gradient():
    cfg = advgen.TrainConfig(method="generator")
    cfg.options.recursions = 2
    with pytest.raises(UserError, match="recursions above 1 needs options.bank.grad_input"):
        cfg.validate()


def test_random_assignment_is_kept_across_recursions(trained_tiny):
    """Both applications of the bank use one shuffle: k follows that draw, and the RNG advanced by one."""
    model = copy.deepcopy(trained_tiny.model).train()
    method = _variant(model, recursions=2)
    method.options.bank.assign = method.bank.cfg.assign = "random"
    x, y = trained_tiny.x_test[:16], trained_tiny.y_test[:16]
    ref = torch.Generator()
    ref.set_state(method.assign_rng.get_state())
    perm = torch.randperm(16, generator=ref)
    _, _, k = method._generate(x, y)
    assert torch.equal(k, (torch.arange(16) % 4)[torch.argsort(perm)])
    assert torch.equal(method.assign_rng.get_state(), ref.get_state())


# ------------------------------------------------------------------------------ memory across epochs

def test_bank_sees_the_previous_perturbation_in_units_of_the_bound():
    """With memory_input the bank's input is [x, g, δ_prev / unit] (unit: s/√D for l2, s for box), and
    grad_skip adds the gradient's channels alone; a bank that ignored δ_prev would fail both checks."""
    x = rand_images(6)
    g = torch.Generator().manual_seed(2)
    grad, delta = torch.randn(6, 3, 32, 32, generator=g), 0.01 * torch.randn(6, 3, 32, 32, generator=g)
    for bound, unit in (("l2", 0.5 / 3072 ** 0.5), ("box", 0.5)):
        bank = make_bank(bound=bound, size=0.5, grad_input=True, grad_skip=True, memory_input=True)
        assert bank.convs[0].in_channels == 4 * 9                       # N generators x (x, g, δ_prev)
        with torch.no_grad():
            adv, k = bank(x, grad, memory=delta)
            torch.testing.assert_close(adv, reference(bank, x, k, grad, delta / unit, skip=grad), atol=1e-5, rtol=0)
            assert (adv - bank(x, grad, memory=torch.zeros_like(delta))[0]).abs().max() > 1e-3
    bank = make_bank(memory_input=True)                                  # without the gradient: [x, δ_prev / s]
    with torch.no_grad():
        adv, k = bank(x, memory=delta)
        torch.testing.assert_close(adv, reference(bank, x, k, memory=delta / 0.2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pass memory="):
        bank(x)


def _memory_data(trained_tiny, n=24, batch=8, seed=1):
    """(Dataset of n of the tiny test images as uint8, augmenting Batches over it)."""
    from advgen.data import Batches, Dataset
    ds = Dataset((trained_tiny.x_test[:n] * 255).round().to(torch.uint8), trained_tiny.y_test[:n], 10)
    return ds, Batches(ds, batch, seed=seed)


def memory_method(model, train_size=24, bank=None, **opts):
    cfg = advgen.TrainConfig(method="generator", seed=0)
    cfg.options.bank = BankConfig(**{"n": 4, "bound": "l2", "size": 0.5, "grad_input": True, "grad_skip": True,
                                     "width": 4, **(bank or {})})
    cfg.options.memory = True
    for k, v in opts.items():
        setattr(cfg.options, k, v)
    cfg.validate()
    torch.manual_seed(0)
    return GeneratorMethod(model, cfg.options, Setup(device=torch.device("cpu"), steps_per_epoch=3, seed=0,
                                                     train_size=train_size))


def _training_inputs(model):
    """A list that receives the input of every classifier call (the last one of a step: the training pass)."""
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    return seen


def test_memory_is_written_in_the_dataset_frame_and_read_in_the_next_crop(trained_tiny):
    """Epoch 1 stores δ = x_adv − x of every sample; in epoch 2 the bank's δ_prev shows each stored value
    on the image pixel it was made for, after another crop and flip (reference: synth_cifar.shown_pixels)."""
    from synth_cifar import shown_pixels
    model = copy.deepcopy(trained_tiny.model).train()
    ds, batches = _memory_data(trained_tiny)
    method = memory_method(model, step_after=True)
    assert method.per_sample and method.passes == 3
    inputs = _training_inputs(model)
    made = torch.zeros(24, 3, 32, 32)                 # δ in the dataset frame, from the augmentation alone
    aug = {}
    for x, y, where in batches.epoch(1, where=True):
        method.loss(x, y, where=where)
        delta = inputs[-1] - x
        for b, i in enumerate(where.idx.tolist()):
            aug[i] = (int(where.offs[0, b]), int(where.offs[1, b]), bool(where.flip[b]))
            r, c, inside = shown_pixels(*aug[i], where.pad)
            made[i][:, r[inside], c[inside]] = delta[b][:, inside]
    assert method.memory.dtype == torch.float16 and method.memory.shape == (24, 3, 32, 32)
    assert torch.equal(method.memory, made.half())   # the pixels every crop cut off hold 0
    seen = []
    method.bank.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["memory"].clone()), with_kwargs=True)
    moved = 0
    remade = torch.zeros(24, 3, 32, 32)
    for x, y, where in batches.epoch(2, where=True):
        method.loss(x, y, where=where)
        delta = inputs[-1] - x
        for b, i in enumerate(where.idx.tolist()):
            now = (int(where.offs[0, b]), int(where.offs[1, b]), bool(where.flip[b]))
            r, c, inside = shown_pixels(*now, where.pad)
            want = torch.zeros(3, 32, 32)
            want[:, inside] = made[i][:, r[inside], c[inside]].half().float()
            assert torch.equal(seen[-1][b], want), i
            remade[i][:, r[inside], c[inside]] = delta[b][:, inside]
            moved += now != aug[i]
    assert moved >= 20
    # a row holds the last visit's δ alone: pixels that crop cut off are 0, not epoch 1's values
    assert torch.equal(method.memory, remade.half())
    assert not method.memory.requires_grad and method.memory.grad_fn is None


def test_the_bank_uses_the_previous_perturbation(trained_tiny):
    """The same bank and batch with another buffer give another x_adv: δ_prev reaches the bank."""
    model = copy.deepcopy(trained_tiny.model).eval()
    _, batches = _memory_data(trained_tiny)
    x, y, where = next(batches.epoch(1, where=True))
    method = memory_method(model)
    inputs = _training_inputs(model)
    method.loss(x, y, where=where)
    first = inputs[-1]
    method.loss(x, y, where=where)                   # the same rows again: now δ_prev = the first δ
    assert (inputs[-1] - first).abs().max() > 1e-3
    method.memory.zero_()
    method.loss(x, y, where=where)                   # back to zeros: the first sample again
    torch.testing.assert_close(inputs[-1], first, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bound, size", [("box", 0.05), ("linf", 0.03), ("l2", 0.5)])
def test_stored_perturbations_respect_the_bound(trained_tiny, bound, size):
    model = copy.deepcopy(trained_tiny.model).train()
    ds, batches = _memory_data(trained_tiny)
    method = memory_method(model, bank={"bound": bound, "size": size, "grad_skip": bound == "l2"},
                           step_after=True, lr=0.05)
    images = ds.images.float() / 255
    for epoch in (1, 2):
        for x, y, where in batches.epoch(epoch, where=True):
            loss, _, _ = method.loss(x, y, where=where)
            loss.backward()
            method.after_step()
            delta = method.memory.float()
            tol = size * 2 ** -10                    # float16 rounding of the stored values
            if bound == "l2":
                assert (delta.flatten(1).norm(dim=1) <= size + tol).all()
            else:
                assert delta.abs().max() <= size + tol
            # each δ is one for its own image, un-cropped and un-flipped: x + δ stays in [0, 1]
            assert (images + delta).min() >= -tol and (images + delta).max() <= 1 + tol
    assert (method.memory.float().flatten(1).norm(dim=1) > 0.5 * size).all()   # every sample was perturbed
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.bank.parameters())


def test_memory_needs_where_and_a_training_set_size(trained_tiny):
    model = copy.deepcopy(trained_tiny.model)
    x, y = trained_tiny.x_test[:8], trained_tiny.y_test[:8]
    with pytest.raises(ValueError, match="where=Where"):
        memory_method(model).loss(x, y)
    _, batches = _memory_data(trained_tiny)
    x, y, where = next(batches.epoch(1, where=True))
    with pytest.raises(ValueError, match="train_size"):
        memory_method(model, train_size=0).loss(x, y, where=where)
    assert not generator_method(model).per_sample


@pytest.mark.parametrize("bound, size, norm", [("l2", 0.5, "l2"), ("box", 0.05, "linf")])
def test_the_control_steps_from_the_previous_perturbation(trained_tiny, bound, size, norm):
    """start memory: x_adv = x + P_s(x0 + α·d(∇L(x0)) − x), x0 = clip(x + δ_prev), no bank, 2 passes;
    the first visit (δ_prev = 0) is the plain step from x; the stored δ is x_adv − x."""
    from advgen.attacks.pgd import NORMS
    model = copy.deepcopy(trained_tiny.model).train()
    _, batches = _memory_data(trained_tiny)
    method = memory_method(model, bank={"bound": bound, "size": size, "grad_input": False, "grad_skip": False},
                           step_after=True, start="memory", step_size=0.75 * size)
    assert method.bank is None and method.modules() == {} and method.passes == 2
    inputs = _training_inputs(model)
    p = NORMS[norm]
    starts = []
    for epoch in (1, 2):
        for x, y, where in batches.epoch(epoch, where=True):
            prev = where.gather(method.memory).float() if method.memory is not None else torch.zeros_like(x)
            starts.append(prev.abs().max().item())
            x0 = (x + prev).clamp(0, 1).requires_grad_(True)
            model.eval()
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
            model.train()
            want = (x + p.project(x0.detach() + 0.75 * size * p.direction(grad) - x, size)).clamp(0, 1)
            inputs.clear()
            loss, _, labels = method.loss(x, y, where=where)
            assert len(inputs) == 2 and torch.equal(labels, y)
            torch.testing.assert_close(inputs[-1], want, atol=1e-5, rtol=0)
            inside = where.gather(torch.ones_like(method.memory))
            assert torch.equal(where.gather(method.memory), ((inputs[-1] - x) * inside).half())
            loss.backward()
            method.after_step()
    assert max(starts[:3]) == 0 and min(starts[3:]) > 0   # epoch 1 starts at x, epoch 2 at x + δ_prev


def test_memory_options_that_make_no_sense_are_refused():
    def options(bank=None, **kw):
        cfg = advgen.TrainConfig(method="generator")
        for k, v in (bank or {}).items():
            setattr(cfg.options.bank, k, v)
        for k, v in kw.items():
            setattr(cfg.options, k, v)
        return cfg
    cases = [
        (dict(start="memory"), "options.start memory needs options.memory and options.step_after"),
        (dict(start="memory", memory=True), "options.start memory needs"),
        (dict(start="memory", memory=True, step_after=True, steps=2), "options.steps acts on the bank"),
        (dict(start="memory", memory=True, step_after=True, warmup_epochs=1.0), "options.warmup_epochs acts on"),
        (dict(start="memory", memory=True, step_after=True, bank={"grad_input": True}), "options.bank.grad_input feeds"),
        (dict(start="sample"), "options.start unknown: 'sample'; choose from bank, memory"),
        (dict(memory=True, bank={"assign": "all"}), "options.memory cannot be combined with options.bank.assign all"),
        (dict(bank={"memory_input": True}), "options.bank.memory_input needs options.memory"),
    ]
    for kw, needle in cases:
        with pytest.raises(UserError, match=re.escape(needle)):
            options(**kw).validate()
    options(memory=True, step_after=True, start="memory").validate()   # the control itself is fine
    options(memory=True, recursions=2, bank={"grad_input": True}).validate()


def test_memory_cli_flags():
    from advgen.cli import build_parser
    from advgen.cli.train import train_config_from_args
    parse = lambda *a: train_config_from_args(build_parser().parse_args(  # noqa: E731
        ["train", "--method", "generator", "--out", "x", *a])).options
    assert not parse().memory and parse().start == "bank"
    strong = parse("--gen-preset", "gradient", "--gen-memory", "true", "--gen-step-after", "true")
    assert strong.memory and strong.step_after and strong.bank.grad_input and strong.passes == 3
    # the paper preset has no gradient input, so the control needs no --gen-grad-input false
    control = parse("--gen-memory", "yes", "--gen-step-after", "on", "--gen-start", "memory")
    assert (control.memory, control.start, control.passes) == (True, "memory", 2)
    assert not parse("--gen-memory", "false").memory


def test_compare_entries_of_the_memory_variant_and_its_control():
    from advgen.apps.compare.plan import COMPARE_PRESETS, L2_ENTRIES as ENTRIES, passes_per_step
    from advgen.config import from_dict
    quick = {e.name: e for e in COMPARE_PRESETS["quick"].entries}
    costs = {}
    for name in ("gen-mem-l2", "mem-step-l2"):
        e = quick[name]
        cfg = advgen.TrainConfig(method=e.method, options=from_dict(GeneratorOptions, e.options()))
        cfg.validate()
        costs[name] = passes_per_step(cfg)
        assert cfg.options.memory and cfg.options.step_after
    assert costs == {"gen-mem-l2": 3, "mem-step-l2": 2}
    mem, ctl = (from_dict(GeneratorOptions, quick[n].options()) for n in ("gen-mem-l2", "mem-step-l2"))
    assert mem.bank.grad_input and mem.start == "bank" and ctl.start == "memory"
    assert (ctl.bank.bound, ctl.bank.size, ctl.step_size) == (mem.bank.bound, mem.bank.size, mem.step_size)
    assert {e.name for e in ENTRIES} >= {"gen-mem-l2", "mem-step-l2"}
    assert not any(e.options().get("memory") for e in COMPARE_PRESETS["smoke"].entries)