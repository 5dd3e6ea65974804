"""Robust accuracy curves and the Carlini et al. 2019 sanity checks."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

from advgen.attacks import PGD
from advgen.errors import UserError
from advgen.evaluation import LARGE_EPS, accuracy, predict, robust_accuracy, sanity_checks
from conftest import curve_evaluation as evaluate
from conftest import full_evaluation

L2_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
LINF_GRID = [0.0, 0.02, 0.04, 0.06, 0.1]


def data(tt, n=200):
    return tt.x_test[:n], tt.y_test[:n]


# ------------------------------------------------------------------------------------------ accuracy

def test_predict_and_accuracy(trained_tiny):
    model = copy.deepcopy(trained_tiny.model).train()
    x, y = data(trained_tiny)
    pred = predict(model, x, batch_size=64)
    assert pred.shape == (200,) and pred.dtype == torch.int64
    assert all(m.training for m in model.modules())               # mode restored
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x).argmax(1)
    assert torch.equal(pred, ref)                                   # eval-mode predictions, batched
    acc = accuracy(model, x, y, batch_size=7)
    assert acc == pytest.approx((ref == y).float().mean().item())
    assert 0.9 < acc < 1.0                                          # the 5 % wrong labels cost accuracy
    # uint8 images are scaled to [0, 1]
    q = (x * 255).round().to(torch.uint8)
    assert torch.equal(predict(model, q), predict(model, q.float() / 255))


# ------------------------------------------------------------------------------------------ robust_accuracy

def pgd_at(model, norm, steps=10, **kw):
    return lambda eps: PGD(model, norm=norm, eps=eps, steps=steps, **kw)


@pytest.mark.parametrize("norm,grid", [("l2", L2_GRID), ("linf", LINF_GRID)])
def test_robust_accuracy_curve(trained_tiny, norm, grid):
    model = trained_tiny.model
    x, y = data(trained_tiny)
    accs = robust_accuracy(model, x, y, pgd_at(model, norm), grid, batch_size=64)
    assert isinstance(accs, list) and len(accs) == len(grid)
    assert all(isinstance(a, float) and 0 <= a <= 1 for a in accs)
    assert accs[0] == pytest.approx(accuracy(model, x, y))          # eps 0: clean accuracy
    assert all(b <= a + 1e-9 for a, b in zip(accs, accs[1:]))      # non-increasing
    assert accs[-1] < 0.05 and accs[0] > 0.9


def test_robust_accuracy_attacks_only_correct_samples_each_eps_alone(trained_tiny):
    model = trained_tiny.model
    x, y = data(trained_tiny, 100)
    ok = predict(model, x) == y
    calls = []

    def attack_at(eps):
        def attack(xb, yb):
            calls.append((eps, xb.shape[0]))
            assert (predict(model, xb) == yb).all()                 # only clean-correct samples
            return xb.clone() if eps < 1 else (1 - xb)              # a "perfect" attack above eps 1
        return attack

    accs = robust_accuracy(model, x, y, attack_at, [0.0, 0.5, 2.0], batch_size=40)
    assert [c[0] for c in calls] == [0.5, 2.0] * 3                  # eps 0 is never attacked; 3 batches
    assert sum(c[1] for c in calls if c[0] == 0.5) == ok.sum()
    assert accs[0] == pytest.approx(ok.float().mean().item())
    assert accs[1] == pytest.approx(accs[0])
    assert accs[2] < accs[0] - 0.5


def test_robust_accuracy_independent_of_batch_size_without_random_start(trained_tiny):
    model = trained_tiny.model
    x, y = data(trained_tiny)
    at = pgd_at(model, "l2", random_start=False)
    a = robust_accuracy(model, x, y, at, [0.0, 1.5, 2.0], batch_size=500)
    b = robust_accuracy(model, x, y, at, [0.0, 1.5, 2.0], batch_size=48)
    assert a == pytest.approx(b, abs=1e-6)
    assert a[1] < a[0]


def test_robust_accuracy_reseeds_every_batch(trained_tiny):
    seeds = []

    class Spy:
        seed = 10

        def __call__(self, x, y):
            seeds.append(self.seed)
            return x

    x, y = data(trained_tiny, 100)
    robust_accuracy(trained_tiny.model, x, y, lambda eps: Spy(), [0.5], batch_size=40)
    assert seeds == [10, 50, 90]


def test_robust_accuracy_on_uint8_images(trained_tiny):
    model = trained_tiny.model
    x, y = data(trained_tiny, 100)
    q = (x * 255).round().to(torch.uint8)
    at = pgd_at(model, "linf", random_start=False)
    assert robust_accuracy(model, q, y, at, [0.0, 0.04]) == pytest.approx(
        robust_accuracy(model, q.float() / 255, y, at, [0.0, 0.04]))


# ------------------------------------------------------------------------------------------ sanity checks

def passed(checks):
    return [c["passed"] for c in checks]


def test_sanity_checks_pass_a_good_curve():
    checks = sanity_checks("l2", [0, 0.5, 1.0], [0.9, 0.5, 0.2], [0.9, 0.6, 0.4], 0.0, n=100)
    assert len(checks) == 3 and passed(checks) == [True, True, True]
    assert all({"name", "passed", "detail"} <= set(c) for c in checks)


def test_sanity_checks_flag_a_rising_curve(caplog):
    with caplog.at_level(logging.WARNING, logger="advgen.evaluation.checks"):
        checks = sanity_checks("l2", [0, 0.5, 1.0], [0.9, 0.5, 0.7], None, None, n=100)
    assert len(checks) == 1 and checks[0]["passed"] is False
    assert "0.5" in checks[0]["detail"] and "1.0" in checks[0]["detail"]
    assert "sanity check failed" in caplog.text
    # within one sample (1/n + 0.005) is not a rise
    assert passed(sanity_checks("l2", [0, 0.5, 1.0], [0.9, 0.5, 0.51], None, None, n=100)) == [True]
    # the order of eps, not of the list, decides
    assert passed(sanity_checks("l2", [1.0, 0.0, 0.5], [0.2, 0.9, 0.5], None, None, n=100)) == [True]
    assert passed(sanity_checks("l2", [1.0, 0.0, 0.5], [0.6, 0.9, 0.5], None, None, n=100)) == [False]


def test_sanity_checks_flag_pgd_weaker_than_fgsm():
    checks = sanity_checks("linf", [0, 0.03], [0.9, 0.5], [0.9, 0.4], None, n=100)
    assert len(checks) == 2 and passed(checks) == [True, False]
    assert "0.03" in checks[1]["detail"]
    assert passed(sanity_checks("linf", [0, 0.03], [0.9, 0.41], [0.9, 0.4], None, n=100)) == [True, True]


@pytest.mark.parametrize("large,ok", [(0.0, True), (0.05, True), (0.06, False), (0.3, False)])
def test_sanity_checks_flag_large_eps_accuracy(large, ok):
    checks = sanity_checks("linf", [0, 0.03], [0.9, 0.5], None, large, n=100)
    assert len(checks) == 2 and checks[1]["passed"] is ok
    assert str(LARGE_EPS["linf"]) in checks[1]["name"]


# ------------------------------------------------------------------------------------------ evaluate

EVAL_KEYS = {"protocol", "settings", "attacks", "n", "clean", "checks", "samples", "seconds", "results"}


@pytest.mark.parametrize("attack,grid", [("pgd-l2", L2_GRID), ("pgd-linf", LINF_GRID)])
def test_evaluate_pgd_on_the_tiny_model(trained_tiny, attack, grid):
    model = trained_tiny.model
    x, y = data(trained_tiny)
    norm = attack.split("-")[1]
    r = evaluate(model, x, y, attack=attack, epsilons=grid, steps=10, batch_size=100)
    assert set(r) == EVAL_KEYS | {f"pgd_{norm}"}
    assert r["protocol"]["attack"] == "pgd" and r["protocol"]["norm"] == norm and r["n"] == 200
    assert r["protocol"]["steps"] == 10 and r["protocol"]["restarts"] == 1
    assert [row["eps"] for row in r["results"]] == grid
    accs = [row["accuracy"] for row in r["results"]]
    assert accs[0] == pytest.approx(accuracy(model, x, y))
    assert all(b <= a for a, b in zip(accs, accs[1:]))
    assert accs[-1] < 0.05
    fgsm = [r["samples"][f"fgsm:{e}"].count("1") / 200 for e in grid]   # the FGSM check's per-sample results
    assert all(a <= f + 0.01 for a, f in zip(accs, fgsm))
    assert len(r["checks"]) == 3 and all(c["passed"] for c in r["checks"]), r["checks"]
    assert all(v >= 0 for v in r["seconds"].values())
    for e, d in r[f"pgd_{norm}"].items():                               # every accuracy with its interval
        assert d["ci95"][0] <= d["accuracy"] <= d["ci95"][1] and d["n"] == 200


def test_evaluate_fgsm_and_without_checks(trained_tiny):
    model = trained_tiny.model
    x, y = data(trained_tiny, 100)
    r = evaluate(model, x, y, attack="fgsm-l2", epsilons=[0, 2.0], steps=10)
    assert r["protocol"]["norm"] == "l2" and set(r["samples"]) == {"clean", "fgsm:0.0", "fgsm:2.0", "large"}
    assert len(r["checks"]) == 2                                     # no FGSM comparison for FGSM itself
    r = evaluate(model, x, y, attack="pgd-l2", epsilons=[0, 2.0], steps=5, checks=False)
    assert "checks" not in r and "large" not in r["samples"]
    assert r["results"][1]["accuracy"] < r["results"][0]["accuracy"]


def test_evaluate_flags_a_too_weak_attack(trained_tiny):
    """PGD with a tiny step never leaves the start region: weaker than FGSM, and the checks say so."""
    model = trained_tiny.model
    x, y = data(trained_tiny, 100)
    r = evaluate(model, x, y, attack="pgd-l2", epsilons=[0, 2.0, 3.0], steps=2, rel_step=0.01)
    names = {c["name"]: c["passed"] for c in r["checks"]}
    assert names["attack at least as strong as FGSM"] is False
    assert names["accuracy non-increasing in eps"] is True


def test_evaluate_is_reproducible(trained_tiny):
    x, y = data(trained_tiny, 100)
    kw = dict(attack="pgd-linf", epsilons=[0.04], steps=5, checks=False)
    a = evaluate(trained_tiny.model, x, y, seed=1, **kw)["results"]
    b = evaluate(trained_tiny.model, x, y, seed=1, **kw)["results"]
    assert a == b


# ------------------------------------------------------------------------------------------ speed.inference_copy

def test_inference_copy_folds_batchnorm_and_keeps_the_function():
    from advgen import build_model
    from advgen.models.folding import inference_copy
    torch.manual_seed(0)
    model = build_model("resnet20").train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has something to get wrong
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    fast = inference_copy(model)
    assert model.training and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_evaluate_fast_and_plain_agree(trained_tiny):
    x, y = data(trained_tiny)
    kw = dict(attack="pgd-l2", epsilons=[0.0, 0.5, 1.0], steps=5, checks=False)
    fast = evaluate(trained_tiny.model, x, y, **kw)   # attacks the BatchNorm-folded copy
    model = trained_tiny.model
    plain = robust_accuracy(model, x, y, lambda e: PGD(model, norm="l2", eps=e, steps=5, seed=0), [0.0, 0.5, 1.0])
    for a, b in zip(fast["results"], plain):
        assert abs(a["accuracy"] - b) <= 2 / x.shape[0]  # float rounding may flip a sample


def test_wilson_interval_matches_the_formula_and_edges():
    from advgen.evaluation import wilson
    lo, hi = wilson(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)   # the textbook value for 50/100
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0 and 0 < wilson(0, 20)[1] < 0.2


class _FakeAA:
    """Stands for AutoAttack (tested in test_trust_eval): replaces every other image by grey, counts
    the images it is called on, and can be told to fail (a stopped run) after some calls."""
    calls: list = []
    fail_after: int | None = None

    def __init__(self, model, *, norm, eps, seed, **settings):
        self.model, self.eps, self.seed = model, eps, seed

    def __call__(self, xb, yb):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(xb.shape[0])
        out = xb.clone()
        out[self.seed % 2::2] = 0.5   # which images depends on the seed, as random starts do
        return out


# 3 PGD steps: Madry's 2.5 eps / steps, not the full evaluation's default (meant for 50 steps)
FULL = dict(pgd_eps=[0.0, 0.5, 2.0], aa_eps=[0.5], pgd_steps=3, restarts=1, batch_size=8, rel_step=2.5 / 3)


@pytest.fixture
def fake_aa(monkeypatch):
    monkeypatch.setattr("advgen.evaluation.protocol.AutoAttack", _FakeAA)
    _FakeAA.calls, _FakeAA.fail_after = [], None
    return _FakeAA


def _bits(out, key):
    return torch.tensor([c == "1" for c in out["samples"][key]])


def test_full_evaluation_worst_case_is_per_sample(tmp_path, trained_tiny, fake_aa):
    x, y = trained_tiny.x_test[:24], trained_tiny.y_test[:24]
    out = full_evaluation(trained_tiny.model, x, y, **{**FULL, "aa_eps": [2.0]})
    clean = out["clean"]
    assert clean["n"] == 24 and clean["ci95"][0] <= clean["accuracy"] <= clean["ci95"][1]
    pgd, aa = _bits(out, "pgd:2.0"), _bits(out, "aa:2.0")
    assert (pgd & ~aa).any() or (aa & ~pgd).any(), "the test needs attacks that fail on different samples"
    assert out["worst_case_l2"]["2.0"]["correct"] == int((pgd & aa).sum())
    assert out["worst_case_l2"]["2.0"]["correct"] < min(out["pgd_l2"]["2.0"]["correct"],
                                                        out["autoattack_l2"]["2.0"]["correct"])
    assert out["autoattack_l2"]["2.0"]["correct"] == int(aa.sum())
    assert out["pgd_l2"]["2.0"]["accuracy"] <= out["pgd_l2"]["0.5"]["accuracy"] <= out["pgd_l2"]["0.0"]["accuracy"]
    assert out["pgd_l2"]["0.0"]["correct"] == clean["correct"]
    assert {c["name"] for c in out["checks"]} >= {"accuracy non-increasing in eps", "attack at least as strong as FGSM"}
    gap = next(c for c in out["checks"] if c["name"] == "PGD within 3 points of AutoAttack")
    assert gap["passed"] == (out["pgd_l2"]["2.0"]["accuracy"] - out["autoattack_l2"]["2.0"]["accuracy"] <= 0.03 + 0.5 / 24)


def test_full_evaluation_resumes_inside_an_attack(tmp_path, trained_tiny, fake_aa):
    x, y = trained_tiny.x_test[:24], trained_tiny.y_test[:24]
    whole = full_evaluation(trained_tiny.model, x, y, **FULL)
    fake_aa.calls, fake_aa.fail_after = [], 1           # stopped during AutoAttack's second chunk of 8
    progress = tmp_path / "eval.json"
    with pytest.raises(KeyboardInterrupt):
        full_evaluation(trained_tiny.model, x, y, progress_file=progress, **FULL)
    saved = json.loads(progress.read_text())
    assert len(saved["samples"]["aa:0.5"]) == 8 and "pgd:2.0" in saved["samples"]
    fake_aa.calls, fake_aa.fail_after = [], None
    again = full_evaluation(trained_tiny.model, x, y, progress_file=progress, **FULL)
    assert len(fake_aa.calls) == 2                      # the two chunks left, not the whole attack
    assert again["samples"] == whole["samples"] and again["worst_case_l2"] == whole["worst_case_l2"]
    fake_aa.calls = []
    full_evaluation(trained_tiny.model, x, y, progress_file=progress, **FULL)
    assert fake_aa.calls == []                          # all read back


def test_compare_autoattack_resumes_inside_its_chunks(tmp_path, trained_tiny, monkeypatch, caplog):
    from advgen.apps.compare.plan import COMPARE_PRESETS
    from advgen.apps.compare.run import evaluate_model
    from advgen.evaluation import robust_accuracy
    monkeypatch.setattr("advgen.evaluation.protocol.AutoAttack", _FakeAA)
    _FakeAA.calls, _FakeAA.fail_after = [], None
    p = dataclasses.replace(COMPARE_PRESETS["smoke"], aa_chunk=5, aa_eps=[0.5])   # chunks seeded 3, 8, 13
    model, x, y = trained_tiny.model, trained_tiny.x_test[:15], trained_tiny.y_test[:15]
    whole = evaluate_model(model, x, y, p, autoattack=True, seed=3)
    assert len(_FakeAA.calls) == 3
    # chunk a seeded seed + a: the same per-sample results as one call in batches of the chunk's size
    one_call = robust_accuracy(model, x, y, lambda e: _FakeAA(model, norm="l2", eps=e, seed=3), [0.5], 5)[0]
    assert whole["autoattack"] == {"0.5": one_call}
    assert robust_accuracy(model, x, y, lambda e: _FakeAA(model, norm="l2", eps=e, seed=3), [0.5], 15)[0] != one_call
    progress = tmp_path / "eval-step-4.aa-progress.json"
    _FakeAA.calls, _FakeAA.fail_after = [], 1            # stopped during the second chunk
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(model, x, y, p, autoattack=True, seed=3, progress=progress)
    assert len(json.loads(progress.read_text())["samples"]["aa:0.5"]) == 5
    _FakeAA.calls, _FakeAA.fail_after = [], None
    assert evaluate_model(model, x, y, p, autoattack=True, seed=3, progress=progress) == whole
    assert len(_FakeAA.calls) == 2                       # the two chunks left
    # the run trained again: the file is stale, its AutoAttack starts over, said in a warning
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    _FakeAA.calls = []
    evaluate_model(other, x, y, p, autoattack=True, seed=3, progress=progress)
    assert len(_FakeAA.calls) == 3 and "model_sha256" in caplog.text and "starting it over" in caplog.text


def test_full_evaluation_step_size_and_the_settings_of_older_files(tmp_path, trained_tiny, fake_aa, monkeypatch):
    import importlib
    ev = importlib.import_module("advgen.evaluation.protocol")   # the module: advgen.evaluate is also a function
    x, y = trained_tiny.x_test[:8], trained_tiny.y_test[:8]
    steps = []
    real = ev.PGD

    def spy(*a, **k):
        steps.append(k["rel_step"])
        return real(*a, **k)
    monkeypatch.setattr(ev, "PGD", spy)
    default = {k: v for k, v in FULL.items() if k != "rel_step"}
    out = full_evaluation(trained_tiny.model, x, y, **default)
    large = 0.1   # the large-eps sanity check's own PGD
    assert out["settings"]["pgd_rel_step"] == ev.FULL_REL_STEP and set(steps) - {large} == {ev.FULL_REL_STEP}
    assert out["attacks"]["pgd_l2"]["step_size"] == f"{ev.FULL_REL_STEP:g} * eps"
    # Madry's 2.5 / steps, the step of the first evaluations: not named, so their files resume
    steps.clear()
    old = full_evaluation(trained_tiny.model, x, y, **FULL)
    assert "pgd_rel_step" not in old["settings"] and set(steps) - {large} == {2.5 / FULL["pgd_steps"]}


def test_full_evaluation_refuses_a_file_of_another_model_or_settings(tmp_path, trained_tiny, fake_aa):
    x, y = trained_tiny.x_test[:16], trained_tiny.y_test[:16]
    progress = tmp_path / "eval.json"
    full_evaluation(trained_tiny.model, x, y, progress_file=progress, **FULL)
    before = progress.read_bytes()
    other = copy.deepcopy(trained_tiny.model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(UserError, match="model_sha256 differ"):
        full_evaluation(other, x, y, progress_file=progress, **FULL)
    with pytest.raises(UserError, match="data_sha256, n differ"):
        full_evaluation(trained_tiny.model, x[:8], y[:8], progress_file=progress, **FULL)
    with pytest.raises(UserError, match="pgd_steps differ"):
        full_evaluation(trained_tiny.model, x, y, progress_file=progress, **{**FULL, "pgd_steps": 4})
    with pytest.raises(UserError, match="pgd_objectives differ"):     # CE only: the key left out, as before
        full_evaluation(trained_tiny.model, x, y, progress_file=progress, **FULL, objectives=("ce",))
    assert progress.read_bytes() == before              # refused, never overwritten


def test_full_evaluation_pgd_takes_the_objectives_in_turn(trained_tiny, fake_aa, monkeypatch):
    import sys
    ev = sys.modules["advgen.evaluation.protocol"]      # the package's `evaluate` attribute is the function
    made = []

    class Recording(ev.PGD):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((kwargs["steps"], self.objectives))

    monkeypatch.setattr(ev, "PGD", Recording)
    x, y = trained_tiny.x_test[:8], trained_tiny.y_test[:8]
    out = full_evaluation(trained_tiny.model, x, y, **FULL)
    assert out["settings"]["pgd_objectives"] == ["ce", "margin"]
    assert out["attacks"]["pgd_l2"]["objectives"] == ["ce", "margin"]
    assert {o for steps, o in made if steps == FULL["pgd_steps"]} == {("ce", "margin")}
    made.clear()
    out = full_evaluation(trained_tiny.model, x, y, **FULL, objectives=("margin",))
    assert {o for steps, o in made if steps == FULL["pgd_steps"]} == {("margin",)}
    assert out["settings"]["pgd_objectives"] == ["margin"]


@pytest.mark.slow
def test_full_evaluation_with_the_real_standard_autoattack(tiny_model):
    """The pyautoattack package's standard version through the adapter (an untrained model: few
    points to attack, seconds): AutoAttack never does better than clean, the worst case never better
    than either attack."""
    from conftest import synthetic_images
    x, y = synthetic_images(8, 3)
    out = full_evaluation(tiny_model(seed=1).eval(), x, y, pgd_eps=[0.0, 0.25], aa_eps=[0.25], pgd_steps=2,
                          restarts=1)
    aa, pgd, worst = (out[k]["0.25"]["correct"] for k in ("autoattack_l2", "pgd_l2", "worst_case_l2"))
    assert aa <= out["clean"]["correct"] and worst <= min(aa, pgd)
