"""The speed options: BatchNorm folding per batch, channels-last, bf16 autocast, torch.compile guard,
and benchmarks/bench.py end to end on tiny inputs (no speed assertions)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from synth_cifar import tiny_dataset

from advgen.cli import main
from advgen.config import AttackConfig
from advgen.training import TrainConfig
from advgen.errors import UserError
from advgen.models import build_model
from advgen.models.folding import BNFolder, inference_copy
from advgen.training import METHODS, registered
from advgen.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _sgd_steps(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(n):
        x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_folder_tracks_the_live_model(channels_last):
    torch.manual_seed(0)
    model = build_model("resnet20")
    folder = BNFolder(model, channels_last=channels_last)
    assert folder.exact and len(folder.pairs) == 19
    x = torch.rand(8, 3, 32, 32)
    for seed in range(2):  # the copy follows the weights and running statistics after every update
        _sgd_steps(model, seed=seed)
        fast = folder.refresh()
        ref = inference_copy(model, channels_last=channels_last)
        model.eval()
        with torch.no_grad():
            want = model(x)
            assert torch.equal(fast(x), ref(x))  # the very folding evaluate uses
            assert torch.allclose(fast(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert model.training is False and not any(p.requires_grad for p in fast.parameters())
        model.train()


def _data():
    return tiny_dataset(64, 1), tiny_dataset(32, 2)


def test_minmax_attacks_the_folded_copy_and_trains_in_train_mode():
    train_set, test_set = _data()
    cfg = TrainConfig(method="minmax", epochs=1, batch_size=16, lr=0.01, seed=0,
                      options=AttackConfig(norm="l2", eps=0.5, steps=3, step_size=0.2))
    torch.manual_seed(0)
    folded, _ = train(cfg, train_set, test_set, progress=False)
    torch.manual_seed(0)
    plain, _ = train(TrainConfig(**{**cfg.__dict__, "fold_bn_attack": False}), train_set, test_set, progress=False)
    init = build_model("resnet20").state_dict()
    for k, v in folded.state_dict().items():
        assert torch.allclose(v.float(), plain.state_dict()[k].float(), rtol=1e-2, atol=1e-2), k  # rounding only
    # the classifier trained in train mode: its BatchNorm statistics moved
    assert not torch.equal(folded.state_dict()["1.bn1.running_mean"], init["1.bn1.running_mean"])


def test_channels_last_layout_of_model_and_batches():
    train_set, test_set = _data()
    seen = []
    base = METHODS["standard"].cls

    class Spy(base):
        def loss(self, x, y):
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return super().loss(x, y)

    for flag, want in ((True, True), (False, False), (None, True)):  # None: auto, on for the CPU
        seen.clear()
        with registered("standard", Spy):
            model, _ = train(TrainConfig(epochs=1, batch_size=16, channels_last=flag), train_set, test_set,
                             progress=False)
        assert seen and all(s == want for s in seen)
        w = model[1].conv1.weight
        assert (w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()) == want


def test_generator_with_channels_last_matches_contiguous():
    train_set, test_set = _data()
    out = {}
    for flag in (False, True):
        torch.manual_seed(0)
        out[flag], _ = train(TrainConfig(method="generator", epochs=1, batch_size=32, lr=0.01, channels_last=flag),
                             train_set, test_set, progress=False)
    for k, v in out[False].state_dict().items():
        assert torch.allclose(v.float(), out[True].state_dict()[k].float(), atol=1e-4), k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "generator", "minmax"])
def test_bf16_runs_the_forward_passes_in_bf16_autocast(method):
    train_set, test_set = _data()
    seen = []

    def hook(module, inp, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))

    model = build_model("resnet20")
    model[1].conv1.register_forward_hook(hook)
    options = AttackConfig(norm="l2", eps=0.5, steps=2, step_size=0.3) if method == "minmax" else None
    cfg = TrainConfig(method=method, options=options, epochs=1, batch_size=32, lr=0.01, precision="bf16")
    train(cfg, train_set, test_set, progress=False, model=model)
    train_seen = [s for s in seen if s[0]]
    assert train_seen and all(s[1] == torch.bfloat16 and s[2] == torch.bfloat16 for s in train_seen)
    assert any(not s[0] and s[2] == torch.float32 for s in seen)  # the evaluation after the epoch: fp32


def test_compile_compiles_the_training_forward_only(monkeypatch):
    """torch.compile gets the training forward (Forwards of the classifier); the classifier itself is not
    compiled in place (attacks and evaluation run it in eval mode and at other batch sizes, each another
    compilation), and the attacks keep the BatchNorm-folded copy."""
    from advgen.training.method import Forwards
    compiled, in_place, modes = [], [], []
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: compiled.append(module) or module)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: in_place.append(self))
    train_set, test_set = _data()
    base = METHODS["minmax"].cls

    class Spy(base):
        def loss(self, x, y):
            modes.append(self.folder is not None)
            return super().loss(x, y)

    cfg = TrainConfig(method="minmax", epochs=1, batch_size=32, compile=True,
                      options=AttackConfig(norm="l2", eps=0.5, steps=1))
    with registered("minmax", Spy):
        model, _ = train(cfg, train_set, test_set, progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], Forwards) and compiled[0].model is model
    assert in_place == [] and modes and all(modes)


def test_compile_without_a_compiler_is_a_user_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("shutil.which", lambda name: None)
    train_set, test_set = _data()
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        train(TrainConfig(epochs=1, batch_size=32, compile=True), train_set, test_set, progress=False)
    from synth_cifar import write_cifar
    data = write_cifar(tmp_path / "data")
    rc = main(["train", "--method", "standard", "--epochs", "1", "--compile", "--data-dir", str(data),
               "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 2 and "C++ compiler" in capsys.readouterr().err


def test_compile_failure_is_a_user_error(monkeypatch):
    import torch._dynamo.exc as dexc

    def boom(self, x, y):
        raise dexc.TorchDynamoException("no luck")

    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: module)
    train_set, test_set = _data()
    with registered("standard", type("Boom", (METHODS["standard"].cls,), {"loss": boom})), \
            pytest.raises(UserError, match="compile failed \\(TorchDynamoException: no luck\\)"):
        train(TrainConfig(epochs=1, batch_size=32, compile=True), train_set, test_set, progress=False)


def test_an_inductor_failure_is_a_user_error_too(monkeypatch):
    """Inductor raises its own errors (a C++ or Triton compile failure) outside torch._dynamo's."""
    inductor_error = type("CppCompileError", (RuntimeError,), {"__module__": "torch._inductor.exc"})

    def boom(self, x, y):
        raise inductor_error("g++ failed")

    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: module)
    train_set, test_set = _data()
    with registered("standard", type("Boom", (METHODS["standard"].cls,), {"loss": boom})), \
            pytest.raises(UserError, match="compile failed \\(CppCompileError: g\\+\\+ failed\\); train without it"):
        train(TrainConfig(epochs=1, batch_size=32, compile=True), train_set, test_set, progress=False)


