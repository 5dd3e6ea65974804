"""RobustBench interop: `advgen export MODEL --format robustbench OUT` and `advgen eval --full
--robustbench-json`. The networks that load the exports are written in these tests (RobustBench's
PreActResNet with bn_before_fc and mu/sigma, its WideResNet, and a plain ResNet-20 in advgen's own
layout); each must load the exported state dict strictly and give advgen's logits exactly."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from synth_cifar import write_cifar
from test_preact_forwards import UpstreamPreActResNet18
from test_wide_resnet import RefWideResNet
from torch import nn

import advgen
from advgen.checkpoint import zoo_dir
from advgen.apps import export as interop
from advgen.checkpoint import save_model
from advgen.io import read_tensors
from advgen.cli import main
from advgen.io import fingerprint
from advgen.models import MODELS, build_model, wide_resnet
from advgen.models.normalize import CIFAR100_MEAN, CIFAR100_STD
from settled import settled

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


class PlainBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.extra, self.stride = cout - cin, stride

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.extra or self.stride != 1:   # option A: subsample, zero channels split around the input's
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + x)


class PlainResNet20(nn.Module):
    """ResNet-20 under advgen's own names (conv1, bn1, layers.0-8, fc) with RobustBench-style mu/sigma."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.zeros(1, 3, 1, 1))
        self.register_buffer("sigma", torch.ones(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks += [PlainBlock(cin, cout, stride), PlainBlock(cout, cout, 1), PlainBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1((x - self.mu) / self.sigma))))
        return self.fc(F.avg_pool2d(out, 8).flatten(1))


@pytest.fixture
def small_wrn(monkeypatch):
    """WRN-10-2 registered (and known to the export) as "wrn10_2": the export path of wrn28_10, cheaply."""
    monkeypatch.setitem(MODELS, "wrn10_2", wide_resnet(10, 2))
    monkeypatch.setitem(interop.ARCHITECTURES, "wrn10_2",
                        interop.UpstreamArch("WideResNet-10-2", "WideResNet(depth=10, widen_factor=2)", False))


def advgen_file(tmp_path, name, seed=0, config=None):
    """A settled advgen model of `name` with CIFAR-100's statistics (not the default) in its file."""
    model = settled(build_model(name, mean=CIFAR100_MEAN, std=CIFAR100_STD), seed)
    path = tmp_path / f"{name}.safetensors"
    save_model(path, model, {"model": name, "num_classes": 10,
                             "config": config if config is not None else {"dataset": "cifar10", "init": None}})
    return path, model


