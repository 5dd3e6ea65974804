"""`advgen export MODEL --format robustbench OUT`, and the RobustBench model info `advgen eval --full
--robustbench-json` writes (apps/export.py does the work)."""
from __future__ import annotations

from pathlib import Path

from .._version import __version__
from ..apps import export as rb
from ..apps.zoo import check_evaluation, evaluation_norms
from ..checkpoint import (FOREIGN_SUFFIXES, MODEL_FILE, ZOO_PREFIX, load_model, resolve_model_file,
                          saved_architecture, zoo_dir)
from ..errors import check
from ..evaluation import GAP_CHECK
from ..io import check_writable, read_json, read_tensors, write_json
from .args import number, parse_bool


def check_model_info_request(args, protocol) -> None:
    """eval --robustbench-json: refuse what cannot be written before hours of attacks, not after."""
    check(args.full, "--robustbench-json needs --full (RobustBench reports the standard AutoAttack)")
    rb.benchmark_dataset(args.dataset)
    rb.pick_eps(list(protocol.aa_eps), None)
    check_writable(Path(args.robustbench_json).parent)


def _advgen_facts(path: Path, model_name: str | None) -> tuple[str | None, dict]:
    """(registry name, training config) of an advgen model file; (model_name, {}) for a foreign file."""
    if path.suffix.lower() in FOREIGN_SUFFIXES:
        return model_name, {}
    config = read_tensors(path)[1].get("config")
    return saved_architecture(path), config if isinstance(config, dict) else {}


def _model_info(args, name: str | None, config: dict, dataset: str, evaluation: dict | None, eps: float | None,
                provenance: dict, norm: str = "l2") -> dict:
    """The RobustBench model-info dict of a model (rb.model_info), from the command's options."""
    numbers = rb.evaluation_numbers(evaluation, eps, (GAP_CHECK,), norm) if evaluation is not None else None
    arch = rb.ARCHITECTURES.get(name)
    additional = getattr(args, "additional_data", None)
    if additional is None and config.get("dataset") in rb.DATASETS and not config.get("init"):
        additional = False   # trained from scratch on the named dataset alone
    if arch is not None:
        provenance = {**provenance, "robustbench_builder": arch.builder}
    if arch is not None and arch.builder is None:
        provenance["load_with"] = (f"advgen.load_model(FILE.pt, model_name={name!r}): advgen's own names, the "
                                   "normalization as mu/sigma (docs/models-and-checkpoints.md)")
    return rb.model_info(architecture=arch.architecture if arch else None, dataset=dataset,
                              threat_model={"l2": "L2", "linf": "Linf"}[norm] if numbers else None, eps=eps, numbers=numbers,
                              additional_data=additional, title=getattr(args, "title", None),
                              authors=getattr(args, "authors", None), link=getattr(args, "link", None),
                              venue=getattr(args, "venue", None),
                              provenance={"advgen_version": __version__, **provenance})


def write_model_info(args, result: dict, protocol) -> None:
    """eval --full --robustbench-json PATH: the result just computed, as RobustBench model info."""
    path = resolve_model_file(args.model_path)
    name, config = _advgen_facts(path, args.model)
    eps = rb.pick_eps(list(protocol.aa_eps), None)
    info = _model_info(args, name, config, args.dataset, result, eps,
                       {"model": str(args.model_path), "advgen_model": name, "evaluation": str(args.out)}, protocol.norm)
    write_json(Path(args.robustbench_json), info)
    print(f"RobustBench model info written to {args.robustbench_json}"
          + (f" (null: {', '.join(info['advgen']['missing'])})" if info["advgen"]["missing"] else ""))


