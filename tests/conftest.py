"""Shared fixtures: the offline CIFAR-10 copy, tiny classifiers and one tiny model trained to break."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advgen

torch.set_num_threads(1)

# 10 class colours: the image mean is 0.5 + 0.08 * code per channel, plus pixel noise of std 0.15
CLASS_CODES = torch.tensor([[-1, -1, -1], [-1, -1, 1], [-1, 1, -1], [-1, 1, 1], [1, -1, -1],
                            [1, -1, 1], [1, 1, -1], [1, 1, 1], [0, 0, 1], [0, 1, 0]], dtype=torch.float)


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float (n, 3, 32, 32) in [0, 1], y int64 (n,)): class-dependent colour plus noise, balanced."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    x = 0.5 + 0.08 * CLASS_CODES[y][:, :, None, None] + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp(0, 1), y


def make_tiny(num_classes: int = 10, batchnorm: bool = True) -> nn.Sequential:
    """Sequential(Normalize, small conv net) taking (B, 3, 32, 32) pixels in [0, 1]."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), norm(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, 2, 1), norm(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    return nn.Sequential(advgen.models.Normalize(), net)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder that holds the offline cifar-10-batches-py/ (next to the repository root)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.skip(f"offline CIFAR-10 not found under {path}")
    return path


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(num_classes=10, seed=0, batchnorm=True) -> an untrained tiny classifier."""
    def factory(num_classes: int = 10, seed: int = 0, batchnorm: bool = True) -> nn.Sequential:
        torch.manual_seed(seed)
        return make_tiny(num_classes, batchnorm)
    return factory


@pytest.fixture(scope="session")
def trained_tiny() -> SimpleNamespace:
    """A tiny model trained (Adam, 8 epochs of 2000 images, ~1 s) to ~95 % test accuracy, in eval mode.

    Fields: model, x_train, y_train, x_test (500), y_test. Tests that change the model deep-copy it.
    """
    torch.manual_seed(0)
    x_train, y_train = synthetic_images(2000, seed=1)
    x_test, y_test = synthetic_images(500, seed=2)
    y_test[::20] = (y_test[::20] + 1) % 10                      # 5 % wrong labels: clean accuracy < 1
    model = make_tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(8):
        perm = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(y_train), 100):
            idx = perm[i:i + 100]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    acc = advgen.accuracy(model, x_test, y_test)
    assert acc > 0.9, f"tiny model only reached {acc:.3f} clean accuracy"
    return SimpleNamespace(model=model, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                           clean_acc=acc)


def full_evaluation(model, images, labels, *, pgd_eps=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0), aa_eps=(0.25, 0.5),
                    pgd_steps=50, restarts=2, seed=0, batch_size=500, progress_file=None, objectives=("ce", "margin"),
                    rel_step=advgen.evaluation.FULL_REL_STEP, norm="l2"):
    """The full evaluation's protocol from the settings of advgen 0.1's full_evaluation (the tests' way
    of saying them), run by the one evaluate()."""
    p = advgen.EvalProtocol(norm=norm, eps=tuple(pgd_eps), aa_eps=tuple(aa_eps), steps=pgd_steps, restarts=restarts,
                            seed=seed, batch_size=batch_size, objectives=tuple(objectives), rel_step=rel_step)
    return advgen.evaluate(model, images, labels, p, progress_file=progress_file)


def curve_evaluation(model, images, labels, *, attack="pgd-l2", epsilons=(0.0, 0.25, 0.5), steps=20, step_size=None,
                     rel_step=None, restarts=1, batch_size=500, seed=0, checks=True, objective=("ce", "margin")):
    """A curve under one attack, said as advgen 0.1's evaluate() said it, run by the one evaluate(); the
    result with its curve also as {"results": [{"eps", "accuracy"}]} as the tests read it."""
    kind, _, norm = attack.partition("-")
    norm = norm or "linf"
    p = advgen.EvalProtocol(norm=norm, eps=tuple(epsilons), attack=kind, steps=steps, step_size=step_size,
                            rel_step=rel_step, restarts=restarts, batch_size=batch_size, seed=seed, checks=checks,
                            objectives=(objective,) if isinstance(objective, str) else tuple(objective))
    out = advgen.evaluate(model, images, labels, p)
    out["results"] = [{"eps": float(e), "accuracy": d["accuracy"]} for e, d in out[f"{kind}_{norm}"].items()]
    return out
