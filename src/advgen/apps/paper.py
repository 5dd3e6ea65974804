"""docs/report-paper.md: the paper's experiment at full scale, from the campaign's run folders
(tools/campaign.sh) and their full evaluations (`advgen eval RUN --full`).

It uses what is finished and lists the rest as pending: a stage's training numbers once its run.json
says it finished, its accuracies once a finished full evaluation of exactly its weights exists (checked
by the evaluation's model_sha256). Nothing is filled in by hand. Outputs, beside the report:
figure2-paper.png (generator samples), figure3-paper.png (accuracy against PGD-L2 eps, Wilson 95%
error bars), results-paper.json (everything the report shows, without the per-sample bits).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import GENERATORS_FILE, METRICS_FILE, MODEL_FILE, RUN_FILE, STATE_FILE
from ..errors import UserError
from ..evaluation import gap_check, mcnemar, with_interval
from ..evaluation.progress import unbits
from ..precision import training_precision
from ..recipes import RECIPES
from ..io import atomic_write, fingerprint, git_commit, machine_description, read_json, read_tensors, write_json
from . import DATA_CAVEAT
from .figures import figure2, figure3
from ..data import first_n, load_dataset
from .zoo import EVAL_KEYS, check_evaluation

# the campaign's stages (docs/campaign.md), in the order the report shows them
STAGES = {
    "base": "standard training (the base of every other model)",
    "gen_paper": "generators as in the paper: 32, box s = 0.2, SGD 0.005",
    "minmax_paper": "min-max as in the paper: PGD-L2 eps 0.05, 40 steps of 0.005",
    "fgsm_rs": "FGSM-RS, L2 eps 0.5",
    "gen_gradient": "advgen's generator variant (--gen-preset gradient), L2 bound 0.5",
    "pgd10": "min-max PGD-10, L2 eps 0.5",
    "nfgsm": "N-FGSM (de Jorge et al. 2022), L2 eps 0.5, noise 2 eps",
    "gen_sdi": "gradient generators + a gradient step from their output (FGSM-SDI style), L2 bound 0.5",
}
EVAL_FILE = "eval-full.json"
PAPER_RATIO = 551 / 105   # the paper's Table 1: min-max 551 s, generator 105 s per epoch


def eval_path(runs_dir: Path, stage: str, evals_dir: Path | None) -> Path:
    """Where a stage's full evaluation lies: EVALS_DIR/STAGE.json, else RUNS_DIR/STAGE/eval-full.json."""
    return evals_dir / f"{stage}.json" if evals_dir is not None else runs_dir / stage / EVAL_FILE


def stage_status(run_dir: Path, ev_path: Path) -> dict:
    """{"state", "run", "eval", "note"} of one stage. state: "pending" (no run yet), "training",
    "trained" (finished, no usable evaluation yet) or "evaluated"; run and eval are the JSON records
    (eval without its per-sample bits) or None."""
    if not (run_dir / RUN_FILE).is_file():
        if (run_dir / STATE_FILE).is_file():     # run.json comes at the end; a saved state means part-way
            return {"state": "training", "run": None, "eval": None, "note": f"training: {_progress(run_dir)}"}
        return {"state": "pending", "run": None, "eval": None, "note": "not started"}
    rec = read_json(run_dir / RUN_FILE)
    if not rec.get("finished"):
        done = len(rec.get("epochs", []))
        return {"state": "training", "run": None, "eval": None,
                "note": f"training: {done} of {rec.get('config', {}).get('epochs', '?')} epochs done"}
    if not ev_path.is_file():
        return {"state": "trained", "run": rec, "eval": None, "note": f"trained; no evaluation yet ({ev_path})"}
    ev = read_json(ev_path)
    if any(k not in ev for k in EVAL_KEYS) and "samples" in ev:   # advgen eval --full writes as it goes
        n = ev.get("settings", {}).get("n")
        parts = [k if len(b) == n or k == "large" else f"{k} ({len(b)} of {n})"
                 for k, b in sorted(ev["samples"].items())]
        return {"state": "trained", "run": rec, "eval": None, "pgd_l2": _finished_pgd(ev, run_dir),
                "note": f"trained; evaluation part-way ({ev_path}: {', '.join(parts)} done)"}
    try:
        check_evaluation(ev, read_tensors(run_dir / MODEL_FILE)[0], str(ev_path))
    except UserError as e:
        return {"state": "trained", "run": rec, "eval": None, "note": f"trained; evaluation not usable: {e}"}
    return {"state": "evaluated", "run": rec, "eval": {k: v for k, v in ev.items() if k != "samples"},
            "samples": ev["samples"], "note": "evaluated"}