def test_cli_speed_flags_reach_the_config(tmp_path):
    from advgen.cli import build_parser
    from advgen.cli.train import train_config_from_args
    args = build_parser().parse_args(["train", "--method", "minmax", "--out", str(tmp_path), "--channels-last",
                                      "false", "--precision", "bf16", "--fold-bn-attack", "false"])
    cfg = train_config_from_args(args)
    assert (cfg.channels_last, cfg.precision, cfg.compile, cfg.fold_bn_attack) == (False, "bf16", False, False)
    cfg = train_config_from_args(build_parser().parse_args(["train", "--method", "standard", "--out", str(tmp_path)]))
    assert (cfg.channels_last, cfg.precision, cfg.compile, cfg.fold_bn_attack) == (None, "auto", False, True)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_tiny_inputs(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results"
    assert bench.main(["--data-dir", str(shared_data), "--train-subset", "128", "--batch-size", "64", "--reps", "1", "--eval-n", "20",
                       "--base-epochs", "1", "--base-subset", "128", "--out", str(out)]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert {"machine", "train_subset", "batch_size", "reps", "training", "standard_throughput", "eval"} <= set(r)
    t = r["training"]
    assert set(t["seconds_per_epoch"]) == {"standard", "gen-paper", "fgsm-rs-l2", "pgd10-l2", "minmax-paper",
                                           "nfgsm-l2", "gen-gradient-l2", "gen-sdi-l2", "plain_pytorch"}
    assert set(t["ratios"]) == {"gen-paper/standard", "pgd10-l2/gen-paper", "minmax-paper/gen-paper",
                                "fgsm-rs-l2/gen-paper", "pgd10-l2/nfgsm-l2", "pgd10-l2/gen-gradient-l2",
                                "pgd10-l2/gen-sdi-l2", "plain_pytorch/standard"}
    for v in list(t["seconds_per_epoch"].values()) + list(t["ratios"].values()):
        assert {"median", "min", "max", "runs"} <= set(v) and v["median"] > 0
    assert r["standard_throughput"]["images_per_second"] > 0
    e = r["eval"]
    assert {"eps", "steps", "rel_step", "n", "accuracy", "seconds", "foolbox/advgen"} <= set(e) and e["n"] == 20
    try:
        import foolbox  # noqa: F401
        assert e["foolbox/advgen"]["median"] > 0 and 0 <= e["accuracy"]["foolbox"] <= 1
    except ImportError:
        assert e["foolbox/advgen"] is None
    assert "advgen" in (out / "bench.md").read_text()


def test_bf16_precision_measures_the_rounding_of_small_perturbations():
    spec = importlib.util.spec_from_file_location("bf16_precision", ROOT / "benchmarks" / "bf16_precision.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tiny, large = mod.relative_error(x, 0.01), mod.relative_error(x, 8.0)
    assert tiny.shape == (8,) and tiny.median() > 0.5      # far below bf16's step: mostly rounded away
    assert large.median() < 0.02                           # well above it: rounding is a small error


def test_gpu_bench_runs_on_the_cpu(tmp_path, capsys):
    """benchmarks/gpu_bench.py (the timed part of gpu_check.sh) end to end on tiny inputs on the CPU."""
    from synth_cifar import write_cifar
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    out = tmp_path / "bench.json"
    assert mod.main(["--data-dir", str(data), "--device", "cpu", "--train-subset", "64", "--test-subset", "16",
                     "--batch-size", "32", "--epochs", "1", "--methods", "standard,fgsm",
                     "--precisions", "fp32,fp8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["precision"]) for r in rows] == [("standard", "fp32"), ("fgsm", "fp32"),
                                                             ("standard", "fp8"), ("fgsm", "fp8")]
    assert all(r["images_per_second"] > 0 and r["trained_in"] == "fp32" for r in rows[:2])
    assert all("precision must be one of" in r["error"] for r in rows[2:])   # recorded, the others went on
    assert "images/s" in capsys.readouterr().out


def test_precision_ab_pairs_the_arms_by_seed(tmp_path, capsys):
    """benchmarks/precision_ab.py's report on hand-made records: bf16 − fp32 per seed, its t-interval,
    fp32's seed spread, the speed ratio; an unfinished evaluation is left out."""
    spec = importlib.util.spec_from_file_location("precision_ab", ROOT / "benchmarks" / "precision_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def arm(precision, seed, aa, seconds, finished=True):
        run = tmp_path / f"nfgsm-l2-{precision}-s{seed}"
        run.mkdir()
        cell = lambda a: {"accuracy": a}   # noqa: E731
        ev = {"n": 500, "clean": cell(0.8), "pgd_l2": {"0.5": cell(aa + 0.01)}, "autoattack_l2": {"0.5": cell(aa)},
              "worst_case_l2": {"0.5": cell(aa)}, "checks": [{"passed": True}]} if finished else {"samples": {}}
        (run / "eval.json").write_text(json.dumps(ev))
        (run / "run.json").write_text(json.dumps({"epochs": [{"seconds": 9.0}] + [{"seconds": seconds}] * 2,
                                                  "precision": {"training": precision}}))

    for seed, (a32, a16) in enumerate([(0.50, 0.48), (0.52, 0.51), (0.54, 0.50)]):
        arm("fp32", seed, a32, 2.0)
        arm("bf16", seed, a16, 1.0)
    arm("bf16", 3, 0.1, 1.0, finished=False)
    doc = mod.report(tmp_path)
    (aa,) = [p for p in doc["paired"] if p["metric"] == "aa"]
    assert aa["seeds"] == [0, 1, 2] and aa["diffs"] == pytest.approx([-2.0, -1.0, -4.0])
    half = 4.303 * statistics.stdev([-2.0, -1.0, -4.0]) / 3 ** 0.5
    assert aa["mean"] == pytest.approx(-7 / 3) and aa["ci95"] == pytest.approx([-7 / 3 - half, -7 / 3 + half])
    assert aa["fp32_seed_std"] == pytest.approx(2.0)
    assert len(doc["arms"]) == 6 and "nfgsm-l2-bf16-s3" not in doc["arms"]
    assert "fp32 / bf16 seconds per epoch = 2.00" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file()


def test_precision_ab_train_only_leaves_the_evaluation_for_later(tmp_path, monkeypatch):
    """--train-only trains an arm and stops (bf16 training needs native bf16, the fp32 evaluation runs
    anywhere); the same call without it then evaluates the trained arm without training it again."""
    spec = importlib.util.spec_from_file_location("precision_ab", ROOT / "benchmarks" / "precision_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []

    def fake_call(cmd, **kw):
        calls.append(cmd[cmd.index("advgen") + 1])
        if cmd[cmd.index("advgen") + 1] == "train":
            (Path(cmd[cmd.index("--out") + 1]) / "model.safetensors").write_bytes(b"")
        return 0

    monkeypatch.setattr(mod.subprocess, "call", fake_call)
    args = argparse.Namespace(out=tmp_path, data_dir="DATA", device="cpu", train_subset=100, test_subset=10,
                              train_only=True)
    (tmp_path / mod.arm_name("nfgsm-l2", "bf16", 0)).mkdir()
    assert mod.run_arm(args, "nfgsm-l2", "bf16", 0) == 0 and calls == ["train"]
    args.train_only = False
    assert mod.run_arm(args, "nfgsm-l2", "bf16", 0) == 0 and calls == ["train", "eval"]
