"""How a config field declares its command-line flag, so that a new method's options are one file.

    k: float = option(2.0, "--nfgsm-k", "noise radius in units of eps")

is a dataclass field (default 2.0) whose flag the CLI builds (its type from the annotation, its choices
from `choices`) and names in errors about the field. Several options classes may share a flag (every
attack method's --attack-eps): the CLI adds it once. A field without a flag is set through the API or a
recipe only.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any = dataclasses.MISSING, flag: str | None = None, help: str = "", *,
           choices: tuple | None = None, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its command-line flag, help text and choices (see the module docstring)."""
    meta = {"flag": flag, "help": help, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flagged_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """(config path under `prefix`, field, its class) of every field of dataclass `cls` that declares a
    flag, nested dataclass fields included ("bank.size")."""
    import typing
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += flagged_fields(t, f"{prefix}{f.name}.")
        elif f.metadata.get("flag"):
            out.append((prefix + f.name, f, t))
    return out


def check_types(obj, prefix: str = "") -> None:
    """ConfigError naming the field (`prefix` + its path) when a field of dataclass `obj` does not hold its
    annotated type: int, float (an int is a float here), str, bool, a nested dataclass, or None where the
    annotation allows it. Values read from a file or typed in Python are checked before their ranges."""
    import typing
    from .errors import ConfigError
    names = {int: "an integer", float: "a number", str: "a text", bool: "true or false"}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, t = getattr(obj, f.name), hints[f.name]
        args = typing.get_args(t)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), t) if args else t
        if value is None and optional:
            continue
        if dataclasses.is_dataclass(base):
            if not isinstance(value, base):
                raise ConfigError(prefix + f.name, f"must be a {base.__name__}, got {type(value).__name__}")
            check_types(value, f"{prefix}{f.name}.")
            continue
        if base not in names:
            continue
        ok = (isinstance(value, bool) if base is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
              isinstance(value, int) and not isinstance(value, bool) if base is int else isinstance(value, str))
        if not ok:
            raise ConfigError(prefix + f.name, f"must be {names[base]}, got {value!r}")
