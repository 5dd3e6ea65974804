"""RobustBench interoperability: a model as RobustBench's architectures name their weights, and its
result as a RobustBench model-info JSON.

Upstream: RobustBench (github.com/RobustBench/robustbench). Its models take pixels in [0, 1] and carry
their normalization inside, as top-level buffers `mu` and `sigma` of shape (1, 3, 1, 1) (e.g.
`model_zoo/cifar10.py` Wong2020FastNet, Rice2020OverfittingNetL2); its `utils.load_model` reads a
`torch.load` file, takes `['state_dict']` if present, strips `module.` / `model.` and loads strictly. Its
model-info files (`model_info/<dataset>/<threat model>/<name>.json`, written by `utils.update_json`)
hold link, name (the paper's title), authors, additional_data, number_forward_passes, dataset, venue,
architecture, eps (a string: "0.5", "8/255"), clean_acc and autoattack_acc (strings of percentages
rounded to 2 decimals: "83.34"), reported, footnote, unreliable. The threat model is the file's folder
there; an export also writes it as a field, `threat_model`, since the file stands alone. Fields advgen
cannot fill are null, and `advgen.missing` says why for each; nothing is invented.

`advgen export MODEL --format robustbench OUT` and `advgen eval --full --robustbench-json PATH` write these.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_write

DATASETS = ("cifar10", "cifar100")      # advgen's datasets that RobustBench has leaderboards for
THREAT_MODELS = ("L2", "Linf")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class UpstreamArch:
    """How RobustBench names and builds one of advgen's architectures.

    architecture: its model-info string ("PreActResNet-18"); builder: the RobustBench expression whose
    state dict (plus the mu / sigma buffers) the export matches, None where RobustBench has none;
    staged: the weights are renamed to the public stage layout (`layer{s}.{j}`, `shortcut.0`, `linear`),
    else they keep advgen's own names."""
    architecture: str
    builder: str | None
    staged: bool


_PREACT = "robustbench.model_zoo.architectures.resnet.PreActResNet({}, [2, 2, 2, 2], bn_before_fc=True)"
_WRN = "robustbench.model_zoo.architectures.wide_resnet.WideResNet(depth={}, widen_factor=10)"
ARCHITECTURES = {
    **{f"resnet{d}": UpstreamArch(f"ResNet-{d}", None, False) for d in (20, 32, 44, 56, 110)},
    "preact_resnet18": UpstreamArch("PreActResNet-18", _PREACT.format("PreActBlock"), True),
    "preact_resnet18_v2": UpstreamArch("PreActResNet-18", _PREACT.format("PreActBlockV2"), True),
    "wrn28_10": UpstreamArch("WideResNet-28-10", _WRN.format(28), False),
    "wrn34_10": UpstreamArch("WideResNet-34-10", _WRN.format(34), False),
}


def upstream_arch(name: str) -> UpstreamArch:
    """ARCHITECTURES[name], or a UserError for a model the export does not know (a user's factory)."""
    if name not in ARCHITECTURES:
        raise UserError(f"model {name!r}: the RobustBench export knows {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def upstream_key(key: str, net: nn.Module) -> str:
    """The public stage layout's name of an advgen key of `net` (the inverse of checkpoint.foreign_key):
    'layers.{i}.*' is 'layer{i // blocks_per_stage + 1}.{i % blocks_per_stage}.*', with the 1x1
    'shortcut.weight' as 'shortcut.0.weight'; 'fc.*' is 'linear.*'; other keys keep their names."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        i, rest = int(m[1]), m[2]
        per = net.blocks_per_stage
        return f"layer{i // per + 1}.{i % per}.{'shortcut.0.weight' if rest == 'shortcut.weight' else rest}"
    return "linear." + key[len("fc."):] if key.startswith("fc.") else key


def robustbench_state(model: nn.Sequential, name: str) -> dict[str, torch.Tensor]:
    """The state dict RobustBench's build of architecture `name` holds, from advgen's
    Sequential(Normalize, net): the net's tensors under upstream names (renamed when ARCHITECTURES says
    staged), plus its normalization as `mu` and `sigma`, float32 (1, C, 1, 1) per-channel statistics of
    [0, 1] pixels. Every tensor is a contiguous CPU copy (nothing else in the file)."""
    arch, net = upstream_arch(name), model[1]
    state = {(upstream_key(k, net) if arch.staged else k): v for k, v in net.state_dict().items()}
    if "mu" in state or "sigma" in state:
        raise UserError(f"model {name!r} already has a weight named mu or sigma")
    state["mu"], state["sigma"] = model[0].mean, model[0].std
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def eps_text(eps: float, threat_model: str) -> str:
    """RobustBench's eps string: L2 as the number ("0.5"); Linf as k/255 when it is one ("8/255")."""
    if threat_model == "Linf" and eps > 0 and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def percent(accuracy: float) -> str:
    """An accuracy in [0, 1] as RobustBench writes it: a string of the percentage rounded to 2
    decimals (utils.update_json: str(round(acc * 100, 2)), "83.34")."""
    return str(round(float(accuracy) * 100, 2))


