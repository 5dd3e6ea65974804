"""The user's edges (issue: trust at the user's edges), the Python API's half: every TrainConfig field,
set away from its default and handed to advgen.train, either changes what trains (checked against a run
with the default, or where the field goes) or is refused with an error naming it. A field added without
an entry here fails test_every_field_is_walked."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import advgen
from advgen.data import load_subsets
from advgen.errors import ConfigError, UserError
from advgen.training import TrainConfig
from advgen.training import loop
from advgen.training.methods.minmax import FGSMOptions

BASE = dict(method="standard", model="resnet20", epochs=1, batch_size=32, train_subset=64, test_subset=16)


@pytest.fixture(scope="module")
def data(shared_data):
    return load_subsets("cifar10", shared_data, train_subset=512, test_subset=64)


def _train(data, tmp_path=None, **changes):
    torch.manual_seed(0)
    cfg = TrainConfig(**{**BASE, **changes})
    model, record = advgen.train(cfg, *data, out_dir=tmp_path, progress=False)
    return model, record


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def default_run(data):
    return _train(data)


def _differs(changes, data, default_run, **_):
    model, _ = _train(data, **changes)
    assert not torch.equal(_weights(model), _weights(default_run[0])), f"{changes} trained the same weights"


def _record(check):
    def walk(changes, data, default_run, tmp_path, **_):
        _, record = _train(data, **changes)
        assert check(record), f"{changes}: the record does not show it"
    return walk


def _refused(field):
    def walk(changes, data, default_run, tmp_path, **_):
        with pytest.raises(ConfigError) as e:
            _train(data, **changes)
        assert e.value.field == field
    return walk


def _reaches(target, attribute, check):
    """The field's value reaches the code that uses it: `target` (a module attribute) is wrapped and
    `check` is asserted on the arguments of its calls."""
    def walk(changes, data, default_run, tmp_path, monkeypatch, **_):
        seen = []
        real = getattr(target, attribute)

        def spy(*args, **kwargs):
            seen.append((args, kwargs))
            return real(*args, **kwargs)
        monkeypatch.setattr(target, attribute, spy)
        _train(data, **changes)
        assert seen and any(check(*call) for call in seen), f"{changes}: not passed on ({seen[:1]})"
    return walk


def _init(changes, data, default_run, tmp_path, **_):
    """init: training starts from the file's weights, so it ends elsewhere than a run from scratch."""
    path = tmp_path / "init"
    _train(data, path)
    model, record = _train(data, init=str(path))
    assert record["config"]["init"] == str(path)
    assert not torch.equal(_weights(model), _weights(default_run[0]))


def _init_normalize(changes, data, default_run, tmp_path, **_):
    """A foreign file without its normalization is refused; stated, it is what the classifier gets."""
    path = tmp_path / "foreign.pt"
    # a bare ResNet-20's state dict, as torch.save(model.state_dict()) of another code base writes it
    torch.save({k[2:]: v for k, v in default_run[0].state_dict().items() if k.startswith("1.")}, path)
    with pytest.raises(UserError, match="normaliz"):
        _train(data, init=str(path))
    model, _ = _train(data, init=str(path), init_normalize="none")
    norm = model[0]
    assert torch.equal(norm.mean.flatten(), torch.zeros(3)) and torch.equal(norm.std.flatten(), torch.ones(3))


