"""Checkpoints: tensors in safetensors, everything else in JSON. Loading never unpickles.

A run folder holds model.safetensors (the classifier; its header metadata repeats the model name, so
the file stands alone), run.json (config, per-epoch metrics, version, git commit) and, for the
generator method, generators.safetensors; state.safetensors holds the whole training state for
`--resume` (tensors, and the rest as JSON in its header, so the two can never come from different
steps). Every write goes to a temporary file in the same folder, is fsynced and then renamed over the
target (and the folder fsynced), so a crash leaves the old file or the new one, never half.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import CheckpointError, UserError

MODEL_FILE = "model.safetensors"
GENERATORS_FILE = "generators.safetensors"
RUN_FILE = "run.json"
STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.csv"
RUN_FILES = (STATE_FILE, RUN_FILE, MODEL_FILE, GENERATORS_FILE, METRICS_FILE)   # what makes a folder hold a run


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to path atomically (temp file in the same folder, fsync, os.replace)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; give the file the mode open() would
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there, before hours of work go into it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".advgen-probe.", suffix=".tmp") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None


def git_commit() -> str | None:
    """The commit of the advgen source tree, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def save_tensors(path: Path, module_or_state, metadata: dict | None = None) -> None:
    """Save a module's state dict (or a dict of tensors) as safetensors, with JSON metadata."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"advgen": json.dumps(metadata)} if metadata is not None else None
    atomic_write(path, st_save(tensors, metadata=meta))


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file -> (tensors, advgen metadata dict or {})."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        tensors = st_load(raw)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("advgen", "{}"))
    except (SafetensorError, ValueError, UnicodeDecodeError, TypeError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has malformed advgen metadata (not a JSON object)")
    return tensors, meta


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit]


def save_model(path: Path, model: nn.Module, meta: dict) -> None:
    """Save a classifier; meta must hold "model" (registry name) and "num_classes"."""
    save_tensors(path, model, meta)


def _foreign_state(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch .pt/.pth state dict, read with weights_only=True (no code runs)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # torch raises many types for bad files; all mean "not loadable safely"
        raise CheckpointError(f"{path} is not a loadable weights-only PyTorch file ({type(e).__name__})") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def map_foreign_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a state dict saved without advgen's Normalize layer (keys 'conv1.weight', 'module.…',
    'linear.weight') onto `Sequential(Normalize, net)`: strip 'module.', rename 'linear' -> 'fc',
    prefix '1.'; the normalization buffers keep advgen's CIFAR statistics."""
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith("linear."):
            k = "fc." + k[len("linear."):]
        if k not in own and f"1.{k}" in own:
            k = f"1.{k}"
        out[k] = v
    for k in ("0.mean", "0.std"):
        out.setdefault(k, own[k])
    return out


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise CheckpointError(f"{path} does not fit this architecture ({first[:200]})") from None
    except (TypeError, ValueError) as e:  # e.g. a tensor of another dtype that cannot be copied
        raise CheckpointError(f"{path} does not fit this architecture ({_one_line(e)})") from None


def resolve_model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    return path


def load_model(path: str | Path, *, model_name: str | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a classifier from a run folder or a model file, in eval mode, taking [0, 1] inputs.

    advgen's .safetensors files name their architecture; a foreign .pt/.pth state dict needs
    model_name (and is read with torch.load(weights_only=True) and a key mapping).
    """
    from .models import build_model

    path = resolve_model_file(path)
    if path.suffix in (".pt", ".pth"):
        if model_name is None:
            raise UserError(f"{path} is a foreign PyTorch file: name its architecture (--model)")
        model = build_model(model_name, num_classes or 10)
        load_state(model, map_foreign_keys(_foreign_state(path), model), path)
    else:
        tensors, meta = read_tensors(path)
        name = meta.get("model", model_name)
        if name is None:
            raise CheckpointError(f"{path} does not say which architecture it holds (pass --model)")
        classes = meta.get("num_classes", num_classes or 10)
        from .models import MODELS
        if not isinstance(name, str) or name not in MODELS:
            raise CheckpointError(f"{path} holds an unknown architecture {name!r}; advgen knows "
                                  f"{', '.join(sorted(MODELS))}")
        if type(classes) is not int or not 1 <= classes <= 100_000:
            raise CheckpointError(f"{path} has malformed metadata (num_classes {classes!r})")
        model = build_model(name, classes)
        load_state(model, tensors, path)
    return model.to(device).eval()
