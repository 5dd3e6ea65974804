"""The speedrun (issue: time to robustness): the one-cycle schedule, recipes that fix further settings,
and `advgen reproduce --preset speedrun-smoke` end to end — it records its training seconds."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from synth_cifar import tiny_dataset

from advgen.apps import train_stage
from advgen.cli import main
from advgen.errors import UserError
from advgen.recipes import RECIPES, Recipe, recipe_config, register_recipe
from advgen.training import TrainConfig
from advgen.training.config import lr_factor


def test_cyclic_schedule_is_one_cycle_peaking_at_two_fifths():
    total = 100
    f = [lr_factor("cyclic", total)(i) for i in range(total)]
    peak = max(range(total), key=f.__getitem__)
    assert peak in (39, 40)                       # Wong et al. 2020: the top at 2/5 of the run
    assert all(a < b for a, b in zip(f[:peak], f[1:peak + 1]))        # up, strictly
    assert all(a > b for a, b in zip(f[peak:-1], f[peak + 1:]))       # then down, strictly
    assert 0 < f[0] < 0.02 and 0 < f[-1] < 0.02 and f[peak] <= 1      # no step trains at 0 or above the peak
    assert lr_factor("cosine", total)(0) == 1 and lr_factor("constant", total)(57) == 1


def test_the_cyclic_schedule_drives_the_optimizer(tmp_path, shared_data):
    """The learning rate each step trained at (metrics.csv) follows lr_factor, scaled by lr."""
    from advgen.data import load_subsets
    from advgen.training import train
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.2, schedule="cyclic", train_subset=128, test_subset=16)
    tr, te = load_subsets("cifar10", shared_data, train_subset=128, test_subset=16)
    train(cfg, tr, te, out_dir=tmp_path / "run", progress=False)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    lrs = [float(r.split(",")[4]) for r in rows]
    want = [0.2 * lr_factor("cyclic", 8)(i) for i in range(8)]
    assert lrs == pytest.approx(want, rel=1e-4)


def test_a_recipe_fixes_its_settings_and_a_change_overrides_them():
    r = register_recipe(Recipe("test-settings-recipe", "standard", "a test", settings={"batch_size": 32},
                               init=None))
    try:
        assert recipe_config(r.name).batch_size == 32
        assert recipe_config(r.name, batch_size=64).batch_size == 64
    finally:
        del RECIPES[r.name]


def test_speedrun_recipe_trains_from_scratch_with_the_cycle():
    cfg = recipe_config("speedrun-l2")
    assert cfg.init is None and cfg.schedule == "cyclic" and cfg.method == "nfgsm"
    assert (cfg.options.norm, cfg.options.eps) == ("l2", 0.5)


def test_speedrun_smoke_records_its_seconds_and_resumes(tmp_path, shared_data, capsys):
    out = tmp_path / "sr"
    args = ["reproduce", "--preset", "speedrun-smoke", "--data-dir", str(shared_data), "--device", "cpu",
            "--out", str(out)]
    assert main(args) == 0
    s = json.loads((out / "speedrun.json").read_text())
    run = json.loads((out / "run" / "run.json").read_text())
    assert len(s["epoch_seconds"]) == 2 and all(t > 0 for t in s["epoch_seconds"])
    assert s["train_seconds"] == pytest.approx(sum(r["seconds"] for r in run["epochs"]))
    assert s["wall_seconds"] >= s["train_seconds"]
    assert s["precision"]["training"] == "fp32" and s["machine"] and s["threads"] >= 1
    assert s["command"].startswith("advgen reproduce --preset speedrun-smoke")
    assert run["config"]["init"] is None and run["config"]["schedule"] == "cyclic"
    # one curve point per epoch (a snapshot after epoch 1, the final model), at growing training seconds
    curve = s["curve"]
    assert [pt["step"] for pt in curve] == [4, 8]
    assert curve[0]["seconds"] < curve[1]["seconds"] == pytest.approx(s["train_seconds"])
    assert "training seconds" in (out / "speedrun.md").read_text()
    assert (out / "speedrun.png").stat().st_size > 1000   # the curve beside the zoo's path
    # again: nothing retrains (the run's record is untouched), the recorded wall clock is kept
    before = (out / "run" / "run.json").read_bytes()
    assert main(args) == 0
    assert (out / "run" / "run.json").read_bytes() == before
    assert json.loads((out / "speedrun.json").read_text())["wall_seconds"] == s["wall_seconds"]


def test_speedrun_refuses_seeds(tmp_path, capsys):
    assert main(["reproduce", "--preset", "speedrun-smoke", "--seeds", "0,1", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_zoo_path_is_base_then_fine_tuning():
    from advgen.apps.speedrun import zoo_path
    (points,) = zoo_path(0.5).values()
    assert points[0]["seconds"] < points[1]["seconds"] and points[0]["pgd"] < 0.05 < 0.5 < points[1]["pgd"]


def test_a_stage_that_cannot_be_continued_names_the_apps_way_out(tmp_path):
    data, test = tiny_dataset(32, 1), tiny_dataset(16, 2)
    run = tmp_path / "run"
    cfg = TrainConfig(method="standard", model="resnet20", epochs=1, batch_size=16)
    train_stage(cfg, data, test, run, torch.device("cpu"), "reproduce", progress=False)
    with pytest.raises(UserError) as e:   # the folder holds a run with another learning rate
        train_stage(dataclasses.replace(cfg, lr=0.05), data, test, run, torch.device("cpu"), "reproduce",
                    progress=False)
    msg = str(e.value)
    assert msg.endswith(f"; reproduce cannot continue it: give reproduce another --out, or remove {run}")
    assert "--force" not in msg and "--resume" not in msg