def _finished_pgd(ev: dict, run_dir: Path) -> dict | None:
    """A part-way evaluation's PGD-L2 sweep as {eps: with_interval}, when every eps of it is done on all n
    images and it measured exactly the run's weights (so Figure 3 need not wait for AutoAttack's hours);
    else None."""
    settings, samples = ev.get("settings", {}), ev["samples"]
    keys = [f"pgd:{e}" for e in settings.get("pgd_eps", [])]
    if not keys or any(len(samples.get(k, "")) != settings.get("n") for k in keys) or \
            settings.get("model_sha256") != fingerprint(read_tensors(run_dir / MODEL_FILE)[0]):
        return None
    return {str(e): with_interval(unbits(samples[f"pgd:{e}"])) for e in settings["pgd_eps"]}


def _pgd_l2(st: dict) -> dict | None:
    """A stage's PGD-L2 results {eps: with_interval}: from its finished evaluation, else from a part-way
    one whose PGD sweep is complete; None when there are none yet."""
    return st["eval"]["pgd_l2"] if st["eval"] is not None else st.get("pgd_l2")


def _swept(stages: dict) -> dict[str, dict]:
    """{stage: its PGD-L2 results} of every stage that has them: what Figure 3 draws and tabulates."""
    return {s: pgd for s, st in stages.items() if (pgd := _pgd_l2(st)) is not None}


def _progress(run_dir: Path) -> str:
    """How far a run without run.json has got, from the last row of its metrics.csv (step, epoch, ...)."""
    rows = (run_dir / METRICS_FILE).read_text().split("\n") if (run_dir / METRICS_FILE).is_file() else []
    last = [r for r in rows if r and r[0].isdigit()]
    if not last:
        return "part-way (a saved state, no metrics yet)"
    step, epoch = last[-1].split(",")[:2]
    return f"part-way (epoch {epoch}, {step} steps in metrics.csv)"


def collect(runs_dir: Path, evals_dir: Path | None = None) -> dict[str, dict]:
    """stage_status of every campaign stage."""
    return {s: stage_status(runs_dir / s, eval_path(runs_dir, s, evals_dir)) for s in STAGES}


def table1(stages: dict[str, dict]) -> dict:
    """Median seconds per epoch (full-data epochs) of every finished stage and the paper's ratios:
    min-max/generator (minmax_paper / gen_paper) and generator/standard (gen_paper / base); a ratio
    whose stages are not both finished is None."""
    rows = {}
    for name, st in stages.items():
        if st["run"] is None:
            continue
        rec = st["run"]
        secs = statistics.median(r["seconds"] for r in rec["epochs"])
        rows[name] = {"seconds_per_epoch": secs, "images_per_second": rec["train_images"] / secs,
                      "epochs": len(rec["epochs"]), "train_images": rec["train_images"],
                      "bf16_autocast": training_precision(rec) == "bf16"}

    def ratio(a: str, b: str) -> float | None:
        return rows[a]["seconds_per_epoch"] / rows[b]["seconds_per_epoch"] if a in rows and b in rows else None
    return {"rows": rows, "ratios": {"minmax/generator": ratio("minmax_paper", "gen_paper"),
                                     "generator/standard": ratio("gen_paper", "base"),
                                     "pgd10/gen_gradient": ratio("pgd10", "gen_gradient")}}


