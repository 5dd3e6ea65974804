"""The `advgen` command line: train, eval, reproduce. argparse lives here and nowhere else.

Exit codes: 0 done; 2 a user error (bad argument or value, missing or corrupt data or checkpoint, an
--out folder that holds a run, a diverged run), shown as one line on stderr; 1 an internal error (with
its traceback), or jobs of `compare --jobs N` that failed (a line for each, naming its log); 130 / 143
stopped by SIGINT / SIGTERM (train, reproduce and compare save their state first and say how to resume).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import random
import shlex
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .attacks import ATTACKS
from .config import SCHEDULES, AttackConfig, NoOptions, TrainConfig
from .errors import ConfigError, Interrupted, UserError, WorkersFailed, check
from .evaluate import FULL_REL_STEP
from .models import MODELS
from .models.generators import ASSIGNMENTS, BOUNDS
from .precision import PRECISIONS, amp_alias
from .training import METHODS
from .training.control import STOP
from .training.free import FreeOptions
from .training.generator import GENERATOR_PRESETS, STARTS, GeneratorOptions, generator_preset
from .training.nfgsm import NFGSMOptions
from .training.trades import TradesOptions

log = logging.getLogger("advgen")


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default (a None default, "not set", is left out)."""

    @staticmethod
    def _shows_default(action) -> bool:
        return bool(action.option_strings) and action.default not in (None, argparse.SUPPRESS, False)

    def _format_action(self, action):
        if not action.help and self._shows_default(action):  # argparse prints no line for help=None
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        if self._shows_default(action) and "%(default)" not in text and "default:" not in text:
            text += " (default: %(default)s)"
        return text.strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **k):
        k.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **k)

    def error(self, message):  # one line and exit 2, like every other user error
        sys.stderr.write(f"advgen: error: {message}\n")
        sys.exit(2)


def _number(text) -> float:
    """A float, or a fraction as radii are usually written: "8/255"."""
    if isinstance(text, (int, float)):
        return float(text)
    num, slash, den = str(text).partition("/")
    try:
        return float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def _joined(text) -> str:
    """An option value as the comma-separated text it is on the command line (a --config file gives a list)."""
    return ",".join(str(t) for t in text) if isinstance(text, (list, tuple)) else str(text)


