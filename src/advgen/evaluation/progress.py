"""Per-sample results of an evaluation, saved as it goes: a stopped evaluation resumes where it was."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..io import read_json, write_json

log = logging.getLogger(__name__)


def bits(flags: torch.Tensor) -> str:
    """A bool vector as a string of "1" (correct) and "0"."""
    return "".join("1" if f else "0" for f in flags.tolist())


def unbits(text: str) -> torch.Tensor:
    """The inverse of bits()."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


class EvalProgress:
    """The per-sample results of a full evaluation as bit strings, one per part ("pgd:0.5", "aa:0.25",
    ...), written to a JSON file after every chunk of images, so that a stopped evaluation resumes
    where it was (an AutoAttack on 1,000 CPU images takes hours). A file written under other settings,
    another model or other images is refused, never overwritten."""

    def __init__(self, path: Path | None, settings: dict):
        self.path, self.settings, self.parts, self.seconds = path, settings, {}, {}
        if path is not None and Path(path).exists():
            saved = read_json(Path(path))
            if saved.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(saved.get("settings") or {})
                              if (saved.get("settings") or {}).get(k) != settings.get(k))
                raise UserError(f"{path} holds an evaluation with other settings ({', '.join(diff)} differ); "
                                "write to another file, or remove it (advgen eval: --force)")
            self.parts, self.seconds = saved.get("samples", {}), saved.get("seconds", {})

    def save(self) -> None:
        if self.path is not None:
            write_json(Path(self.path), {"settings": self.settings, "samples": self.parts, "seconds": self.seconds})

    def flags(self, key: str, n: int, chunk: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """Per-sample bits of part `key` for samples 0..n-1; compute(start, stop) gives those of a chunk
        of at most `chunk` samples (the chunks are the same on every run, hence the same random starts)."""
        done = self.parts.get(key, "")
        while len(done) < n:
            start, t0 = len(done), time.perf_counter()
            done += bits(compute(start, min(n, start + chunk)).cpu())
            self.parts[key] = done
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
            self.save()
            # a line per chunk: a long evaluation says where it is also when no terminal shows a bar
            log.info("%s: %d of %d images, %.0f s", key, len(done), n, self.seconds[key])
        return unbits(done[:n])
