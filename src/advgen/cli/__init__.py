"""The `advgen` command line: a module per command (train, eval, and the applications), built from the
registries of methods, recipes and models. argparse lives in this package and nowhere else.

Exit codes: 0 done; 2 a user error (bad argument or value, missing or corrupt data or checkpoint, an
--out folder that holds a run, a diverged run), shown as one line on stderr; 1 an internal error (with
its traceback), or jobs of `compare --jobs N` that failed (a line for each, naming its log); 130 / 143
stopped by SIGINT / SIGTERM (train, reproduce and compare save their state first and say how to resume).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from .._version import __version__
from ..errors import ConfigError, Interrupted, UserError, WorkersFailed, check
from ..training.control import STOP
from .apps import add_compare, add_plot, add_reproduce, add_zoo
from .args import Parser, config_error_line
from .eval import add_eval_args, cmd_eval
from .export import add_export
from .train import add_train_args, cmd_train

log = logging.getLogger("advgen")

PLUGINS = "ADVGEN_PLUGINS"   # comma-separated modules imported before the arguments are read (their methods)


def import_plugins() -> None:
    """Import the modules named in $ADVGEN_PLUGINS, so that the methods and recipes they register are on
    the command line like advgen's own (a new method is one file). Only modules of the installed
    environment, never the standard library; a failure is one line."""
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS, "").split(","))):
        check(all(part.isidentifier() for part in name.split(".")), f"${PLUGINS}: {name!r} is not a module name")
        check(name.split(".")[0] not in sys.stdlib_module_names, f"${PLUGINS}: {name} is in the standard library")
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or whatever the module raised while importing
            raise UserError(f"${PLUGINS}: cannot import {name} ({type(e).__name__}: {e})") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="advgen", description="Fast adversarial training with generator networks (Jung 2024), "
                                           "min-max and fast-AT peers, and robustness evaluation you can trust.")
    p.add_argument("--version", action="version", version=f"advgen {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("train", help="train a classifier: a recipe (--recipe) or a method (--method)")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="robust accuracy of a trained model: a quick curve, or --full")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    add_reproduce(sub)
    add_compare(sub)
    add_zoo(sub)
    add_export(sub)
    add_plot(sub)
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
    except ImportError:  # Python 3.10: the same parser, packaged (a dependency there)
        import tomli as tomllib
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
    for group in target._mutually_exclusive_groups:   # nor is a required choice (--recipe | --method) it makes
        if any(a.dest in settings for a in group._group_actions):
            group.required = False
    target.set_defaults(**settings)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_plugins()
        parser = build_parser()
        apply_config_file(parser, argv)
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a bad argument (2, one line printed)
        return int(e.code or 0)
    except UserError as e:
        sys.stderr.write(f"advgen: error: {' '.join(str(e).split())}\n")
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    args.command_line = "advgen " + shlex.join(argv)   # what a record names as its command
    stoppable = args.command in ("train", "reproduce", "compare")
    try:
        with stop_on_signals() if stoppable else contextlib.nullcontext():
            return args.func(args)
    except ConfigError as e:
        sys.stderr.write(f"advgen: error: {config_error_line(e, _method_of(args))}\n")
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


def _method_of(args) -> str | None:
    """The training method a command's arguments name (its options' flags name config errors)."""
    if getattr(args, "method", None):
        return args.method
    if getattr(args, "recipe", None):
        from ..recipes import resolve_recipe
        with contextlib.suppress(UserError):
            return resolve_recipe(args.recipe).method
    return None


if __name__ == "__main__":
    sys.exit(main())
