"""CIFAR-10/100 from the official "python version" batches, held as uint8 tensors, batched on-device.

Pixels stay uint8 (N, 3, 32, 32) until a batch is drawn; a batch comes back as float32 in [0, 1].
Augmentation (random crop with 4 pixels of zero padding, horizontal flip) is one gather on the batch.
The batches are pickles: they are read with a restricted unpickler that admits only the types a CIFAR
batch holds, so a malicious file raises DataError instead of running code.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, UserError

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


@dataclass(frozen=True)
class _Layout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    url: str
    md5: str


LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                       ("test_batch",), b"labels", 10, CIFAR10_URL, CIFAR10_MD5),
    "cifar100": _Layout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                        CIFAR100_URL, CIFAR100_MD5),
}

# What a CIFAR batch pickle may name: numpy's array reconstruction, under its 1.x and 2.x module paths.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """How Python 3 pickles bytes at protocol 2: _codecs.encode(str, "latin1"); only that codec is allowed."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"forbidden encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits dict, list, bytes, str, int, float and numpy array reconstruction; nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def read_batch(path: Path) -> dict:
    """Unpickle one CIFAR batch file safely; any failure becomes DataError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a valid CIFAR batch ({e})") from None
    except Exception as e:  # truncated or garbled pickles raise many types; all mean "corrupt"
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (holds {type(obj).__name__}, not dict)")
    return obj


def _parse_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (n, 3, 32, 32), labels int64 (n,)) after validating shapes and labels."""
    batch = read_batch(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (n, 3072), got {desc}")
    if (not isinstance(labels, (list, np.ndarray)) or (isinstance(labels, np.ndarray) and labels.ndim != 1)
            or len(labels) != data.shape[0]):
        raise DataError(f"{path}: {label_key!r} must be a list of {data.shape[0]} labels")
    try:  # integers only: floats, bools, strings or nested lists are corruption, not labels to round
        if isinstance(labels, list) and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                 for v in labels):
            raise TypeError
        y = np.asarray(labels)
        if y.dtype.kind not in "iu":
            raise TypeError
        y = y.astype(np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: labels are not integers") from None
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), y


