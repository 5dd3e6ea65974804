"""The model zoo that ships with advgen: full-data models as safetensors beside a JSON card each.

A card holds the model's name, architecture, method and full config, the training command, commit,
`train_images`, epochs, seconds per epoch and machine, its evaluation (`eval`: n, clean, `pgd_l2`,
`autoattack_l2`, `worst_case_l2`, each {eps: {"accuracy", "ci95", ...}}) and the sha256 of its
weights file, which is checked before every load: a mismatch is an error, never a load.
`advgen.load_model("zoo:NAME")`, `advgen eval zoo:NAME`, `advgen zoo [--json]`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import MODEL_FILE, RUN_FILE, CheckpointError, atomic_write, file_digest, read_json, read_tensors, \
    write_json
from .errors import UserError
from .precision import run_precision, training_precision

PREFIX = "zoo:"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def zoo_dir() -> Path:
    """The installed zoo (package data), or $ADVGEN_ZOO_DIR."""
    return Path(os.environ.get("ADVGEN_ZOO_DIR") or Path(__file__).with_name("zoo_models"))


def cards(folder: Path | None = None) -> list[dict]:
    """Every card of the zoo (its NAME.json files), sorted by name; [] when the folder is absent."""
    folder = folder or zoo_dir()
    return sorted((read_json(p) for p in folder.glob("*.json")), key=lambda c: c.get("name", "")) if folder.is_dir() else []


def model_file(name: str, folder: Path | None = None) -> Path:
    """The weights of zoo model `name`, after checking them against the card's sha256."""
    folder = folder or zoo_dir()
    card_path = folder / f"{name}.json"
    if not NAME.match(name) or not card_path.is_file():
        known = ", ".join(c["name"] for c in cards(folder)) or "none (the zoo is empty)"
        raise UserError(f"no model {name!r} in the zoo ({folder}); known: {known}")
    card = read_json(card_path)
    path = folder / card.get("file", f"{name}.safetensors")
    if not path.is_file():
        raise CheckpointError(f"zoo model {name}: its weights file {path.name} is missing")
    digest = file_digest(path)
    if digest != card.get("sha256"):
        raise CheckpointError(f"zoo model {name}: {path.name} has sha256 {digest[:16]}…, its card says "
                              f"{str(card.get('sha256'))[:16]}…; the file was changed or damaged and is not loaded")
    return path


EVAL_KEYS = ("settings", "n", "clean", "pgd_l2", "autoattack_l2", "worst_case_l2", "checks")


def check_evaluation(evaluation: dict, tensors: dict, where: str) -> None:
    """A finished full evaluation (evaluate.full_evaluation) of exactly these weights, or a UserError."""
    from .evaluate import fingerprint
    missing = [k for k in EVAL_KEYS if k not in evaluation]
    if missing:
        raise UserError(f"{where} is not a finished full evaluation (no {', '.join(missing)}): run "
                        "advgen eval RUN --full --out FILE again until it completes")
    if evaluation["settings"].get("model_sha256") != fingerprint(tensors):
        raise UserError(f"{where} evaluated other weights than the run's model (model_sha256 differs)")


def training_command(run_dir: Path, rec: dict) -> str | None:
    """The command that trained a run: run.json's "command" if it has one, else the last
    "... train ..." line experiments/campaign.sh logged in RUN/log.txt ("== DATE stage NAME: CMD")."""
    if rec.get("command"):
        return rec["command"]
    log = run_dir / "log.txt"
    if log.is_file():
        lines = [ln.split(": ", 1)[1] for ln in log.read_text(errors="replace").splitlines()
                 if ln.startswith("== ") and ": " in ln and " train " in ln]
        return lines[-1] if lines else None
    return None


def card_for(name: str, rec: dict, meta: dict, evaluation: dict, *, command: str, machine: str) -> dict:
    """The card of a zoo model (without its file and sha256): what it is, how it was trained, how it
    did under the full evaluation (its per-sample bits left out)."""
    import statistics

    from .report import DATA_CAVEAT
    cfg, rows = rec["config"], rec["epochs"]
    evaluation = {**evaluation, "checks": _with_gap_check(evaluation)}
    return {"name": name, "architecture": meta["model"], "num_classes": meta["num_classes"],
            "method": cfg["method"], "config": cfg, "command": command, "commit": rec.get("git_commit"),
            "advgen_version": rec.get("version"), "train_images": rec.get("train_images"), "epochs": len(rows),
            "seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None,
            "epoch_seconds": [r["seconds"] for r in rows], "machine": machine,
            "precision": run_precision(rec), "bf16_autocast": training_precision(rec) == "bf16", "data": DATA_CAVEAT,
            "eval": {k: v for k, v in evaluation.items() if k not in ("samples", "model", "model_file")}}


