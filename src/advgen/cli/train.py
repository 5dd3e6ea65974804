"""`advgen train`: a recipe or a method, every TrainConfig field and every option a method declares as a
flag; a flag left out keeps the recipe's value (or the config's default)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from ..errors import UserError, check
from ..models import MODELS
from ..recipes import RECIPES, recipe_config, resolve_recipe
from ..precision import PRECISIONS, amp_alias
from ..training import METHODS, SCHEDULES, TrainConfig
from .args import (add_bool, add_data_args, add_option_flags, fetch_once, number, options_from_args, parse_bool,
                   resolve_device, seed_everything)

log = logging.getLogger("advgen")

# TrainConfig fields the train command sets from a flag of the same name (dashes for underscores); each
# flag's default is "not given", so the recipe's value, or the config's default, holds
CONFIG_FLAGS = ("model", "dataset", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "seed", "init", "init_normalize",
                "augment",
                "train_subset", "test_subset", "watch_subset", "watch_eps", "watch_norm", "watch_steps", "time_budget",
                "budget_steps", "budget_clock", "channels_last", "compile", "precision", "fold_bn_attack", "sync_bn")


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", metavar="NAME",
                      help="a named training: method, options, learning rate, epochs and starting model "
                           "(docs/methods.md): " + ", ".join(sorted(RECIPES)))
    what.add_argument("--method", choices=sorted(METHODS),
                      help="; ".join(f"{k}: {v.summary}" for k, v in sorted(METHODS.items())))
    p.add_argument("--model", metavar="NAME|package.module:factory",
                   help=f"{', '.join(sorted(MODELS))}, or your own: factory(num_classes=K) returning an nn.Module "
                        f"(advgen puts the data's normalization in front of it) (default: {d.model})")
    p.add_argument("--epochs", type=int, help=f"(default: the recipe's, else {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"(default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"classifier learning rate, SGD with Nesterov momentum (default: the "
                                            f"recipe's, else {d.lr})")
    p.add_argument("--momentum", type=float, help=f"(default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, help=f"(default: {d.weight_decay})")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"learning-rate schedule (default: {d.schedule})")
    p.add_argument("--seed", type=int, help=f"seed of the initialisation, data order, subset and attacks "
                                            f"(default: {d.seed})")
    p.add_argument("--init", help="start from this checkpoint: a run folder, a model file or zoo:NAME (default: the "
                                  "recipe's, else from scratch); --init none starts a recipe from scratch")
    p.add_argument("--normalize", dest="init_normalize", metavar="cifar10|cifar100|imagenet|none|MEAN/STD",
                   help="the normalization of a foreign --init file (.pt/.pth/.th/.tar) that does not carry its "
                        "own; required for such a file (never assumed)")
    p.add_argument("--augment", metavar="none|crop|flip|crop,flip",
                   help="training augmentation: a random crop of the 4-pixel zero-padded image and a horizontal flip "
                        "(default: crop,flip, for every dataset; give none or crop for data whose label depends on "
                        "left and right, such as digits or text)")
    p.add_argument("--watch-subset", type=int,
                   help="PGD accuracy on the first N test images after each epoch, the catastrophic-overfitting "
                        "check (default: 256 for fgsm, else 0)")
    p.add_argument("--watch-eps", type=number,
                   help="radius of the watch's PGD (default: the training's radius when the norms agree, else the "
                        "norm's standard radius; needs --watch-subset)")
    p.add_argument("--watch-norm", choices=["l2", "linf"],
                   help="norm of the watch's PGD (default: the method's norm, else l2; needs --watch-subset)")
    p.add_argument("--watch-steps", type=int, help=f"PGD steps of the watch (default: {d.watch_steps})")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training steps")
    p.add_argument("--budget-steps", type=int,
                   help="stop after this many training steps in all (a budget that reproduces on any machine)")
    p.add_argument("--budget-clock", choices=["wall", "process"],
                   help="clock of --time-budget: wall, or CPU seconds of this process (shared machines) "
                        f"(default: {d.budget_clock})")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--force", action="store_true", help="overwrite a run folder that already holds a run")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last saved state (pass the same arguments)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the per-step metrics and epoch evaluations to RUN_DIR/tensorboard "
                        "(pip install 'advgen[tensorboard]')")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also save the whole training state every STEPS steps (it is always saved at epoch ends)")
    sp = p.add_argument_group("speed (docs/performance.md)")
    sp.add_argument("--channels-last", choices=["auto", "true", "false"],
                    help="NHWC memory layout of the classifier and batches (default auto: on for the CPU)")
    add_bool(sp, "--compile", help="torch.compile the training forward (CPU: needs a C++ compiler)")
    sp.add_argument("--precision", choices=PRECISIONS,
                    help="of the training forward passes (autocast; fp16 with a gradient scaler); auto is fp32 "
                         "until the bf16 A/B decides; evaluation runs in fp32 (docs/gpu-and-precision.md) "
                         "(default: auto)")
    sp.add_argument("--amp", action="store_true", help="deprecated: --precision bf16 (fp16 on GPUs without bf16)")
    add_bool(sp, "--sync-bn", help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    add_bool(sp, "--fold-bn-attack", help="attack methods: attack a BatchNorm-folded copy of the classifier (the same "
                                          "function) (default: true)")
    p.add_argument("--gen-preset", choices=["paper", "gradient"],
                   help="deprecated: the generator options of --recipe gen-paper or gen-gradient-l2")
    add_option_flags(p)
    add_data_args(p, train=True)


def _given(args, name: str):
    value = getattr(args, name)
    if name == "channels_last" and value is not None:
        return {"auto": None, "true": True, "false": False}[value]
    if name == "init" and value == "none":
        return None
    return value


def train_config_from_args(args) -> TrainConfig:
    """The run's config: the recipe's (or --method's defaults), then every flag given on top."""
    if args.recipe:
        recipe = resolve_recipe(args.recipe)
        check(args.gen_preset is None, "--gen-preset goes with --method generator; a recipe has its options")
        base = recipe_config(recipe.name)
    else:
        options = None
        if args.gen_preset is not None:
            check(args.method == "generator", "--gen-preset goes with --method generator")
            name = {"paper": "gen-paper", "gradient": "gen-gradient-l2"}[args.gen_preset]
            log.warning("--gen-preset %s is deprecated: use --recipe %s", args.gen_preset, name)
            options = RECIPES[name].options_object()
        base = TrainConfig(method=args.method, options=options)
    changes = {name: _given(args, name) for name in CONFIG_FLAGS
               if getattr(args, name) is not None}
    if args.amp:
        check(args.precision is None, "give --precision or the deprecated --amp, not both")
        changes["precision"] = amp_alias(resolve_device(args.device))
        log.warning("--amp is deprecated: it means --precision %s here; pass --precision", changes["precision"])
    cfg = dataclasses.replace(base, options=options_from_args(base.method, args, base.options), **changes)
    if args.watch_subset is None and cfg.method == "fgsm":   # the catastrophic-overfitting watch, on for FGSM
        cfg.watch_subset = 256
    cfg.validate()
    return cfg


def claim_run_dir(out: Path, force: bool, resume: bool = False) -> None:
    """Refuse a folder that already holds a run (finished or started), unless --resume or --force: a
    result is never overwritten by accident. Checked before the data are loaded."""
    from ..io import check_writable
    from ..training.rundir import check_run_dir
    check_run_dir(out, resume=resume, force=force)
    if resume and not out.is_dir():
        raise UserError(f"--resume: {out} does not exist; there is no run to resume")
    check_writable(out)


@contextlib.contextmanager
def distributed_job(device_name: str):
    """Under torchrun: join the job (training/distributed.py), quiet the logs of ranks other than 0,
    and leave the process group at the end. Yields (dist, device)."""
    from ..training import distributed
    dist, name = distributed.init(device_name)
    clean = False
    try:
        if not dist.main:
            logging.getLogger().setLevel(logging.ERROR)
        device = resolve_device(name)
        if device.type == "cuda":   # the process's GPU (torchrun: distributed.init did it): events, streams
            torch.cuda.set_device(device)
        yield dist, device
        clean = True
    finally:
        distributed.shutdown(clean=clean and dist.active)


def cmd_train(args) -> int:
    from ..checkpoint import resolve_model_file
    from ..data import load_dataset
    from ..training import train
    from ..training.distributed import rank_seed
    from ..training.rundir import hold_run_dir
    cfg = train_config_from_args(args)
    check(args.checkpoint_every is None or args.checkpoint_every >= 1,
          f"--checkpoint-every must be >= 1 step, got {args.checkpoint_every}")   # before the data load
    out = Path(args.out)
    if cfg.init is not None and not args.resume:
        check(resolve_model_file(cfg.init).is_file(), f"--init {cfg.init}: no such checkpoint")
    with distributed_job(args.device) as (dist, device), contextlib.ExitStack() as held:
        check(cfg.batch_size % dist.world == 0, f"--batch-size {cfg.batch_size} is the global batch: it must be "
                                                f"divisible by the {dist.world} processes")

        def claim():  # rank 0 locks and checks the folder, for the run's life; the others learn the outcome
            check(not args.resume or out.is_dir(), f"--resume: {out} does not exist; there is no run to resume")
            held.enter_context(hold_run_dir(out))
            claim_run_dir(out, args.force, args.resume)
        dist.share(claim)
        seed_everything(rank_seed(cfg.seed, dist.rank))
        if dist.active:
            fetch_once(args, dist)
        train_set, test_set = load_dataset(args.dataset, args.data_dir, download=args.download)  # train() subsets
        model, record = train(cfg, train_set, test_set, out_dir=out, device=device, resume=args.resume,
                              force=args.force, checkpoint_every=args.checkpoint_every,
                              tensorboard=args.tensorboard, dist=dist, data_on=args.data_on)
        rows = record["epochs"]
        if dist.main:
            print(f"{args.recipe or cfg.method}: {len(rows)} epochs, "
                  f"{sum(r['seconds'] for r in rows) / len(rows):.1f} s/epoch, "
                  f"test accuracy {100 * rows[-1]['test_acc']:.2f}% -> {out}"
                  + (f" ({dist.world} processes)" if dist.active else ""))
    return 0


__all__ = ["add_train_args", "train_config_from_args", "cmd_train", "parse_bool"]
