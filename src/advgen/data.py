"""Datasets held as uint8 tensors, batched on-device: CIFAR-10/100, an .npz file, an image folder, tensors.

Pixels stay uint8 (N, C, H, W) until a batch is drawn; a batch comes back as float32 in [0, 1].
Augmentation (random crop with zero padding of about an eighth of the image side — 4 pixels for 32x32 —
and a horizontal flip) is one gather on the batch.
The CIFAR batches are pickles: they are read with a restricted unpickler that admits only the types a CIFAR
batch holds, so a malicious file raises DataError instead of running code. .npz files are read with
allow_pickle=False, images with Pillow.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import secrets
import shutil
import socket
import tarfile
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .io import file_digest
from .devices import indexed
from .errors import DataError, UserError
from .models.normalize import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

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
    stats: tuple[tuple[float, ...], tuple[float, ...]]   # the published per-channel (mean, std)


LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                       ("test_batch",), b"labels", 10, CIFAR10_URL, CIFAR10_MD5, (CIFAR10_MEAN, CIFAR10_STD)),
    "cifar100": _Layout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                        CIFAR100_URL, CIFAR100_MD5, (CIFAR100_MEAN, CIFAR100_STD)),
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


Stats = tuple[tuple[float, ...], tuple[float, ...]]   # per-channel (mean, std) of pixels in [0, 1]


@dataclass
class Dataset:
    """A split held in memory: images uint8 (N, C, H, W), labels int64 (N,) in 0..num_classes-1.

    stats: the per-channel (mean, std) the classifier normalizes with, or None to compute them from
    these images (see normalization_for). Images are always uint8: build a Dataset from float pixels
    with Dataset.from_tensors, which checks they lie in [0, 1] (a float tensor here would be divided by
    255 a second time where batches are drawn, so it is refused).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    stats: Stats | None = None

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            desc = (f"{self.images.dtype} {tuple(self.images.shape)}" if isinstance(self.images, torch.Tensor)
                    else type(self.images).__name__)
            raise DataError(f"Dataset images must be a uint8 tensor (N, C, H, W), got {desc}; "
                            "use Dataset.from_tensors for float pixels in [0, 1]")
        if (not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1
                or self.labels.shape[0] != self.images.shape[0]):
            raise DataError(f"Dataset labels must be a tensor of {self.images.shape[0]} labels")

    @classmethod
    def from_tensors(cls, images, labels, num_classes: int | None = None, *, stats: Stats | None = None,
                     source: str = "images") -> "Dataset":
        """A validated Dataset from images (N, C, H, W) or (N, H, W) and integer labels (N,).

        images: torch tensor or numpy array, uint8 (0..255) or float in [0, 1] (rounded to the nearest
        of 256 levels; floats outside [0, 1], NaN included, are refused, never rescaled). labels:
        integers in 0..num_classes-1 (num_classes defaults to the largest label + 1). stats: (mean,
        std) to carry, e.g. the training split's for a test split. Any problem is a DataError that
        starts with `source`.
        """
        x = _as_tensor(images, f"{source}: images")
        y = _as_tensor(labels, f"{source}: labels")
        x = _to_uint8(x, source)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or min(x.shape) < 1:
            raise DataError(f"{source}: images must be (N, C, H, W) or (N, H, W) with every size >= 1, "
                            f"got {tuple(x.shape)}")
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise DataError(f"{source}: labels must be integers, got {y.dtype}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{source}: {x.shape[0]} images but labels of shape {tuple(y.shape)} "
                            "(one integer label per image)")
        y = y.long()
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y.numel() else 1
        if type(num_classes) is not int or num_classes < 1:
            raise DataError(f"{source}: num_classes must be an integer >= 1, got {num_classes!r}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"{source}: labels must lie in 0..{num_classes - 1}, found "
                            f"{int(y.min())}..{int(y.max())}")
        if stats is not None:
            from .models.normalize import check_stats
            check_stats(*stats, channels=x.shape[1])
            stats = (tuple(float(v) for v in stats[0]), tuple(float(v) for v in stats[1]))
        return cls(x.contiguous(), y, num_classes, stats)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def to(self, device) -> "Dataset":
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def float_images(self) -> torch.Tensor:
        """All images as float32 in [0, 1]."""
        return self.images.float().div_(255)

    def check_every_class(self, source: str) -> None:
        """DataError naming the classes of 0..num_classes-1 that have no image here (a training split)."""
        counts = torch.bincount(self.labels.cpu(), minlength=self.num_classes)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            raise DataError(f"{source}: {len(empty)} of {self.num_classes} classes have no image ({shown})")