# field -> (the changes that set it, how its effect shows)
WALK = {
    "method": (dict(method="fgsm"), _record(lambda r: r["epochs"][0]["passes"] == 2 * r["epochs"][0]["steps"])),
    "options": (dict(method="fgsm", options=FGSMOptions(eps=0.25)),
                _record(lambda r: r["config"]["options"]["eps"] == 0.25)),
    "model": (dict(model="resnet32"), _record(lambda r: r["config"]["model"] == "resnet32")),
    "dataset": (dict(dataset="cifar100"), _refused("dataset")),   # the data handed over are CIFAR-10's
    "epochs": (dict(epochs=2), _record(lambda r: len(r["epochs"]) == 2)),
    "batch_size": (dict(batch_size=16), _record(lambda r: r["epochs"][0]["steps"] == 4)),
    "lr": (dict(lr=0.05), _differs),
    "momentum": (dict(momentum=0.5), _differs),
    "weight_decay": (dict(weight_decay=0.1), _differs),
    "schedule": (dict(schedule="constant"), _differs),
    "seed": (dict(seed=1), _differs),
    "train_subset": (dict(train_subset=32), _record(lambda r: r["train_images"] == 32)),
    "test_subset": (dict(test_subset=8), _record(lambda r: r["test_images"] == 8)),
    "watch_subset": (dict(watch_subset=8), _record(lambda r: "watch_acc" in r["epochs"][0])),
    "watch_norm": (dict(watch_subset=8, watch_norm="linf"),
                   _reaches(loop, "evaluate_epoch", lambda a, k: (k["watch_norm"], k["watch_eps"]) == ("linf", 8 / 255))),
    "watch_eps": (dict(watch_subset=8, watch_eps=0.25),
                  _reaches(loop, "evaluate_epoch", lambda a, k: (k["watch_norm"], k["watch_eps"]) == ("l2", 0.25))),
    "watch_steps": (dict(watch_subset=8, watch_steps=3), _reaches(loop, "evaluate_epoch", lambda a, k: k["watch_steps"] == 3)),
    "init": (None, _init),
    "init_normalize": (None, _init_normalize),
    "augment": (dict(augment="none"), _differs),
    "time_budget": (dict(time_budget=1e-9), _record(lambda r: r["epochs"][0]["steps"] == 1)),
    "budget_clock": (dict(time_budget=1e-9, budget_clock="process"),
                     _reaches(loop, "Budget", lambda a, k: a == (1e-9, "process"))),
    "budget_steps": (dict(budget_steps=1), _record(lambda r: r["epochs"][0]["steps"] == 1)),
    "channels_last": (dict(channels_last=False),
                      lambda changes, data, **_: not _train(data, **changes)[0][1].conv1.weight.is_contiguous(
                          memory_format=torch.channels_last) or pytest.fail("channels_last=False kept NHWC")),
    "compile": (dict(compile=True), _reaches(loop, "compiled", lambda a, k: True)),
    "precision": (dict(precision="bf16"), _record(lambda r: r["precision"]["training"] == "bf16")),
    "fold_bn_attack": (dict(method="fgsm", fold_bn_attack=False),
                       _reaches(advgen.training.methods.minmax, "BNFolder", lambda a, k: False)),
    "sync_bn": (dict(sync_bn=True), _refused("sync_bn")),   # one process: nothing to synchronize
}


def test_every_field_is_walked():
    assert set(WALK) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("field", sorted(WALK))
def test_a_train_config_field_takes_effect_or_is_refused(field, data, default_run, tmp_path, monkeypatch):
    changes, walk = WALK[field]
    if field == "compile":   # the spy stands in for torch.compile: only that it is asked for matters here
        monkeypatch.setattr(loop, "compiled", lambda forward: forward)
    if field == "fold_bn_attack":   # not built at all when off: the spy must see no call
        built = []
        monkeypatch.setattr(advgen.training.methods.minmax, "BNFolder",
                            lambda *a, **k: built.append(1) or pytest.fail("BNFolder built with fold_bn_attack=False"))
        _train(data, **changes)
        assert not built
        return
    walk(changes, data=data, default_run=default_run, tmp_path=tmp_path, monkeypatch=monkeypatch)


def test_run_json_records_the_defaults_as_they_ran(data, tmp_path):
    """eps and step_size left to their defaults are recorded as the values that ran, never null; so is
    the watch's threat model (the training's own)."""
    _, record = _train(data, tmp_path / "r", method="nfgsm", watch_subset=8,
                       options=advgen.training.METHODS["nfgsm"].options(norm="linf"))
    o = record["config"]["options"]
    assert (o["eps"], o["step_size"]) == (8 / 255, 8 / 255)
    assert (record["config"]["watch_norm"], record["config"]["watch_eps"]) == ("linf", 8 / 255)
    # the same config again, its defaults left out: a resume of the same run, not "other settings"
    torch.manual_seed(0)
    cfg = TrainConfig(**{**BASE, "method": "nfgsm", "watch_subset": 8,
                         "options": advgen.training.METHODS["nfgsm"].options(norm="linf")})
    _, again = advgen.train(cfg, *data, out_dir=tmp_path / "r", resume=True, progress=False)
    assert again["epochs"] == record["epochs"]
    # and another radius is another run
    cfg.options.eps = 4 / 255
    with pytest.raises(advgen.errors.CheckpointError, match="other settings"):
        advgen.train(cfg, *data, out_dir=tmp_path / "r", resume=True, progress=False)


def test_an_advgen_0_1_record_without_eps_ran_at_0_05():
    """advgen 0.1 trained L2 attacks at 0.05 when no eps was given; its records say null: read as 0.05."""
    from advgen.training.config import as_run
    saved = {"method": "fgsm", "attack": {"norm": "l2", "eps": None, "steps": 1, "step_size": None,
                                          "random_start": True}}
    assert as_run(saved, "0.1.0")["options"]["eps"] == 0.05
    assert as_run(saved, "0.2.0")["options"]["eps"] == 0.5