def _with_gap_check(evaluation: dict) -> list[dict]:
    """The evaluation's sanity checks with the PGD - AutoAttack gap rule (evaluate.gap_check) among
    them: evaluations written before full_evaluation ran it get it computed from their accuracies, so a
    card never shows only passed checks where PGD overstates robustness."""
    from .evaluate import GAP_CHECK, gap_check
    checks = list(evaluation["checks"])
    if any(c["name"] == GAP_CHECK for c in checks):
        return checks
    acc = lambda key: {e: r["accuracy"] for e, r in evaluation[key].items()}  # noqa: E731
    return checks + [gap_check(acc("pgd_l2"), acc("autoattack_l2"), evaluation["n"])]


def add(run_dir: Path, name: str, evaluation: dict, *, command: str | None = None, machine: str,
        folder: Path | None = None, force: bool = False, eval_path: str = "the evaluation") -> dict:
    """Copy a finished run's model into the zoo as NAME.safetensors with its card NAME.json; returns
    the card.

    evaluation: the output of evaluate.full_evaluation on this very model (checked by its
    model_sha256); command: the training command (default: the one the run's folder records).
    An existing NAME is refused unless force."""
    folder = folder or zoo_dir()
    run_dir = Path(run_dir)
    if not NAME.match(name):
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
    card = card_for(name, rec, meta, evaluation, command=command, machine=machine)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    atomic_write(weights, (run_dir / MODEL_FILE).read_bytes())
    card.update(file=weights.name, sha256=file_digest(weights))
    write_json(folder / f"{name}.json", card)
    return card


def _cell(d: dict | None) -> str:
    return "-" if not d else f"{100 * d['accuracy']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"


def table(all_cards: list[dict], folder: Path | None = None, eps: float = 0.5) -> str:
    """The zoo as a text table: clean, PGD-L2, AutoAttack-L2 and their worst case at L2 radius `eps`
    (% with 95% Wilson intervals; "-" where a card was not attacked at that radius), seconds per epoch."""
    if not all_cards:
        return (f"the model zoo ({folder or zoo_dir()}) is empty: no full-data model has been added yet "
                "(see docs/campaign.md)")
    heads = ["name", "arch", "method", "images", "epochs", "s/epoch", "clean", f"PGD-L2 {eps:g}", f"AA-L2 {eps:g}",
             f"worst {eps:g}"]
    rows = []
    for c in all_cards:
        e = c.get("eval", {})
        # a card's radii are the strings json gave them ("0.25"): matched as numbers, so 0.50 finds "0.5"
        at = lambda key: _cell(next((v for k, v in e.get(key, {}).items() if float(k) == eps), None))  # noqa: E731
        spe = c.get("seconds_per_epoch")
        rows.append([c["name"], c.get("architecture", "?"), c.get("method", "?"), str(c.get("train_images") or "?"),
                     str(c.get("epochs", "?")), "?" if spe is None else f"{spe:.0f}", _cell(e.get("clean")),
                     at("pgd_l2"), at("autoattack_l2"), at("worst_case_l2")])
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    line = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    ns = sorted({str(c.get("eval", {}).get("n", "?")) for c in all_cards})
    from .evaluate import GAP_CHECK
    failed = [(c["name"], k) for c in all_cards for k in c.get("eval", {}).get("checks", []) if not k.get("passed", True)]
    return "\n".join([line(heads), "-" * len(line(heads))] + [line(r) for r in rows] +
                      [f"accuracy % [95% Wilson interval] on the first {'/'.join(ns)} test images; worst = "
                       "robust only if PGD and AutoAttack both fail; load one as zoo:NAME"] +
                     [f"{name}: check failed: {k['name']} ({k['detail']})" for name, k in failed] +
                     (["where PGD overstates robustness, quote the AutoAttack or worst-case column"]
                      if any(k["name"] == GAP_CHECK for _, k in failed) else []))
