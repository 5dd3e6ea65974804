"""tools/carry.py: what a save keeps of finished and unfinished runs, and that restore returns it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("carry", Path(__file__).parents[1] / "tools" / "carry.py")
carry = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(carry)


def _run(folder: Path, finished: bool) -> None:
    (folder / "snapshots").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"finished": finished, "epochs": [{"steps": 3}, {"steps": 1}]}))
    for name in ("model.safetensors", "state.safetensors", "metrics.csv", "eval-step-4.json", ".lock",
                 "snapshots/step-2.safetensors", ".metrics.csv.x1y2.tmp"):
        (folder / name).write_text(name)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_save_keeps_what_resumes_and_light_keeps_records(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "done", True)
    _run(runs / "going", False)
    _run(runs / "base", True)
    (runs / "compare.json").write_text("{}")
    assert carry.main(["save", str(runs), str(tmp_path / "full")]) == 0
    full = tmp_path / "full"
    assert _files(full / "done") == {"run.json", "model.safetensors", "metrics.csv", "eval-step-4.json",
                                     "snapshots/step-2.safetensors"}          # no state, no lock
    assert _files(full / "going") == _files(runs / "going") - {".lock", ".metrics.csv.x1y2.tmp"}   # all it needs
    assert (full / "compare.json").exists()
    assert carry.main(["save", str(runs), str(tmp_path / "part"), "--light"]) == 0
    # done's snapshot (step 2) is not evaluated yet: it stays, to be evaluated; the final model (step 4) is
    assert _files(tmp_path / "part" / "done") == {"run.json", "metrics.csv", "eval-step-4.json",
                                                  "snapshots/step-2.safetensors"}
    (runs / "done" / "eval-step-2.json").write_text("{}")
    assert carry.main(["save", str(runs), str(tmp_path / "part"), "--light"]) == 0   # evaluated since: weights go
    assert _files(tmp_path / "part" / "done") == {"run.json", "metrics.csv", "eval-step-2.json", "eval-step-4.json"}
    assert carry.main(["save", str(runs), str(tmp_path / "light"), "--light"]) == 0
    light = tmp_path / "light"
    assert _files(light / "done") == {"run.json", "metrics.csv", "eval-step-2.json", "eval-step-4.json"}
    assert "model.safetensors" in _files(light / "base")                   # --keep-weights base
    assert _files(light / "going") == _files(full / "going")
    (runs / "going" / "run.json").write_text(json.dumps({"finished": True}))   # it finishes: its state goes
    assert carry.main(["save", str(runs), str(full)]) == 0
    assert not (full / "going" / "state.safetensors").exists()
    assert carry.main(["restore", str(light), str(tmp_path / "back")]) == 0
    assert _files(tmp_path / "back") == _files(light)


def test_a_missing_folder_is_exit_2(tmp_path, capsys):
    assert carry.main(["save", str(tmp_path / "none"), str(tmp_path / "keep")]) == 2
    assert "no folder" in capsys.readouterr().err and not (tmp_path / "keep").exists()


def test_an_unfinished_run_over_max_mb_is_left_out(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "big", False)
    _run(runs / "done", True)
    (runs / "big" / "state.safetensors").write_bytes(b"x" * 3 * 2**20)
    (runs / "done" / "model.safetensors").write_bytes(b"x" * 3 * 2**20)   # finished: saved whatever its size
    assert carry.main(["save", str(runs), str(tmp_path / "keep"), "--max-mb", "2"]) == 0
    assert not (tmp_path / "keep" / "big").exists() and (tmp_path / "keep" / "done" / "model.safetensors").exists()
    assert "left out big: in progress, 3 MB to save, over --max-mb 2" in capsys.readouterr().out
    assert carry.main(["save", str(runs), str(tmp_path / "keep"), "--max-mb", "4"]) == 0
    assert (tmp_path / "keep" / "big" / "state.safetensors").stat().st_size == 3 * 2**20


def test_a_final_model_is_kept_until_its_own_step_is_evaluated(tmp_path):
    """A restored run has lost its evaluated snapshots: the final model is judged by the eval file of
    its last step (4 = the epochs' steps), not by counting snapshots (which once dropped a model whose
    AutoAttack was still to run)."""
    runs = tmp_path / "runs"
    _run(runs / "done", True)
    (runs / "done" / "snapshots" / "step-2.safetensors").unlink()
    (runs / "done" / "eval-step-2.json").write_text("{}")
    (runs / "done" / "eval-step-4.json").unlink()
    assert carry.main(["save", str(runs), str(tmp_path / "keep"), "--light"]) == 0
    assert "model.safetensors" in _files(tmp_path / "keep" / "done")
    (runs / "done" / "eval-step-4.json").write_text("{}")
    assert carry.main(["save", str(runs), str(tmp_path / "keep"), "--light"]) == 0
    assert "model.safetensors" not in _files(tmp_path / "keep" / "done")


def test_a_keep_folder_git_ignores_is_refused(tmp_path, capsys):
    # the last session's carry went to experiments/.../runs/, which .gitignore's `runs/` drops: nothing landed
    import subprocess
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("runs/\n")
    _run(tmp_path / "runs" / "a", finished=False)
    assert carry.main(["save", str(tmp_path / "runs"), str(repo / "experiments" / "runs")]) == 2
    assert "git ignores" in capsys.readouterr().err and not (repo / "experiments").exists()
    assert carry.main(["save", str(tmp_path / "runs"), str(repo / "experiments" / "kept")]) == 0
    assert "a/state.safetensors" in _files(repo / "experiments" / "kept")