def _as_tensor(value, what: str) -> torch.Tensor:
    """A torch tensor sharing memory with a numpy array or tensor; DataError for anything else."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{what} have dtype {value.dtype}; expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise DataError(f"{what} must be a torch tensor or numpy array, got {type(value).__name__}")


def _to_uint8(x: torch.Tensor, source: str) -> torch.Tensor:
    """uint8 images as they are; float pixels in [0, 1] -> round(255 x); every other dtype refused."""
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise DataError(f"{source}: images have dtype {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    inside = (x >= 0) & (x <= 1)                   # False for NaN
    if not bool(inside.all()):
        bad = x[~inside]
        finite = bad[torch.isfinite(bad)]
        found = [f"{finite.min().item():g}..{finite.max().item():g}"] if finite.numel() else []
        found += ["NaN or inf"] if finite.numel() < bad.numel() else []
        raise DataError(f"{source}: float images must be pixels in [0, 1]; {bad.numel()} values are not "
                        f"(found {' and '.join(found)}); advgen does not rescale: divide 0..255 data by 255 "
                        "yourself or pass uint8")
    return x.float().mul(255).round_().to(torch.uint8)


def normalization_for(ds: Dataset) -> Stats:
    """Per-channel (mean, std) of pixels in [0, 1] for the classifier's Normalize layer.

    CIFAR-10/100 carry their published statistics; other data the ones of its training split (set by
    the loaders), or else they are computed here from ds.images (population std over all pixels; a
    channel with std below 1/255 gets 1/255, with a warning, so a constant channel cannot divide by 0).
    """
    if ds.stats is not None:
        return ds.stats
    return compute_stats(ds.images)


def compute_stats(images: torch.Tensor, chunk: int = 1024) -> Stats:
    """(mean, std) per channel of uint8 images (N, C, H, W) scaled to [0, 1], in float64 by chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        part = images[i:i + chunk].to("cpu", torch.float64).div_(255)
        total += part.sum((0, 2, 3))
        squares += part.square().sum((0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    if bool((std < 1 / 255).any()):
        log.warning("image channel(s) %s are (nearly) constant: their normalization std is set to 1/255",
                    (std < 1 / 255).nonzero().flatten().tolist())
        std = std.clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


def default_data_dir() -> Path:
    return Path(os.environ.get("ADVGEN_DATA") or Path.home() / ".cache" / "advgen")


def _unique() -> str:
    """A name part no other process picks: host, pid and a random token (nodes may share the folder)."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def download(layout: _Layout, root: Path) -> None:
    """Fetch the official archive into root (progress bar), verify its md5, extract it safely.

    Safe when several processes do it at once into one folder (the nodes of a torchrun job on a shared
    file system): each downloads into a file of its own and renames it into place (an archive that
    verified), extracts into a folder of its own and renames that into place; the first complete copy
    wins, and no reader ever sees a half-written archive or a half-extracted folder."""
    from tqdm import tqdm

    root.mkdir(parents=True, exist_ok=True)
    archive = root / layout.url.rsplit("/", 1)[1]
    if not archive.exists() or file_digest(archive, "md5") != layout.md5:
        part = archive.with_name(f".{archive.name}.{_unique()}.part")
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
        if file_digest(part, "md5") != layout.md5:
            part.unlink(missing_ok=True)
            raise DataError(f"download of {layout.url} has the wrong md5 (expected {layout.md5})")
        os.replace(part, archive)
    _extract(archive, root / layout.folder)


def _extract(archive: Path, folder: Path) -> None:
    """Extract `archive` (holding folder.name/) into a temporary folder beside `folder`, then rename its
    folder.name/ into place; if another process put a copy there first, that one is kept."""
    tmp = folder.parent / f".extract.{_unique()}"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # the "data" filter refuses links and paths outside tmp
        if not (tmp / folder.name).is_dir():
            raise DataError(f"{archive} does not hold {folder.name}/")
        try:
            os.rename(tmp / folder.name, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(name: str, data_dir: str | Path | None = None, *, download: bool = False) -> None:
    """Make sure CIFAR data `name` is on disk (downloading it as load_cifar would); nothing for other
    datasets. Under torchrun one process per node calls it first while the others wait (cli.load_data)."""
    if name in LAYOUTS:
        _locate(name, data_dir, download)


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
        splits.append(Dataset(torch.from_numpy(x), torch.from_numpy(y), layout.num_classes, layout.stats))
    return splits[0], splits[1]


def load_dataset(name: str = "cifar10", data_dir: str | Path | None = None, *,
                 download: bool = False) -> tuple[Dataset, Dataset]:
    """(train, test) of "cifar10", "cifar100", an .npz file or an image folder (see load_npz and
    load_image_folder; data_dir and download apply to CIFAR only)."""
    if name in LAYOUTS:
        return load_cifar(name, data_dir, download=download)
    path = Path(name)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        return load_npz(path)
    raise UserError(f"unknown dataset {name!r}: not {' or '.join(sorted(LAYOUTS))}, an .npz file or an "
                    "image folder")


def load_subsets(name: str = "cifar10", data_dir: str | Path | None = None, *, download: bool = False,
                 train_subset: int | None = None, test_subset: int | None = None,
                 seed: int = 0) -> tuple[Dataset, Dataset]:
    """load_dataset, then a seeded class-balanced subset of the training set and the first test images."""
    train, test = load_dataset(name, data_dir, download=download)
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
    return replace(ds, images=ds.images[pick], labels=ds.labels[pick])


def first_n(ds: Dataset, n: int | None) -> Dataset:
    """The first n images (as RobustBench does), so tools can be compared on the same images."""
    if n is None:
        return ds
    if not 1 <= n <= len(ds):
        raise UserError(f"test subset {n} must lie in 1..{len(ds)}")
    return replace(ds, images=ds.images[:n], labels=ds.labels[:n])


def crop_padding(height: int, width: int) -> int:
    """Zero padding of the random crop in pixels: an eighth of the shorter side, rounded half up (4 for
    32x32, as in He et al. 2016; 4 for 28x28, 8 for 64x64), at least 1."""
    return max(1, int(min(height, width) / 8 + 0.5))


AUGMENTATIONS = ("crop", "flip")   # a random crop of the zero-padded image, a horizontal flip


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
    return _augment_with(images, *_augment_draws(images.shape[0], generator, pad), pad)


def _augment_with(images: torch.Tensor, offs: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """augment() with its random numbers given (offsets (2, B), flips (B,))."""
    b, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).contiguous()
    plane = (torch.arange(b * c, device=dev) * ((h + 2 * pad) * (w + 2 * pad))).view(b, c, 1, 1)  # image i, channel k
    return padded.view(-1)[plane + _crop_index(offs, flip, h, w, pad, dev)]


def _crop_index(offs: torch.Tensor, flip: torch.Tensor, h: int, w: int, pad: int, dev) -> torch.Tensor:
    """(B, 1, H, W): for each output pixel (i, j) of a crop (offsets (2, B)) and flip (B,), its flat
    position (dy + i) · (W + 2 pad) + column in the padded image."""
    offs, flip = offs.to(dev), flip.to(dev)
    b, ar_w = flip.shape[0], torch.arange(w, device=dev)
    rows = offs[0, :, None] + torch.arange(h, device=dev)                    # (B, H)
    cols = offs[1, :, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    return (rows * (w + 2 * pad)).view(b, 1, h, 1) + cols.view(b, 1, 1, w)


@dataclass(frozen=True)
class Where:
    """Where a training batch's rows come from: dataset indices and the augmentation each row got.

    idx (B,) int64 on the batches' device; offs (2, B) crop offsets and flip (B,) coins as drawn by
    _augment_draws (None for unaugmented batches); pad: the crop padding. Per-sample state kept in the
    dataset's frame (N, C, H, W) -- e.g. each sample's last adversarial perturbation -- is read into the
    batch's augmented frame with gather() and written back with scatter_(), so a perturbation stays on
    the pixels it was made for when the next epoch crops and flips the image differently.
    """

    idx: torch.Tensor
    offs: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    pad: int = 0

    def __getitem__(self, rows: slice) -> "Where":
        """The record of a slice of the batch's rows."""
        if self.offs is None:
            return Where(self.idx[rows], pad=self.pad)
        return Where(self.idx[rows], self.offs[:, rows], self.flip[rows], self.pad)

    def gather(self, store: torch.Tensor) -> torch.Tensor:
        """store (N, C, H, W) -> its rows of this batch, augmented as the batch: (B, C, H, W); pixels
        the crop takes from the padding are 0."""
        rows = store[self.idx]
        return rows if self.offs is None else _augment_with(rows, self.offs, self.flip, self.pad)

    def scatter_(self, store: torch.Tensor, values: torch.Tensor) -> None:
        """Write values (B, C, H, W), in the batch's augmented frame, back into store's rows, un-flipped
        and un-cropped; the pixels a crop cut off keep what store held."""
        values = values.to(store.dtype)
        if self.offs is not None:
            b, c, h, w = values.shape
            p = self.pad
            canvas = torch.nn.functional.pad(store[self.idx], (p, p, p, p))
            flat = _crop_index(self.offs, self.flip, h, w, p, values.device).expand(b, c, h, w).reshape(b, c, -1)
            canvas.view(b, c, -1).scatter_(2, flat, values.reshape(b, c, -1))
            values = canvas[:, :, p:p + h, p:p + w]
        store[self.idx] = values


class Batches:
    """Iterates over a Dataset in seeded random order, augmenting on the device; float32 in [0, 1].

    The permutation of epoch e is drawn from a generator seeded with (seed, e), so the order of any epoch
    can be recomputed after a restart. `drop_last` drops the final incomplete batch (training).

    Data parallel (rank, world): batch_size is the global batch; rank r gets rows [r*b, (r+1)*b) of
    every batch, b = batch_size / world, with the augmentation those rows get in a one-process run (the
    whole batch's draws are taken from the one stream and sliced), so the ranks' shards are disjoint,
    cover every batch, and the data do not depend on the world size.

    device: where the batches are delivered (None: where the dataset lives). A dataset left on the host
    for a CUDA device (data_placement: it does not fit) takes the host path: each batch's uint8 rows are
    gathered on the host into pinned memory and copied to the device on a side stream one batch ahead
    (the copy of batch i+1 overlaps the training on batch i), then augmented there; the batches are
    the same as those of a dataset on the device.
    """

    def __init__(self, ds: Dataset, batch_size: int, *, seed: int = 0, train: bool = True,
                 drop_last: bool | None = None, rank: int = 0, world: int = 1, device=None,
                 augment: tuple[str, ...] = AUGMENTATIONS):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % world:
            raise UserError(f"batch size {batch_size} (the global batch) must be divisible by the {world} "
                            "processes, each training on an equal share of it")
        self.ds, self.batch_size, self.seed, self.train = ds, batch_size, seed, train
        unknown = set(augment) - set(AUGMENTATIONS)
        if unknown:
            raise UserError(f"unknown augmentation {', '.join(sorted(unknown))}; choose from {', '.join(AUGMENTATIONS)}")
        self.augment = tuple(augment)
        self.rank, self.world = rank, world
        self.device = ds.images.device if device is None else indexed(device)   # comparable with tensors' devices
        self.drop_last = train if drop_last is None else drop_last
        self.pad = crop_padding(*ds.images.shape[2:])
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
                _augment_draws(order[i * self.batch_size:(i + 1) * self.batch_size].numel(), g, self.pad)
        return order, g

    def epoch(self, epoch: int, start: int = 0, where: bool = False):
        """Yield (x float (B, C, H, W) in [0, 1], y int64 (B,)) for batches start, start+1, ...;
        with where=True, (x, y, Where): the rows' dataset indices and augmentation.

        The order and the augmentation of the epoch's batches are drawn on the host when the epoch
        starts (the same stream, in the same order, as batch by batch) and reach the device in one copy
        each (to_device): no host-to-device copy, so no host sync, per batch."""
        order, g = self.position(epoch, start)
        order = to_device(order, self.ds.images.device)
        draws = self._epoch_draws(g, start) if self.train else None
        rows = (self._rows(order, i) for i in range(start, len(self)))
        if self.ds.images.device != self.device:
            rows = _copied_ahead(rows, self.device)
        for i, (n, idx, x, y) in enumerate(rows):
            offs = flip = None
            if self.train:   # this rank's share of the whole batch's draws
                offs, flip = draws[i]
                x = _augment_with(x, offs, flip, self.pad)
            batch = (x.float().div_(255), y)
            yield (*batch, Where(idx, offs, flip, self.pad)) if where else batch

    def _epoch_draws(self, g: torch.Generator, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (offsets (2, b), flips (b,)) of batches start, start+1, ... on self.device, drawn
        from `g` as epoch() drew them batch by batch, moved in one copy."""
        n = len(self.ds)
        sizes = [min(self.batch_size, n - i * self.batch_size) for i in range(start, len(self))]
        parts = []
        for size in sizes:   # the whole batch's draws (the stream), this rank's share of them
            offs, flip = _augment_draws(size, g, self.pad)
            # an augmentation left out is drawn all the same (the stream stays that of crop,flip) and undone:
            # offset `pad` is the uncropped frame, no flip the unflipped one
            if "crop" not in self.augment:
                offs = torch.full_like(offs, self.pad)
            if "flip" not in self.augment:
                flip = torch.zeros_like(flip)
            part = shard_rows(size, self.rank, self.world)
            parts.append(torch.cat([offs[:, part], flip[part].long()[None]]))
        packed = to_device(torch.cat(parts, dim=1), self.device) if parts else None   # (3, rows of the epoch)
        out, i = [], 0
        for p in parts:
            b = p.shape[1]
            out.append((packed[:2, i:i + b], packed[2, i:i + b] == 1))
            i += b
        return out

    def _rows(self, order: torch.Tensor, i: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows of the whole batch i, then this rank's dataset indices, uint8 images and labels of it,
        where the data live)."""
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        n = idx.numel()
        idx = idx[shard_rows(n, self.rank, self.world)]
        return n, idx, self.ds.images[idx], self.ds.labels[idx]

    def shard(self, epoch: int) -> torch.Tensor:
        """The dataset indices this rank trains on in `epoch`, in order (what epoch() yields)."""
        order, _ = self.position(epoch)
        rows = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]
        return torch.cat([r[shard_rows(r.numel(), self.rank, self.world)] for r in rows])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without a host sync: from the CPU to a GPU through pinned memory, non-blocking (the
    caching host allocator keeps the pinned buffer until the copy has run); elsewhere t.to(device).
    A plain .to("cuda") of pageable memory makes the host wait for the device."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _copied_ahead(batches, device: torch.device):
    """Host tensors -> the same on a CUDA `device`, each batch's copy issued (pinned, non-blocking, on a
    side stream) before the previous batch is handed out, so that it overlaps the work on that batch."""
    stream = torch.cuda.Stream(device)

    def issue(tensors):
        with torch.cuda.stream(stream):
            moved = tuple(t.pin_memory().to(device, non_blocking=True) if torch.is_tensor(t) else t
                          for t in tensors)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    ahead = None
    for tensors in batches:
        nxt = issue(tensors)
        if ahead is not None:
            yield _received(*ahead, device)
        ahead = nxt
    if ahead is not None:
        yield _received(*ahead, device)


def _received(moved: tuple, done, device):
    """A batch copied on the side stream, made safe to use on the current one."""
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for t in moved:
        if torch.is_tensor(t):
            t.record_stream(current)   # the caching allocator must not reuse it before the current stream is done
    return moved


def data_placement(ds: Dataset, device: torch.device, mode: str = "auto") -> str:
    """Where a training set lives while a run trains on `device`: "device" or "host" (Batches' host path).

    mode device|host forces it (host means device for a CPU device: there is nothing to copy); auto puts
    it on a CUDA device when its uint8 images take at most half of the device's free memory, the rest
    being the model's, the activations' and the attacks'."""
    if mode not in ("auto", "device", "host"):
        raise UserError(f"data placement must be auto, device or host, got {mode!r}")
    if device.type != "cuda" or mode == "device":
        return "device"
    if mode == "host":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if ds.images.numel() * ds.images.element_size() <= free // 2 else "host"


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s rows of a batch of n rows split over `world` ranks: [r*b, (r+1)*b), b = n / world
    (an evaluation's last, smaller batch: the first n % world ranks take one row more)."""
    b, extra = divmod(n, world)
    start = rank * b + min(rank, extra)
    return slice(start, start + b + (rank < extra))


# ------------------------------------------------------------------------------------ your own data

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA")


def _npz_images(x: np.ndarray, where: str) -> np.ndarray:
    """N x H x W x C (or N x H x W) -> N x C x H x W (or N x H x W); refuses arrays that look NCHW."""
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
            raise DataError(f"{where} has shape {x.shape}, which looks like N x C x H x W; advgen reads "
                            "N x H x W x C (save x.transpose(0, 2, 3, 1))")
        return x.transpose(0, 3, 1, 2)
    if x.ndim != 3:
        raise DataError(f"{where} must be N x H x W x C or N x H x W, got shape {x.shape}")
    return x


def load_npz(path: str | Path) -> tuple[Dataset, Dataset]:
    """(train, test) from an .npz holding x_train, y_train, x_test, y_test.

    Images uint8 N x H x W x C (or N x H x W for one channel), or float in [0, 1]; labels integers in
    0..K-1, where K is the largest training label + 1 and every class has a training image. Read with
    allow_pickle=False; normalization statistics are computed from the training images.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # OSError, BadZipFile, ValueError, EOFError...: all mean "not a readable .npz"
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if isinstance(archive, np.ndarray):
        raise DataError(f"{path} holds a single array, not an .npz archive with {', '.join(NPZ_KEYS)}")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(archive.files) or 'nothing'})")
        arrays = {}
        for k in NPZ_KEYS:
            try:
                arrays[k] = archive[k]
            except ValueError:  # object arrays need pickle, which is refused
                raise DataError(f"{path}: {k} is an object (pickled) array; store plain numeric arrays") from None
            except Exception as e:
                raise DataError(f"{path}: {k} is unreadable ({type(e).__name__})") from None
    train = Dataset.from_tensors(_npz_images(arrays["x_train"], f"{path}: x_train"), arrays["y_train"],
                                 source=f"{path}: x_train/y_train")
    train.check_every_class(f"{path}: y_train")
    train = replace(train, stats=compute_stats(train.images))
    test = Dataset.from_tensors(_npz_images(arrays["x_test"], f"{path}: x_test"), arrays["y_test"],
                                train.num_classes, stats=train.stats, source=f"{path}: x_test/y_test")
    _check_same_shape(train, test, path)
    return train, test


def _check_same_shape(train: Dataset, test: Dataset, where) -> None:
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{where}: training images are {tuple(train.images.shape[1:])} (C, H, W) but test "
                        f"images {tuple(test.images.shape[1:])}")


def _read_image(path: Path):
    """One image as a uint8 array (H, W) for grayscale or (H, W, 3) for colour; DataError if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            gray = im.mode in _GRAY_MODES
            if im.mode.startswith("I") or im.mode.startswith("F"):
                raise DataError(f"{path}: {im.mode} images (16-bit or float) are not supported; save 8-bit")
            return np.asarray(im.convert("L" if gray else "RGB"))
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types for bad files (UnidentifiedImageError, OSError, ...)
        raise DataError(f"{path} is not a readable image ({type(e).__name__})") from None


def _class_files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image path, class index) for folder/CLASS/*.png|jpg|jpeg, sorted; DataError for an empty class."""
    items = []
    for k, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{sub} holds no .png or .jpg image (an empty class)")
        items += [(f, k) for f in files]
    return items


def _stack_images(arrays: list[np.ndarray], files: list[Path], channels: int) -> np.ndarray:
    """N x C x H x W uint8 from (H, W) / (H, W, 3) arrays of one size; grey is repeated for colour data."""
    size = arrays[0].shape[:2]
    out = np.empty((len(arrays), channels, *size), dtype=np.uint8)
    for i, (a, f) in enumerate(zip(arrays, files)):
        if a.shape[:2] != size:
            raise DataError(f"{f} is {a.shape[1]}x{a.shape[0]} pixels where {files[0]} is {size[1]}x{size[0]}; "
                            "all images must have one size")
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def load_image_folder(root: str | Path) -> tuple[Dataset, Dataset]:
    """(train, test) from root/train/CLASS/*.png|jpg and root/test/CLASS/*, read with Pillow.

    Classes are the sorted folder names under train/ (test/ may lack some, not add any). All images must
    have one size; if every one is grayscale the data have 1 channel, else 3 (RGB; alpha dropped, grey
    repeated). Normalization statistics are computed from the training images.
    """
    root = Path(root)
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        raise UserError("reading an image folder needs Pillow: pip install pillow") from None
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"{root} is not an image folder: {d.name}/ is missing (expected "
                            "train/CLASS/*.png and test/CLASS/*.png)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{train_dir} has no class folders")
    extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise DataError(f"{test_dir} has class folders not in train/: {', '.join(extra[:5])}")
    splits = []
    for folder in (train_dir, test_dir):
        items = _class_files(folder, classes)
        if not items:
            raise DataError(f"{folder} holds no .png or .jpg images")
        splits.append(([_read_image(f) for f, _ in items], [f for f, _ in items], [k for _, k in items]))
    channels = 1 if all(a.ndim == 2 for arrays, _, _ in splits for a in arrays) else 3
    sets = []
    for arrays, files, labels in splits:
        x = _stack_images(arrays, files, channels)
        sets.append(Dataset.from_tensors(x, np.asarray(labels, dtype=np.int64), len(classes), source=str(root)))
    train, test = sets
    _check_same_shape(train, test, root)
    stats = compute_stats(train.images)
    return replace(train, stats=stats), replace(test, stats=stats)
