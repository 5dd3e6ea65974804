"""The generator bank (Jung 2024, eq. 3) and the generator training method (eq. 2-5, gradient reversal)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import advgen
from advgen.errors import UserError
from advgen.models.generators import GeneratorBank, BankConfig
from advgen.training.generator import GeneratorMethod
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


def reference(bank, x, k, grad=None):
    """Expected output for samples x assigned to generators k (one generator at a time)."""
    inp = x if grad is None else torch.cat([x, grad], 1)
    out = torch.empty_like(x)
    for j in range(bank.cfg.n):
        sel = k == j
        if sel.any():
            out[sel] = ref_bound(ref_psi(bank, j, inp[sel]), x[sel], bank.cfg)
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
    from advgen.checkpoint import read_tensors
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


def test_recursions_need_the_input_gradient():
    cfg = advgen.TrainConfig(method="generator")
    cfg.options.recursions = 2
    with pytest.raises(UserError, match="recursions above 1 needs bank.grad_input"):
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
