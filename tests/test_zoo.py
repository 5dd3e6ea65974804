"""The model zoo: cards, sha256 checked before loading, zoo:NAME in load_model and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from synth_cifar import tiny_dataset, write_cifar

import advgen
from advgen import zoo
from advgen.cli import main
from advgen.config import TrainConfig
from advgen.errors import CheckpointError, UserError

EVAL = {"n": 16, "clean": {"accuracy": 0.5, "ci95": [0.28, 0.72], "correct": 8, "n": 16},
        "pgd_l2": {"0.5": {"accuracy": 0.25, "ci95": [0.1, 0.5], "correct": 4, "n": 16}},
        "autoattack_l2": {"0.5": {"accuracy": 0.1875, "ci95": [0.07, 0.43], "correct": 3, "n": 16}},
        "worst_case_l2": {"0.5": {"accuracy": 0.1875, "ci95": [0.07, 0.43], "correct": 3, "n": 16}},
        "checks": [], "samples": {"clean": "1" * 8 + "0" * 8}}


@pytest.fixture
def a_zoo(tmp_path, monkeypatch):
    """A zoo folder holding one tiny trained model, as `advgen zoo --add` makes it."""
    monkeypatch.setenv("ADVGEN_ZOO_DIR", str(tmp_path / "zoo"))
    torch.manual_seed(0)
    run = tmp_path / "run"
    advgen.train(TrainConfig(epochs=1, batch_size=16), tiny_dataset(32, 1), tiny_dataset(16, 2), out_dir=run,
                 progress=False)
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    assert main(["zoo", "--add", str(run), "--name", "tiny-base", "--eval", str(tmp_path / "eval.json"),
                 "--command", "advgen train ..."]) == 0
    return tmp_path / "zoo", run


def test_zoo_card_lists_and_loads(a_zoo, capsys):
    folder, run = a_zoo
    card = json.loads((folder / "tiny-base.json").read_text())
    assert card["sha256"] == zoo.sha256(folder / "tiny-base.safetensors")
    assert (card["architecture"], card["method"], card["train_images"], card["epochs"]) == ("resnet20", "standard", 32, 1)
    assert "samples" not in card["eval"] and card["eval"]["autoattack_l2"]["0.5"]["accuracy"] == 0.1875
    capsys.readouterr()
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "tiny-base" in out and "18.8 [7.0, 43.0]" in out
    assert main(["zoo", "--json"]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)] == ["tiny-base"]
    model = advgen.load_model("zoo:tiny-base")
    ref = advgen.load_model(run)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), ref(x))


def test_a_changed_weights_file_is_refused_before_loading(a_zoo, tmp_path, capsys):
    folder, _ = a_zoo
    raw = bytearray((folder / "tiny-base.safetensors").read_bytes())
    raw[-1] ^= 1
    (folder / "tiny-base.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 .* is not loaded"):
        advgen.load_model("zoo:tiny-base")
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=8)
    assert main(["eval", "zoo:tiny-base", "--data-dir", str(data), "--eps", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not loaded" in err and err.count("\n") == 1


def test_unknown_names_and_an_empty_zoo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADVGEN_ZOO_DIR", str(tmp_path / "none"))
    with pytest.raises(UserError, match="known: none"):
        advgen.load_model("zoo:base")
    assert main(["zoo"]) == 0 and "is empty" in capsys.readouterr().out


def test_the_shipped_zoo_is_consistent():
    """Every card of the installed zoo names a file whose sha256 matches (the check a load makes)."""
    if not zoo.cards():
        pytest.skip("the zoo ships no model yet (the full-data campaign is running)")
    for card in zoo.cards():
        assert zoo.model_file(card["name"]).name == card["file"]
