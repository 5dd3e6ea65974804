"""--precision auto|fp32|bf16|fp16: the bf16 detection, what auto resolves to and why (recorded in run.json
and the zoo card), the deprecated --amp, runs made before --precision, and evaluation in fp32."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import advgen
from synth_cifar import tiny_dataset, write_cifar

from advgen import precision
from advgen.apps import zoo
from advgen.checkpoint import STATE_FILE
from advgen.cli import build_parser, main
from advgen.cli.train import train_config_from_args
from advgen.training import TrainConfig
from advgen.errors import CheckpointError, ConfigError
from advgen.evaluation import GAP_CHECK, evaluate
from advgen.training import METHODS, registered, train
from advgen.training.state import read_state, write_state

torch.set_num_threads(1)
CPU = torch.device("cpu")
# /proc/cpuinfo excerpts: the AVX2 EPYC this was written on, a Sapphire Rapids, a Cooper Lake
AVX2 = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx avx2 fma bmi2\nprocessor\t: 1\nflags\t\t: fpu avx avx2\n"
AMX = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8\n"
COOPER = "flags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert precision.cpu_flags(AVX2) == {"fpu", "vme", "sse", "sse2", "avx", "avx2", "fma", "bmi2"}
    assert not precision.cpu_has_native_bf16(AVX2)
    assert precision.cpu_has_native_bf16(AMX) and precision.cpu_has_native_bf16(COOPER)
    assert not precision.cpu_has_native_bf16("")                  # no /proc/cpuinfo: not assumed
    assert not precision.cpu_has_native_bf16("model name\t: avx512_bf16 in a name\n")   # flags lines only


@pytest.mark.parametrize("cpuinfo, has", [(AVX2, "no"), (AMX, "yes"), (COOPER, "yes")])
def test_auto_is_fp32_everywhere_for_now_and_says_why(cpuinfo, has):
    p = precision.resolve("auto", CPU, cpuinfo)
    assert (p.requested, p.training, p.dtype, p.autocast_on, p.scaled) == ("auto", "fp32", torch.float32, False, False)
    assert p.reason == f"auto: fp32 until the bf16 A/B decides; this CPU has native bf16: {has}"
    assert p.record() == {"requested": "auto", "training": "fp32", "evaluation": "fp32", "reason": p.reason}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        q = precision.resolve(name, CPU, cpuinfo)
        assert (q.training, q.dtype, q.scaled) == (name, dtype, name == "fp16") and q.reason.startswith("requested")
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16"):
        precision.resolve("fp8", CPU, cpuinfo)


def test_auto_on_a_gpu_is_fp32_too(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    p = precision.resolve("auto", torch.device("cuda", 0))
    assert p.training == "fp32" and "this GPU has native bf16: yes" in p.reason
    assert precision.amp_alias(torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert precision.amp_alias(torch.device("cuda", 0)) == "fp16"   # what --amp meant on a V100
    assert precision.amp_alias(CPU) == "bf16"


def test_bf16_on_a_cpu_without_it_warns_that_it_is_slow(caplog):
    with caplog.at_level(logging.WARNING, logger="advgen.precision"):
        precision.check_available(precision.resolve("bf16", CPU, AVX2), CPU, AVX2)
        assert "about 10x slower" in caplog.text
        caplog.clear()
        precision.check_available(precision.resolve("bf16", CPU, AMX), CPU, AMX)
        assert not caplog.text


def test_config_field_and_runs_made_before_it():
    assert TrainConfig().precision == "auto"
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="half").validate()
    old = TrainConfig().to_dict()
    del old["precision"]
    for amp, want in ((False, "auto"), (True, "bf16")):
        assert TrainConfig.from_dict({**old, "amp": amp}).precision == want
    assert precision.training_precision({"config": {"amp": True}}) == "bf16"
    assert precision.training_precision({"config": {"amp": False}}) == "fp32"
    assert precision.training_precision({"config": {}, "precision": {"training": "fp16"}}) == "fp16"


def test_cli_precision_and_the_deprecated_amp(tmp_path, caplog, capsys):
    parse = lambda *a: build_parser().parse_args(["train", "--method", "standard", "--out", str(tmp_path),  # noqa: E731
                                                  "--device", "cpu", *a])
    assert train_config_from_args(parse()).precision == "auto"
    assert train_config_from_args(parse("--precision", "fp16")).precision == "fp16"
    with caplog.at_level(logging.WARNING, logger="advgen"):
        assert train_config_from_args(parse("--amp")).precision == "bf16"
    assert "--amp is deprecated: it means --precision bf16 here" in caplog.text
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    rc = main(["train", "--method", "standard", "--device", "cpu", "--amp", "--precision", "fp16",
               "--data-dir", str(data), "--out", str(tmp_path / "run")])
    assert rc == 2 and "give --precision or the deprecated --amp, not both" in capsys.readouterr().err


def _sets():
    return tiny_dataset(32, 1), tiny_dataset(16, 2)


def test_run_json_records_the_resolved_precision_and_evaluation_says_fp32(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _, rec = train(TrainConfig(epochs=1, batch_size=16), *_sets(), out_dir=tmp_path / "run", progress=False)
    want = precision.resolve("auto", CPU)
    assert rec["precision"] == want.record()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["precision"] == want.record()
    assert f"precision: training fp32 ({want.reason}); evaluation fp32" in caplog.text
    # and the zoo card, built from the run record, carries it
    card = zoo.card_for("x", rec, {"model": "resnet20", "num_classes": 10}, {"checks": [{"name": GAP_CHECK}]},
                        command="c", machine="m")
    assert card["precision"] == want.record() and card["bf16_autocast"] is False
    legacy = {**rec, "config": {**rec["config"], "amp": True}}
    del legacy["precision"]
    card = zoo.card_for("x", legacy, {"model": "resnet20", "num_classes": 10}, {"checks": [{"name": GAP_CHECK}]},
                        command="c", machine="m")
    assert card["precision"]["training"] == "bf16" and card["bf16_autocast"] is True


def test_evaluation_runs_in_fp32_and_says_so(trained_tiny, caplog):
    x, y = trained_tiny.x_test[:20], trained_tiny.y_test[:20]
    p = advgen.EvalProtocol(eps=(0.0, 0.5), steps=2, checks=False)
    with caplog.at_level(logging.INFO, logger="advgen.evaluation.protocol"):
        r = evaluate(trained_tiny.model, x, y, p)
    assert "evaluation precision: fp32" in caplog.text
    assert r["clean"]["accuracy"] == pytest.approx(advgen.accuracy(trained_tiny.model, x, y))   # the fp32 computation
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="advgen.evaluation.protocol"), torch.autocast("cpu", dtype=torch.bfloat16):
        evaluate(trained_tiny.model, x[:4], y[:4], advgen.EvalProtocol(eps=(0.0,), checks=False))
    assert "evaluation precision: bfloat16 (the caller's autocast)" in caplog.text


def test_the_epoch_evaluation_runs_in_fp32_under_bf16_training():
    seen = []
    base = METHODS["standard"].cls
    from conftest import make_tiny
    model = make_tiny()
    model[1][0].register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    with registered("standard", base):
        train(TrainConfig(epochs=1, batch_size=16, precision="bf16"), *_sets(), progress=False, model=model)
    assert {d for t, d in seen if t} == {torch.bfloat16}      # the training forwards
    assert {d for t, d in seen if not t} == {torch.float32}   # the test accuracy after the epoch


class Crash(Exception):
    pass


def _crash_at(call: int):
    base, calls = METHODS["standard"].cls, {"n": 0}

    def loss(self, x, y):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash()
        return base.loss(self, x, y)
    return registered("standard", type("Crashing", (base,), {"loss": loss}))


def _as_if_before_precision(path, amp: bool) -> None:
    """Rewrite a state as advgen wrote it before --precision: config with `amp`, no precision record."""
    state, header = read_state(path)
    for config in (header["config"], state["record"]["config"]):
        del config["precision"]
        config["amp"] = amp
    del state["record"]["precision"]
    write_state(path, state, header)


@pytest.mark.parametrize("amp, resume_with, ok", [(False, "auto", True), (False, "fp32", True),
                                                  (False, "bf16", False), (True, "bf16", True),
                                                  (True, "auto", False)])
def test_a_state_from_before_precision_resumes_in_what_it_trained_in(tmp_path, amp, resume_with, ok):
    out = tmp_path / "run"
    cfg = lambda p: TrainConfig(epochs=2, batch_size=16, precision=p)  # noqa: E731
    with _crash_at(3), pytest.raises(Crash):
        train(cfg("bf16" if amp else "auto"), *_sets(), out_dir=out, progress=False)
    _as_if_before_precision(out / STATE_FILE, amp)
    if ok:
        _, rec = train(cfg(resume_with), *_sets(), out_dir=out, progress=False, resume=True)
        assert rec["finished"] and rec["config"]["amp"] is amp   # the record as the run began
    else:
        trained = "bf16" if amp else "fp32"
        with pytest.raises(CheckpointError, match=f"the run trained in {trained}, but --precision {resume_with} "
                                                  f"means {resume_with.replace('auto', 'fp32')} here"):
            train(cfg(resume_with), *_sets(), out_dir=out, progress=False, resume=True)


def test_fp32_on_a_gpu_says_when_its_convolutions_run_in_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    gpu = torch.device("cuda", 0)
    assert "run in TF32" in precision.resolve("fp32", gpu).reason
    assert "run in TF32" in precision.resolve("auto", gpu).reason
    assert "TF32" not in precision.resolve("fp32", CPU, "flags: avx2").reason
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # the user's own setting, recorded as it is
    assert "TF32" not in precision.resolve("fp32", gpu).reason
