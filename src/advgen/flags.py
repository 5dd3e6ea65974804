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
