"""Numeric precision of training: what `--precision auto|fp32|bf16|fp16` means on a device.

Training may run its forward passes under autocast (bf16 or fp16; fp16 with a GradScaler); evaluation
(the epoch-end test accuracy and PGD watch, `advgen eval`, AutoAttack, the sanity checks) runs in fp32.

`auto` is fp32 on every device for now: bf16 halves a training step only where the hardware computes
in bf16 natively (CUDA GPUs with bf16, CPUs with avx512_bf16 or amx_bf16), and whether it trains as
robust a model as fp32 has not been measured (the bf16-vs-fp32 accuracy A/B; docs/gpu-and-precision.md).
The detection below is recorded with every run, so the A/B's machines are known when it is run.

On an AVX2-only CPU bf16 is emulated: a ResNet-20 training step of 128 images took 6.2 s in bf16
against 0.60 s in fp32 (AMD EPYC, one thread).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs that compute in bf16 natively (AVX512-BF16 dot products, AMX tiles)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
EVALUATION = "fp32"   # what every evaluation runs in


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of a /proc/cpuinfo text (the union over its "flags" lines; x86 Linux)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Whether a CPU with this /proc/cpuinfo text computes bf16 natively (avx512_bf16 or amx_bf16)."""
    return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (macOS, Windows: then no native bf16 is assumed)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> bool | None:
    """Whether `device` computes bf16 natively: True / False, None where unknown (MPS and others)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16(read_cpuinfo() if cpuinfo is None else cpuinfo)
    return None


def amp_alias(device: torch.device) -> str:
    """What the deprecated --amp means on `device`, as before --precision: bf16, or fp16 on a CUDA GPU
    without bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp16"
    return "bf16"


def legacy_training_precision(config: dict, device: torch.device | None = None) -> str:
    """The precision a run made before --precision trained in, from its config's `amp` (fp32 without
    it; with it bf16, or fp16 where amp_alias says so on `device`)."""
    if not config.get("amp"):
        return "fp32"
    return "bf16" if device is None else amp_alias(device)


def run_precision(record: dict) -> dict:
    """A run record's precision ({"requested", "training", "evaluation", "reason"}; for a record made
    before --precision, derived from its config's amp)."""
    if record.get("precision"):
        return record["precision"]
    return {"training": legacy_training_precision(record.get("config") or {}), "evaluation": EVALUATION,
            "reason": "recorded before --precision: from the config's amp"}


def training_precision(record: dict) -> str:
    """fp32 | bf16 | fp16: what a run record's training ran in."""
    return run_precision(record)["training"]


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `requested` (auto|fp32|bf16|fp16), `training` (fp32|bf16|fp16, what the
    training forward passes run in) and `reason` (one line, recorded in run.json)."""

    requested: str
    training: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.training]

    @property
    def autocast_on(self) -> bool:
        return self.training != "fp32"

    @property
    def scaled(self) -> bool:
        """fp16 needs a GradScaler (its 5 exponent bits underflow small gradients); bf16 does not."""
        return self.training == "fp16"

    def autocast(self, device: torch.device):
        """The context of a training step's forward passes."""
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.autocast_on)

    def record(self) -> dict:
        return {"requested": self.requested, "training": self.training, "evaluation": EVALUATION,
                "reason": self.reason}


def tf32_note(device: torch.device) -> str:
    """'; fp32 convolutions in TF32 ...' on a CUDA device where PyTorch lets cuDNN use TF32 (its default
    for convolutions: 10 mantissa bits, not fp32's 23), else ''. Recorded, never changed here: the user's
    torch.backends setting is theirs."""
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "; fp32 convolutions run in TF32 (torch.backends.cudnn.allow_tf32, PyTorch's default)"
    return ""


def _device_words(device: torch.device) -> str:
    return {"cuda": "GPU", "cpu": "CPU"}.get(device.type, device.type)


def resolve(requested: str, device: torch.device, cpuinfo: str | None = None) -> Precision:
    """The Precision `requested` means on `device` (cpuinfo: the /proc/cpuinfo text, read if None)."""
    if requested not in PRECISIONS:
        raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    native = native_bf16(device, cpuinfo)
    has = {True: "yes", False: "no", None: "unknown"}[native]
    if requested == "auto":
        return Precision("auto", "fp32", f"auto: fp32 until the bf16 A/B decides; this {_device_words(device)} "
                                         f"has native bf16: {has}{tf32_note(device)}")
    return Precision(requested, requested,
                     f"requested; this {_device_words(device)} has native bf16: {has}{tf32_note(device)}")


def check_available(p: Precision, device: torch.device, cpuinfo: str | None = None) -> None:
    """ConfigError where `p` cannot train on `device`; a warning where it runs but slowly."""
    if not p.autocast_on:
        return
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError("precision", f"{p.training}: autocast is not available on {device.type}")
    if p.training == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ConfigError("precision", f"bf16: this GPU ({torch.cuda.get_device_name(device)}) has no native bf16 "
                                       "(it would be emulated, slowly); use fp16 or fp32")
    if device.type == "cpu" and p.training == "bf16" and not native_bf16(device, cpuinfo):
        log.warning("precision bf16 on a CPU without avx512_bf16 or amx_bf16: emulated, about 10x slower than "
                    "fp32 (a ResNet-20 step of 128 images: 6.2 s against 0.60 s on an AVX2 EPYC)")
    if device.type == "cpu" and p.training == "fp16":
        log.warning("precision fp16 on a CPU: emulated, far slower than fp32 (for tests of the fp16 path)")


def evaluation_note(device: torch.device) -> str:
    """What an evaluation on `device` runs in: fp32, unless the caller runs it inside an autocast of its
    own (then that autocast's dtype, named as the caller's choice)."""
    if torch.is_autocast_enabled(device.type):
        dtype = str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
        return f"{dtype} (the caller's autocast)"
    return EVALUATION + tf32_note(device)


@contextlib.contextmanager
def full_precision(device: torch.device):
    """Autocast off on `device` for the block: passes in the inputs' and weights' own dtype (fp32)."""
    with torch.autocast(device.type, enabled=False):
        yield
