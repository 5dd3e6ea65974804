"""Files: atomic writes, JSON, safetensors, digests, and the provenance written beside every result.

Every write goes to a temporary file in the same folder, is fsynced and then renamed over the target
(and the folder fsynced), so a crash leaves the old file or the new one, never half. Nothing read here
is ever executed: JSON is parsed, tensors come from safetensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import CheckpointError, UserError


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


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (read in 1 MiB blocks): sha256 for the zoo, md5 for CIFAR archives."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def machine_description(device: torch.device) -> str:
    """The machine a timing was measured on: CPU model, logical CPUs, torch and its threads, GPU, device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return f"{desc}, device {device}"


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
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has malformed advgen metadata (not a JSON object)")
    return tensors, meta


def one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit]


def fingerprint(tensors) -> str:
    """sha256 (hex) of a model's state dict, a dict of tensors or a sequence of tensors: names, dtypes,
    shapes and bytes. It names what an evaluation measured or a run trained on, so that results are never
    resumed or filed under other weights or other images."""
    items = sorted(tensors.state_dict().items()) if isinstance(tensors, nn.Module) else \
        sorted(tensors.items()) if isinstance(tensors, dict) else list(enumerate(tensors))
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
