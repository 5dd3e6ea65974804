"""A tiny CIFAR-10 in the official python layout (protocol-4 pickles), for tests that need files."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from advgen.data import Dataset


def batch_dict(n: int, seed: int) -> dict:
    """A CIFAR batch dict of n images: a class-dependent colour plus noise, labels 0..9 cycled."""
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.permutation(np.arange(n) % 10)]
    base = 60 + 14 * np.array(labels)[:, None]
    data = np.clip(base + rng.integers(-40, 40, size=(n, 3072)), 0, 255).astype(np.uint8)
    return {b"batch_label": b"synthetic", b"labels": labels, b"data": data,
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def write_cifar(root: Path, per_batch: int = 32, n_test: int = 32) -> Path:
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch}; return root (for --data-dir)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch_dict(per_batch, i), protocol=4))
    (folder / "test_batch").write_bytes(pickle.dumps(batch_dict(n_test, 99), protocol=4))
    return Path(root)


def tiny_dataset(n: int, seed: int) -> Dataset:
    d = batch_dict(n, seed)
    return Dataset(torch.from_numpy(d[b"data"].reshape(-1, 3, 32, 32).copy()),
                   torch.tensor(d[b"labels"], dtype=torch.long), 10)


def shown_pixels(dy: int, dx: int, flipped: bool, pad: int, h: int = 32, w: int = 32):
    """For every pixel (i, j) of an augmented image (crop at offset (dy, dx) of the zero-padded image,
    then the optional flip), the image pixel (r, c) it shows, and whether it shows one at all (False:
    the crop's padding). Written from data.augment's docstring, pixel by pixel, as the tests' reference."""
    i = torch.arange(h)[:, None].expand(h, w)
    j = torch.arange(w)[None, :].expand(h, w)
    r, c = dy + i - pad, dx + (w - 1 - j if flipped else j) - pad
    return r, c, (r >= 0) & (r < h) & (c >= 0) & (c < w)


class Touch:
    """A pickle payload: unpickling it would create a file (arbitrary code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class System:
    """A pickle payload: unpickling it would run a shell command that creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))
