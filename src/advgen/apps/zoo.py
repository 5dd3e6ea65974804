"""The model zoo that ships with advgen: full-data models as safetensors beside a JSON card each.

A card holds the model's name, architecture, method and full config, the training command, commit,
`train_images`, epochs, seconds per epoch and machine, its evaluation (`eval`: n, clean, `pgd_l2`,
`autoattack_l2`, `worst_case_l2`, each {eps: {"accuracy", "ci95", ...}}) and the sha256 of its
weights file, which is checked before every load: a mismatch is an error, never a load.
`advgen.load_model("zoo:NAME")`, `advgen eval zoo:NAME`, `advgen zoo [--json]`.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from ..checkpoint import MODEL_FILE, RUN_FILE, ZOO_NAME, zoo_dir
from ..errors import UserError
from ..evaluation import GAP_CHECK, gap_check
from ..precision import run_precision, training_precision
from ..recipes import resolve_recipe
from ..io import atomic_write, file_digest, fingerprint, read_json, read_tensors, write_json
from . import DATA_CAVEAT

EVAL_KEYS = ("settings", "n", "clean", "checks")   # and, per norm attacked, autoattack_NORM beside pgd_NORM


def check_evaluation(evaluation: dict, tensors: dict, where: str) -> None:
    """A finished full evaluation (advgen eval --full) of exactly these weights, or a UserError."""
    missing = [k for k in EVAL_KEYS if k not in evaluation] + \
        ([] if evaluation_norms(evaluation) else ["autoattack_l2 or autoattack_linf"])
    if missing:
        raise UserError(f"{where} is not a finished full evaluation (no {', '.join(missing)}): run "
                        "advgen eval RUN --full --out FILE again until it completes")
    if evaluation["settings"].get("model_sha256") != fingerprint(tensors):
        raise UserError(f"{where} evaluated other weights than the run's model (model_sha256 differs)")


def training_command(run_dir: Path, rec: dict) -> str | None:
    """The command that trained a run: run.json's "command" if it has one, else the last
    "... train ..." line tools/campaign.sh logged in RUN/log.txt ("== DATE stage NAME: CMD")."""
    if rec.get("command"):
        return rec["command"]
    log = run_dir / "log.txt"
    if log.is_file():
        lines = [ln.split(": ", 1)[1] for ln in log.read_text(errors="replace").splitlines()
                 if ln.startswith("== ") and ": " in ln and " train " in ln]
        return lines[-1] if lines else None
    return None


def card_for(name: str, rec: dict, meta: dict, evaluation: dict, *, command: str, machine: str,
             recipe: str | None = None) -> dict:
    """The card of a zoo model (without its file and sha256): what it is, how it was trained, how it
    did under the full evaluation (its per-sample bits left out)."""
    cfg, rows = rec["config"], rec["epochs"]
    evaluation = {**evaluation, "checks": _with_gap_check(evaluation)}
    return {"name": name, "architecture": meta["model"], "num_classes": meta["num_classes"],
            "method": cfg["method"], "recipe": recipe, "config": cfg, "command": command, "commit": rec.get("git_commit"),
            "advgen_version": rec.get("version"), "train_images": rec.get("train_images"), "epochs": len(rows),
            "seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None,
            "epoch_seconds": [r["seconds"] for r in rows], "train_seconds": sum(r["seconds"] for r in rows),
            "machine": machine,
            "precision": run_precision(rec), "bf16_autocast": training_precision(rec) == "bf16", "data": DATA_CAVEAT,
            "eval": {k: v for k, v in evaluation.items() if k not in ("samples", "model", "model_file")}}


def _with_gap_check(evaluation: dict) -> list[dict]:
    """The evaluation's sanity checks with the PGD - AutoAttack gap rule (evaluate.gap_check) among
    them: evaluations written before full_evaluation ran it get it computed from their accuracies, so a
    card never shows only passed checks where PGD overstates robustness."""
    checks = list(evaluation["checks"])
    if any(c["name"] == GAP_CHECK for c in checks):
        return checks
    acc = lambda key: {e: r["accuracy"] for e, r in evaluation[key].items()}  # noqa: E731
    return checks + [gap_check(acc(f"pgd_{n}"), acc(f"autoattack_{n}"), evaluation["n"])
                     for n in evaluation_norms(evaluation)]


def evaluation_norms(evaluation: dict) -> list[str]:
    """The norms a full evaluation attacked with PGD and AutoAttack ("l2", "linf")."""
    return [n for n in ("l2", "linf") if f"autoattack_{n}" in evaluation and f"pgd_{n}" in evaluation]


def add(run_dir: Path, name: str, evaluation: dict, *, command: str | None = None, machine: str,
        folder: Path | None = None, force: bool = False, eval_path: str = "the evaluation",
        recipe: str | None = None) -> dict:
    """Copy a finished run's model into the zoo as NAME.safetensors with its card NAME.json; returns
    the card.

    evaluation: the output of evaluate.full_evaluation on this very model (checked by its
    model_sha256); command: the training command (default: the one the run's folder records).
    An existing NAME is refused unless force."""
    folder = folder or zoo_dir()
    run_dir = Path(run_dir)
    if not ZOO_NAME.match(name):
        raise UserError(f"zoo names are lower-case letters, digits, '_', '.', '-': {name!r}")
    if (folder / f"{name}.json").exists() and not force:
        raise UserError(f"the zoo already has {name!r} (force to replace it)")
    rec = read_json(run_dir / RUN_FILE)
    if not rec.get("finished"):
        raise UserError(f"{run_dir} is not a finished run")
    tensors, meta = read_tensors(run_dir / MODEL_FILE)   # a valid advgen model file
    check_evaluation(evaluation, tensors, eval_path)
    command = command or training_command(run_dir, rec)
    if not command:
        raise UserError(f"{run_dir} does not record the command that trained it: give it (--command)")
    if recipe is not None:
        recipe = resolve_recipe(recipe).name
    card = card_for(name, rec, meta, evaluation, command=command, machine=machine, recipe=recipe)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    atomic_write(weights, (run_dir / MODEL_FILE).read_bytes())
    card.update(file=weights.name, sha256=file_digest(weights))
    write_json(folder / f"{name}.json", card)
    return card


def _cell(d: dict | None) -> str:
    return "-" if not d else f"{100 * d['accuracy']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"


def table(all_cards: list[dict], folder: Path | None = None, eps: float = 0.5, norm: str = "l2") -> str:
    """The zoo as a text table: clean, PGD, AutoAttack and their worst case at radius `eps` of `norm`
    (% with 95% Wilson intervals), seconds per epoch; the cards attacked at that radius only."""
    if not all_cards:
        return (f"the model zoo ({folder or zoo_dir()}) is empty: no full-data model has been added yet "
                "(see docs/campaign.md)")
    N = norm.upper().replace("INF", "inf")
    radius = f"{round(eps * 255)}/255" if norm == "linf" else f"{eps:g}"
    heads = ["name", "arch", "method", "images", "epochs", "s/epoch", "clean", f"PGD-{N} {radius}",
             f"AA-{N} {radius}", f"worst {radius}"]
    rows = []
    # a card's radii are the strings json gave them ("0.25"): matched as numbers, so 0.50 finds "0.5"
    found = lambda c, key: next((v for k, v in c.get("eval", {}).get(key, {}).items()  # noqa: E731
                                 if abs(float(k) - eps) < 1e-9), None)
    all_cards = [c for c in all_cards if found(c, f"autoattack_{norm}") or found(c, f"pgd_{norm}")]
    for c in all_cards:
        e = c.get("eval", {})
        at = lambda key: _cell(found(c, key))  # noqa: E731
        spe = c.get("seconds_per_epoch")
        rows.append([c["name"], c.get("architecture", "?"), c.get("method", "?"), str(c.get("train_images") or "?"),
                     str(c.get("epochs", "?")), "?" if spe is None else f"{spe:.0f}", _cell(e.get("clean")),
                     at(f"pgd_{norm}"), at(f"autoattack_{norm}"), at(f"worst_case_{norm}")])
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    line = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    ns = sorted({str(c.get("eval", {}).get("n", "?")) for c in all_cards})
    failed = [(c["name"], k) for c in all_cards for k in c.get("eval", {}).get("checks", []) if not k.get("passed", True)]
    return "\n".join([line(heads), "-" * len(line(heads))] + [line(r) for r in rows] +
                      [f"accuracy % [95% Wilson interval] on the first {'/'.join(ns)} test images; worst = "
                       "robust only if PGD and AutoAttack both fail; load one as zoo:NAME"] +
                     [f"{name}: check failed: {k['name']} ({k['detail']})" for name, k in failed] +
                     (["where PGD overstates robustness, quote the AutoAttack or worst-case column"]
                      if any(k["name"] == GAP_CHECK for _, k in failed) else []))