def pick_eps(available, wanted: float | None) -> float:
    """The radius (in [0, 1] pixel units) to report among those AutoAttack ran at: `wanted`, else the
    only one, else 0.5 (RobustBench's CIFAR L2 radius) if present; otherwise a UserError listing them."""
    radii = sorted({float(e) for e in available})
    if wanted is not None:
        hit = [e for e in radii if math.isclose(e, wanted, abs_tol=1e-9)]
        if not hit:
            raise UserError(f"AutoAttack did not run at eps {wanted:g}; it ran at "
                            f"{', '.join(f'{e:g}' for e in radii) or 'no radius'}")
        return hit[0]
    if len(radii) == 1:
        return radii[0]
    if 0.5 in radii:
        return 0.5
    raise UserError(f"AutoAttack ran at {', '.join(f'{e:g}' for e in radii) or 'no radius'}: "
                    "say which one the model info reports (--eps)")


def benchmark_dataset(dataset: str) -> str:
    """`dataset` if RobustBench has a leaderboard for it (DATASETS), else a UserError."""
    if dataset not in DATASETS:
        raise UserError(f"dataset {dataset!r}: RobustBench's model info covers {', '.join(DATASETS)} (and imagenet)")
    return dataset


def _at(table: dict, eps: float) -> dict | None:
    """The entry of an {eps string: result} table at radius eps (keys compared as numbers)."""
    return next((v for k, v in table.items() if math.isclose(float(k), eps, abs_tol=1e-9)), None)


def evaluation_numbers(evaluation: dict, eps: float, not_about_autoattack: tuple[str, ...] = (),
                       norm: str = "l2") -> dict:
    """From an `advgen eval --full` result (evaluation.evaluate's dict: "n", "clean",
    "autoattack_NORM", "worst_case_NORM", "checks"; accuracies in [0, 1]): clean_acc and autoattack_acc as
    RobustBench strings, unreliable (True when one of the evaluation's gradient-masking checks failed,
    leaving out the checks named in not_about_autoattack, such as the PGD - AutoAttack gap rule, which
    faults PGD, not AutoAttack) and the facts behind them. A missing part is a UserError."""
    try:
        clean, aa = evaluation["clean"]["accuracy"], _at(evaluation[f"autoattack_{norm}"], eps)
        n, checks = int(evaluation["n"]), evaluation["checks"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"the evaluation is not a finished advgen eval --full result (clean, autoattack_{norm}, "
                        "n, checks)") from None
    if aa is None:
        raise UserError(f"the evaluation has no AutoAttack result at eps {eps:g}")
    worst = _at(evaluation.get(f"worst_case_{norm}", {}), eps)
    failed = [c["name"] for c in checks if not c.get("passed", True)]
    masking = [name for name in failed if name not in not_about_autoattack]
    return {"clean_acc": percent(clean), "autoattack_acc": percent(aa["accuracy"]), "unreliable": bool(masking),
            "n": n, "failed_checks": failed,
            "worst_case_acc": percent(worst["accuracy"]) if worst else None}


