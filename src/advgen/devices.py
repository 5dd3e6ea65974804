"""Device names as advgen keeps them: indexed, so that a device compares equal to where tensors report
they are, and scoped, so that CUDA work without an explicit device lands on the run's GPU.

torch.device("cuda") is not equal to torch.device("cuda", 0), yet a tensor moved with .to("cuda")
reports cuda:0: code that asks "are the data already on the device?" with an index-less device gets
"no" for data that are. Entry points (the CLI's --device, train()) therefore resolve an index-less
device once, with `indexed`.
"""
from __future__ import annotations

import contextlib

import torch


def indexed(device: str | torch.device) -> torch.device:
    """`device` with its index: "cuda" -> cuda:<the current CUDA device>, "mps" -> mps:0; a CPU device and
    an indexed device are returned as they are."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None:
        return device
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device.type, 0)


def scope(device: torch.device):
    """A context in which `device` is the current CUDA device (torch.cuda.device), restored after: CUDA
    events, streams and new tensors without a device then go to it. Nothing elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