def _export_evaluation(args, path: Path) -> tuple[dict | None, dict]:
    """(the evaluation of the model to report, or None; provenance): --eval EVAL.json (checked to be of
    these very weights), else a zoo model's card."""
    if args.eval:
        evaluation = read_json(Path(args.eval))
        check_evaluation(evaluation, read_tensors(path)[0], args.eval)
        return evaluation, {"evaluation": str(args.eval)}
    if str(args.model_path).startswith(ZOO_PREFIX):
        name = args.model_path[len(ZOO_PREFIX):]
        card = read_json(zoo_dir() / f"{name}.json")
        if not isinstance(card.get("eval"), dict):
            return None, {"data": card.get("data")}
        check_evaluation(card["eval"], read_tensors(path)[0], f"the zoo card of {name}")
        return card["eval"], {"evaluation": f"the zoo card of {name}", "data": card.get("data")}
    return None, {}


def cmd_export(args) -> int:
    """advgen export MODEL --format robustbench OUT: the model as RobustBench's architecture names its
    weights (normalization as mu/sigma buffers) in OUT/NAME.pt, and its model info in OUT/NAME.json."""
    path = resolve_model_file(args.model_path)
    check(path.suffix.lower() not in FOREIGN_SUFFIXES, f"{path}: export reads advgen models (a run folder, a "
          ".safetensors file or zoo:NAME); a foreign file is already a plain state dict")
    name, config = _advgen_facts(path, None)
    check(name is not None, f"{path} does not record its architecture")
    rb.upstream_arch(name)
    dataset = config.get("dataset")
    check(isinstance(dataset, str), f"{path} does not record the dataset it was trained on")
    evaluation, provenance = _export_evaluation(args, path)
    norm, eps = "l2", None
    if evaluation is not None:
        norms = evaluation_norms(evaluation)
        norm = args.norm or (norms[0] if len(norms) == 1 else None)
        check(norm in norms, f"the evaluation has AutoAttack at {' and '.join(norms)}: say which with --norm")
        eps = rb.pick_eps(evaluation[f"autoattack_{norm}"], args.eps)
    model_id = args.name or (args.model_path[4:] if str(args.model_path).startswith("zoo:") else
                             (path.parent.name if path.name == MODEL_FILE else path.stem))
    info = _model_info(args, name, config, dataset, evaluation, eps,
                       {"model": str(args.model_path), "advgen_model": name, **provenance}, norm)
    state = rb.robustbench_state(load_model(path), name)
    weights, card = rb.write_export(Path(args.out), model_id, state, info, force=args.force)
    print(f"exported {name} as {info['architecture']} to {weights} and {card}"
          + (f"; null fields: {', '.join(info['advgen']['missing'])} (see advgen.missing)"
             if info["advgen"]["missing"] else ""))
    return 0


def add_export(sub) -> None:
    x = sub.add_parser("export", help="write a model for another tool: --format robustbench (state dict with "
                                      "mu/sigma buffers + model-info JSON)")
    x.add_argument("model_path", metavar="RUN_DIR|MODEL_FILE|zoo:NAME")
    x.add_argument("out", metavar="OUT", help="folder to write NAME.pt and NAME.json into")
    x.add_argument("--format", required=True, choices=["robustbench"])
    x.add_argument("--name", help="file names and model id (default: the zoo name, run folder or file name)")
    x.add_argument("--eval", metavar="EVAL.json", help="its advgen eval --full output (default for zoo:NAME: "
                                                        "its card's evaluation)")
    x.add_argument("--norm", choices=["l2", "linf"], help="the threat model to report (default: the only one the "
                                                          "evaluation has)")
    x.add_argument("--eps", type=number, help="the AutoAttack radius to report (default: 0.5, or the only one)")
    x.add_argument("--title", help="model info 'name': the paper's title")
    x.add_argument("--authors")
    x.add_argument("--link")
    x.add_argument("--venue")
    x.add_argument("--additional-data", type=parse_bool, help="whether training used data beyond the dataset "
                                                         "(default: false for a run from scratch, else unknown)")
    x.add_argument("--force", action="store_true", help="replace existing OUT/NAME.pt and OUT/NAME.json")
    x.set_defaults(func=cmd_export)


