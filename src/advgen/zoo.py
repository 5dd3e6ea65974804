"""The model zoo that ships with advgen: full-data models as safetensors beside a JSON card each.

A card holds the model's name, architecture, method and full config, the training command, commit,
`train_images`, epochs, seconds per epoch and machine, its evaluation (`eval`: n, clean, `pgd_l2`,
`autoattack_l2`, `worst_case_l2`, each {eps: {"accuracy", "ci95", ...}}) and the sha256 of its
weights file, which is checked before every load: a mismatch is an error, never a load.
`advgen.load_model("zoo:NAME")`, `advgen eval zoo:NAME`, `advgen zoo [--json]`.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .checkpoint import MODEL_FILE, RUN_FILE, CheckpointError, atomic_write, read_json, read_tensors, write_json
from .errors import UserError

PREFIX = "zoo:"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def zoo_dir() -> Path:
    """The installed zoo (package data), or $ADVGEN_ZOO_DIR."""
    return Path(os.environ.get("ADVGEN_ZOO_DIR") or Path(__file__).with_name("zoo_models"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cards(folder: Path | None = None) -> list[dict]:
    """Every card of the zoo, by name."""
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
    digest = sha256(path)
    if digest != card.get("sha256"):
        raise CheckpointError(f"zoo model {name}: {path.name} has sha256 {digest[:16]}…, its card says "
                              f"{str(card.get('sha256'))[:16]}…; the file was changed or damaged and is not loaded")
    return path


def add(run_dir: Path, name: str, evaluation: dict, *, command: str, machine: str, folder: Path | None = None,
        force: bool = False) -> dict:
    """Copy a finished run's model into the zoo as NAME.safetensors with its card; returns the card.

    evaluation: the output of evaluate.full_evaluation on the model (its per-sample bits are left out
    of the card). An existing NAME is refused unless force."""
    folder = folder or zoo_dir()
    if not NAME.match(name):
        raise UserError(f"zoo names are lower-case letters, digits, '_', '.', '-': {name!r}")
    if (folder / f"{name}.json").exists() and not force:
        raise UserError(f"the zoo already has {name!r} (force to replace it)")
    rec = read_json(run_dir / RUN_FILE)
    if not rec.get("finished"):
        raise UserError(f"{run_dir} is not a finished run")
    _, meta = read_tensors(run_dir / MODEL_FILE)   # a valid advgen model file
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    atomic_write(weights, (run_dir / MODEL_FILE).read_bytes())
    rows = rec["epochs"]
    card = {"name": name, "architecture": meta["model"], "num_classes": meta["num_classes"],
            "method": rec["config"]["method"], "config": rec["config"], "command": command,
            "commit": rec.get("git_commit"), "train_images": rec.get("train_images"), "epochs": len(rows),
            "seconds_per_epoch": sorted(r["seconds"] for r in rows)[len(rows) // 2], "machine": machine,
            "eval": {k: v for k, v in evaluation.items() if k != "samples"},
            "file": weights.name, "sha256": sha256(weights)}
    write_json(folder / f"{name}.json", card)
    return card


def table(all_cards: list[dict]) -> str:
    """The zoo as a text table: clean, PGD-L2 and AutoAttack-L2 at 0.5 (with 95% intervals)."""
    if not all_cards:
        return f"the model zoo ({zoo_dir()}) is empty: no full-data model has been added yet"

    def cell(d: dict | None) -> str:
        return "-" if not d else f"{100 * d['accuracy']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"

    head = f"{'name':<16} {'arch':<10} {'method':<10} {'images':>7} {'ep':>3} {'clean':>18} {'PGD-L2 0.5':>18} {'AA-L2 0.5':>18}"
    lines = [head, "-" * len(head)]
    for c in all_cards:
        e = c.get("eval", {})
        lines.append(f"{c['name']:<16} {c['architecture']:<10} {c['method']:<10} {c.get('train_images') or 0:>7} "
                     f"{c.get('epochs', 0):>3} {cell(e.get('clean')):>18} {cell(e.get('pgd_l2', {}).get('0.5')):>18} "
                     f"{cell(e.get('autoattack_l2', {}).get('0.5')):>18}")
    return "\n".join(lines + [f"n = {all_cards[0].get('eval', {}).get('n', '?')} test images; 95% Wilson intervals"])