def pgd_curve(pgd_l2: dict) -> dict:
    """PGD-L2 results {eps: with_interval} as the curve report.figure3 draws (with "ci95")."""
    pts = sorted((float(e), d) for e, d in pgd_l2.items())
    return {"results": [{"eps": e, "accuracy": d["accuracy"], "ci95": d["ci95"]} for e, d in pts]}


def _pct(d: dict | None) -> str:
    return "pending" if d is None else f"{100 * d['accuracy']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"


def _table1_lines(t: dict, stages: dict) -> list[str]:
    lines = ["| model | what | seconds per epoch (median) | images per second | epochs |", "|---|---|---|---|---|"]
    for name, what in STAGES.items():
        r = t["rows"].get(name)
        lines.append(f"| {name} | {what} | " + (f"{r['seconds_per_epoch']:.0f} | {r['images_per_second']:.0f} | "
                                               f"{r['epochs']} |" if r else f"{stages[name]['note']} | | |"))
    ra = t["ratios"]
    fmt = lambda v: "pending" if v is None else f"**{v:.2f}×**"  # noqa: E731
    return lines + ["", f"min-max / generator (minmax_paper / gen_paper) = {fmt(ra['minmax/generator'])} "
                        f"(paper: 551 s / 105 s = {PAPER_RATIO:.1f}×); generator / standard (gen_paper / base) = "
                        f"{fmt(ra['generator/standard'])}; PGD-10 / generator variant (pgd10 / gen_gradient) = "
                        f"{fmt(ra['pgd10/gen_gradient'])}."]


def _bench_lines(bench: dict | None, source: str) -> list[str]:
    """The like-for-like ratios of benchmarks/bench.py (every method in one process, interleaved) beside
    the campaign's epochs, which ran under whatever else the machine was doing."""
    lines = ["", "The campaign's epochs ran on one thread of a shared 2-core machine, some beside other jobs, so "
                 "the seconds of stages that ran under different load are not like-for-like."]
    if bench is None:
        return lines
    r, m = bench["training"]["ratios"], bench["machine"]
    # a benchmark file of advgen 0.1 names its ratios by the old names
    old = {"minmax-paper/gen-paper": "minmax_pgd40/generator", "pgd10-l2/gen-paper": "minmax_pgd10/generator",
           "gen-paper/standard": "generator/standard"}

    def fmt(key: str) -> str:
        v = r[key] if key in r else r[old[key]]
        return f"{v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})"

    return [lines[0], lines[1] + f" Like-for-like, from benchmarks/bench.py ({source}: every method in one process, "
            f"{bench['reps']} interleaved repetitions of an epoch of {bench['train_subset']} images, {m['threads']} "
            f"thread(s), torch {m['torch']}; median (min–max)): PGD-40 / generator = {fmt('minmax-paper/gen-paper')}, "
            f"PGD-10 / generator = {fmt('pgd10-l2/gen-paper')}, generator / standard = "
            f"{fmt('gen-paper/standard')}."]