REFERENCES = {"resnet20": PlainResNet20, "preact_resnet18": lambda: UpstreamPreActResNet18(v2=False),
              "preact_resnet18_v2": lambda: UpstreamPreActResNet18(v2=True),
              "wrn10_2": lambda: RefWideResNet(10, 2, mu_sigma=((0.0,) * 3, (1.0,) * 3))}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_export_loads_strictly_into_an_independent_network_with_identical_logits(tmp_path, small_wrn, name):
    path, model = advgen_file(tmp_path, name, seed=len(name))
    assert main(["export", str(path), str(tmp_path / "out"), "--format", "robustbench", "--name", "m"]) == 0
    state = torch.load(tmp_path / "out" / "m.pt", weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    ref = REFERENCES[name]()
    assert sorted(state) == sorted(ref.state_dict())
    ref.load_state_dict(state, strict=True)
    assert torch.equal(state["mu"].flatten(), torch.tensor(CIFAR100_MEAN))
    assert torch.equal(logits(ref), logits(model))
    info = json.loads((tmp_path / "out" / "m.json").read_text())
    assert info["architecture"] == interop.ARCHITECTURES[name].architecture
    assert info["additional_data"] is False and info["number_forward_passes"] == 1 and info["dataset"] == "cifar10"
    for field in ("clean_acc", "autoattack_acc", "eps", "threat_model", "reported", "name", "link", "authors"):
        assert info[field] is None and info["advgen"]["missing"][field]          # null, and why
    # advgen reads its own export back: the normalization comes with it
    assert torch.equal(logits(advgen.load_model(tmp_path / "out" / "m.pt", model_name=name)), logits(model))


def full_eval_of(tensors, n=1000, clean=0.809, aa=None, failed=()):
    """An `advgen eval --full` result of these weights (the parts the export reads)."""
    aa = aa or {"0.25": 0.675, "0.5": 0.546}
    cell = lambda a: {"accuracy": a, "ci95": [a - 0.03, a + 0.03], "correct": round(a * n), "n": n}  # noqa: E731
    return {"settings": {"n": n, "aa_eps": [float(e) for e in aa], "model_sha256": fingerprint(tensors)}, "n": n,
            "clean": cell(clean), "pgd_l2": {"0.5": cell(0.567)}, "autoattack_l2": {e: cell(a) for e, a in aa.items()},
            "worst_case_l2": {e: cell(a) for e, a in aa.items()},
            "checks": [{"name": "accuracy non-increasing in eps", "passed": True, "detail": "ok"}] +
                      [{"name": c, "passed": False, "detail": "x"} for c in failed]}


def test_export_with_an_evaluation_reports_its_numbers(tmp_path, capsys):
    path, _ = advgen_file(tmp_path, "resnet20", config={"dataset": "cifar10", "init": "runs/base"})
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(full_eval_of(read_tensors(path)[0])))
    out = tmp_path / "out"
    argv = ["export", str(path), str(out), "--format", "robustbench", "--eval", str(ev), "--title", "A title",
            "--venue", "arXiv"]
    assert main(argv) == 0
    info = json.loads((out / "resnet20.json").read_text())
    assert (info["clean_acc"], info["autoattack_acc"], info["eps"], info["threat_model"]) == ("80.9", "54.6", "0.5", "L2")
    assert info["unreliable"] is False and info["name"] == "A title" and info["venue"] == "arXiv"
    assert info["architecture"] == "ResNet-20" and info["advgen"]["n"] == 1000
    assert info["additional_data"] is None and "additional_data" in info["advgen"]["missing"]   # it had an --init
    assert "first 1000 test images" in info["footnote"]
    assert main(argv) == 2 and "--force" in capsys.readouterr().err                          # no silent overwrite
    assert main(argv + ["--force", "--eps", "0.25", "--additional-data", "false"]) == 0
    info = json.loads((out / "resnet20.json").read_text())
    assert (info["autoattack_acc"], info["eps"], info["additional_data"]) == ("67.5", "0.25", False)
    assert main(argv + ["--force", "--eps", "0.3"]) == 2
    assert "did not run at eps 0.3" in capsys.readouterr().err
    other, _ = advgen_file(tmp_path / "o", "resnet20", seed=9)
    assert main(["export", str(other), str(out), "--format", "robustbench", "--eval", str(ev), "--force"]) == 2
    assert "evaluated other weights" in capsys.readouterr().err


def test_export_of_a_zoo_model_takes_its_cards_numbers(tmp_path):
    card = json.loads((zoo_dir() / "resnet20-pgd10.json").read_text())
    assert main(["export", "zoo:resnet20-pgd10", str(tmp_path), "--format", "robustbench"]) == 0
    info = json.loads((tmp_path / "resnet20-pgd10.json").read_text())
    assert info["clean_acc"] == str(round(card["eval"]["clean"]["accuracy"] * 100, 2)) == "80.9"
    assert info["autoattack_acc"] == str(round(card["eval"]["autoattack_l2"]["0.5"]["accuracy"] * 100, 2)) == "54.6"
    assert info["advgen"]["data"] == card["data"]
    ref = PlainResNet20()
    ref.load_state_dict(torch.load(tmp_path / "resnet20-pgd10.pt", weights_only=True), strict=True)
    assert torch.equal(logits(ref), logits(advgen.load_model("zoo:resnet20-pgd10")))


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    torch.save(build_model("resnet20")[1].state_dict(), tmp_path / "foreign.pt")
    assert main(["export", str(tmp_path / "foreign.pt"), str(tmp_path / "o"), "--format", "robustbench"]) == 2
    assert "export reads advgen models" in capsys.readouterr().err
    path, _ = advgen_file(tmp_path, "resnet20", config={"dataset": "data.npz", "init": None})
    assert main(["export", str(path), str(tmp_path / "o"), "--format", "robustbench"]) == 2
    assert "RobustBench's model info covers cifar10, cifar100" in capsys.readouterr().err