def _floats(text) -> list[float]:
    text = _joined(text)
    try:
        vals = [_number(t) for t in str(text).split(",") if t.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return vals


def _objectives(text) -> tuple[str, ...]:
    """PGD objectives for evaluation, comma-separated: "ce", "margin" or "ce,margin"."""
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not names or any(n not in ("ce", "margin") for n in names):
        raise argparse.ArgumentTypeError(f"expected ce, margin or a comma list of them, got {text!r}")
    return names


def _ints(text) -> list[int]:
    """Comma-separated distinct non-negative integers: "0,1,2"."""
    text = _joined(text)
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return vals


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def seed_everything(seed: int) -> None:
    """The one place that seeds the global RNGs (library code takes explicit generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device_name(text: str) -> str:
    """--device: auto, cpu, cuda, cuda:N or mps."""
    if text in ("auto", "cpu", "cuda", "mps") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


def _device_list(text: str) -> list[str]:
    """--devices: comma-separated --device names (cuda:0,cuda:1); one may repeat (two workers on one GPU)."""
    text = _joined(text)
    names = [t.strip() for t in str(text).split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated devices such as cuda:0,cuda:1, got {text!r}")
    for name in names:
        _device_name(name)
    return names


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The torch.device of a --device name, with its index (devices.indexed: "cuda" is cuda:N); UserError
    (naming `flag`) where it is not on this machine."""
    from .devices import indexed
    if name == "auto":
        if torch.cuda.is_available():
            return indexed("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return indexed("mps")
        return torch.device("cpu")
    check(not name.startswith("cuda") or torch.cuda.is_available(), f"{flag} {name}: no CUDA device is available")
    if name.startswith("cuda:"):
        check(int(name[5:]) < torch.cuda.device_count(),
              f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0..")
    check(name != "mps" or torch.backends.mps.is_available(), f"{flag} mps: no MPS device is available")
    return indexed(name)


def _add_data_args(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: $ADVGEN_DATA or ~/.cache/advgen, downloaded if absent)")
    p.add_argument("--download", action="store_true", help="download the data into --data-dir if it is missing")
    p.add_argument("--dataset", default="cifar10", metavar="cifar10|cifar100|PATH",
                   help="cifar10, cifar100, an .npz file (x_train, y_train, x_test, y_test) or an image folder "
                        "(train/CLASS/*.png, test/CLASS/*.png) (default: cifar10)")
    if train:
        p.add_argument("--train-subset", type=int, help="train on N images (seeded, class-balanced)")
        p.add_argument("--data-on", default="auto", choices=["auto", "device", "host"],
                       help="where the training images live on a GPU run: on the device, or on the host with "
                            "pinned batches copied one ahead (auto: on the device if they take at most half "
                            "of its free memory)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    p.add_argument("--device", default="auto", type=_device_name, metavar="auto|cpu|cuda|cuda:N|mps",
                   help="cuda under torchrun: each process takes cuda:LOCAL_RANK")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d, a = TrainConfig(), AttackConfig()
    p.add_argument("--method", required=True, choices=sorted(METHODS),
                   help="; ".join(f"{k}: {v.summary}" for k, v in sorted(METHODS.items())))
    p.add_argument("--model", default=d.model, metavar="NAME|package.module:factory",
                   help=f"{', '.join(sorted(MODELS))}, or your own: factory(num_classes=K) returning an nn.Module "
                        "(advgen puts the data's normalization in front of it)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="classifier learning rate (SGD, Nesterov momentum)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", help="start from this checkpoint (run folder or model file)")
    p.add_argument("--watch-subset", type=int, default=None,
                   help="PGD accuracy on the first N test images after each epoch (default 256 for fgsm, else 0)")
    p.add_argument("--watch-eps", type=_number, default=d.watch_eps)
    p.add_argument("--watch-norm", default=d.watch_norm, choices=["l2", "linf"])
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training steps")
    p.add_argument("--budget-steps", type=int,
                   help="stop after this many training steps in all (a budget that reproduces on any machine)")
    p.add_argument("--budget-clock", default=d.budget_clock, choices=["wall", "process"],
                   help="clock of --time-budget: wall, or CPU seconds of this process (shared machines)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--force", action="store_true", help="overwrite a run folder that already holds a run")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last saved state (pass the same arguments)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the per-step metrics and epoch evaluations to RUN_DIR/tensorboard "
                        "(pip install 'advgen[tensorboard]')")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also save the whole training state every STEPS steps (it is always saved at epoch ends)")
    sp = p.add_argument_group("speed (benchmarks/README.md)")
    sp.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                    help="NHWC memory layout of the classifier and batches (auto: on for the CPU)")
    sp.add_argument("--compile", action="store_true",
                    help="torch.compile the training forward (CPU: needs a C++ compiler)")
    sp.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                    help="of the training forward passes (autocast; fp16 with a gradient scaler); auto is fp32 "
                         "until the bf16 A/B decides; evaluation runs in fp32 (docs/gpu-and-precision.md)")
    sp.add_argument("--amp", action="store_true", help="deprecated: --precision bf16 (fp16 on GPUs without bf16)")
    sp.add_argument("--sync-bn", action="store_true",
                    help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    sp.add_argument("--fold-bn-attack", type=_bool, default=d.fold_bn_attack,
                    help="minmax/fgsm/nfgsm/trades: attack a BatchNorm-folded copy of the classifier (same function)")
    mm = p.add_argument_group("attack methods (minmax, fgsm, nfgsm, free, trades)")
    mm.add_argument("--attack-norm", default=a.norm, choices=["l2", "linf"])
    mm.add_argument("--attack-eps", type=_number, help="radius in [0,1] pixel units (default: 0.05 for l2, 8/255 for linf)")
    mm.add_argument("--attack-steps", type=int,
                    help=f"PGD steps of minmax (default {a.steps}) and trades (default {TradesOptions().steps})")
    mm.add_argument("--attack-step-size", type=_number,
                    help="step size (default: minmax 2.5 * eps / steps; trades 2 * eps / steps; nfgsm and free eps)")
    peers = p.add_argument_group("fast-AT peers (nfgsm, free, trades)")
    peers.add_argument("--nfgsm-k", type=_number, default=NFGSMOptions().k,
                       help="N-FGSM noise radius in units of eps: uniform in the k*eps ball")
    peers.add_argument("--free-replays", type=int, default=FreeOptions().replays,
                       help="Free-AT: m replays (classifier updates) per batch; an epoch costs m passes per batch")
    peers.add_argument("--trades-beta", type=float, default=TradesOptions().beta,
                       help="TRADES: weight of KL(f(x) || f(x')) beside CE(f(x), y)")
    gen = p.add_argument_group("generator (each flag overrides --gen-preset)")
    gen.add_argument("--gen-preset", default="paper", choices=GENERATOR_PRESETS,
                     help="paper: Jung 2024 (box s=0.2, SGD 0.005); gradient: advgen's recommendation "
                          "(input gradient + grad skip, L2 bound 0.5, Adam 1e-3)")
    gen.add_argument("--generators", type=int, help="number of generator networks N")
    gen.add_argument("--gen-bound", type=_number, help="s: the bound size in [0,1] pixel units")
    gen.add_argument("--gen-bound-type", choices=BOUNDS, help="box: eq. (3); l2: s*psi/||psi||_2; linf: s*tanh(psi)")
    gen.add_argument("--gen-depth", type=int)
    gen.add_argument("--gen-width", type=int)
    gen.add_argument("--gen-residual", type=_bool, help="phi(x) = x + psi(x) (true) or psi(x)")
    gen.add_argument("--gen-grad-input", type=_bool,
                     help="phi also sees the input gradient (one extra forward+backward per step)")
    gen.add_argument("--gen-grad-skip", type=_bool,
                     help="with --gen-grad-input: psi = gradient + net, so the bank starts as the FGSM step")
    gen.add_argument("--gen-assign", choices=ASSIGNMENTS)
    gen.add_argument("--gen-lr", type=float)
    gen.add_argument("--gen-optimizer", choices=["sgd", "adam"])
    gen.add_argument("--gen-momentum", type=float)
    gen.add_argument("--gen-steps", type=int, help="generator ascent steps per classifier step")
    gen.add_argument("--gen-warmup", type=float, help="epochs of linear warm-up of s")
    gen.add_argument("--gen-reinit-every", type=int)
    gen.add_argument("--clean-fraction", type=float)
    gen.add_argument("--gen-recursions", type=int, help="K: apply the bank K times, each on its own output and "
                     "the gradient there (needs --gen-grad-input; K gradient evaluations)")
    gen.add_argument("--gen-step-after", type=_bool, help="a gradient step from the bank's output, projected onto "
                     "the bound: the bank learns the start of the step (FGSM-SDI style; one more gradient)")
    gen.add_argument("--gen-step-size", type=_number, help="size of that step (default: the bound s)")
    gen.add_argument("--gen-memory", type=_bool, help="keep each sample's last perturbation (float16 on the device, "
                     "about 6 KB per CIFAR image) and show it to the bank (FGSM-PGI style; no extra pass)")
    gen.add_argument("--gen-start", choices=STARTS, help="memory: the control without the network, one gradient "
                     "step from each sample's previous perturbation (needs --gen-memory, --gen-step-after)")


# library config fields whose flag is not "--" + the field with dashes (the peers' own fields follow that
# rule: nfgsm.k -> --nfgsm-k, free.replays -> --free-replays, trades.beta -> --trades-beta; their norm,
# eps, steps and step size are attack.* fields, reported as the --attack-* flags they come from)
FLAGS = {"attack.norm": "--attack-norm", "attack.eps": "--attack-eps", "attack.steps": "--attack-steps",
         "attack.step_size": "--attack-step-size", "bank.n": "--generators", "bank.size": "--gen-bound",
         "bank.bound": "--gen-bound-type", "bank.depth": "--gen-depth", "bank.width": "--gen-width",
         "bank.assign": "--gen-assign", "bank.grad_skip": "--gen-grad-skip", "bank.grad_input": "--gen-grad-input",
         "generator.optimizer": "--gen-optimizer", "generator.lr": "--gen-lr", "generator.momentum": "--gen-momentum",
         "generator.steps": "--gen-steps", "generator.clean_fraction": "--clean-fraction",
         "generator.warmup_epochs": "--gen-warmup", "generator.reinit_every": "--gen-reinit-every",
         "generator.recursions": "--gen-recursions", "generator.step_size": "--gen-step-size",
         "generator.step_after": "--gen-step-after", "generator.memory": "--gen-memory", "generator.start": "--gen-start",
         "checkpoint_every": "--checkpoint-every"}


def flag_of(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-").replace(".", "-"))


def _generator_options(args) -> GeneratorOptions:
    gen = generator_preset(args.gen_preset)
    for flag, name in (("generators", "n"), ("gen_bound", "size"), ("gen_bound_type", "bound"),
                       ("gen_depth", "depth"), ("gen_width", "width"), ("gen_residual", "residual"),
                       ("gen_grad_input", "grad_input"), ("gen_grad_skip", "grad_skip"), ("gen_assign", "assign")):
        if getattr(args, flag) is not None:
            setattr(gen.bank, name, getattr(args, flag))
    for flag, name in (("gen_lr", "lr"), ("gen_optimizer", "optimizer"), ("gen_momentum", "momentum"),
                       ("gen_steps", "steps"), ("gen_warmup", "warmup_epochs"), ("gen_reinit_every", "reinit_every"),
                       ("clean_fraction", "clean_fraction"), ("gen_recursions", "recursions"),
                       ("gen_step_after", "step_after"), ("gen_step_size", "step_size"), ("gen_memory", "memory"),
                       ("gen_start", "start")):
        if getattr(args, flag) is not None:
            setattr(gen, name, getattr(args, flag))
    return gen


def method_options(args):
    """The typed options of --method from its flag group (flags of other methods are ignored)."""
    kind = METHODS[args.method].options
    if kind is GeneratorOptions:
        return _generator_options(args)
    threat = {"norm": args.attack_norm, "eps": args.attack_eps}
    steps = {} if args.attack_steps is None else {"steps": args.attack_steps}
    if kind is AttackConfig:
        return AttackConfig(**threat, **steps, step_size=args.attack_step_size)
    if kind is NFGSMOptions:
        return NFGSMOptions(**threat, k=args.nfgsm_k, step_size=args.attack_step_size)
    if kind is FreeOptions:
        return FreeOptions(**threat, replays=args.free_replays, step_size=args.attack_step_size)
    if kind is TradesOptions:
        return TradesOptions(**threat, **steps, step_size=args.attack_step_size, beta=args.trades_beta)
    if kind is NoOptions:
        return NoOptions()
    raise UserError(f"--method {args.method}: the command line has no flags for its options ({kind.__name__}); "
                    "train it through the Python API")


def _precision(args) -> str:
    """--precision, or what the deprecated --amp meant on --device (bf16, fp16 on a GPU without bf16)."""
    if not args.amp:
        return args.precision
    check(args.precision == "auto", "give --precision or the deprecated --amp, not both")
    alias = amp_alias(resolve_device(args.device))
    log.warning("--amp is deprecated: it means --precision %s here; pass --precision", alias)
    return alias


def train_config_from_args(args) -> TrainConfig:
    watch = args.watch_subset if args.watch_subset is not None else (256 if args.method == "fgsm" else 0)
    cfg = TrainConfig(method=args.method, options=method_options(args), model=args.model, dataset=args.dataset,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
                      train_subset=args.train_subset, test_subset=args.test_subset, watch_subset=watch,
                      watch_norm=args.watch_norm, watch_eps=args.watch_eps, init=args.init,
                      time_budget=args.time_budget, budget_clock=args.budget_clock, budget_steps=args.budget_steps,
                      channels_last={"auto": None, "true": True, "false": False}[args.channels_last],
                      compile=args.compile, precision=_precision(args), fold_bn_attack=args.fold_bn_attack,
                      sync_bn=args.sync_bn)
    cfg.validate()
    return cfg


def load_data(args, train: bool = True, dist=None):
    """The data of --dataset; under torchrun (dist) the download is made once per node (fetch_once)."""
    from .data import load_subsets
    if dist is not None and dist.active:
        fetch_once(args, dist)
    return load_subsets(args.dataset, args.data_dir, download=args.download, test_subset=args.test_subset,
                        train_subset=args.train_subset if train else None, seed=args.seed)


def fetch_once(args, dist) -> None:
    """Local rank 0 of each node fetches the data if they are missing while the node's other ranks wait
    (a patient barrier: a download outlasts the collective timeout); a failure on any rank fails all."""
    from .data import fetch
    error = None
    if dist.local_rank == 0:
        try:
            fetch(args.dataset, args.data_dir, download=args.download)
        except UserError as e:
            error = e
    dist.barrier(patient=True)
    if dist.agree(error is not None)[0]:
        raise error or UserError("the data could not be fetched on another node (its error says why)")


def claim_run_dir(out: Path, force: bool, resume: bool = False) -> None:
    """Refuse a folder that already holds a run (finished or started), unless --resume or --force: a
    result is never overwritten by accident. Checked before the data are loaded."""
    from .checkpoint import check_writable
    from .training.rundir import check_run_dir
    check_run_dir(out, resume=resume, force=force)
    if resume and not out.is_dir():
        raise UserError(f"--resume: {out} does not exist; there is no run to resume")
    check_writable(out)


@contextlib.contextmanager
def distributed_job(device_name: str):
    """Under torchrun: join the job (training/distributed.py), quiet the logs of ranks other than 0,
    and leave the process group at the end. Yields (dist, device)."""
    from .training import distributed
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
    from .training import train
    from .training.distributed import rank_seed
    from .training.rundir import hold_run_dir
    cfg = train_config_from_args(args)
    check(args.checkpoint_every is None or args.checkpoint_every >= 1,
          f"--checkpoint-every must be >= 1 step, got {args.checkpoint_every}")   # before the data load
    out = Path(args.out)
    if cfg.init is not None and not args.resume:
        from .checkpoint import resolve_model_file
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
        train_set, test_set = load_data(args, dist=dist)
        model, record = train(cfg, train_set, test_set, out_dir=out, device=device, resume=args.resume,
                              force=args.force, checkpoint_every=args.checkpoint_every,
                              tensorboard=args.tensorboard, dist=dist, data_on=args.data_on)
        rows = record["epochs"]
        if dist.main:
            print(f"{cfg.method}: {len(rows)} epochs, {sum(r['seconds'] for r in rows) / len(rows):.1f} s/epoch, "
                  f"test accuracy {100 * rows[-1]['test_acc']:.2f}% -> {out}"
                  + (f" ({dist.world} processes)" if dist.active else ""))
    return 0


def load_eval_model(args, device: torch.device, dist=None):
    """(model, test set) for `advgen eval`. An advgen checkpoint is read before the data (it names its
    own classes and normalization); a foreign file after them: it gets the data's class and channel
    counts and --normalize (default: the data's own statistics) in front of it."""
    from .checkpoint import (FOREIGN_SUFFIXES, load_model, model_from_foreign_state, read_foreign_state,
                             resolve_model_file)
    from .data import normalization_for
    from .models.normalize import parse_stats
    if resolve_model_file(args.model_path).suffix.lower() not in FOREIGN_SUFFIXES:
        check(args.normalize is None, "--normalize applies to foreign .pt/.pth/.th/.tar files only; advgen "
                                      "checkpoints carry their own normalization")
        model = load_model(args.model_path, model_name=args.model, device=device)
        return model, load_data(args, train=False, dist=dist)[1]
    path = resolve_model_file(args.model_path)
    check(args.model is not None, f"{path} is a foreign PyTorch file: name its architecture (--model)")
    state = read_foreign_state(path)                  # a bad file fails before the data are loaded
    test_set = load_data(args, train=False, dist=dist)[1]
    stats = (parse_stats(args.normalize, test_set.channels) if args.normalize is not None
             else normalization_for(test_set))
    log.info("normalization in front of %s: mean %s, std %s", args.model_path,
             ",".join(f"{v:.4g}" for v in stats[0]), ",".join(f"{v:.4g}" for v in stats[1]))
    model = model_from_foreign_state(state, path, args.model, test_set.num_classes, test_set.channels, stats)
    return model.to(device), test_set


EVAL_DEFAULTS = {"eps": [0.0, 0.25, 0.5], "steps": 20, "restarts": 1}
FULL_EVAL_DEFAULTS = {"eps": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0], "steps": 50, "restarts": 2, "rel_step": FULL_REL_STEP}


def _eval_defaults(args) -> None:
    """--eps, --steps, --restarts (and with --full --rel-step) left out: a quick curve, or with --full the
    zoo's full strength."""
    for name, value in (FULL_EVAL_DEFAULTS if args.full else EVAL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.full:
        check(args.attack == "pgd-l2", "--full runs PGD-L2 and the standard AutoAttack-L2 itself: leave --attack out")
        check(args.step_size is None, "--full takes PGD steps relative to eps: give --rel-step, not --step-size")
        check(all(math.isfinite(e) and e >= 0 for e in args.eps + args.aa_eps), "--eps and --aa-eps must be >= 0")


def cmd_eval(args) -> int:
    from .checkpoint import resolve_model_file
    from .evaluate import evaluate
    _eval_defaults(args)
    check(args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    check(args.restarts >= 1, f"--restarts must be >= 1, got {args.restarts}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(0 <= args.seed < 2**32, f"--seed must lie in 0..{2**32 - 1}, got {args.seed}")
    for name in ("step_size", "rel_step"):
        v = getattr(args, name)
        check(v is None or (math.isfinite(v) and v > 0), f"--{name.replace('_', '-')} must be > 0, got {v}")
    if args.out:
        from .checkpoint import check_writable
        check_writable(Path(args.out).parent)  # before the attack runs, not after
    with distributed_job(args.device) as (dist, device):
        seed_everything(args.seed)
        model, test_set = load_eval_model(args, device, dist)
        if args.full:
            check(not dist.active, "--full runs in one process (it is resumable instead: run it again to continue)")
            return _full_eval(args, model, test_set, device)
        kwargs = dict(attack=args.attack, epsilons=args.eps, steps=args.steps, step_size=args.step_size,
                      rel_step=args.rel_step, restarts=args.restarts, batch_size=args.batch_size, seed=args.seed,
                      objective=args.pgd_objective)
        if dist.active:
            from .evaluate_sharded import evaluate_sharded
            result = evaluate_sharded(dist, model, test_set.images, test_set.labels, device, **kwargs)
        else:
            result = evaluate(model, test_set.images.to(device), test_set.labels.to(device), **kwargs)
        if not dist.main:
            return 0
    result["model"] = str(resolve_model_file(args.model_path))
    print(f"{args.attack}, {result['n']} images, {args.steps} steps, {args.restarts} restart(s)" +
          (f" ascending {_turns(args.pgd_objective, args.restarts)}" if args.attack.startswith("pgd") else ""))
    print(f"{'eps':>8}  {'accuracy':>8}")
    for r in result["results"]:
        print(f"{r['eps']:>8g}  {100 * r['accuracy']:>7.2f}%")
    for c in result.get("checks", []):
        print(f"[{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}")
    if args.out:
        from .checkpoint import write_json
        write_json(Path(args.out), result)
    return 0


def _turns(objectives, restarts: int) -> str:
    """The objective of each restart, as PGD takes them in turn: "ce, margin"."""
    return ", ".join(objectives[r % len(objectives)] for r in range(restarts))


def _full_eval(args, model, test_set, device) -> int:
    """advgen eval --full: PGD-L2 + the standard AutoAttack + their worst case, with Wilson intervals;
    resumable through --out (the parts are written there as they finish)."""
    from .evaluate import full_evaluation
    check(args.out is not None, "--full needs --out FILE.json (it is written as the parts finish, and resumed from)")
    result = full_evaluation(model, test_set.images.to(device), test_set.labels.to(device), pgd_eps=args.eps,
                             aa_eps=args.aa_eps, pgd_steps=args.steps, restarts=args.restarts, seed=args.seed,
                             batch_size=args.batch_size, progress_file=Path(args.out), objectives=args.pgd_objective,
                             rel_step=args.rel_step)
    from .checkpoint import resolve_model_file, write_json
    result["model"] = str(args.model_path)
    result["model_file"] = str(resolve_model_file(args.model_path))
    write_json(Path(args.out), result)
    cell = lambda d: f"{100 * d['accuracy']:6.2f}% [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"  # noqa: E731
    print(f"{result['n']} images; PGD-L2 {args.steps} steps x {args.restarts} restarts ascending "
          f"{_turns(args.pgd_objective, args.restarts)}; standard AutoAttack-L2; "
          f"95% Wilson intervals")
    print(f"clean {cell(result['clean'])}")
    for e, d in result["pgd_l2"].items():
        print(f"PGD-L2 {e:>5}  {cell(d)}")
    for e, d in result["autoattack_l2"].items():
        print(f"AA-L2  {e:>5}  {cell(d)}   worst case of both {cell(result['worst_case_l2'][e])}")
    for c in result["checks"]:
        print(f"[{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}")
    print(f"{sum(result['seconds'].values()):.0f} s of attacks in all; results in {args.out}")
    return 0


def cmd_zoo(args) -> int:
    """advgen zoo [--json] [--eps R]: the table (attack columns at radius R) or the cards of the shipped
    models; --add RUN: put a run in the zoo."""
    import json
    from . import zoo
    if args.add:
        from .checkpoint import RUN_FILE, machine_description, read_json
        check(args.name and args.eval, "--add RUN needs --name NAME and --eval EVAL.json (from advgen eval --full)")
        machine = (args.machine or read_json(Path(args.add) / RUN_FILE).get("machine")
                   or f"{machine_description(torch.device('cpu'))} (the machine advgen zoo --add ran on)")
        card = zoo.add(Path(args.add), args.name, read_json(Path(args.eval)), command=args.command,
                       machine=machine, force=args.force, eval_path=args.eval)
        print(f"added {card['name']} to the zoo ({zoo.zoo_dir()}): {card['file']}, sha256 {card['sha256'][:16]}…")
        return 0
    cards = zoo.cards()
    radii = {float(k) for c in cards for key in ("pgd_l2", "autoattack_l2") for k in c.get("eval", {}).get(key, {})}
    check(not cards or args.eps in radii, f"--eps {args.eps:g}: no zoo model was attacked at that L2 radius; "
          f"choose from {', '.join(f'{r:g}' for r in sorted(radii))}")
    print(json.dumps(cards, indent=1) if args.json else zoo.table(cards, eps=args.eps))
    return 0


def cmd_reproduce(args) -> int:
    from .report import PRESETS, reproduce
    check(args.preset in PRESETS, f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    device = resolve_device(args.device)
    kw = dict(data_dir=args.data_dir, download=args.download, device=device)
    if args.seeds:
        from .report import reproduce_seeds
        seed_everything(args.seeds[0])
        path = reproduce_seeds(args.preset, Path(args.out), args.seeds, **kw)
    else:
        seed_everything(PRESETS[args.preset].seed)
        path = reproduce(args.preset, Path(args.out), **kw)
    print(f"report written to {path}")
    return 0


def cmd_compare(args) -> int:
    from .compare import COMPARE_PRESETS, compare
    check(args.preset in COMPARE_PRESETS, f"unknown preset {args.preset!r}; choose from {', '.join(COMPARE_PRESETS)}")
    check(args.jobs >= 1, f"--jobs must be >= 1 (worker processes), got {args.jobs}")
    device = resolve_device(args.device)
    try:   # a list from a --config file has not been through argparse's type=
        names = _device_list(args.devices) if args.devices else []
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--devices: {e}") from None
    devices = [resolve_device(d, "--devices") for d in names] or None
    seed_everything(COMPARE_PRESETS[args.preset].base_seed)
    path = compare(args.preset, Path(args.out), data_dir=args.data_dir, download=args.download, device=device,
                   base=Path(args.base) if args.base else None,
                   entries=args.entries.split(",") if args.entries else None, jobs=args.jobs, devices=devices)
    print(f"comparison written to {path}")
    return 0


def cmd_plot(args) -> int:
    from .checkpoint import check_writable
    from .report import plot_runs
    out = Path(args.out)
    check_writable(out.parent if str(out.parent) else Path("."))
    print(f"training curves written to {plot_runs([Path(r) for r in args.runs], out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="advgen", description="Fast adversarial training with generator networks (Jung 2024).")
    p.add_argument("--version", action="version", version=f"advgen {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier (standard, minmax, fgsm, nfgsm, free, trades, generator)")
    _add_train_args(t)
    _add_data_args(t, train=True)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="robust accuracy curve of a trained model")
    e.add_argument("model_path", metavar="RUN_DIR|MODEL_FILE")
    e.add_argument("--model", metavar="NAME|package.module:factory",
                   help=f"architecture of a foreign .pt/.pth/.th/.tar file ({', '.join(sorted(MODELS))}, or your own)")
    e.add_argument("--normalize", metavar="cifar10|cifar100|imagenet|none|MEAN/STD",
                   help="what goes in front of a foreign model: named statistics, none, or per-channel comma "
                        "lists MEAN/STD, e.g. 0.5,0.5,0.5/0.25,0.25,0.25 (default: the dataset's statistics)")
    e.add_argument("--attack", default="pgd-l2", choices=ATTACKS)
    e.add_argument("--eps", type=_floats, help="comma-separated radii, [0,1] pixel units "
                                                "(default 0,0.25,0.5; with --full 0,0.1,0.25,0.5,0.75,1)")
    e.add_argument("--steps", type=int, help="attack steps (default 20; with --full 50)")
    step = e.add_mutually_exclusive_group()
    step.add_argument("--step-size", type=_number, help="absolute PGD step size")
    step.add_argument("--rel-step", type=float, help="PGD step size as a fraction of eps (default 2.5/steps; "
                                                      f"with --full {FULL_REL_STEP:g})")
    e.add_argument("--restarts", type=int, help="random restarts, each sample's worst case kept (default 1; with --full 2)")
    e.add_argument("--pgd-objective", type=_objectives, default="ce,margin", metavar="ce|margin|ce,margin",
                   help="what PGD's restarts ascend, in turn (ce,margin: cross-entropy, then the margin loss; "
                        "with one restart, cross-entropy only)")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--full", action="store_true",
                   help="the zoo's full-strength L2 evaluation: PGD (--steps, --restarts) at --eps, the standard "
                        "AutoAttack at --aa-eps, their per-sample worst case, Wilson 95%% intervals (resumable via --out)")
    e.add_argument("--aa-eps", type=_floats, default=[0.25, 0.5], help="AutoAttack radii of --full")
    _add_data_args(e, train=False)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("reproduce", help="the paper's Table 1 and Figures 2-3")
    r.add_argument("--preset", default="quick")
    r.add_argument("--out", required=True)
    r.add_argument("--seeds", type=_ints, default=None, metavar="S1,S2,...",
                   help="one reproduction per seed in OUT/seed-S, and a report of the mean ± std over them")
    r.add_argument("--data-dir")
    r.add_argument("--download", action="store_true")
    r.add_argument("--device", default="auto", type=_device_name, metavar="auto|cpu|cuda|cuda:N|mps",
                   help="cuda under torchrun: each process takes cuda:LOCAL_RANK")
    r.set_defaults(func=cmd_reproduce)

    c = sub.add_parser("compare", help="every method from one base at several budgets and seeds: curves "
                                       "(PGD + AutoAttack)")
    c.add_argument("--preset", default="quick")
    c.add_argument("--out", required=True)
    c.add_argument("--base", help="an existing base run folder to start from (default: train one in OUT/base)")
    c.add_argument("--entries", help="comma-separated entries of the preset to run (default: all); the report "
                                     "covers every entry already run in OUT")
    c.add_argument("--data-dir")
    c.add_argument("--download", action="store_true")
    c.add_argument("--device", default="auto", type=_device_name, metavar="auto|cpu|cuda|cuda:N|mps",
                   help="where the base is trained and evaluated (and the runs, without --devices)")
    c.add_argument("--jobs", type=int, default=1,
                   help="worker processes training and evaluating the (entry, seed) runs at once, each with "
                        "CPUs / N threads and its output in RUN_DIR/compare.log; 1: one after the other here")
    c.add_argument("--devices", type=_device_list, metavar="DEVICE,...",
                   help="devices of the workers, round-robin (e.g. cuda:0,cuda:1; default: --device)")
    c.set_defaults(func=cmd_compare)
    z = sub.add_parser("zoo", help="the models that ship with advgen (load one as zoo:NAME)")
    z.add_argument("--json", action="store_true", help="print the list of cards")
    z.add_argument("--eps", type=float, default=0.5,
                   help="the L2 radius of the table's attack columns (default 0.5; the zoo's AutoAttack ran at "
                        "0.25 and 0.5)")
    z.add_argument("--add", metavar="RUN_DIR", help="add a finished run to the zoo (with --name, --eval)")
    z.add_argument("--name")
    z.add_argument("--eval", metavar="EVAL.json", help="its advgen eval --full output")
    z.add_argument("--command", help="the command that trained it (default: the one RUN_DIR/log.txt records)")
    z.add_argument("--machine", help="where it was trained (default: this machine)")
    z.add_argument("--force", action="store_true", help="replace a zoo model of that name")
    z.set_defaults(func=cmd_zoo)
    pl = sub.add_parser("plot", help="training curves of runs (loss, accuracy, PGD-watch accuracy) to a PNG")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", default="curves.png", help="the PNG to write")
    pl.set_defaults(func=cmd_plot)
    for command in sub.choices.values():
        command.add_argument("--config", metavar="FILE.toml",
                             help="settings from a TOML file (option names as keys); the command line overrides them")
    return p


def _resume_hint(argv: list[str]) -> str:
    """How to continue a stopped command: train gets --resume (instead of --force); reproduce resumes as is."""
    if argv and argv[0] == "train":
        argv = [a for a in argv if a != "--force"] + ([] if "--resume" in argv else ["--resume"])
    return "advgen " + shlex.join(argv)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM while training: the loop finishes its step, saves and raises Interrupted (through
    the library's STOP flag); outside the training steps, or at a second signal, Interrupted at once."""
    def handler(signum, frame):
        if STOP.request(signum):
            log.warning("%s received: finishing the current step, then saving", signal.Signals(signum).name)
            return
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}", saved=False)

    STOP.reset()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STOP.reset()


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """--config FILE.toml: its keys (option names, with - or _) become the subcommand's defaults, so the
    command line overrides them. Unknown keys and unreadable files are errors (exit 2)."""
    if "--config" not in argv:
        return
    i = argv.index("--config")
    check(i + 1 < len(argv), "--config needs a TOML file")
    path = Path(argv[i + 1])
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UserError("--config needs Python 3.11 or later (tomllib)") from None
    try:
        values = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path} is not valid TOML ({e})") from None
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = next((a for a in argv if a in sub.choices), None) if sub else None
    check(command is not None, "--config goes after a command (advgen train --config FILE.toml)")
    target = sub.choices[command]
    dests = {a.dest for a in target._actions}
    settings = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in settings if k not in dests or k in ("config", "help"))
    check(not unknown, f"--config {path}: unknown settings for advgen {command}: {', '.join(unknown)}")
    for action in target._actions:  # a required option given in the file is no longer required
        if action.dest in settings:
            action.required = False
    target.set_defaults(**settings)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        apply_config_file(parser, argv)
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a bad argument (2, one line printed)
        return int(e.code or 0)
    except UserError as e:
        sys.stderr.write(f"advgen: error: {' '.join(str(e).split())}\n")
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    stoppable = args.command in ("train", "reproduce", "compare")
    try:
        with stop_on_signals() if stoppable else contextlib.nullcontext():
            return args.func(args)
    except ConfigError as e:
        sys.stderr.write(f"advgen: error: {flag_of(e.field)} {' '.join(e.problem.split())}\n")
        return 2
    except UserError as e:
        sys.stderr.write(f"advgen: error: {' '.join(str(e).split())}\n")
        return 2
    except WorkersFailed as e:   # each line names a failed job and its log; the others' results are kept
        for line in e.failures:
            sys.stderr.write(f"advgen: error: {' '.join(line.split())}\n")
        sys.stderr.write(f"advgen: {e.done} other job(s) finished and are reused when the command runs again: "
                         f"{_resume_hint(argv)}\n")
        return 1
    except Interrupted as e:
        if stoppable:
            what = "resume with" if e.saved else "the last saved state is kept; resume with"
            sys.stderr.write(f"advgen: {e}; {what}: {_resume_hint(argv)}\n")
        else:
            sys.stderr.write(f"advgen: {e}\n")
        return 128 + e.signum
    except KeyboardInterrupt:
        sys.stderr.write("advgen: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