@dataclass
class Dataset:
    """A split held in memory: images uint8 (N, 3, 32, 32), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Dataset":
        return Dataset(self.images.to(device), self.labels.to(device), self.num_classes)

    def float_images(self) -> torch.Tensor:
        """All images as float32 in [0, 1]."""
        return self.images.float().div_(255)


def default_data_dir() -> Path:
    return Path(os.environ.get("ADVGEN_DATA") or Path.home() / ".cache" / "advgen")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(layout: _Layout, root: Path) -> None:
    """Fetch the official archive into root (progress bar), verify its md5, extract it safely."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    archive = root / layout.url.rsplit("/", 1)[1]
    if not archive.exists() or _md5(archive) != layout.md5:
        part = archive.with_suffix(".part")
        log.info("downloading %s", layout.url)
        try:
            with urllib.request.urlopen(layout.url, timeout=60) as resp, open(part, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=archive.name) as bar:
                    for chunk in iter(lambda: resp.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as e:
            part.unlink(missing_ok=True)
            raise DataError(f"download of {layout.url} failed: {e}") from None
        if _md5(part) != layout.md5:
            part.unlink(missing_ok=True)
            raise DataError(f"download of {layout.url} has the wrong md5 (expected {layout.md5})")
        os.replace(part, archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")  # the "data" filter refuses links and paths outside root


def _locate(name: str, data_dir: str | Path | None, allow_download: bool) -> tuple[_Layout, Path]:
    if name not in LAYOUTS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(sorted(LAYOUTS))}")
    layout = LAYOUTS[name]
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root if root.name == layout.folder else root / layout.folder
    if not folder.is_dir():
        if data_dir is not None and not allow_download:
            raise DataError(f"no {layout.folder}/ in {root} (pass --download to fetch it, or point "
                            f"--data-dir at a folder that holds it)")
        download(layout, folder.parent)
    return layout, folder


def load_cifar(name: str = "cifar10", data_dir: str | Path | None = None, *,
               download: bool = False) -> tuple[Dataset, Dataset]:
    """Load (train, test) of CIFAR-10 or CIFAR-100 from the official python-version batches.

    data_dir: a folder holding `cifar-10-batches-py/` (or that folder itself). Without it, the cache
    folder ($ADVGEN_DATA, else ~/.cache/advgen) is used and the archive downloaded there if absent.
    """
    layout, folder = _locate(name, data_dir, download)
    splits = []
    for files, expected in ((layout.train_files, 50000), (layout.test_files, 10000)):
        parts = [_parse_batch(folder / f, layout.label_key, layout.num_classes) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if x.shape[0] != expected:
            log.warning("%s: %d images where CIFAR has %d", folder, x.shape[0], expected)
        splits.append(Dataset(torch.from_numpy(x), torch.from_numpy(y), layout.num_classes))
    return splits[0], splits[1]


def load_subsets(name: str = "cifar10", data_dir: str | Path | None = None, *, download: bool = False,
                 train_subset: int | None = None, test_subset: int | None = None,
                 seed: int = 0) -> tuple[Dataset, Dataset]:
    """load_cifar, then a seeded class-balanced subset of the training set and the first test images."""
    train, test = load_cifar(name, data_dir, download=download)
    if train_subset is not None:
        train = balanced_subset(train, train_subset, seed)
    return train, first_n(test, test_subset)


def balanced_subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """n images, as equal a share of every class as possible, chosen with a seeded permutation."""
    if not 1 <= n <= len(ds):
        raise UserError(f"train subset {n} must lie in 1..{len(ds)}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)
    labels = ds.labels[order]
    # rank of each image within its class, in permuted order; take ranks round-robin over classes
    rank = torch.zeros(len(ds), dtype=torch.long)
    for c in range(ds.num_classes):
        members = (labels == c).nonzero().squeeze(1)
        rank[members] = torch.arange(members.numel())
    pick = order[torch.argsort(rank * ds.num_classes + labels, stable=True)[:n]]
    pick = pick.sort().values
    return Dataset(ds.images[pick], ds.labels[pick], ds.num_classes)


def first_n(ds: Dataset, n: int | None) -> Dataset:
    """The first n images (as RobustBench does), so tools can be compared on the same images."""
    if n is None:
        return ds
    if not 1 <= n <= len(ds):
        raise UserError(f"test subset {n} must lie in 1..{len(ds)}")
    return Dataset(ds.images[:n], ds.labels[:n], ds.num_classes)


def _augment_draws(b: int, generator: torch.Generator | None, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of augmenting b images: offsets (2, b) in [0, 2*pad] and flip coins (b,).

    They come from a CPU generator so the stream is the same on every device; Batches replays them to
    fast-forward an epoch to a given batch (exact resume).
    """
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return offs, flip


def augment(images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a uint8 batch (B, C, H, W), in one gather.

    Each image gets an offset (dy, dx) in [0, 2*pad] and a coin for the flip; the output pixel (i, j)
    is read from the padded image at (dy + i, dx + j), or (dy + i, dx + W - 1 - j) when flipped.
    The gather is one flat index into the padded batch (about 4x cheaper than a 4-D advanced index).
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).contiguous()
    offs, flip = _augment_draws(b, generator, pad)
    offs, flip = offs.to(dev), flip.to(dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offs[0, :, None] + ar_h  # (B, H)
    cols = offs[1, :, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    hp, wp = h + 2 * pad, w + 2 * pad
    plane = (torch.arange(b * c, device=dev) * (hp * wp)).view(b, c, 1, 1)  # start of image i, channel k
    return padded.view(-1)[plane + (rows * wp).view(b, 1, h, 1) + cols.view(b, 1, 1, w)]


class Batches:
    """Iterates over a Dataset in seeded random order, augmenting on the device; float32 in [0, 1].

    The permutation of epoch e is drawn from a generator seeded with (seed, e), so the order of any epoch
    can be recomputed after a restart. `drop_last` drops the final incomplete batch (training).
    """

    def __init__(self, ds: Dataset, batch_size: int, *, seed: int = 0, train: bool = True,
                 drop_last: bool | None = None):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.ds, self.batch_size, self.seed, self.train = ds, batch_size, seed, train
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(ds) < batch_size:
            raise UserError(f"batch size {batch_size} exceeds the {len(ds)} training images")

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def position(self, epoch: int, start: int = 0) -> tuple[torch.Tensor, torch.Generator]:
        """(order (N,) on the CPU, augmentation generator) as they stand before batch `start` of `epoch`.

        The generator seeded with (seed, epoch) draws the permutation, then the augmentation of batch 0,
        1, ...; the draws of the batches before `start` are replayed, so a resumed epoch continues the
        very same random stream as an uninterrupted one.
        """
        if not 0 <= start <= len(self):
            raise ValueError(f"batch {start} is outside epoch of {len(self)} batches")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.ds)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        if self.train:
            for i in range(start):
                _augment_draws(order[i * self.batch_size:(i + 1) * self.batch_size].numel(), g)
        return order, g

    def epoch(self, epoch: int, start: int = 0):
        """Yield (x float (B, 3, 32, 32) in [0, 1], y int64 (B,)) for batches start, start+1, ..."""
        order, g = self.position(epoch, start)
        dev = self.ds.images.device
        order = order.to(dev)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.ds.images[idx]
            if self.train:
                x = augment(x, g)
            yield x.float().div_(255), self.ds.labels[idx]