def test_fgsm_takes_its_step_size_and_refuses_steps(tmp_path, capsys):
    """FGSM-RS is one step: --attack-steps, which it used to ignore, is refused; --attack-step-size, which
    it used to ignore too, is its alpha; an old record of an FGSM run reads as what ran (1.25 eps)."""
    from advgen.cli import main
    assert main(["train", "--method", "fgsm", "--attack-steps", "10", "--out", str(tmp_path / "x")]) == 2
    assert "--attack-steps" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert FGSMOptions(norm="l2", eps=0.5).step == 0.625 and FGSMOptions(eps=0.5, step_size=0.1).step == 0.1
    old = TrainConfig.from_dict({"method": "fgsm", "options": {"norm": "l2", "eps": 0.5, "steps": 40,
                                                               "step_size": 0.01, "random_start": True}})
    assert old.options == FGSMOptions(norm="l2", eps=0.5) and old.resolved().options.step_size == 0.625


@pytest.mark.parametrize("argv", [["reproduce", "--preset", "smoke"], ["reproduce", "--preset", "speedrun-smoke"],
                                  ["compare", "--preset", "smoke"]])
def test_an_out_that_is_a_file_is_refused_in_one_line(argv, tmp_path, capsys):
    """reproduce and compare used to die in a traceback (FileExistsError) on an --out that is a file."""
    from advgen.cli import main
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's")
    assert main([*argv, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err and mine.read_text() == "the user's"


def test_plot_keeps_an_existing_file_without_force(tmp_path, capsys):
    """advgen plot used to write over any --out."""
    from advgen.cli import main
    mine = tmp_path / "curves.png"
    mine.write_text("the user's")
    assert main(["plot", str(tmp_path), "--out", str(mine)]) == 2
    assert "--force" in capsys.readouterr().err and mine.read_text() == "the user's"


@pytest.mark.parametrize("images, labels, needle", [
    (torch.rand(4, 3, 32, 32) * 255, torch.arange(4), "pixels in [0, 1], got values in"),   # float 0-255
    ((torch.rand(4, 3, 32, 32) - 0.5) / 0.25, torch.arange(4), "normalization inside the model"),   # normalized
    (torch.rand(4, 3, 32, 32), torch.arange(4).float(), "integer class indices"),
    (torch.rand(4, 3, 32, 32), torch.arange(3), "of shape (4,)"),
])
def test_api_evaluation_refuses_pixels_outside_0_1(images, labels, needle, tiny_model):
    """advgen.evaluate used to attack 0-255 float pixels with radii meant for [0, 1] and return a number."""
    with pytest.raises(UserError, match=re.escape(needle)):
        advgen.evaluate(tiny_model(), images, labels, advgen.EvalProtocol.quick("l2", steps=1, checks=False))
    with pytest.raises(UserError, match=re.escape(needle)):
        advgen.robust_accuracy(tiny_model(), images, labels, lambda e: None, [0.0])


def test_api_evaluation_takes_uint8_as_0_255(tiny_model):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(4)
    p = advgen.EvalProtocol.quick("l2", steps=1, checks=False)
    model = tiny_model()
    assert advgen.evaluate(model, x, y, p)["clean"] == advgen.evaluate(model, x.float() / 255, y, p)["clean"]


def test_the_watch_takes_the_training_threat_model_of_each_method():
    """Linf training is watched at Linf 8/255 by default, generator banks bounded in a ball too (the
    watch of advgen compare's Linf presets used to be L2 0.5); a stated watch wins; standard: L2 0.5."""
    from advgen.recipes import recipe_config
    for name in ("nfgsm-linf", "fgsm-rs-linf", "pgd10-linf", "gen-sdi-linf"):
        assert recipe_config(name, watch_subset=8).watch_threat == ("linf", 8 / 255), name
    assert recipe_config("gen-sdi-l2", watch_subset=8).watch_threat == ("l2", 0.5)
    assert recipe_config("standard", watch_subset=8).watch_threat == ("l2", 0.5)
    assert recipe_config("gen-paper", watch_subset=8).watch_threat == ("l2", 0.5)   # a box bound: no norm
    assert recipe_config("nfgsm-linf", watch_subset=8, watch_norm="l2").watch_threat == ("l2", 0.5)
    assert recipe_config("nfgsm-linf", watch_subset=8, watch_eps=4 / 255).watch_threat == ("linf", 4 / 255)
