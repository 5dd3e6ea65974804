"""Evaluation that can be trusted: worst case over restarts, eval mode, visible sanity checks, bounded memory."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from synth_cifar import tiny_dataset, write_cifar
from torch import nn

from advgen.attacks import PGD
from advgen.cli import main
from advgen.training import TrainConfig
from advgen.data import Dataset
from advgen.models import Normalize
from advgen.training import train

torch.set_num_threads(1)
ev = importlib.import_module("advgen.evaluation.core")
from advgen.evaluation import sanity_checks  # noqa: E402
from conftest import curve_evaluation  # noqa: E402


def tiny(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize(), nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, 10))


class Masked(nn.Module):
    """Quantises its input: zero gradients everywhere, so gradient attacks cannot move (masking)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


class Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.max_batch = net, 0

    def forward(self, x):
        self.max_batch = max(self.max_batch, x.shape[0])
        return self.net(x)


def _data(n=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_restarts_keep_each_samples_worst_case():
    model = tiny().eval()
    x, y = _data()
    y = model(x).argmax(1)                      # every sample starts correctly classified
    one = PGD(model, norm="l2", eps=0.3, steps=3, restarts=1, seed=5)(x, y)
    many = PGD(model, norm="l2", eps=0.3, steps=3, restarts=4, seed=5)(x, y)   # restart 0 is the same run
    with torch.no_grad():
        l1, lm = (F.cross_entropy(model(a), y, reduction="none") for a in (one, many))
        f1, fm = (model(a).argmax(1) != y for a in (one, many))
    assert (fm | ~f1).all()                     # fooled once -> stays fooled
    keep = ~fm
    assert (lm[keep] >= l1[keep] - 1e-6).all()  # not fooled -> the highest loss over all restarts
    assert fm.sum() > f1.sum() or (lm > l1 + 1e-6).any()   # the extra restarts found something
    assert ((many - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    acc = [ev.robust_accuracy(model, x, y, lambda e, r=r: PGD(model, norm="l2", eps=e, steps=3, restarts=r, seed=5),
                              [0.3])[0] for r in (1, 4)]
    assert acc[1] <= acc[0]


def test_attacks_run_in_eval_mode_and_leave_the_model_as_it_was():
    model = tiny(dropout=0.5).train()
    x, y = _data(32)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    a = PGD(model, norm="linf", eps=8 / 255, steps=3, seed=1)(x, y)
    b = PGD(model, norm="linf", eps=8 / 255, steps=3, seed=1)(x, y)
    assert torch.equal(a, b)                    # dropout off: deterministic
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())   # BN statistics untouched
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    curve_evaluation(model, (x * 255).to(torch.uint8), y, epsilons=[0.0, 0.5], steps=2)
    assert model.training and all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


def test_sanity_checks_are_always_reported_and_failures_shown():
    x, y = _data(48)
    good = tiny().eval()
    res = curve_evaluation(good, x, good(x).argmax(1), epsilons=[0.0, 0.25, 0.5], steps=5)
    names = [c["name"] for c in res["checks"]]
    assert names == ["accuracy non-increasing in eps", "attack at least as strong as FGSM",
                     "large eps (10.0) drives accuracy to ~0"]
    assert all(c["passed"] for c in res["checks"]), res["checks"]
    masked = Masked(tiny()).eval()
    res = curve_evaluation(masked, x, masked(x).argmax(1), epsilons=[0.0, 0.5], steps=5)
    failed = [c for c in res["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["large eps (10.0) drives accuracy to ~0"]
    assert "gradients may be masked" in failed[0]["detail"]
    checks = sanity_checks("l2", [0.0, 0.5, 1.0], [0.9, 0.5, 0.7], [0.9, 0.4, 0.6], 0.0, 100)
    assert [c["passed"] for c in checks] == [False, False, True]


def test_cli_eval_prints_every_check_and_a_failure(tmp_path, monkeypatch, capsys):
    data = write_cifar(tmp_path / "d", per_batch=16, n_test=16)
    monkeypatch.setattr("advgen.cli.eval.load_model", lambda *a, **k: Masked(tiny()).eval())
    out = tmp_path / "eval.json"
    assert main(["eval", "masked", "--data-dir", str(data), "--device", "cpu", "--eps", "0,0.5", "--steps", "3",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "[ok] accuracy non-increasing in eps" in stdout and "[ok] attack at least as strong as FGSM" in stdout
    assert "[FAILED] large eps (10.0) drives accuracy to ~0" in stdout
    saved = json.loads(out.read_text())["checks"]
    assert [c["passed"] for c in saved] == [True, True, False]


def test_memory_is_bounded_by_the_batch_size(monkeypatch):
    converted = []
    real = ev._as_float
    monkeypatch.setattr(ev, "_as_float", lambda t: converted.append(t.shape[0]) or real(t))
    model = Recorder(tiny().eval())
    images = (torch.rand(100, 3, 32, 32) * 255).to(torch.uint8)   # uint8, as the CLI passes the test set
    labels = torch.randint(0, 10, (100,))
    curve_evaluation(model, images, labels, epsilons=[0.0, 0.5], steps=2, restarts=2, batch_size=16)
    assert model.max_batch <= 16 and max(converted) <= 16


def test_training_watch_converts_only_the_watched_images(monkeypatch, tmp_path):
    monkeypatch.setattr(Dataset, "float_images", lambda self: pytest.fail("whole test set converted to float"))
    cfg = TrainConfig(method="standard", epochs=1, batch_size=16, watch_subset=4, watch_steps=1)
    torch.manual_seed(0)
    _, rec = train(cfg, tiny_dataset(32, 1), tiny_dataset(64, 2), progress=False)
    assert 0.0 <= rec["epochs"][0]["watch_acc"] <= 1.0


def test_the_overfitting_check_sees_the_fall_and_the_state():
    """catastrophic_overfitting: PGD falling below half its best while FGSM holds (Wong et al. 2020), or, with
    no robust epoch to fall from, FGSM ≥ 10 points above PGD and PGD under a quarter of it (the CO pilot's
    FGSM from zero at 16/255: 0% PGD, 17.6% FGSM); a robust model's usual gap and early noise do not fire."""
    from advgen.training.metrics import catastrophic_overfitting as co
    best = [{"epoch": 1, "watch_acc": 0.30, "watch_fgsm_acc": 0.35}]
    assert co(best, {"watch_acc": 0.10, "watch_fgsm_acc": 0.40})        # the fall
    assert not co(best, {"watch_acc": 0.10, "watch_fgsm_acc": 0.12})    # both fell: not the signature
    assert not co(best, {"watch_acc": 0.28, "watch_fgsm_acc": 0.33})
    assert co([], {"watch_acc": 0.0, "watch_fgsm_acc": 0.176})           # the state, no history needed
    assert co(best, {"watch_acc": 0.02, "watch_fgsm_acc": 0.16})
    assert not co([], {"watch_acc": 0.17, "watch_fgsm_acc": 0.21})      # a robust model's gap
    assert not co([], {"watch_acc": 0.015, "watch_fgsm_acc": 0.08})     # early epochs: both low
    assert not co(best, {"test_acc": 0.5})                               # no watch
