"""The comparison's verdicts against its references (compare.contrasts): which budgets are paired, on
which attack, the Welch interval and the issue's thresholds. Synthetic rows: nothing is trained."""
from __future__ import annotations

import pytest

from advgen.apps.compare.report import contrasts, render, summarize
from advgen.evaluation import paired_interval, welch_interval

UNIT = 256


def _rows(name, units, passes_per_step, pgd, aa_final, seeds=(0, 1, 2), clean=(0.6, 0.6, 0.6)):
    """Rows of one entry: pgd[units] and aa_final are lists of per-seed accuracies; AutoAttack only at
    the entry's largest budget, as the quick preset does."""
    rows = []
    for i, seed in enumerate(seeds):
        for u in units:
            steps = round(u * UNIT / passes_per_step)
            passes = steps * passes_per_step
            rows.append({"name": name, "method": name, "label": name, "seed": seed, "budget_units": u, "steps": steps,
                         "passes": passes, "budget_seconds": passes / 10, "clean": clean[i], "pgd": {"0.5": pgd[u][i]},
                         "autoattack": {"0.5": aa_final[i]} if u == units[-1] else {}, "checks": []})
    return rows


def _summary(gen_aa, seeds=(0, 1, 2), gen_clean=(0.6, 0.6, 0.6)):
    q = [1.0, 2.0, 4.0]
    rows = _rows("nfgsm-l2", [0.5] + q, 2, {u: [0.30, 0.31, 0.32] for u in [0.5] + q}, [0.34, 0.35, 0.36])
    rows += _rows("pgd10-l2", q + [8.0], 11, {u: [0.36, 0.37, 0.38] for u in q + [8.0]}, [0.37, 0.38, 0.39])
    rows += _rows("gen_x", [0.5] + q, 3, {0.5: [0.2] * 3, 1.0: [0.3] * 3, 2.0: [0.365, 0.37, 0.375],
                                          4.0: [0.40, 0.40, 0.41]}, gen_aa, seeds, gen_clean)
    return summarize(rows)


def test_welch_interval_matches_the_hand_computation():
    a = {"mean": 0.40, "std": 0.01, "n": 3}
    b = {"mean": 0.35, "std": 0.02, "n": 3}
    d, lo, hi = welch_interval(a, b)
    # se² = (0.01² + 0.02²) / 3; Welch df = 2.94, rounded down to 2: t = 4.303
    half = 4.303 * ((0.01 ** 2 + 0.02 ** 2) / 3) ** 0.5
    assert d == pytest.approx(0.05) and (lo, hi) == pytest.approx((0.05 - half, 0.05 + half))
    big = {"mean": 0.4, "std": 0.01, "n": 40}
    # 78 degrees of freedom: the normal quantile
    assert welch_interval(big, {**big, "mean": 0.39})[2] - 0.01 == pytest.approx(1.96 * 0.01 * (2 / 40) ** 0.5)


def test_contrasts_pair_the_budgets_the_target_names():
    (c,) = contrasts(_summary([0.38, 0.38, 0.39]), "0.5")
    ref, slow = c["vs_ref"], c["vs_slow"]
    # N-FGSM at the largest shared budget (4 units), both AutoAttacked: +3.33 points, sd of the difference
    # sqrt(0.01² + 0.0058²) = 1.2 points: a win
    assert (ref["units"], ref["attack"], ref["verdict"]) == (4.0, "AA", "yes")
    assert ref["diff"] == pytest.approx(0.0333, abs=1e-3) and ref["ci95"][0] < ref["diff"] < ref["ci95"][1]
    # PGD-10 at >= 3x the passes: gen_x's 2 units (513 passes) against PGD-10's 8 (2046), on PGD for both
    # (gen_x's 2-unit snapshot has no AutoAttack): 0.37 against 0.37, within 1 point
    assert (slow["units"], slow["other_units"], slow["attack"], slow["verdict"]) == (2.0, 8.0, "PGD", "yes")
    assert slow["passes_ratio"] == pytest.approx(513 / 2046) and slow["diff"] == pytest.approx(0.0, abs=1e-9)
    assert ref["clean_diff"] == pytest.approx(0.0, abs=1e-9)
    # 1.5 points over N-FGSM is not the 2 the target asks
    assert contrasts(_summary([0.365, 0.365, 0.365]), "0.5")[0]["vs_ref"]["verdict"] == "no"