def _aa_lines(stages: dict) -> list[str]:
    lines = ["| model | clean | PGD-L2 0.25 | AA-L2 0.25 | worst 0.25 | PGD-L2 0.5 | AA-L2 0.5 | worst 0.5 |",
             "|---|" + "---|" * 7]
    for name, st in stages.items():
        ev = st["eval"]
        if ev is None:
            lines.append(f"| {name} | {st['note']} |" + " |" * 6)
            continue
        cells = [_pct(ev["clean"])]
        for e in ("0.25", "0.5"):
            cells += [_pct(ev[k].get(e)) for k in ("pgd_l2", "autoattack_l2", "worst_case_l2")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


# benchmarks/bench.py's name for each campaign stage's method and settings
# each campaign stage's recipe (recipes.py): a benchmark file names its timings by recipe (or, written by
# advgen 0.1, by the recipe's old name)
STAGE_RECIPES = {"base": "standard", "gen_paper": "gen-paper", "minmax_paper": "minmax-paper", "fgsm_rs": "fgsm-rs-l2",
                 "gen_gradient": "gen-gradient-l2", "pgd10": "pgd10-l2", "nfgsm": "nfgsm-l2", "gen_sdi": "gen-sdi-l2"}
# names the 0.1 benchmark gave recipes that were no aliases of theirs
_OLD_BENCH = {"standard": ("standard",), "gen-paper": ("generator",)}


def bench_seconds(timed: dict, stage: str) -> float | None:
    """The benchmark's median seconds per epoch of a stage's recipe, however the file names it."""
    recipe = RECIPES.get(STAGE_RECIPES.get(stage, stage))
    if recipe is None:
        return None
    for name in (recipe.name, *recipe.aliases, *_OLD_BENCH.get(recipe.name, ())):
        if name in timed:
            return timed[name].get("median")
    return None


def tradeoff_lines(stages: dict, t: dict, eps: str = "0.5", bench: dict | None = None) -> list[str]:
    """Robustness against training cost, one row per stage with both: the worst case over PGD and
    AutoAttack at L2 eps, seconds per epoch, and each against min-max PGD-10 (pgd10) once it is in, with
    the exact McNemar test of the two models' per-sample worst cases on the same images (where both
    stages carry their samples) and, given a bench.json that timed both methods, the like-for-like time
    ratio of its interleaved epochs. Rows by robustness, highest first; what a user should train follows."""
    rows = [(s, st["eval"]["worst_case_l2"][eps], t["rows"][s]["seconds_per_epoch"]) for s, st in stages.items()
            if st["eval"] is not None and eps in st["eval"]["worst_case_l2"] and s in t["rows"]]
    if not rows:
        return ["pending (no stage has both its training record and its evaluation at L2 " + eps + ")."]
    ref = next(((a, sec) for s, a, sec in rows if s == "pgd10"), None)
    timed = {} if bench is None else bench["training"]["seconds_per_epoch"]
    like = lambda s: bench_seconds(timed, s)  # noqa: E731
    head = f"| model | worst case L2 {eps} | s/epoch |" + \
        (" points vs pgd10 | robust only here / only pgd10 (McNemar p) | time / pgd10 |" if ref else "") + \
        (" time / pgd10, like for like |" if ref and like("pgd10") else "")
    lines = [head, "|---" * head.count(" |") + "|"]
    for s, acc, sec in sorted(rows, key=lambda r: -r[1]["accuracy"]):
        cells = [s, _pct(acc), f"{sec:.0f}"]
        if ref:
            cells += [f"{100 * (acc['accuracy'] - ref[0]['accuracy']):+.1f}", _paired(stages, s, "pgd10", eps),
                      f"{sec / ref[1]:.2f}"]
            if like("pgd10"):
                cells.append(f"{like(s) / like('pgd10'):.2f}" if like(s) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", _what_to_train(rows, like, eps), "", "Seconds per epoch are the campaign's own (see Table 1 on their load)" +
                    ("; like for like is benchmarks/bench.py's medians of interleaved epochs (Table 1)" if timed
                     else "") + ". The paired test asks whether these two models differ on these images; each "
                    "method ran one training seed, so it says nothing of the spread between seeds."]


def _what_to_train(rows: list, like, eps: str) -> str:
    """The advice the trade-off table supports: of the models whose worst case at L2 eps lies inside the
    most robust one's 95% interval (not told apart from it on these images), the cheapest, by the
    like-for-like benchmark where it timed them all, else by the campaign's own seconds."""
    best = max(rows, key=lambda r: r[1]["accuracy"])
    level = [r for r in rows if r[1]["accuracy"] >= best[1]["ci95"][0]]
    fair = all(like(s) for s, _, _ in level)
    cost = (lambda r: like(r[0])) if fair else (lambda r: r[2])  # noqa: E731
    pick = min(level, key=cost)
    basis = "like-for-like benchmark" if fair else "the campaign's own seconds per epoch"
    return (f"What to train: {', '.join(s for s, _, _ in level)} sit inside the 95% interval of the most "
            f"robust ({best[0]}, {_pct(best[1])} at L2 {eps}); the cheapest of them is **{pick[0]}** ({basis}). "
            "One training seed each: the ranking between seeds is the 3-seed comparison's (docs/results.md).")


def _paired(stages: dict, a: str, b: str, eps: str) -> str:
    """'only a / only b (p)' for the per-sample worst cases of stages a and b at L2 eps; '' for a == b,
    '-' where either stage lacks its samples."""
    if a == b:
        return ""
    sa, sb = stages[a].get("samples"), stages[b].get("samples")
    if not sa or not sb or f"aa:{eps}" not in sa or f"aa:{eps}" not in sb:
        return "-"
    test = mcnemar(_and(sa, eps), _and(sb, eps))
    return f"{test['only_a']} / {test['only_b']} ({test['p']:.2g})"


def claims(stages: dict, t: dict) -> list[str]:
    """What the paper's two claims become, computed from the finished stages (pending otherwise):
    speed (min-max / generator time per epoch) and robustness (the paper's generator model against its
    min-max model, worst case over PGD and AutoAttack at each L2 radius both ran, paired McNemar test on the
    same images)."""
    ratio = t["ratios"]["minmax/generator"]
    out = ["- **Speed** (the generator method trains faster than min-max): " +
           ("pending (gen_paper and minmax_paper must both finish)." if ratio is None else
            f"an epoch of the paper's min-max takes {ratio:.2f}× one of the paper's generator method here "
            f"(paper: {PAPER_RATIO:.1f}×).")]
    g, m = stages["gen_paper"], stages["minmax_paper"]
    radii = [] if g["eval"] is None or m["eval"] is None else \
        [e for e in g["eval"]["worst_case_l2"] if e in m["eval"]["worst_case_l2"]]
    if not radii:
        out.append("- **Robustness** (the generator model is as robust as the min-max model): pending (both "
                   "models need their full evaluation).")
        return out
    parts = []
    for eps in radii:
        gw, mw = g["eval"]["worst_case_l2"][eps], m["eval"]["worst_case_l2"][eps]
        test = mcnemar(_and(g["samples"], eps), _and(m["samples"], eps))
        parts.append(f"at L2 {eps}, gen_paper {_pct(gw)} % against minmax_paper {_pct(mw)} %, a difference of "
                     f"{100 * (gw['accuracy'] - mw['accuracy']):+.1f} points; on the same {gw['n']} images "
                     f"{test['only_a']} are robust only for gen_paper and {test['only_b']} only for minmax_paper "
                     f"(exact McNemar p = {test['p']:.3g})")
    out.append("- **Robustness** (the generator model is as robust as the min-max model): worst case over PGD and "
               "AutoAttack " + "; ".join(parts) + ".")
    return out


def _pgd_gap_line(stages: dict) -> str:
    """How far PGD sits above AutoAttack where both ran: the margin by which Figure 3's PGD-only radii may
    overstate robustness (PGD alone is an upper bound on robust accuracy)."""
    gaps = []
    for s, st in stages.items():
        if st["eval"] is not None:
            pgd, aa = st["eval"]["pgd_l2"], st["eval"]["autoattack_l2"]
            gaps.append(f"{s} " + " / ".join(f"{100 * (pgd[e]['accuracy'] - aa[e]['accuracy']):+.1f}"
                                             for e in aa if e in pgd))
    eps = " and ".join(next((list(st["eval"]["autoattack_l2"]) for st in stages.values() if st["eval"]), []))
    return ("Radii without AutoAttack rest on PGD alone, an upper bound on robust accuracy. Where both ran "
            f"(L2 {eps}), PGD minus AutoAttack in points: {'; '.join(gaps)}." if gaps else
            "Radii without AutoAttack rest on PGD alone, an upper bound on robust accuracy.")


def _checks(ev: dict) -> list[dict]:
    """A full evaluation's sanity checks, with the PGD - AutoAttack gap rule worked out from its accuracies
    where the evaluation predates the rule (the campaign's worktree is pinned to an older commit)."""
    checks = list(ev.get("checks", []))
    gap = gap_check({e: d["accuracy"] for e, d in ev["pgd_l2"].items()},
                    {e: d["accuracy"] for e, d in ev["autoattack_l2"].items()}, ev["n"])
    return checks + ([gap] if all(c["name"] != gap["name"] for c in checks) else [])


def _and(samples: dict, eps: str) -> str:
    """The per-sample worst case at eps as bits: robust under PGD (when evaluated there) and AutoAttack."""
    aa, pgd = samples[f"aa:{eps}"], samples.get(f"pgd:{eps}", samples[f"aa:{eps}"])
    return "".join("1" if a == "1" and p == "1" else "0" for a, p in zip(aa, pgd))


def _listed(values) -> str:
    """Distinct values, in order, joined by " / "; "pending" when there are none."""
    seen = list(dict.fromkeys(str(v) for v in values))
    return " / ".join(seen) if seen else "pending"


def _pgd_step(settings: dict) -> str:
    """PGD's step size in words, from a full evaluation's settings (older ones name no step: Madry's)."""
    rel = settings.get("pgd_rel_step")
    return "2.5·eps/steps" if rel is None else f"{rel:g}·eps"


def render(stages: dict, t: dict, *, machine: str, fig2: str | None, fig3: bool, bench: dict | None = None,
           bench_source: str = "") -> str:
    """The Markdown of docs/report-paper.md."""
    evaluated = [s for s, st in stages.items() if st["eval"] is not None]
    ev0 = stages[evaluated[0]]["eval"] if evaluated else None
    pending = [f"- {s}: {st['note']}" for s, st in stages.items() if st["state"] != "evaluated"]
    finished = [st for st in stages.values() if st["run"] is not None]
    lines = ["# The paper's experiment at full scale (Jung 2024, advgen)", "",
             f"Built by advgen {__version__} (commit {git_commit() or 'unknown'}) from the campaign's run folders "
             f"([docs/campaign.md](campaign.md)). Machine of the timings: {machine}.", "", DATA_CAVEAT, "",
             "## Settings", "",
             f"- Data and architecture (from the finished runs): {_listed(st['run']['train_images'] for st in finished)} "
             f"CIFAR-10 training images; {_listed(st['run']['config']['model'] for st in finished)}.",
             "- Models: " + "; ".join(f"`{s}` {w}" for s, w in STAGES.items()) + " (docs/campaign.md has each "
             "command; Table 1 the epochs each ran).",
             ("- Evaluation: " + (f"the first {ev0['n']} test images; PGD-L2 {ev0['settings']['pgd_steps']} steps "
                                  f"of {_pgd_step(ev0['settings'])} with {ev0['settings']['restarts']} random restarts, each "
                                  "sample's worst case; the standard AutoAttack (APGD-CE, APGD-T with 9 targets, "
                                  "FAB-T, Square); worst case = robust only if both attacks fail; "
                                  "[low, high] = Wilson 95% interval." if ev0 else "pending.")), ""]
    if pending:
        lines += ["## Pending", "", "These stages are not in the tables and figures yet:", ""] + pending + [""]
    lines += ["## What the paper's two claims become", ""] + claims(stages, t) + [""]
    lines += ["## Table 1: training time per epoch (full-data epochs)", ""] + _table1_lines(t, stages) + _bench_lines(bench, bench_source) + [""]
    lines += ["## Figure 2: generator samples (gen_paper)", "",
              f"![Figure 2]({fig2})" if fig2 else "pending (gen_paper's generators, and --data-dir for the images).",
              "", "## Figure 3: accuracy against PGD-L2 eps (95% Wilson error bars)", "",
              "![Figure 3](figure3-paper.png)" if fig3 else "pending (no model evaluated yet).", ""]
    swept = _swept(stages)
    if swept:
        eps = [r["eps"] for r in pgd_curve(next(iter(swept.values())))["results"]]
        lines += ["| model | " + " | ".join(f"eps {e:g}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
        for s, pgd in swept.items():
            name = s if stages[s]["eval"] is not None else f"{s} (AutoAttack pending)"
            lines.append(f"| {name} | " + " | ".join(_pct(pgd.get(str(e))) for e in eps) + " |")
        lines += ["", _pgd_gap_line(stages), ""]
    lines += ["## AutoAttack (accuracy % [Wilson 95%])", ""] + _aa_lines(stages) + [""]
    lines += ["## Robustness against training time", ""] + tradeoff_lines(stages, t, bench=bench) + ["",
              "## Sanity checks (Carlini et al. 2019)", ""]
    for s in evaluated:
        for c in _checks(stages[s]["eval"]):
            lines.append(f"- {s}: [{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}")
    return "\n".join(lines + [""])


def build(runs_dir: Path, out_dir: Path, *, evals_dir: Path | None = None, data_dir=None,
          machine: str | None = None, bench: Path | None = None) -> Path:
    """Write out_dir/report-paper.md, figure2-paper.png, figure3-paper.png and results-paper.json from
    whatever stages of the campaign in runs_dir are finished; return the report's path.

    evals_dir: where the full evaluations lie as STAGE.json (default RUNS_DIR/STAGE/eval-full.json);
    data_dir: the CIFAR-10 folder for Figure 2's images (no Figure 2 without it); machine: where the
    campaign trained (its run.json files do not say; default: this machine); bench: a bench.json of
    benchmarks/bench.py, whose interleaved ratios Table 1 shows beside the campaign's own epochs."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir} is not a folder of campaign runs")
    bench_rec = None
    if bench is not None:
        bench_rec = read_json(bench)
        if not isinstance(bench_rec.get("training", {}).get("ratios"), dict):
            raise UserError(f"{bench} is not a bench.json of benchmarks/bench.py (no training ratios)")
    stages = collect(runs_dir, None if evals_dir is None else Path(evals_dir))
    t = table1(stages)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig2 = _figure2(runs_dir / "gen_paper", stages["gen_paper"], data_dir, out_dir / "figure2-paper.png")
    swept = _swept(stages)
    if swept:
        n = next(iter(next(iter(swept.values())).values()))["n"]
        figure3({s: pgd_curve(v) for s, v in swept.items()}, out_dir / "figure3-paper.png",
                title=f"first {n} test images, 95% Wilson intervals")
    machine = machine or f"{machine_description(torch.device('cpu'))} (where the report was built)"
    write_json(out_dir / "results-paper.json",
               {"version": __version__, "git_commit": git_commit(), "machine": machine, "table1": t,
                "benchmark_ratios": bench_rec["training"]["ratios"] if bench_rec else None,
                "stages": {s: {k: v for k, v in st.items() if k not in ("samples", "run")} |
                           {"config": st["run"]["config"] if st["run"] else None} for s, st in stages.items()}})
    path = out_dir / "report-paper.md"
    atomic_write(path, render(stages, t, machine=machine, fig2=fig2, fig3=bool(swept), bench=bench_rec,
                                  bench_source=str(bench)).encode())
    return path


def _figure2(run_dir: Path, st: dict, data_dir, path: Path) -> str | None:
    """report.figure2 of the paper's generators on the first test images; None (pending) when the
    stage or the data are missing."""
    if st["run"] is None or data_dir is None or not (run_dir / GENERATORS_FILE).is_file():
        return None
    test = first_n(load_dataset("cifar10", data_dir)[1], 6)
    figure2(run_dir / GENERATORS_FILE, test, path)
    return path.name
