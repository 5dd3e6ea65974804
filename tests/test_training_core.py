"""The training core's seams: the method protocol and registry, the state format, the CLI's mapping of
library errors to flags, and the defects fixed with the redesign."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from synth_cifar import tiny_dataset, write_cifar

import advgen
from advgen.checkpoint import STATE_FILE, save_model
from advgen.io import file_digest, save_tensors
from advgen.cli import main
from advgen.attacks import STANDARD_EPS as DEFAULT_EPS
from advgen.config import AttackConfig
from advgen.training.methods.minmax import FGSMOptions
from advgen.training import TrainConfig
from advgen.errors import CheckpointError, ConfigError
from advgen.training import METHODS, Method, Run, register, registered, train
from advgen.training.state import pack, read_state, unpack

torch.set_num_threads(1)


def _sets():
    return tiny_dataset(48, 1), tiny_dataset(16, 2)


@dataclass
class NoiseOptions:
    sigma: float = 0.1

    def validate(self):
        if not self.sigma > 0:
            raise ConfigError("noise.sigma", f"must be > 0, got {self.sigma}")


class Noise(Method):
    """A method written against the protocol alone: Gaussian noise of its own RNG, and a step counter."""

    def __init__(self, model, options, setup):
        super().__init__(model, options, setup)
        self.rng = torch.Generator().manual_seed(setup.seed)
        self.steps = 0

    def loss(self, x, y):
        noise = torch.randn(x.shape, generator=self.rng) * self.options.sigma
        logits = self.model((x + noise).clamp(0, 1))
        return F.cross_entropy(logits, y), logits, y

    def after_step(self):
        self.steps += 1

    def state_dict(self):
        return {"rng": self.rng.get_state(), "steps": self.steps}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])
        self.steps = state["steps"]


class Crash(Exception):
    pass


def test_a_new_method_is_one_class_and_its_registration(tmp_path):
    """Registered, trained through the CLI-free API, killed mid-run and resumed bit-identically: the loop
    saves what the method hands it (its RNG and counter) without knowing its attributes."""
    cfg = lambda: TrainConfig(method="noise", options=NoiseOptions(0.2), epochs=2, batch_size=16, seed=1)  # noqa: E731
    with registered("noise", Noise, NoiseOptions, "noise augmentation (test)"):
        torch.manual_seed(0)
        ref, _ = train(cfg(), *_sets(), out_dir=tmp_path / "ref", progress=False)

        class Dying(Noise):
            def loss(self, x, y):
                if self.steps == 4:
                    raise Crash()
                return super().loss(x, y)

        with registered("noise", Dying):
            torch.manual_seed(0)
            with pytest.raises(Crash):
                train(cfg(), *_sets(), out_dir=tmp_path / "run", progress=False, checkpoint_every=1)
        state, header = read_state(tmp_path / "run" / STATE_FILE)
        assert (header["epoch"], header["step"]) == (2, 1) and state["method"]["steps"] == 4
        torch.manual_seed(99)
        model, _ = train(cfg(), *_sets(), out_dir=tmp_path / "run", progress=False, resume=True)
    assert "noise" not in METHODS   # registered() restores the registry
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_register_refuses_a_second_method_of_a_name():
    with pytest.raises(ValueError, match="registered twice"):
        register("standard", NoiseOptions, "")(Noise)


def test_options_of_another_type_are_refused():
    with pytest.raises(ConfigError, match="options of method minmax must be AttackConfig"):
        TrainConfig(method="minmax", options=NoiseOptions()).validate()


def test_pack_round_trips_optimizer_state_with_int_keys_and_tuples():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.ones(3)
    opt.step()
    tensors = {}
    skeleton = pack({"opt": opt.state_dict(), "n": 3, "none": None}, "s", tensors)
    json.dumps(skeleton)   # JSON all the way down
    back = unpack(json.loads(json.dumps(skeleton)), tensors)
    assert back["n"] == 3 and back["none"] is None
    assert set(back["opt"]["state"]) == {0} and back["opt"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="not object"):
        pack({"x": object()}, "s", {})


def test_the_bank_follows_the_classifier_layout_under_auto():
    """channels_last None (auto) on the CPU: the classifier and the generator bank are both NHWC (the
    bank used to read the raw config value None and stay NCHW)."""
    train_set, test_set = _sets()
    cfg = TrainConfig(method="generator", batch_size=16)
    cfg.options.bank.n = 4
    run = Run(cfg, advgen.build_model("resnet20"), train_set, test_set, torch.device("cpu"))
    nhwc = lambda w: w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()  # noqa: E731
    assert run.setup.channels_last and nhwc(run.model[1].conv1.weight)
    assert all(nhwc(conv.weight) for conv in run.method.bank.convs)


def test_each_norm_has_its_own_default_eps():
    assert AttackConfig(norm="linf").radius == DEFAULT_EPS["linf"] == 8 / 255
    assert AttackConfig(norm="l2").radius == DEFAULT_EPS["l2"] == 0.5   # the standard threat models
    assert AttackConfig(norm="l2", eps=0.5, steps=10).step == pytest.approx(0.125)


def test_cli_linf_attack_defaults_to_8_over_255(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=16)
    out = tmp_path / "run"
    assert main(["train", "--method", "fgsm", "--attack-norm", "linf", "--epochs", "1", "--batch-size", "20",
                 "--watch-subset", "0", "--data-dir", str(data), "--device", "cpu", "--out", str(out)]) == 0
    cfg = json.loads((out / "run.json").read_text())["config"]
    # left out, the radius is the norm's standard one, recorded as it ran (never null); FGSM's step 1.25 eps
    assert cfg["options"]["norm"] == "linf" and cfg["options"]["eps"] == 8 / 255


def test_seconds_per_epoch_after_a_time_budget_stop(tmp_path, capsys):
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    assert main(["train", "--method", "standard", "--epochs", "50", "--batch-size", "16", "--time-budget", "1e-9",
                 "--schedule", "constant", "--data-dir", str(data), "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    (row,) = rec["epochs"]
    assert out.startswith("standard: 1 epochs, ") and f"{row['seconds']:.1f} s/epoch" in out


def test_init_of_another_class_count_is_refused(tmp_path):
    ten = advgen.build_model("resnet20", 10)
    save_model(tmp_path / "ten.safetensors", ten, {"model": "resnet20", "num_classes": 10})
    hundred = tiny_dataset(48, 1)
    hundred = type(hundred)(hundred.images, hundred.labels, 100)
    cfg = TrainConfig(epochs=1, batch_size=16, init=str(tmp_path / "ten.safetensors"), dataset="hundred")
    with pytest.raises(ConfigError, match="another architecture or class count") as e:
        train(cfg, hundred, hundred, progress=False)
    assert e.value.field == "init"


@pytest.mark.parametrize("argv, needle", [
    (["--method", "generator", "--gen-lr", "-1"], "--gen-lr must be > 0, got -1.0"),
    (["--method", "generator", "--generators", "0"], "--generators must be >= 1, got 0"),
    (["--method", "minmax", "--attack-eps", "-0.5"], "--attack-eps must be > 0, got -0.5"),
    (["--method", "standard", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
])
def test_library_errors_are_reported_with_the_cli_flag(argv, needle, tmp_path, capsys):
    assert main(["train", *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_a_state_of_the_old_format_is_refused_with_a_reason(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    save_tensors(out / STATE_FILE, {"model.x": torch.zeros(1)}, {"format": "advgen-train-state/1"})
    cfg = TrainConfig(epochs=1, batch_size=16)
    with pytest.raises(CheckpointError, match="written by advgen 0.1"):
        train(cfg, *_sets(), out_dir=out, progress=False, resume=True)


def test_old_run_configs_still_read():
    old = {"method": "minmax", "epochs": 8, "attack": {"norm": "l2", "eps": 0.05, "steps": 40, "step_size": 0.005,
                                                      "random_start": True},
           "generator": {"bank": {"n": 32}, "lr": 0.005}}
    cfg = TrainConfig.from_dict(old)
    assert cfg.options == AttackConfig(norm="l2", eps=0.05, steps=40, step_size=0.005)
    gen = TrainConfig.from_dict({**old, "method": "generator"})
    assert gen.options.bank.n == 32 and gen.options.lr == 0.005
    # 0.1 kept its attack settings in a standard run's config too (the shipped base's): ignored, as then
    std = TrainConfig.from_dict({**old, "method": "standard"})
    assert std.method == "standard" and std.threat is None


def test_a_budget_in_steps_stops_at_that_step_and_records_passes(tmp_path):
    cfg = TrainConfig(method="minmax", options=AttackConfig(eps=0.5, steps=2), epochs=10, batch_size=16,
                      budget_steps=4)
    _, rec = train(cfg, *_sets(), out_dir=tmp_path / "r", progress=False)   # 3 steps per epoch
    assert rec["finished"] and [(r["epoch"], r["steps"], r["passes"]) for r in rec["epochs"]] == [(1, 3, 9), (2, 1, 3)]
    # each epoch names the machine its seconds were measured on (a resumed run may have moved)
    assert all(r["machine"].endswith("device cpu") and "logical CPUs" in r["machine"] for r in rec["epochs"])
    with pytest.raises(ConfigError, match="budget_steps must be >= 1"):
        TrainConfig(budget_steps=0).validate()


def test_snapshots_equal_the_runs_of_shorter_budgets(tmp_path):
    """Under a constant schedule, the snapshot at step N holds the weights a run stopped at N ends with."""
    cfg = lambda n: TrainConfig(method="fgsm", options=FGSMOptions(eps=0.5), epochs=10, batch_size=16,  # noqa: E731
                                schedule="constant", budget_steps=n, seed=2)
    torch.manual_seed(0)
    train(cfg(5), *_sets(), out_dir=tmp_path / "long", progress=False, snapshots=[2, 4])
    torch.manual_seed(0)
    short, _ = train(cfg(4), *_sets(), out_dir=tmp_path / "short", progress=False)
    snap = advgen.load_model(tmp_path / "long" / "snapshots" / "step-4.safetensors")
    for (k, a), b in zip(short.state_dict().items(), snap.state_dict().values()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in (tmp_path / "long" / "snapshots").iterdir()) == ["step-2.safetensors",
                                                                                  "step-4.safetensors"]


def test_configs_saved_before_a_setting_existed_match_with_its_default(tmp_path):
    """A finished run whose run.json predates a setting (here budget_steps and options.recursions) is
    still found complete, and still resumes."""
    from advgen.apps.reproduce import run_complete
    cfg = TrainConfig(method="generator", epochs=1, batch_size=16)
    cfg.options.bank.n = 4
    train(cfg, *_sets(), out_dir=tmp_path / "r", progress=False)
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    del rec["config"]["budget_steps"], rec["config"]["options"]["recursions"]
    (tmp_path / "r" / "run.json").write_text(json.dumps(rec))
    assert run_complete(tmp_path / "r", cfg)
    cfg.options.recursions = 2
    cfg.options.bank.grad_input = True
    assert not run_complete(tmp_path / "r", cfg)


def test_a_run_whose_base_moved_is_found_complete_and_resumes_by_the_bases_sha256(tmp_path):
    """A run records the sha256 of the weights it started from: named by another path (a moved checkout,
    advgen compare resumed elsewhere) the same file is the same run; another file at the old path is not."""
    import shutil
    from advgen.apps.reproduce import run_complete
    from advgen.training.loop import _resume_state
    base = tmp_path / "a" / "base"
    train(TrainConfig(epochs=1, batch_size=16), *_sets(), out_dir=base, progress=False)
    cfg = TrainConfig(method="fgsm", epochs=2, batch_size=16, init=str(base))
    torch.manual_seed(0)
    train(cfg, *_sets(), out_dir=tmp_path / "r", progress=False)
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["init_sha256"] == file_digest(base / "model.safetensors")
    shutil.copytree(base, tmp_path / "b" / "base")
    moved = dataclasses.replace(cfg, init=str(tmp_path / "b" / "base"))
    assert run_complete(tmp_path / "r", moved)
    _resume_state(tmp_path / "r", moved)   # the saved state's header carries the digest too
    # another base at the recorded path is another run
    train(TrainConfig(epochs=1, batch_size=16, seed=5), *_sets(), out_dir=base, progress=False, force=True)
    assert file_digest(base / "model.safetensors") != rec["init_sha256"]
    assert not run_complete(tmp_path / "r", cfg)
    with pytest.raises(CheckpointError, match="init"):
        _resume_state(tmp_path / "r", cfg)
    # a run that recorded no digest (made before it was recorded) is matched by the path, as it was
    del rec["init_sha256"]
    (tmp_path / "r" / "run.json").write_text(json.dumps(rec))
    assert run_complete(tmp_path / "r", cfg) and not run_complete(tmp_path / "r", moved)


def test_step_log_truncates_to_the_saved_step_and_drops_a_cut_row(tmp_path):
    from advgen.training.metrics import StepLog
    path = tmp_path / "metrics.csv"
    path.write_text("step,epoch,loss,accuracy,lr,seconds\n1,1,2.3,0.1,0.1,0.5\n2,1,2.2,0.2,0.1,1.0\n"
                    "3,1,2.1,0.3,0.1,1.5\n4,2,2.")   # step 4 cut short by a kill
    StepLog(path).truncate(2)
    assert path.read_text().splitlines() == ["step,epoch,loss,accuracy,lr,seconds", "1,1,2.3,0.1,0.1,0.5",
                                             "2,1,2.2,0.2,0.1,1.0"]


@pytest.mark.parametrize("make, needle", [
    (lambda: TrainConfig(method="minmax", options=AttackConfig(eps="abc")), "options.eps must be a number, got 'abc'"),
    (lambda: TrainConfig(method="minmax", options=AttackConfig(steps=2.5)), "options.steps must be an integer"),
    (lambda: TrainConfig(lr="0.1"), "lr must be a number, got '0.1'"),
    (lambda: TrainConfig(epochs=True), "epochs must be an integer, got True"),
    (lambda: TrainConfig(method="generator", options=advgen.GeneratorOptions(bank=advgen.BankConfig(n="4"))),
     "options.bank.n must be an integer"),
])
def test_a_value_of_the_wrong_type_is_a_config_error_naming_its_field(make, needle):
    """Values typed in Python or read from a file are checked against the field's type before its range:
    a ConfigError naming the field, never a bare TypeError from a comparison."""
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make().validate()
    with pytest.raises(ConfigError, match="options.eps must be a number"):
        AttackConfig(eps="abc").validate()


def test_a_dropped_partial_batch_is_said(caplog):
    """A training set that is not a multiple of the batch loses its last partial batch each epoch: said in
    the log, with the count, rather than silently."""
    data = tiny_dataset(40, 0)
    cfg = TrainConfig(method="standard", epochs=1, batch_size=16)
    with caplog.at_level(logging.INFO, logger="advgen.training.loop"):
        train(cfg, data, data, progress=False)
    assert "40 training images, 2 steps of 16 an epoch: 8 images" in caplog.text