def test_contrasts_wait_for_three_seeds_a_side():
    (c,) = contrasts(_summary([0.40, 0.41], seeds=(0, 1)), "0.5")
    assert c["vs_ref"]["verdict"] == "pending" and c["vs_ref"]["seeds"] == [2, 3] and "diff" not in c["vs_ref"]
    results = {"settings": {"pgd_eps": [0.5], "aa_eps": [0.5], "aa_attacks": None, "aa_targets": 9, "train_subset": 1,
                            "lr": 0.01, "seeds": [0, 1], "unit_passes": UNIT, "batch_size": 128, "pgd_steps": 50,
                            "pgd_restarts": 2, "aa_every_budget": False},
               "rows": [], "preset": "t", "version": "0", "git_commit": None,
               "machine": "m", "base": "b", "n_test": 200}
    q = [1.0, 2.0, 4.0]
    results["rows"] = _rows("nfgsm-l2", q, 2, {u: [0.3] * 3 for u in q}, [0.34, 0.35, 0.36]) + \
        _rows("gen_x", q, 3, {u: [0.3] * 2 for u in q}, [0.40, 0.41], seeds=(0, 1))
    md = render(results)
    assert "| gen_x | 4, AA | pending (2 / 3 seeds) | – | pending |" in md
    # the table gives the work as steps (batches seen) beside passes: gen_x's step costs 3 passes
    assert "| entry | units | steps | passes | seconds | seeds |" in md
    assert "| gen_x | 4 | 341 | 1023 |" in md and "| nfgsm-l2 | 4 | 512 | 1024 |" in md


def test_paired_interval_is_the_t_interval_of_the_differences():
    d = [1.0, 2.0, 4.0]   # mean 7/3, sample std sqrt(7/3), 2 degrees of freedom
    m, lo, hi = paired_interval(d)
    half = 4.303 * (7 / 3) ** 0.5 / 3 ** 0.5
    assert m == pytest.approx(7 / 3) and (lo, hi) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert paired_interval([0.5, 0.5])[1:] == (0.5, 0.5)   # no spread, no width


def test_the_overfitting_watch_gets_its_figure_and_column(tmp_path):
    from advgen.apps.compare.report import write_report
    results = {"settings": {"pgd_eps": [8 / 255], "aa_eps": [8 / 255], "aa_attacks": None, "aa_targets": 9,
                            "train_subset": 10000, "lr": 0.01, "seeds": [0, 1, 2], "unit_passes": UNIT,
                            "batch_size": 128, "pgd_steps": 50, "pgd_restarts": 2, "aa_every_budget": False,
                            "norm": "linf", "watch_subset": 200},
               "rows": [], "preset": "t", "version": "0", "git_commit": None, "machine": "m", "base": "b",
               "n_test": 200}
    eps = str(8 / 255)
    for seed in (0, 1, 2):
        fired = seed == 1   # one seed overfits: PGD collapses while FGSM climbs
        watch = [{"passes": 156 * (i + 1), "pgd": p, "fgsm": f, "overfit": fired and i == 2}
                 for i, (p, f) in enumerate([(0.30, 0.40), (0.32, 0.45), (0.05, 0.80)] if fired else
                                            [(0.30, 0.40), (0.32, 0.42), (0.33, 0.43)])]
        results["rows"].append({"name": "fgsm-rs-linf", "method": "fgsm", "label": "FGSM-RS", "seed": seed,
                                "budget_units": 2.0, "steps": 256, "passes": 512, "budget_seconds": 60.0,
                                "clean": 0.6, "pgd": {eps: 0.05 if fired else 0.33}, "autoattack": {eps: 0.3},
                                "checks": [], "catastrophic_overfitting": fired, "watch": watch})
    md = write_report(results, tmp_path).read_text()
    assert (tmp_path / "overfitting.png").stat().st_size > 10_000
    assert "](overfitting.png)" in md and "| fgsm-rs-linf | 2 | 256 | 512 | 60 | 3 |" in md
    assert md.split("| fgsm-rs-linf | 2 |")[1].splitlines()[0].endswith("| 1/3 | ok |")
    # no run watched: no figure, no paragraph
    for r in results["rows"]:
        del r["watch"]
        r["catastrophic_overfitting"] = None
    (tmp_path / "nowatch").mkdir()
    md = write_report(results, tmp_path / "nowatch").read_text()
    assert not (tmp_path / "nowatch" / "overfitting.png").exists() and "overfitting.png" not in md


