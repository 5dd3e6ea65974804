"""A new training method is one file: a module of the user's own, outside advgen, named in $ADVGEN_PLUGINS,
declares its method, its options with their flags, and a recipe; `advgen train --help` shows the flag,
`advgen train` runs it, a flag of another method is refused, and `advgen compare` takes its recipe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from synth_cifar import write_cifar

PLUGIN = textwrap.dedent('''
    """Gaussian-noise training: a method of a user's own, in one file."""
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F

    from advgen.errors import check_field
    from advgen.flags import option
    from advgen.recipes import Recipe, register_recipe
    from advgen.training import Method, register


    @dataclass
    class NoisyOptions:
        sigma: float = option(0.1, "--noisy-sigma", "std of the Gaussian noise added to each training image")

        def validate(self):
            check_field(self.sigma >= 0, "options.sigma", f"must be >= 0, got {self.sigma}")


    @register("noisy", NoisyOptions, "Gaussian noise on the inputs (a plugin's method)")
    class Noisy(Method):
        def __init__(self, model, options, setup):
            super().__init__(model, options, setup)
            self.g = torch.Generator().manual_seed(setup.seed)

        def loss(self, x, y):
            noise = torch.randn(x.shape, generator=self.g).to(x.device)
            logits = self.train_model((x + self.options.sigma * noise).clamp(0, 1))
            return F.cross_entropy(logits, y), logits, y


    register_recipe(Recipe("noisy-0.2", "noisy", "Gaussian noise, std 0.2", {"sigma": 0.2}, lr=0.05, epochs=1,
                           init=None))
''')


@pytest.fixture
def plugin_env(tmp_path):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "noisy.py").write_text(PLUGIN)
    env = {**os.environ, "ADVGEN_PLUGINS": "noisy", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "plug"), os.environ.get("PYTHONPATH", "")])}
    return env


def advgen(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "advgen", *args], env=env, capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_a_plugin_method_is_on_the_command_line_and_trains(tmp_path, plugin_env):
    shown = advgen(plugin_env, "train", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--noisy-sigma" in shown.stdout and "noisy-0.2" in shown.stdout and "noisy" in shown.stdout
    data = write_cifar(tmp_path / "data", per_batch=16, n_test=16)
    run = advgen(plugin_env, "train", "--method", "noisy", "--noisy-sigma", "0.3", "--epochs", "1", "--batch-size", "16",
                 "--data-dir", str(data), "--device", "cpu", "--out", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert config["method"] == "noisy" and config["options"] == {"sigma": 0.3}
    wrong = advgen(plugin_env, "train", "--method", "nfgsm", "--noisy-sigma", "0.3", "--out", str(tmp_path / "x"))
    assert wrong.returncode == 2 and "--noisy-sigma is not an option of --method nfgsm" in wrong.stderr
    bad = advgen(plugin_env, "train", "--recipe", "noisy-0.2", "--noisy-sigma", "-1", "--data-dir", str(data),
                 "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "--noisy-sigma must be >= 0, got -1.0 (config: options.sigma)" in bad.stderr


@pytest.mark.slow
def test_a_plugin_recipe_runs_in_compare(tmp_path, plugin_env, shared_data):
    out = tmp_path / "cmp"
    r = advgen(plugin_env, "compare", "--preset", "smoke", "--entries", "noisy-0.2", "--data-dir", str(shared_data),
               "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert {r["name"] for r in rows} == {"base", "noisy-0.2"}
    assert (out / "noisy-0.2-s0" / "run.json").exists()


def test_a_plugin_that_fails_to_import_is_one_line(plugin_env):
    r = advgen({**plugin_env, "ADVGEN_PLUGINS": "no_such_module_anywhere"}, "train", "--help")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no_such_module_anywhere" in r.stderr
    r = advgen({**plugin_env, "ADVGEN_PLUGINS": "os"}, "train", "--help")
    assert r.returncode == 2 and "standard library" in r.stderr
