"""The resumable training state: one safetensors file, tensors in the body, everything else as JSON.

Each part of a run (classifier, optimizer, schedule, method, metrics, data position, RNGs) hands over
a state_dict of nested dicts and lists of tensors, numbers, strings and None; `pack` splits such a tree
into named tensors and a JSON skeleton that points at them, `unpack` rebuilds it. Nothing is pickled.
The file is written atomically (checkpoint.atomic_write), so a kill at any instant leaves the previous
good state.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..io import read_tensors, save_tensors
from ..errors import CheckpointError

STATE_FORMAT = "advgen-train-state/2"


def pack(tree, prefix: str, tensors: dict[str, torch.Tensor]):
    """JSON skeleton of `tree`; its tensors go into `tensors` under keys derived from `prefix`."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {"$t": prefix}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in tree):
            return {k: pack(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
        # optimizers key their per-parameter state by int
        return {"$d": [[k, pack(v, f"{prefix}.{i}", tensors)] for i, (k, v) in enumerate(tree.items())]}
    if isinstance(tree, (list, tuple)):
        items = [pack(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
        return {"$tuple": items} if isinstance(tree, tuple) else items
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"{prefix}: a state holds tensors, numbers, strings, lists and dicts, not {type(tree).__name__}")


def unpack(skeleton, tensors: dict[str, torch.Tensor]):
    """The inverse of pack."""
    if isinstance(skeleton, dict):
        if "$t" in skeleton:
            return tensors[skeleton["$t"]]
        if "$d" in skeleton:
            return {k: unpack(v, tensors) for k, v in skeleton["$d"]}
        if "$tuple" in skeleton:
            return tuple(unpack(v, tensors) for v in skeleton["$tuple"])
        return {k: unpack(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    return skeleton


def rng_state(device: torch.device) -> dict:
    """Every global RNG a run draws from: torch (CPU, and the CUDA generator of this process's device
    alone: the other GPUs belong to other ranks), numpy, python."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state's RNGs; the CUDA one onto this process's device, whichever index it has now (a
    job of 1 node x 8 GPUs may resume as 2 x 4: rank 5 was on cuda:5, is on cuda:1)."""
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if device.type == "cuda":
        cuda = _cuda_state(state, device)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    torch.set_rng_state(state["torch"])


def _cuda_state(state: dict, device: torch.device) -> torch.Tensor | None:
    """This device's saved CUDA RNG state. States written before advgen saved one device's hold every
    visible GPU's ("cuda", a list): the entry of this device's index where there is one (exact when the
    rank runs on the GPU index it had), else none restored (the CUDA RNG then goes on from its seed)."""
    if "cuda_device" in state:
        return state["cuda_device"]
    old = state.get("cuda") or []
    index = device.index or 0
    return old[index] if index < len(old) else None


def write_state(path: Path, state: dict, header: dict) -> None:
    """Write `state` (a tree for pack) with `header` (plain JSON: position, config) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, "s", tensors)
    save_tensors(path, tensors, {"format": STATE_FORMAT, **header, "state": skeleton})


def read_state(path: Path) -> tuple[dict, dict]:
    """-> (state tree, header); CheckpointError if the file is not a training state of this format."""
    try:
        tensors, meta = read_tensors(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the run cannot be resumed (--force starts it over)") from None
    fmt = meta.get("format")
    if fmt != STATE_FORMAT:
        older = isinstance(fmt, str) and fmt.startswith("advgen-train-state/")
        hint = (" (written by advgen 0.1: finish it with that version, or --force to start over; its "
                "model.safetensors still loads)" if older else "")
        raise CheckpointError(f"{path} is not an advgen training state of format {STATE_FORMAT!r} "
                              f"(found {fmt!r}){hint}")
    try:
        return unpack(meta.pop("state"), tensors), meta
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