def test_the_watch_curve_is_read_from_the_run_record(tmp_path):
    from advgen.apps.compare.run import _watch_curve
    from advgen.checkpoint import RUN_FILE
    from advgen.io import write_json
    write_json(tmp_path / RUN_FILE, {"epochs": [
        {"epoch": 1, "passes": 156, "watch_acc": 0.3, "watch_fgsm_acc": 0.4},
        {"epoch": 2, "passes": 156, "watch_acc": 0.05, "watch_fgsm_acc": 0.8, "catastrophic_overfitting": True},
        {"epoch": 3, "passes": 40}]})   # an epoch without a watch (none asked for): not a point
    assert _watch_curve(tmp_path) == [{"passes": 156, "pgd": 0.3, "fgsm": 0.4, "overfit": False},
                                      {"passes": 312, "pgd": 0.05, "fgsm": 0.8, "overfit": True}]


def test_the_linf_comparison_script_names_only_entries_of_its_presets(tmp_path):
    """tools/compare_linf.sh: every call it makes is `compare --preset P --entries E` with E an entry of P
    (a misspelt one would stop the background campaign hours in), each once, both radii."""
    import subprocess
    from pathlib import Path

    from advgen.apps.compare.plan import COMPARE_PRESETS
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / "tools" / "compare_linf.sh"), "D", "O"], env={"ADVGEN": "echo",
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
    calls = [ln.split() for ln in out.splitlines() if ln.startswith("compare ")]
    pairs = [(c[c.index("--preset") + 1], c[c.index("--entries") + 1]) for c in calls]
    assert len(pairs) == len(set(pairs)) >= 12
    for preset, entry in pairs:
        assert entry in {e.name for e in COMPARE_PRESETS[preset].entries}, (preset, entry)
    assert {p for p, _ in pairs} == {"linf-quick", "linf16-quick"}
    assert pairs[:2] == [("linf16-quick", "nfgsm-linf"), ("linf16-quick", "gen-sdi-linf")]


def test_a_win_shows_what_it_cost_in_clean_accuracy():
    """gen-nfgsm's lesson at Linf 8/255: +5 robust points for 13 clean ones. The verdict keeps the issue's
    rule; the table says the price, with its interval."""
    summary = _summary([0.38, 0.38, 0.39], gen_clean=(0.47, 0.48, 0.46))
    (c,) = contrasts(summary, "0.5")
    ref = c["vs_ref"]
    assert ref["verdict"] == "yes" and ref["clean_diff"] == pytest.approx(-0.13)
    assert ref["clean_ci95"][0] < -0.13 < ref["clean_ci95"][1] < 0
    results = {"settings": {"pgd_eps": [0.5], "aa_eps": [0.5], "aa_attacks": None, "aa_targets": 9, "train_subset": 1,
                            "lr": 0.01, "seeds": [0, 1, 2], "unit_passes": UNIT, "batch_size": 128, "pgd_steps": 50,
                            "pgd_restarts": 2, "aa_every_budget": False},
               "rows": [], "preset": "t", "version": "0", "git_commit": None, "machine": "m", "base": "b", "n_test": 200}
    q = [1.0, 2.0, 4.0]
    results["rows"] = _rows("nfgsm-l2", q, 2, {u: [0.3] * 3 for u in q}, [0.34, 0.35, 0.36]) + \
        _rows("gen_x", q, 3, {u: [0.3] * 3 for u in q}, [0.38, 0.38, 0.39], clean=(0.47, 0.48, 0.46))
    lo, hi = (100 * x for x in ref["clean_ci95"])
    assert f"| gen_x | 4, AA | +3.3 [" in render(results)
    assert f"| -13.0 [{lo:+.1f}, {hi:+.1f}] | yes |" in render(results)
