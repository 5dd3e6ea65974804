"""The application commands: reproduce, compare, zoo, plot."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..errors import UserError, check
from .args import device_list, device_name, ints, number, resolve_device, seed_everything


def _add_device(p, help: str = "cuda under torchrun: each process takes cuda:LOCAL_RANK") -> None:
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: $ADVGEN_DATA or ~/.cache/advgen)")
    p.add_argument("--download", action="store_true", help="download the data into --data-dir if it is missing")
    p.add_argument("--device", default="auto", type=device_name, metavar="auto|cpu|cuda|cuda:N|mps", help=help)


def _out_folder(path: str) -> Path:
    """--out of reproduce and compare, checked before any work and not made yet (a command refused on
    its other arguments leaves nothing behind): a folder, or a path whose nearest existing parent is a
    folder this process can write to."""
    out = Path(path)
    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    check(parent.is_dir() and os.access(parent, os.W_OK | os.X_OK), f"--out {out}: {parent} is not a writable folder")
    return out


def add_reproduce(sub) -> None:
    from ..apps.reproduce import PRESETS
    from ..apps.speedrun import SPEEDRUN_PRESETS
    r = sub.add_parser("reproduce", help="the paper's Table 1 and Figures 2-3; or the speedrun (time to robustness)")
    r.add_argument("--preset", default="quick", choices=sorted([*PRESETS, *SPEEDRUN_PRESETS]),
                   help="quick: 3,000 images, about 10 minutes on 2 CPU cores; smoke: every stage in seconds "
                        "(numbers mean nothing); paper: the paper's settings on all the data (GPU-scale); "
                        "speedrun: recipe speedrun-l2 from scratch on all the data, timed, its curve and its "
                        "AutoAttack (docs/speedrun.md); speedrun-smoke: the same in seconds")
    r.add_argument("--out", required=True, help="folder of the stages and the report (a stopped reproduction "
                                                "resumes from it: run the same command again)")
    r.add_argument("--seeds", type=ints, default=None, metavar="S1,S2,...",
                   help="one reproduction per seed in OUT/seed-S, and a report of the mean ± std over them")
    _add_device(r)
    r.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from ..apps.reproduce import PRESETS, reproduce, reproduce_seeds
    from ..apps.speedrun import SPEEDRUN_PRESETS, speedrun
    device = resolve_device(args.device)
    kw = dict(data_dir=args.data_dir, download=args.download, device=device)
    if args.preset in SPEEDRUN_PRESETS:
        check(not args.seeds, "--seeds goes with the paper's presets; a speedrun is one timed run")
        seed_everything(SPEEDRUN_PRESETS[args.preset].seed)
        path = speedrun(args.preset, _out_folder(args.out), command=args.command_line, **kw)
        print(f"speedrun written to {path}")
        return 0
    if args.seeds:
        seed_everything(args.seeds[0])
        path = reproduce_seeds(args.preset, _out_folder(args.out), args.seeds, **kw)
    else:
        seed_everything(PRESETS[args.preset].seed)
        path = reproduce(args.preset, _out_folder(args.out), **kw)
    print(f"report written to {path}")
    return 0


def add_compare(sub) -> None:
    from ..apps.compare.plan import COMPARE_PRESETS
    c = sub.add_parser("compare", help="recipes fine-tuned from one base at several budgets and seeds: curves "
                                       "(PGD + AutoAttack)")
    c.add_argument("--preset", default="quick", choices=sorted(COMPARE_PRESETS),
                   help="quick: 10,000 images, 3 seeds, the L2 recipes; linf-quick: the same at Linf 8/255; "
                        "smoke: every stage in seconds; full: all the data (GPU-scale)")
    c.add_argument("--out", required=True, help="folder of the runs and the report (resumed from)")
    c.add_argument("--base", help="an existing base run folder to start from (default: train one in OUT/base)")
    c.add_argument("--entries", help="comma-separated recipes to run (default: the preset's); the report covers "
                                     "every entry already run in OUT")
    _add_device(c, "where the base is trained and evaluated (and the runs, without --devices)")
    c.add_argument("--jobs", type=int, default=1,
                   help="worker processes training and evaluating the (entry, seed) runs at once, each with "
                        "CPUs / N threads and its output in RUN_DIR/compare.log; 1: one after the other here")
    c.add_argument("--devices", type=device_list, metavar="DEVICE,...",
                   help="devices of the workers, round-robin (e.g. cuda:0,cuda:1; default: --device)")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from ..apps.compare.plan import COMPARE_PRESETS
    from ..apps.compare.run import compare
    check(args.jobs >= 1, f"--jobs must be >= 1 (worker processes), got {args.jobs}")
    device = resolve_device(args.device)
    try:   # a list from a --config file has not been through argparse's type=
        names = device_list(args.devices) if args.devices else []
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--devices: {e}") from None
    devices = [resolve_device(d, "--devices") for d in names] or None
    seed_everything(COMPARE_PRESETS[args.preset].base_seed)
    path = compare(args.preset, _out_folder(args.out), data_dir=args.data_dir, download=args.download, device=device,
                   base=Path(args.base) if args.base else None,
                   entries=args.entries.split(",") if args.entries else None, jobs=args.jobs, devices=devices)
    print(f"comparison written to {path}")
    return 0


def add_zoo(sub) -> None:
    z = sub.add_parser("zoo", help="the models that ship with advgen (load one as zoo:NAME)")
    z.add_argument("--json", action="store_true", help="print the list of cards")
    z.add_argument("--norm", default="l2", choices=["l2", "linf"], help="the threat model of the table's attack columns")
    z.add_argument("--eps", type=number, help="the radius of the table's attack columns (default: the norm's "
                                              "standard radius, 0.5 or 8/255)")
    z.add_argument("--add", metavar="RUN_DIR", help="add a finished run to the zoo (with --name, --eval)")
    z.add_argument("--name")
    z.add_argument("--eval", metavar="EVAL.json", help="its advgen eval --full output")
    z.add_argument("--recipe", help="the recipe that trained it (recorded on the card)")
    z.add_argument("--command", help="the command that trained it (default: the one RUN_DIR/log.txt records)")
    z.add_argument("--machine", help="where it was trained (default: this machine)")
    z.add_argument("--force", action="store_true", help="replace a zoo model of that name")
    z.set_defaults(func=cmd_zoo)


def cmd_zoo(args) -> int:
    """advgen zoo [--json] [--norm N] [--eps R]: the table (attack columns at radius R) or the cards of the
    shipped models; --add RUN: put a run in the zoo."""
    from ..apps import zoo
    from ..attacks import STANDARD_EPS
    from ..checkpoint import RUN_FILE, zoo_cards
    from ..io import machine_description, read_json
    if args.add:
        check(args.name and args.eval, "--add RUN needs --name NAME and --eval EVAL.json (from advgen eval --full)")
        machine = (args.machine or read_json(Path(args.add) / RUN_FILE).get("machine")
                   or f"{machine_description(torch.device('cpu'))} (the machine advgen zoo --add ran on)")
        card = zoo.add(Path(args.add), args.name, read_json(Path(args.eval)), command=args.command,
                       machine=machine, force=args.force, eval_path=args.eval, recipe=args.recipe)
        print(f"added {card['name']} to the zoo: {card['file']}, sha256 {card['sha256'][:16]}…")
        return 0
    cards = zoo_cards()
    eps = STANDARD_EPS[args.norm] if args.eps is None else args.eps
    radii = {float(k) for c in cards for key in (f"pgd_{args.norm}", f"autoattack_{args.norm}")
             for k in c.get("eval", {}).get(key, {})}
    name = dict(l2="L2", linf="Linf")[args.norm]
    check(args.json or not cards or radii, f"no zoo model has been evaluated under {name} attacks yet")
    check(args.json or not cards or any(abs(eps - r) < 1e-9 for r in radii),
          f"--eps {eps:g}: no zoo model was attacked at that {name} radius; choose from "
          f"{', '.join(f'{r:g}' for r in sorted(radii))}")
    print(json.dumps(cards, indent=1) if args.json else zoo.table(cards, eps=eps, norm=args.norm))
    return 0


def add_plot(sub) -> None:
    pl = sub.add_parser("plot", help="training curves of runs (loss, accuracy, PGD-watch accuracy) to a PNG")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", default="curves.png", help="the PNG to write (an existing file only with --force)")
    pl.add_argument("--force", action="store_true", help="replace an existing --out")
    pl.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from ..apps.plot import plot_runs
    from ..io import check_writable
    out = Path(args.out)
    check(args.force or not out.exists(), f"--out {out} exists: give another file, or --force to replace it")
    check(not out.is_dir(), f"--out {out} is a folder: give the PNG's file name")
    check_writable(out.parent if str(out.parent) else Path("."))
    print(f"training curves written to {plot_runs([Path(r) for r in args.runs], out)}")
    return 0
