"""What every command shares: the parser classes, value types, devices, and the flags that method options
declare (flags.option): built from the registry, read back into typed options, named in errors."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import random
import sys
import types
import typing

import numpy as np
import torch

from ..devices import indexed
from ..errors import ConfigError, UserError, check
from ..flags import flagged_fields
from ..training import METHODS

log = logging.getLogger("advgen")


class HelpFormatter(argparse.HelpFormatter):
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


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, **k):
        k.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **k)

    def error(self, message):  # one line and exit 2, like every other user error
        sys.stderr.write(f"advgen: error: {message}\n")
        sys.exit(2)


def number(text) -> float:
    """A float, or a fraction as radii are usually written: "8/255"."""
    if isinstance(text, (int, float)):
        return float(text)
    num, slash, den = str(text).partition("/")
    try:
        return float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


def joined(text) -> str:
    """An option value as the comma-separated text it is on the command line (a --config file gives a list)."""
    return ",".join(str(t) for t in text) if isinstance(text, (list, tuple)) else str(text)


def floats(text) -> list[float]:
    text = joined(text)
    try:
        vals = [number(t) for t in str(text).split(",") if t.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return vals


def objectives(text) -> tuple[str, ...]:
    """PGD objectives for evaluation, comma-separated: "ce", "margin" or "ce,margin"."""
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not names or any(n not in ("ce", "margin") for n in names):
        raise argparse.ArgumentTypeError(f"expected ce, margin or a comma list of them, got {text!r}")
    return names


def ints(text) -> list[int]:
    """Comma-separated distinct non-negative integers: "0,1,2"."""
    text = joined(text)
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return vals


def parse_bool(text: str) -> bool:
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


def device_name(text: str) -> str:
    """--device: auto, cpu, cuda, cuda:N or mps."""
    if text in ("auto", "cpu", "cuda", "mps") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


def device_list(text: str) -> list[str]:
    """--devices: comma-separated --device names (cuda:0,cuda:1); one may repeat (two workers on one GPU)."""
    text = joined(text)
    names = [t.strip() for t in str(text).split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated devices such as cuda:0,cuda:1, got {text!r}")
    for name in names:
        device_name(name)
    return names


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The torch.device of a --device name, with its index (devices.indexed: "cuda" is cuda:N); UserError
    (naming `flag`) where it is not on this machine."""
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


def _setting(text) -> bool:
    """A boolean setting: `--flag` alone is true, `--flag true|false` says which."""
    return parse_bool(str(text))


def add_bool(group, flag: str, *, dest: str | None = None, default=None, help: str = "") -> None:
    """A boolean setting, every one the same way: `--flag` (true) or `--flag true|false`."""
    group.add_argument(flag, dest=dest, nargs="?", const=True, default=default, type=_setting,
                       metavar="true|false", help=help)


def _type_of(annotation) -> type:
    """The base type of an options field's annotation (float | None -> float)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union \
        else annotation


def option_flags() -> dict[str, list[tuple[str, str, dataclasses.Field, type]]]:
    """flag -> [(method, config path, field, type)] over every registered method's options class."""
    out: dict[str, list] = {}
    for method, spec in sorted(METHODS.items()):
        if dataclasses.is_dataclass(spec.options):
            for path, f, t in flagged_fields(spec.options):
                out.setdefault(f.metadata["flag"], []).append((method, path, f, t))
    return out


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag for each distinct flag that the methods' options declare, in a group per method (the
    first method that declares it); every default is "not given", so a recipe's or the options' own
    default holds unless the flag is given."""
    groups = {}
    for flag, uses in option_flags().items():
        methods = sorted({m for m, *_ in uses})
        _, path, f, t = uses[0]
        key = ", ".join(methods)
        if key not in groups:
            groups[key] = parser.add_argument_group(f"options of --method {key}")
        g = groups[key]
        helps = [u[2].metadata["help"] for u in uses if u[2].metadata["help"]]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = (helps[0] if helps else "") + ("" if default is None else f" (default: {default})")
        kind = _type_of(t)
        if kind is bool:
            add_bool(g, flag, dest=_dest(flag), help=text)
        else:
            conv = {int: int, float: number, str: str}.get(kind, str)
            g.add_argument(flag, dest=_dest(flag), type=conv, choices=f.metadata.get("choices"), help=text,
                           metavar=None if f.metadata.get("choices") else path.rsplit(".", 1)[-1].upper())


def _set_path(obj, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def options_from_args(method: str, args, base=None):
    """The typed options of `method`: `base` (a recipe's options; default the class's defaults) with every
    flag of that method that was given set on top. A flag given that `method` does not take is an error:
    a setting is never dropped without a word."""
    spec = METHODS[method]
    options = copy.deepcopy(base) if base is not None else spec.options()
    mine = {f.metadata["flag"]: path for path, f, _ in
            (flagged_fields(spec.options) if dataclasses.is_dataclass(spec.options) else [])}
    for flag in option_flags():
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        check(flag in mine, f"{flag} is not an option of --method {method}")
        _set_path(options, mine[flag], value)
    return options


# TrainConfig fields whose flag is not --FIELD
CONFIG_FLAG_NAMES = {"init_normalize": "--normalize"}


def flag_of(field: str, method: str | None = None) -> str:
    """The flag of a config path: "options.eps" of an attack method is --attack-eps; a TrainConfig field
    is --FIELD (dashes for underscores) unless CONFIG_FLAG_NAMES says otherwise."""
    if field in CONFIG_FLAG_NAMES:
        return CONFIG_FLAG_NAMES[field]
    if field.startswith("options.") and method in METHODS and dataclasses.is_dataclass(METHODS[method].options):
        for path, f, _ in flagged_fields(METHODS[method].options, "options."):
            if path == field:
                return f.metadata["flag"]
    return "--" + field.replace("_", "-").replace(".", "-")


def config_error_line(e: ConfigError, method: str | None = None) -> str:
    """A config error as the CLI says it: the flag, the config path, the problem."""
    flag = flag_of(e.field, method)
    return f"{flag} {' '.join(e.problem.split())} (config: {e.field})"


def add_data_args(p: argparse.ArgumentParser, train: bool) -> None:
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
    p.add_argument("--device", default="auto", type=device_name, metavar="auto|cpu|cuda|cuda:N|mps",
                   help="cuda under torchrun: each process takes cuda:LOCAL_RANK")


def load_data(args, train: bool = True, dist=None):
    """(train set, test set) as the data flags say; the training subset is drawn with --seed. Under
    torchrun (dist) the download is made once per node (fetch_once)."""
    from ..data import load_subsets
    if dist is not None and dist.active:
        fetch_once(args, dist)
    return load_subsets(args.dataset, args.data_dir, download=args.download, test_subset=args.test_subset,
                        train_subset=getattr(args, "train_subset", None) if train else None,
                        seed=getattr(args, "seed", None) or 0)


def fetch_once(args, dist) -> None:
    """Local rank 0 of each node fetches the data if they are missing while the node's other ranks wait
    (a patient barrier: a download outlasts the collective timeout); a failure on any rank fails all."""
    from ..data import fetch
    error = None
    if dist.local_rank == 0:
        try:
            fetch(args.dataset, args.data_dir, download=args.download)
        except UserError as e:
            error = e
    dist.barrier(patient=True)
    if dist.agree(error is not None)[0]:
        raise error or UserError("the data could not be fetched on another node (its error says why)")
