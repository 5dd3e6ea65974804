"""docs/report-paper.md from a campaign's run folders: tiny fake campaigns in a tmp folder, some stages
finished and evaluated, some not; the report uses the finished ones and lists the rest as pending."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synth_cifar import tiny_dataset, write_cifar

import advgen
from advgen.apps import paper as paper_report
from advgen.training import TrainConfig
from conftest import full_evaluation

ROOT = Path(__file__).resolve().parents[1]


class _FakeAA:
    """Stands for AutoAttack (the real one runs in test_evaluate): every third image goes grey."""

    def __init__(self, model, *, norm, eps, seed):
        pass

    def __call__(self, x, y):
        out = x.clone()
        out[::3] = 0.5
        return out


def _train(run: Path, method: str, seconds: list[float], seed: int) -> None:
    """A tiny finished run, its epoch seconds then set to known values (Table 1 is checked against them)."""
    torch.manual_seed(seed)
    advgen.train(TrainConfig(method=method, epochs=1, batch_size=16, seed=seed), tiny_dataset(32, 1),
                 tiny_dataset(16, 2), out_dir=run, progress=False)
    rec = json.loads((run / "run.json").read_text())
    rec["epochs"] = [{**rec["epochs"][0], "epoch": i + 1, "seconds": s} for i, s in enumerate(seconds)]
    (run / "run.json").write_text(json.dumps(rec))


def _evaluate(run: Path, out: Path) -> dict:
    x, y = tiny_dataset(10, 5).images, tiny_dataset(10, 5).labels
    ev = full_evaluation(advgen.load_model(run), x, y, pgd_eps=[0.0, 0.25, 0.5], aa_eps=[0.25, 0.5], pgd_steps=1,
                         restarts=1, batch_size=5)
    out.write_text(json.dumps(ev))
    return ev


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """runs/: base and gen_paper finished and evaluated, minmax_paper finished and not evaluated,
    fgsm_rs half-trained, gen_gradient part-way through its first epoch (a saved state, no run.json), pgd10
    not started; evals/ holds STAGE.json."""
    mp = pytest.MonkeyPatch()
    mp.setattr("advgen.evaluation.protocol.AutoAttack", _FakeAA)
    root = tmp_path_factory.mktemp("campaign")
    runs, evals = root / "runs", root / "evals"
    evals.mkdir()
    _train(runs / "base", "standard", [30.0, 10.0, 20.0], 0)
    _train(runs / "gen_paper", "generator", [40.0], 1)
    _train(runs / "minmax_paper", "minmax", [200.0], 2)
    _train(runs / "fgsm_rs", "fgsm", [50.0], 3)
    rec = json.loads((runs / "fgsm_rs" / "run.json").read_text())
    (runs / "fgsm_rs" / "run.json").write_text(json.dumps({**rec, "finished": False, "config": {**rec["config"],
                                                                                              "epochs": 8}}))
    (runs / "gen_gradient").mkdir()
    (runs / "gen_gradient" / "state.safetensors").write_bytes(b"")      # only its presence is read
    (runs / "gen_gradient" / "metrics.csv").write_text("step,epoch,loss,accuracy,lr,seconds\n"
                                                      "56,1,1.5,0.4,0.01,80.0\n57,1,1.4,0.4,0.01,81.5\n")
    evs = {s: _evaluate(runs / s, evals / f"{s}.json") for s in ("base", "gen_paper")}
    yield root, runs, evals, evs
    mp.undo()


def test_report_uses_the_finished_stages_and_lists_the_rest(campaign, tmp_path):
    root, runs, evals, evs = campaign
    data = write_cifar(tmp_path / "data", per_batch=8, n_test=8)
    path = paper_report.build(runs, tmp_path / "docs", evals_dir=evals, data_dir=data, machine="test machine, 1 thread")
    md = path.read_text()
    # Table 1 from the runs' epochs: medians 20 (base), 40 (gen_paper), 200 (minmax_paper)
    assert "| base | standard training" in md and "| 20 | 2 | 3 |" in md
    assert "(from the finished runs): 32 CIFAR-10 training images; resnet20." in md
    assert "min-max / generator (minmax_paper / gen_paper) = **5.00×**" in md
    assert "generator / standard (gen_paper / base) = **2.00×**" in md
    assert "pgd10 / gen_gradient) = pending" in md and "test machine, 1 thread" in md
    # pending stages named, never given numbers
    pending = md.split("## Pending")[1].split("##")[0]
    for line in ("fgsm_rs: training: 1 of 8 epochs done", "gen_gradient: training: part-way (epoch 1, 57 steps in metrics.csv)",
                 "pgd10: not started",
                 "minmax_paper: trained; no evaluation yet"):
        assert line in pending
    assert "| fgsm_rs | training" in md and "| pgd10 | not started |" in md
    # the AutoAttack table holds the evaluations' numbers with their intervals
    ev = evs["gen_paper"]
    row = next(ln for ln in md.splitlines() if ln.startswith("| gen_paper | ") and "[" in ln and "|---" not in ln
               and ln.count("|") == 9)
    wc = ev["worst_case_l2"]["0.5"]
    assert row.endswith(f"{100 * wc['accuracy']:.1f} [{100 * wc['ci95'][0]:.1f}, {100 * wc['ci95'][1]:.1f}] |")
    assert "Robustness** (the generator model is as robust as the min-max model): pending" in md
    # robustness against time: the evaluated stages with a training record, most robust first, no pgd10 yet
    trade = md.split("## Robustness against training time")[1].split("##")[0]
    rows = [ln for ln in trade.splitlines() if ln.startswith("| base") or ln.startswith("| gen_paper")]
    accs = {s: evs[s]["worst_case_l2"]["0.5"]["accuracy"] for s in ("base", "gen_paper")}
    assert len(rows) == 2 and rows[0].startswith(f"| {max(accs, key=accs.get)} |") and "pgd10" not in trade
    assert rows[[r.split(' ')[1] for r in rows].index("base")].endswith("| 20 |")
    assert paper_report.DATA_CAVEAT in md
    gap = lambda s, e: 100 * (evs[s]["pgd_l2"][e]["accuracy"] - evs[s]["autoattack_l2"][e]["accuracy"])  # noqa: E731
    assert (f"PGD minus AutoAttack in points: base {gap('base', '0.25'):+.1f} / {gap('base', '0.5'):+.1f}; "
            f"gen_paper {gap('gen_paper', '0.25'):+.1f} /") in md
    assert "- base: [" in md and "PGD within 3 points of AutoAttack" in md.split("## Sanity checks")[1]
    for png in ("figure2-paper.png", "figure3-paper.png"):
        assert (tmp_path / "docs" / png).stat().st_size > 1000 and f"]({png})" in md
    res = json.loads((tmp_path / "docs" / "results-paper.json").read_text())
    assert res["stages"]["pgd10"]["state"] == "pending" and res["stages"]["base"]["state"] == "evaluated"
    assert res["table1"]["ratios"]["minmax/generator"] == pytest.approx(5.0)
    assert "samples" not in json.dumps(res["stages"]["base"]["eval"])


def test_the_robustness_claim_once_both_paper_models_are_evaluated(campaign, tmp_path, monkeypatch):
    root, runs, evals, evs = campaign
    monkeypatch.setattr("advgen.evaluation.protocol.AutoAttack", _FakeAA)
    mm = _evaluate(runs / "minmax_paper", tmp_path / "minmax_paper.json")
    both = tmp_path / "evals"
    both.mkdir()
    for s in ("base", "gen_paper"):
        (both / f"{s}.json").write_text((evals / f"{s}.json").read_text())
    (both / "minmax_paper.json").write_text(json.dumps(mm))
    md = paper_report.build(runs, tmp_path / "docs", evals_dir=both).read_text()

    def worst(ev, eps):
        return [a == "1" and p == "1" for a, p in zip(ev["samples"][f"aa:{eps}"], ev["samples"][f"pgd:{eps}"])]
    claim = md.split("- **Robustness**")[1].split("\n")[0]
    for eps in ("0.25", "0.5"):     # the claim is stated at every radius both models were attacked at
        g, m = worst(evs["gen_paper"], eps), worst(mm, eps)
        only_g, only_m = sum(a and not b for a, b in zip(g, m)), sum(b and not a for a, b in zip(g, m))
        at = claim.split(f"at L2 {eps}, ")[1].split(";")[1]
        assert f"{only_g} are robust only for gen_paper and {only_m} only for minmax_paper" in at
    assert "Figure 2: generator samples (gen_paper)\n\npending" in md        # no --data-dir: no Figure 2


def test_an_evaluation_of_other_weights_is_not_used(campaign, tmp_path):
    root, runs, evals, _ = campaign
    wrong = tmp_path / "evals"
    wrong.mkdir()
    (wrong / "minmax_paper.json").write_text((evals / "gen_paper.json").read_text())   # filed under the wrong model
    md = paper_report.build(runs, tmp_path / "docs", evals_dir=wrong).read_text()
    assert "minmax_paper: trained; evaluation not usable:" in md and "other weights" in md
    assert "pending (no model evaluated yet)" in md and "| minmax_paper | trained; evaluation not usable" in md


def test_a_part_way_evaluation_is_named_as_such_and_the_benchmark_ratios_shown(campaign, tmp_path):
    root, runs, evals, evs = campaign
    part = tmp_path / "evals"
    part.mkdir()
    # advgen eval --full stores each attack's bits as it finishes them; stopped after the PGD ones
    (part / "minmax_paper.json").write_text(json.dumps({"settings": {"n": 2}, "samples": {"clean": "11",
                                                                                         "pgd:0.25": "0"}}))
    bench = tmp_path / "bench.json"
    ratio = lambda m: {"median": m, "min": m - 0.5, "max": m + 0.5, "runs": [m]}  # noqa: E731
    bench.write_text(json.dumps({"machine": {"threads": 1, "torch": "2.13.0+cpu"}, "train_subset": 1280, "reps": 3,
                                 "training": {"ratios": {"minmax_pgd40/generator": ratio(23.9),
                                                         "minmax_pgd10/generator": ratio(6.0),
                                                         "generator/standard": ratio(1.15)}}}))
    md = paper_report.build(runs, tmp_path / "docs", evals_dir=part, bench=bench).read_text()
    assert "minmax_paper: trained; evaluation part-way (" in md and "clean, pgd:0.25 (1 of 2) done)" in md
    assert "PGD-40 / generator = 23.90× (23.40–24.40)" in md and "3 interleaved repetitions" in md
    res = json.loads((tmp_path / "docs" / "results-paper.json").read_text())
    assert res["benchmark_ratios"]["generator/standard"]["median"] == 1.15
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(advgen.errors.UserError, match="not a bench.json"):
        paper_report.build(runs, tmp_path / "docs", bench=tmp_path / "bad.json")


def test_a_finished_pgd_sweep_joins_figure3_before_autoattack_ends(campaign, tmp_path, monkeypatch):
    root, runs, evals, evs = campaign
    monkeypatch.setattr("advgen.evaluation.protocol.AutoAttack", _FakeAA)
    ev = _evaluate(runs / "minmax_paper", tmp_path / "mm.json")
    part = tmp_path / "evals"
    part.mkdir()
    # as advgen eval --full leaves it when stopped in AutoAttack: every PGD eps done, aa:0.25 on 5 of 10
    samples = {k: v for k, v in ev["samples"].items() if k == "clean" or k.startswith("pgd:")}
    stopped = {"settings": ev["settings"], "samples": samples | {"aa:0.25": ev["samples"]["aa:0.25"][:5]}}
    (part / "minmax_paper.json").write_text(json.dumps(stopped))
    md = paper_report.build(runs, tmp_path / "docs", evals_dir=part).read_text()
    fig3 = md.split("## Figure 3")[1].split("##")[0]
    row = next(ln for ln in fig3.splitlines() if ln.startswith("| minmax_paper (AutoAttack pending) |"))
    assert row.endswith(" | ".join(paper_report._pct(ev["pgd_l2"][e]) for e in ("0.0", "0.25", "0.5")) + " |")
    assert "](figure3-paper.png)" in md and "| minmax_paper | trained; evaluation part-way" in md
    assert "aa:0.25 (5 of 10)" in md and "minmax_paper" not in md.split("## Robustness against training time")[1]
    # the same bits filed under other weights are not drawn
    (part / "minmax_paper.json").write_text(json.dumps({**stopped, "settings": {**ev["settings"],
                                                                                "model_sha256": "0" * 64}}))
    md = paper_report.build(runs, tmp_path / "docs", evals_dir=part).read_text()
    assert "AutoAttack pending" not in md and "pending (no model evaluated yet)" in md


def test_the_gap_rule_is_worked_out_for_evaluations_that_predate_it():
    acc = lambda a: {"accuracy": a}  # noqa: E731
    old = {"n": 200, "checks": [{"name": "accuracy non-increasing in eps", "passed": True, "detail": "ok"}],
           "pgd_l2": {"0.25": acc(0.70), "0.5": acc(0.55)}, "autoattack_l2": {"0.25": acc(0.68), "0.5": acc(0.50)}}
    checks = paper_report._checks(old)
    assert [c["name"] for c in checks] == ["accuracy non-increasing in eps", "PGD within 3 points of AutoAttack"]
    assert not checks[1]["passed"] and checks[1]["detail"].endswith("at eps 0.5")    # 5 points at 0.5
    assert paper_report._checks({**old, "checks": checks}) == checks                   # never twice


def test_mcnemar_exact_p_values():
    assert paper_report.mcnemar("1111", "1111") == {"only_a": 0, "only_b": 0, "p": 1.0}
    r = paper_report.mcnemar("1" * 10 + "0" * 2, "0" * 10 + "1" * 2)     # 10 vs 2 discordant: p = 0.0386
    assert (r["only_a"], r["only_b"]) == (10, 2) and r["p"] == pytest.approx(0.03857, abs=1e-4)


def test_the_script_errors_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "paper_report.py"), str(tmp_path / "nope"),
                          "--out", str(tmp_path / "docs")], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a folder of campaign runs" in out.stderr


def test_tradeoff_rows_are_measured_against_pgd10():
    def st(acc):
        return {"eval": {"worst_case_l2": {"0.5": {"accuracy": acc, "ci95": [acc - 0.01, acc + 0.01], "n": 1000}}}}
    stages = {"pgd10": st(0.40), "fgsm_rs": st(0.35), "gen_paper": st(0.02), "minmax_paper": {"eval": None}}
    t = {"rows": {"pgd10": {"seconds_per_epoch": 1500.0}, "fgsm_rs": {"seconds_per_epoch": 300.0},
                  "gen_paper": {"seconds_per_epoch": 180.0}}}
    lines = paper_report.tradeoff_lines(stages, t)
    assert lines[2] == "| pgd10 | 40.0 [39.0, 41.0] | 1500 | +0.0 |  | 1.00 |"
    assert lines[3] == "| fgsm_rs | 35.0 [34.0, 36.0] | 300 | -5.0 | - | 0.20 |"     # no samples: no test
    assert lines[4].startswith("| gen_paper | 2.0") and len([ln for ln in lines if ln.startswith("| ")]) == 4


def test_tradeoff_pairs_each_model_with_pgd10_on_the_same_images():
    def st(aa, pgd):
        k = aa.count("1") / len(aa)
        return {"eval": {"worst_case_l2": {"0.5": {"accuracy": k, "ci95": [k, k], "n": len(aa)}}},
                "samples": {"aa:0.5": aa, "pgd:0.5": pgd}}
    # fgsm_rs: AutoAttack robust on 11, but PGD breaks the last, so 10 worst-case robust where pgd10 has 2
    stages = {"pgd10": st("0" * 10 + "11", "1" * 12), "fgsm_rs": st("1" * 11 + "0", "1" * 10 + "00")}
    t = {"rows": {"pgd10": {"seconds_per_epoch": 1500.0}, "fgsm_rs": {"seconds_per_epoch": 300.0}}}
    rows = {ln.split(" | ")[0]: ln.split(" | ") for ln in paper_report.tradeoff_lines(stages, t) if ln.startswith("| ")}
    assert rows["| fgsm_rs"][4] == "10 / 2 (0.039)"        # exact McNemar, 10 vs 2 discordant
    assert rows["| pgd10"][4] == ""


def test_tradeoff_takes_the_like_for_like_ratio_from_the_benchmark():
    def st(acc):
        return {"eval": {"worst_case_l2": {"0.5": {"accuracy": acc, "ci95": [acc, acc], "n": 1000}}}}
    stages = {"pgd10": st(0.40), "nfgsm": st(0.41), "gen_mem": st(0.39)}   # gen_mem: a stage the bench lacks
    t = {"rows": {s: {"seconds_per_epoch": 1000.0} for s in stages}}      # a shared core: equal seconds
    bench = {"training": {"seconds_per_epoch": {"minmax_pgd10": {"median": 28.0}, "nfgsm": {"median": 7.0}}}}
    lines = paper_report.tradeoff_lines(stages, t, bench=bench)
    assert lines[0].endswith("| time / pgd10 | time / pgd10, like for like |") and lines[1].count("---") == 7
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in lines if ln.startswith("| ") and "model" not in ln}
    assert rows["nfgsm"][-2:] == ["1.00", "0.25 |"] and rows["gen_mem"][-1] == "- |"
    assert "like for like" not in paper_report.tradeoff_lines(stages, t)[0]             # no bench, no column


def test_what_to_train_is_the_cheapest_model_level_with_the_best():
    def st(acc, low):
        return {"eval": {"worst_case_l2": {"0.5": {"accuracy": acc, "ci95": [low, acc + 0.03], "n": 1000}}}}
    # pgd10 is the most robust; nfgsm is inside its interval, fgsm_rs (0.30) below it
    stages = {"pgd10": st(0.40, 0.37), "nfgsm": st(0.38, 0.35), "fgsm_rs": st(0.30, 0.27)}
    t = {"rows": {"pgd10": {"seconds_per_epoch": 500.0}, "nfgsm": {"seconds_per_epoch": 900.0},   # shared core
                  "fgsm_rs": {"seconds_per_epoch": 100.0}}}
    bench = {"training": {"seconds_per_epoch": {"minmax_pgd10": {"median": 28.0}, "nfgsm": {"median": 7.0},
                                                "fgsm_rs": {"median": 6.0}}}}
    advice = next(ln for ln in paper_report.tradeoff_lines(stages, t, bench=bench) if ln.startswith("What to train"))
    assert "pgd10, nfgsm sit inside" in advice and "**nfgsm** (like-for-like benchmark)" in advice
    advice = next(ln for ln in paper_report.tradeoff_lines(stages, t) if ln.startswith("What to train"))
    assert "**pgd10** (the campaign" in advice          # without the benchmark: the campaign's seconds