class _FakeAA:
    """Stands for AutoAttack (the real one runs in test_evaluate): every other image goes grey."""

    def __init__(self, model, *, norm, eps, seed):
        pass

    def __call__(self, x, y):
        out = x.clone()
        out[::2] = 0.5
        return out


def test_eval_full_writes_robustbench_model_info(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("advgen.attacks.AutoAttack", _FakeAA)
    path, _ = advgen_file(tmp_path, "resnet20")
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=12)
    base = ["eval", str(path), "--full", "--data-dir", str(data), "--test-subset", "10", "--eps", "0,0.5",
            "--steps", "2", "--restarts", "1", "--batch-size", "5", "--out", str(tmp_path / "ev.json")]
    assert main(base[:2] + base[3:] + ["--robustbench-json", str(tmp_path / "rb.json")]) == 2   # without --full
    assert "--robustbench-json needs --full" in capsys.readouterr().err
    assert main(base + ["--aa-eps", "0.25,0.75", "--robustbench-json", str(tmp_path / "rb.json")]) == 2
    assert "say which one" in capsys.readouterr().err and not (tmp_path / "ev.json").exists()  # before any attack
    assert main(base + ["--aa-eps", "0.25,0.5", "--robustbench-json", str(tmp_path / "rb.json")]) == 0
    ev, info = (json.loads((tmp_path / f).read_text()) for f in ("ev.json", "rb.json"))
    bits = lambda key: ev["samples"][key]  # noqa: E731   per-image correctness, "1" = correct
    assert info["clean_acc"] == str(round(bits("clean").count("1") / 10 * 100, 2))
    assert info["autoattack_acc"] == str(round(bits("aa:0.5").count("1") / 10 * 100, 2))
    assert (info["eps"], info["threat_model"], info["dataset"], info["architecture"]) == ("0.5", "L2", "cifar10", "ResNet-20")
    assert info["unreliable"] == any(not c["passed"] for c in ev["checks"])
    assert info["additional_data"] is False and info["advgen"]["n"] == 10


def test_unreliable_means_a_gradient_masking_check_failed_not_the_pgd_gap():
    from advgen.evaluation import GAP_CHECK
    ev = full_eval_of({"w": torch.zeros(1)}, failed=[GAP_CHECK])
    numbers = interop.evaluation_numbers(ev, 0.5, (GAP_CHECK,))
    assert numbers["unreliable"] is False and numbers["failed_checks"] == [GAP_CHECK]
    ev = full_eval_of({"w": torch.zeros(1)}, failed=["large eps (10.0) drives accuracy to ~0"])
    assert interop.evaluation_numbers(ev, 0.5, (GAP_CHECK,))["unreliable"] is True


def test_zoo_base_exports_reliable_with_its_failed_gap_check_named(tmp_path):
    assert main(["export", "zoo:resnet20-base", str(tmp_path), "--format", "robustbench"]) == 0
    info = json.loads((tmp_path / "resnet20-base.json").read_text())
    assert info["unreliable"] is False and "failed checks: PGD within 3 points of AutoAttack" in info["footnote"]


def test_formats():
    assert interop.eps_text(8 / 255, "Linf") == "8/255" and interop.eps_text(0.5, "L2") == "0.5"
    assert interop.eps_text(0.031, "Linf") == "0.031" and interop.eps_text(128 / 255, "L2") == "0.501961"
    assert interop.percent(0.8334) == "83.34" and interop.percent(0.5) == "50.0"
    assert interop.pick_eps([0.25, 0.5], None) == 0.5 and interop.pick_eps([0.25], None) == 0.25
    assert set(interop.ARCHITECTURES) <= set(MODELS)
