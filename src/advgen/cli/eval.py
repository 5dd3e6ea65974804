"""`advgen eval`: one evaluation protocol (evaluation/protocol.py) from the command line: a quick curve, or
with --full the zoo's full strength; resumable through --out, which never overwrites anything else."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import (FOREIGN_SUFFIXES, RUN_FILES, load_model, model_from_foreign_state, read_foreign_state,
                          require_normalization, resolve_model_file)
from ..errors import UserError, check
from ..evaluation import EvalProtocol, curve_key, evaluate
from ..io import check_writable, read_json, read_tensors, write_json
from ..models import MODELS
from ..training import TrainConfig
from .args import add_data_args, floats, load_data, number, objectives, seed_everything
from .export import check_model_info_request, write_model_info
from .train import distributed_job

log = logging.getLogger("advgen")

# advgen 0.1's attack names: each says its norm ("fgsm" and "autoattack" alone were Linf)
OLD_ATTACKS = {"pgd-l2": ("pgd", "l2"), "pgd-linf": ("pgd", "linf"), "fgsm-l2": ("fgsm", "l2"),
               "autoattack-l2": ("autoattack", "l2")}


def add_eval_args(e) -> None:
    e.add_argument("model_path", metavar="RUN_DIR|MODEL_FILE|zoo:NAME")
    e.add_argument("--model", metavar="NAME|package.module:factory",
                   help=f"architecture of a foreign .pt/.pth/.th/.tar file ({', '.join(sorted(MODELS))}, or your own)")
    e.add_argument("--normalize", metavar="cifar10|cifar100|imagenet|none|MEAN/STD",
                   help="what goes in front of a foreign model: named statistics, none (raw [0, 1] pixels), or "
                        "per-channel comma lists MEAN/STD, e.g. 0.5,0.5,0.5/0.25,0.25,0.25; required for a foreign "
                        "file that does not carry its own (RobustBench mu/sigma buffers); never assumed")
    e.add_argument("--attack", default="pgd", choices=["pgd", "fgsm", "autoattack", *OLD_ATTACKS],
                   help="the curve's attack; pgd-l2, pgd-linf, fgsm-l2 and autoattack-l2 are advgen 0.1's "
                        "names (deprecated) (default: pgd)")
    e.add_argument("--norm", choices=["l2", "linf"],
                   help="the threat model (default: the one an advgen model was trained against, from its file; "
                        "else l2 for pgd, while fgsm and autoattack need it said)")
    e.add_argument("--eps", type=floats, help="comma-separated radii in [0,1] pixel units, 8/255 allowed (default: "
                                              "0,0.25,0.5 for l2 and 0,4/255,8/255 for linf; with --full "
                                              "0,0.1,0.25,0.5,0.75,1 and 0,2/255,4/255,8/255,16/255)")
    e.add_argument("--steps", type=int, help="PGD steps (default 20; with --full 50)")
    step = e.add_mutually_exclusive_group()
    step.add_argument("--step-size", type=number, help="absolute PGD step size")
    step.add_argument("--rel-step", type=float, help="PGD step size as a fraction of eps (default 2.5/steps; "
                                                      "with --full 0.2)")
    e.add_argument("--restarts", type=int, help="random restarts, each sample's worst case kept (default 1; with --full 2)")
    e.add_argument("--pgd-objective", type=objectives, default=("ce", "margin"), metavar="ce|margin|ce,margin",
                   help="what PGD's restarts ascend, in turn (ce,margin: cross-entropy, then the margin loss; "
                        "with one restart, cross-entropy only)")
    e.add_argument("--batch-size", type=int, default=500, help="images per batch, and per chunk saved to --out")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="write the result as JSON here (and the per-sample progress, from which the same "
                                 "evaluation resumes); anything else there is refused without --force")
    e.add_argument("--force", action="store_true", help="replace an --out file that holds something else")
    e.add_argument("--full", action="store_true",
                   help="the zoo's full strength: PGD (--steps, --restarts) at --eps, the standard AutoAttack at "
                        "--aa-eps, their per-sample worst case, Wilson 95%% intervals, every check")
    e.add_argument("--robustbench-json", metavar="PATH",
                   help="with --full: also write the result as a RobustBench model-info JSON (clean and AutoAttack "
                        "accuracy at the standard radius, or at the one --aa-eps; fields advgen cannot know are null, "
                        "with why)")
    e.add_argument("--aa-eps", type=floats, help="AutoAttack radii of --full (default: 0.25,0.5 for l2, 8/255 for linf)")
    add_data_args(e, train=False)


def trained_threat(model_path) -> tuple[str, float] | None:
    """(norm, radius) an advgen model was trained against (the config its file records:
    TrainConfig.threat); None for a foreign file, a model trained without a threat model (standard
    training, the paper's generators) or a file that records no config."""
    path = resolve_model_file(model_path)
    if path.suffix.lower() in FOREIGN_SUFFIXES or not path.is_file():
        return None   # a missing file is reported where it is loaded
    config = read_tensors(path)[1].get("config")
    if not isinstance(config, dict):
        return None
    try:
        return TrainConfig.from_dict(config).threat
    except UserError as e:
        log.warning("%s: its training config does not read (%s); the norm is not taken from it", path, e)
        return None


def protocol_from_args(args, trained: tuple[str, float] | None = None) -> EvalProtocol:
    """The protocol the flags describe; radii and strength the norm's quick or full defaults unless given.
    Without --norm the norm is the one the model was trained against (`trained`, said in the log), else
    L2 for PGD; FGSM and AutoAttack on a model without one need it said."""
    attack, norm = args.attack, args.norm
    if attack in OLD_ATTACKS:
        attack, old_norm = OLD_ATTACKS[attack]
        check(norm in (None, old_norm), f"--attack {args.attack} is {old_norm}; it contradicts --norm {norm}")
        log.warning("--attack %s is deprecated: use --attack %s --norm %s", args.attack, attack, old_norm)
        norm = old_norm
    if norm is None and trained is not None:
        norm = trained[0]
        log.info("norm %s: the threat model %s was trained against (%s %s); --norm l2|linf to choose another",
                 norm, args.model_path, norm, _radius(trained[1], norm))
    if norm is None:
        # advgen 0.1 read --attack fgsm and --attack autoattack as Linf: refuse rather than change the number
        check(attack == "pgd", f"--attack {attack} needs --norm l2 or --norm linf")
        norm = "l2"
    base = EvalProtocol.full(norm) if args.full else EvalProtocol.quick(norm)
    if args.full:
        check(attack == "pgd", "--full runs PGD and the standard AutoAttack itself: leave --attack out")
    changes = {"attack": attack, "objectives": tuple(args.pgd_objective), "batch_size": args.batch_size,
               "seed": args.seed}
    for name in ("eps", "aa_eps"):
        if getattr(args, name, None) is not None:
            changes[name] = tuple(getattr(args, name))
    check(args.aa_eps is None or args.full, "--aa-eps goes with --full")
    for name in ("steps", "restarts", "step_size", "rel_step"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.step_size is not None:
        changes["rel_step"] = None
    p = EvalProtocol(**{**base.__dict__, **changes})
    p.validate()
    if norm == "linf" and any(e > 0.25 for e in p.eps + p.aa_eps):
        log.warning("Linf radii above 0.25 (64/255) change any image: did you mean %s?",
                    ",".join(f"{e * 255:g}/255" for e in p.eps if e > 0.25))
    return p


def check_out(path: Path, force: bool) -> None:
    """--out, before any work: never a folder, never a file of a run folder (run.json, the model, the
    state); an existing file only if it is an evaluation (of the same settings: it is resumed; checked
    when the model is known) or with --force."""
    check(not path.is_dir(), f"--out {path} is a folder: name a .json file")
    check(not (path.name in RUN_FILES or path.suffix == ".safetensors"),
          f"--out {path} is a run's own file: write the evaluation elsewhere")
    check(not (path.parent / "run.json").is_file() or path.name not in ("run.json",),
          f"--out {path} would overwrite the run's record")
    check_writable(path.parent if str(path.parent) else Path("."))
    if path.exists() and not force:
        try:
            saved = read_json(path)
        except Exception:
            saved = None
        check(isinstance(saved, dict) and "settings" in saved and "samples" in saved,
              f"--out {path} exists and is not an advgen evaluation: give another file, or --force to replace it")


def load_eval_model(args, device: torch.device, dist=None):
    """(model, test set) for `advgen eval`. An advgen checkpoint is read before the data (it names its
    own classes and normalization); a foreign file after them: it gets the data's class and channel
    counts and the normalization it carries or --normalize states (checkpoint.choose_normalization)."""
    if resolve_model_file(args.model_path).suffix.lower() not in FOREIGN_SUFFIXES:
        check(args.normalize is None, "--normalize applies to foreign .pt/.pth/.th/.tar files only; advgen "
                                      "checkpoints carry their own normalization")
        model = load_model(args.model_path, model_name=args.model, device=device)
        return model, load_data(args, train=False, dist=dist)[1]
    path = resolve_model_file(args.model_path)
    check(args.model is not None, f"{path} is a foreign PyTorch file: name its architecture (--model)")
    state = read_foreign_state(path)                  # a bad file fails before the data are loaded
    require_normalization(state, path, args.normalize)   # neither carried nor stated: refused before the data load
    test_set = load_data(args, train=False, dist=dist)[1]
    model = model_from_foreign_state(state, path, args.model, test_set.num_classes, test_set.channels, args.normalize)
    return model.to(device), test_set


def cmd_eval(args) -> int:
    trained = trained_threat(args.model_path) if args.norm is None and args.attack not in OLD_ATTACKS else None
    protocol = protocol_from_args(args, trained)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out(out, args.force)
    if args.robustbench_json:
        check_model_info_request(args, protocol)
    with distributed_job(args.device) as (dist, device):
        seed_everything(args.seed)
        model, test_set = load_eval_model(args, device, dist)
        x, y = test_set.images.to(device), test_set.labels.to(device)
        if dist.active:
            check(not args.full, "--full runs in one process (it is resumable instead: run it again to continue)")
            from ..evaluation.sharded import evaluate_sharded
            result = evaluate_sharded(dist, model, x, y, device, protocol)
            if not dist.main:
                return 0
        else:
            if out is not None and args.force and out.exists():
                out.unlink()   # --force: the user asked to replace it
            result = evaluate(model, x, y, protocol, progress_file=out)
    result["model"] = str(args.model_path)
    result["norm_from"] = ("--norm" if args.norm or args.attack in OLD_ATTACKS else
                           f"the model's training ({trained[0]} {_radius(trained[1], trained[0])})" if trained else
                           "the default (l2)")
    result["model_file"] = str(resolve_model_file(args.model_path))
    if out is not None:
        write_json(out, result)
    if args.robustbench_json:
        write_model_info(args, result, protocol)
    print_result(result, protocol)
    if out is not None:
        print(f"results in {out}")
    return 0


def _cell(d: dict) -> str:
    return f"{100 * d['accuracy']:6.2f}% [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"


def print_result(result: dict, p: EvalProtocol) -> None:
    """The result as a table: accuracy [95% Wilson interval] per attack and radius, then the checks."""
    print(f"{result['n']} images; {p.describe()}; 95% Wilson intervals")
    print(f"clean          {_cell(result['clean'])}")
    label = {"pgd": "PGD", "fgsm": "FGSM", "autoattack": "AA"}[p.attack]
    for e, d in result[curve_key(p.attack, p.norm)].items():
        if float(e) > 0:
            print(f"{label}-{p.norm.upper():<4} {_radius(float(e), p.norm):>7}  {_cell(d)}")
    for e, d in result.get(curve_key("autoattack", p.norm), {}).items() if p.aa_eps else ():
        print(f"AA-{p.norm.upper():<5} {_radius(float(e), p.norm):>7}  {_cell(d)}   worst case of both "
              f"{_cell(result[f'worst_case_{p.norm}'][e])}")
    for c in result.get("checks", []):
        print(f"[{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}")
    print(f"{sum(result['seconds'].values()):.0f} s of attacks in all")


def _radius(e: float, norm: str) -> str:
    k = e * 255
    return f"{round(k)}/255" if norm == "linf" and abs(k - round(k)) < 1e-6 else f"{e:g}"