def model_info(*, architecture: str | None, dataset: str, threat_model: str | None, eps: float | None,
               numbers: dict | None, additional_data: bool | None, title: str | None = None,
               authors: str | None = None, link: str | None = None, venue: str | None = None,
               provenance: dict | None = None) -> dict:
    """A RobustBench model-info dict (the fields of robustbench.utils.ModelInfo, `unreliable` and
    `threat_model`), with `advgen`: where the numbers come from and, under "missing", why each null
    field is null.

    numbers: evaluation_numbers(...) or None (then the accuracies, eps and threat model are null);
    architecture: ARCHITECTURES[name].architecture; threat_model: "L2" or "Linf"; eps in [0, 1] pixel
    units. number_forward_passes is 1: advgen's classifiers are deterministic single forwards."""
    if threat_model is not None and threat_model not in THREAT_MODELS:
        raise UserError(f"threat model {threat_model!r}: RobustBench's are {', '.join(THREAT_MODELS)}")
    missing = {}

    def given(field: str, value, why: str):
        if value is None:
            missing[field] = why
        return value

    n = numbers or {}
    no_eval = "no evaluation was given (advgen export --eval EVAL.json from advgen eval --full, or a zoo model)"
    info = {
        "link": given("link", link, "not given (--link)"),
        "name": given("name", title, "the paper's title; not given (--title)"),
        "authors": given("authors", authors, "not given (--authors)"),
        "additional_data": given("additional_data", additional_data,
                                 "advgen cannot tell what data the model (or its --init) saw (--additional-data)"),
        "number_forward_passes": 1,
        "dataset": benchmark_dataset(dataset),
        "venue": given("venue", venue, "not given (--venue)"),
        "architecture": given("architecture", architecture, "not a RobustBench-known architecture"),
        "threat_model": given("threat_model", threat_model if numbers else None, no_eval),
        "eps": given("eps", eps_text(eps, threat_model) if numbers and eps is not None else None, no_eval),
        "clean_acc": given("clean_acc", n.get("clean_acc"), no_eval),
        "reported": given("reported", None, "the figure a paper reported; advgen's models have none"),
        "autoattack_acc": given("autoattack_acc", n.get("autoattack_acc"), no_eval),
        "footnote": _footnote(n, eps) if numbers else None,
        "unreliable": given("unreliable", n.get("unreliable"), no_eval),
    }
    if info["footnote"] is None:
        missing["footnote"] = no_eval
    info["advgen"] = {**(provenance or {}), **({"n": n["n"], "failed_checks": n["failed_checks"],
                                                 "worst_case_acc": n["worst_case_acc"]} if numbers else {}),
                      "missing": missing}
    return info


def _footnote(numbers: dict, eps: float) -> str:
    checks = ("; failed checks: " + ", ".join(numbers["failed_checks"])) if numbers["failed_checks"] else ""
    return (f"advgen evaluation: standard AutoAttack at eps {eps:g} and clean accuracy on the first {numbers['n']} "
            f"test images (RobustBench's leaderboards use 10000){checks}.")


def state_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """torch.save of a plain dict of tensors: readable with torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_export(out_dir: Path, model_id: str, state: dict[str, torch.Tensor], info: dict,
                 force: bool = False) -> tuple[Path, Path]:
    """Write OUT_DIR/MODEL_ID.pt (the state dict) and OUT_DIR/MODEL_ID.json (the model info), each
    atomically; existing files are refused unless force. Returns their paths."""
    if not NAME.match(model_id):
        raise UserError(f"export name {model_id!r}: letters, digits, '_', '.', '-' (RobustBench names its files so)")
    out_dir = Path(out_dir)
    weights, card = out_dir / f"{model_id}.pt", out_dir / f"{model_id}.json"
    existing = [str(p) for p in (weights, card) if p.exists()]
    if existing and not force:
        raise UserError(f"{' and '.join(existing)} exist: choose another OUT or --name, or --force to replace them")
    atomic_write(weights, state_bytes(state))
    atomic_write(card, (json.dumps(info, indent=2) + "\n").encode())
    return weights, card


__all__ = ["ARCHITECTURES", "UpstreamArch", "benchmark_dataset", "eps_text", "evaluation_numbers", "model_info",
           "percent", "pick_eps", "robustbench_state", "upstream_arch", "upstream_key", "write_export"]
