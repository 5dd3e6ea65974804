"""Checkpoints: tensors in safetensors, everything else in JSON. Loading never unpickles.

A run folder holds model.safetensors (the classifier; its header metadata repeats the model name, so
the file stands alone), run.json (config, per-epoch metrics, version, git commit) and, for the
generator method, generators.safetensors; state.safetensors holds the whole training state for
`--resume` (tensors, and the rest as JSON in its header, so the two can never come from different
steps). Writes are atomic (io.atomic_write).

The model zoo's files live here too: `zoo:NAME` names a shipped model, whose weights are checked against
the sha256 of its card before every load (apps/zoo.py lists and adds them).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, UserError
from .io import file_digest, one_line, read_json, read_tensors, save_tensors

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
GENERATORS_FILE = "generators.safetensors"
RUN_FILE = "run.json"
STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.csv"
RUN_FILES = (STATE_FILE, RUN_FILE, MODEL_FILE, GENERATORS_FILE, METRICS_FILE)   # what makes a folder hold a run


ZOO_PREFIX = "zoo:"
ZOO_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def zoo_dir() -> Path:
    """The installed zoo (package data), or $ADVGEN_ZOO_DIR."""
    return Path(os.environ.get("ADVGEN_ZOO_DIR") or Path(__file__).with_name("zoo_models"))


def zoo_cards(folder: Path | None = None) -> list[dict]:
    """Every card of the zoo (its NAME.json files), sorted by name; [] when the folder is absent."""
    folder = folder or zoo_dir()
    return sorted((read_json(p) for p in folder.glob("*.json")), key=lambda c: c.get("name", "")) if folder.is_dir() else []


def zoo_model_file(name: str, folder: Path | None = None) -> Path:
    """The weights of zoo model `name`, after checking them against the card's sha256."""
    folder = folder or zoo_dir()
    card_path = folder / f"{name}.json"
    if not ZOO_NAME.match(name) or not card_path.is_file():
        known = ", ".join(c["name"] for c in zoo_cards(folder)) or "none (the zoo is empty)"
        raise UserError(f"no model {name!r} in the zoo ({folder}); known: {known}")
    card = read_json(card_path)
    path = folder / card.get("file", f"{name}.safetensors")
    if not path.is_file():
        raise CheckpointError(f"zoo model {name}: its weights file {path.name} is missing")
    digest = file_digest(path)
    if digest != card.get("sha256"):
        raise CheckpointError(f"zoo model {name}: {path.name} has sha256 {digest[:16]}…, its card says "
                              f"{str(card.get('sha256'))[:16]}…; the file was changed or damaged and is not loaded")
    return path



def save_model(path: Path, model: nn.Module, meta: dict) -> None:
    """Save a classifier; meta must hold "model" (registry name) and "num_classes". A model whose name
    has variants (models.VARIANTS: the two PreAct-ResNet-18 forwards) gets its "variant" recorded."""
    from .models import VARIANTS
    if meta.get("model") in VARIANTS:
        meta = {**meta, "variant": VARIANTS[meta["model"]]}
    save_tensors(path, model, meta)


FOREIGN_SUFFIXES = (".pt", ".pth", ".th", ".tar")   # torch.save files (".pth.tar" ends in ".tar")
_STAGED = re.compile(r"layer(\d+)\.(\d+)\.(.+)")
# containers of a state dict in the wild: akamaster {"state_dict"}, RobustBench {"state_dict"} or bare,
# fast-AT scripts and others {"model"} / {"model_state_dict"} / {"net"}
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# wrapper prefixes stripped from every key, repeatedly: DataParallel's "module.", RobustBench's
# normalize_model wrapper's "model." (utils.load_model strips the same two)
WRAPPER_PREFIXES = ("module.", "model.")
# (mean key, std key) pairs by which a file carries its normalization, after the wrappers are stripped:
# RobustBench's mu/sigma buffers (Wong2020FastNet, Rice2020OverfittingNetL2, ...), its normalize_model
# wrapper (normalize.mean / normalize.std), a bare mean/std pair, advgen's own Sequential (0.mean / 0.std)
NORMALIZATION_KEYS = (("mu", "sigma"), ("normalize.mean", "normalize.std"), ("mean", "std"), ("0.mean", "0.std"))
NORMALIZE_HINT = "--normalize cifar10|cifar100|imagenet|none|MEAN/STD on the command line, normalize= in load_model"


def read_foreign_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a torch.save file, read with weights_only=True (no code runs), unwrapped from
    the usual containers (CONTAINER_KEYS, nested up to three deep)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # torch raises many types for bad files; all mean "not loadable safely"
        raise CheckpointError(f"{path} is not a loadable weights-only PyTorch file ({type(e).__name__})") from None
    for _ in range(3):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj, dict)
                      and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def strip_wrappers(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state with WRAPPER_PREFIXES removed from the front of every key, repeatedly: "module.model.x" ->
    "x"; short key -> the file's key); a CheckpointError if two keys become one."""
    out, original = {}, {}
    for key, v in state.items():
        short = key
        while short.startswith(WRAPPER_PREFIXES):
            short = short.split(".", 1)[1]
        if short in out:
            raise CheckpointError(f"{path}: keys {original[short]!r} and {key!r} both name {short!r} once the "
                                  f"{' and '.join(WRAPPER_PREFIXES)} prefixes are removed")
        out[short], original[short] = v, key
    return out, original


def split_normalization(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, tuple | None]:
    """(state without them, (mean, std) tuples of floats) when state carries its normalization under
    one of NORMALIZATION_KEYS (each a tensor of C values, any shape such as (1, C, 1, 1)), else (state,
    None). Half a pair, or two pairs, is a CheckpointError."""
    found = [(m, s) for m, s in NORMALIZATION_KEYS if m in state or s in state]
    if not found:
        return state, None
    if len(found) > 1 or not all(k in state for k in found[0]):
        raise CheckpointError(f"{path} holds {', '.join(k for pair in found for k in pair if k in state)}: "
                              "not one whole (mean, std) pair of normalization buffers")
    m, s = found[0]
    mean, std = state[m].detach().flatten().tolist(), state[s].detach().flatten().tolist()
    rest = {k: v for k, v in state.items() if k not in (m, s)}
    return rest, (tuple(mean), tuple(std))


def stated_stats(normalize, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a stated normalization: a name or "MEAN/STD" text (normalize.parse_stats) or a
    (mean, std) pair of per-channel sequences; checked against `channels` (UserError)."""
    from .models.normalize import check_stats, parse_stats
    if isinstance(normalize, str):
        return parse_stats(normalize, channels)
    if not isinstance(normalize, (tuple, list)) or len(normalize) != 2:
        raise UserError(f"normalize must be a name, MEAN/STD text or a (mean, std) pair, got {normalize!r}")
    mean, std = (tuple(float(v) for v in part) for part in normalize)
    check_stats(mean, std, channels)
    return mean, std


def _same_stats(a: tuple, b: tuple, tol: float = 1e-6) -> bool:
    return all(len(x) == len(y) and all(abs(u - v) <= tol for u, v in zip(x, y)) for x, y in zip(a, b))


def _fmt_stats(stats: tuple) -> str:
    return f"mean {','.join(f'{v:.4g}' for v in stats[0])}, std {','.join(f'{v:.4g}' for v in stats[1])}"


def choose_normalization(carried: tuple | None, normalize, channels: int, path: Path) -> tuple:
    """The (mean, std) a foreign model gets: what the file carries, else what the caller states; never a
    default. A file without its normalization and no statement, or a statement that contradicts what the
    file carries, is a one-line UserError naming the flag."""
    from .models.normalize import check_stats
    stated = stated_stats(normalize, channels) if normalize is not None else None
    if carried is None:
        if stated is None:
            raise UserError(f"{path} does not carry its normalization and advgen does not guess it: state it "
                            f"({NORMALIZE_HINT}; none for a model trained on raw [0, 1] pixels)")
        return stated
    try:
        check_stats(*carried, channels)
    except UserError as e:
        raise CheckpointError(f"{path} carries bad normalization buffers ({e})") from None
    if stated is not None and not _same_stats(carried, stated):
        raise UserError(f"{path} carries its own normalization ({_fmt_stats(carried)}), not the stated one "
                        f"({_fmt_stats(stated)}): leave --normalize (normalize=) out")
    return carried


def require_normalization(state: dict[str, torch.Tensor], path: Path, normalize) -> None:
    """choose_normalization's refusal, raised early (before a long data load), when the foreign `state`
    carries no normalization and `normalize` states none."""
    if normalize is None and split_normalization(strip_wrappers(state, path)[0], path)[1] is None:
        choose_normalization(None, None, 1, path)


def foreign_key(key: str, net: nn.Module) -> str:
    """The advgen name, in Sequential(Normalize, net), of a key from a file saved without Normalize.

    'module.' (DataParallel) is stripped; the public layouts' 'layer{s}.{j}.*' (stage s from 1, block j
    from 0) is `net.layers[(s - 1) * blocks_per_stage + j]`, when the net has that stage and block (else
    the key is left as it is, to be reported as unexpected); their 'shortcut.0.weight' (a 1x1 conv in a
    Sequential) is advgen's 'shortcut.weight'; 'linear.*' is 'fc.*'; everything else keeps its name
    (conv1, bn1, bn, and advgen's own 'layers.*', 'fc.*'; the WideResNets' RobustBench names are advgen's).
    """
    key = key.removeprefix("module.")
    staged = _STAGED.fullmatch(key)
    stages, per_stage = getattr(net, "stages", 0), getattr(net, "blocks_per_stage", 0)
    if staged and 1 <= int(staged[1]) <= stages and int(staged[2]) < per_stage:
        rest = "shortcut.weight" if staged[3] == "shortcut.0.weight" else staged[3]
        key = f"layers.{(int(staged[1]) - 1) * per_stage + int(staged[2])}.{rest}"
    elif key.startswith("linear."):
        key = "fc." + key[len("linear."):]
    return key


def map_foreign_keys(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a foreign state dict onto model = Sequential(Normalize, net): -> (state, advgen key -> file key).

    Keys already in advgen's spelling ('0.mean', '1.conv1.weight') are kept. Keys under a prefix the net
    declares unused upstream (`unused_upstream_prefixes`: RobustBench's never-called WideResNet
    sub_block1) are dropped, with a log line. BatchNorm 'num_batches_tracked' counters, which older
    PyTorch did not save and which inference does not use, are taken from the model when the file lacks
    them; so are the Normalize buffers (set by the caller).
    """
    own, net = model.state_dict(), model[1]
    unused = tuple(getattr(net, "unused_upstream_prefixes", ()))
    dropped = [k for k in state if unused and k.removeprefix("module.").startswith(unused)]
    if dropped:
        log.info("dropped %d keys under %s (built upstream, never used in its forward)", len(dropped), ", ".join(unused))
    out, names = {}, {}
    for k, v in state.items():
        if k in dropped:
            continue
        mapped = k.removeprefix("module.")
        if mapped not in own:
            mapped = "1." + foreign_key(k, net)
        out[mapped], names[mapped] = v, k
    for k, v in own.items():
        if k not in out and (k.endswith(".num_batches_tracked") or k in ("0.mean", "0.std")):
            out[k] = v
    return out, names


def _natural(key: str) -> list:
    """Sort key that puts layers.9 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _listed(items: list[str], limit: int = 4) -> str:
    items = sorted(items, key=_natural)
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], names: dict[str, str] | None = None) -> str | None:
    """None when state fits model exactly, else one line: the missing keys, the unexpected keys (in the
    file's own spelling, via names) and the shape mismatches, the first few of each with the counts."""
    own, names = model.state_dict(), names or {}
    missing = [k for k in own if k not in state]
    unexpected = [names.get(k, k) for k in state if k not in own]
    shapes = [f"{names.get(k, k)} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    parts = [f"{len(found)} {what}: {_listed(found)}" for what, found in
             (("missing keys", missing), ("unexpected keys", unexpected),
              ("shape mismatches (file vs model)", shapes)) if found]
    return "; ".join(parts) or None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str = "",
               names: dict[str, str] | None = None) -> None:
    """load_state_dict(strict) with a one-line CheckpointError naming what does not fit."""
    problem = state_mismatch(model, state, names)
    if problem is None:
        try:
            model.load_state_dict(state, strict=True)
            return
        except (RuntimeError, TypeError, ValueError) as e:  # e.g. a tensor of a dtype that cannot be copied
            problem = one_line(e)
    raise CheckpointError(f"{path} does not fit this architecture{f' ({what})' if what else ''}: {problem}")


def resolve_model_file(path: str | Path) -> Path:
    """A run folder's model file, a model file, or "zoo:NAME" (checked against its card's sha256)."""
    if isinstance(path, str) and path.startswith(ZOO_PREFIX):
        return zoo_model_file(path[len(ZOO_PREFIX):])
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    return path


def load_model(path: str | Path, *, model_name: str | None = None, num_classes: int | None = None,
               in_channels: int = 3, normalize=None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a classifier from a run folder, a model file or "zoo:NAME", in eval mode, taking [0, 1] inputs.

    advgen's .safetensors files name their architecture (and its variant) and carry their normalization.
    A foreign torch.save file (.pt, .pth, .th, .tar; read with weights_only=True, unwrapped from
    CONTAINER_KEYS, 'module.' / 'model.' prefixes stripped, loaded strictly) needs model_name and is
    built with num_classes (default 10) and in_channels. Its normalization is the one it carries
    (NORMALIZATION_KEYS: RobustBench's mu/sigma, a normalize wrapper's keys) or else must be stated:
    normalize = "cifar10" | "cifar100" | "imagenet" | "none" | "M1,M2,M3/S1,S2,S3" | (mean, std), per
    channel, for pixels in [0, 1]. Nothing is assumed: a file without it and no `normalize` is a
    UserError, and so is a `normalize` that contradicts what a file (advgen's or foreign) carries.
    """
    path = resolve_model_file(path)
    if path.suffix.lower() in FOREIGN_SUFFIXES:
        model = _load_foreign(path, model_name, num_classes or 10, in_channels, normalize)
    else:
        model = _load_advgen(path, model_name, num_classes, normalize)
    return model.to(device).eval()


def _load_foreign(path: Path, model_name: str | None, num_classes: int, in_channels: int, normalize) -> nn.Module:
    if model_name is None:
        raise UserError(f"{path} is a foreign PyTorch file: name its architecture (--model)")
    return model_from_foreign_state(read_foreign_state(path), path, model_name, num_classes, in_channels, normalize)


def model_from_foreign_state(state: dict[str, torch.Tensor], path: Path, model_name: str, num_classes: int,
                             in_channels: int = 3, normalize=None) -> nn.Module:
    """build_model(model_name, ...) holding a foreign state dict (from read_foreign_state(path)); `path`
    only names the file in errors. The normalization: choose_normalization (what the file carries, else
    `normalize` as load_model takes it; never a default)."""
    from .models import build_model
    stripped, original = strip_wrappers(state, path)
    state, carried = split_normalization(stripped, path)
    mean, std = choose_normalization(carried, normalize, in_channels, path)
    log.info("normalization of %s (%s): %s", path, "carried by the file" if carried else "stated",
             _fmt_stats((mean, std)))
    model = build_model(model_name, num_classes, in_channels, mean=mean, std=std)
    mapped, names = map_foreign_keys(state, model)
    names = {k: original.get(v, v) for k, v in names.items()}   # errors name keys as the file spells them
    load_state(model, mapped, path, f"{model_name}, {num_classes} classes, {in_channels} channels", names)
    return model.eval()


def saved_architecture(path: str | Path) -> str | None:
    """The registry name (models.saved_model_name) an advgen model file, run folder or zoo:NAME holds;
    None for a foreign torch.save file or an advgen file that does not record it."""
    from .models import saved_model_name
    path = resolve_model_file(path)
    if path.suffix.lower() in FOREIGN_SUFFIXES:
        return None
    meta = read_tensors(path)[1]
    if not isinstance(meta.get("model"), str):
        return None
    try:
        return saved_model_name(meta["model"], meta.get("variant"))
    except UserError as e:
        raise CheckpointError(f"{path} has inconsistent metadata ({e})") from None


def _load_advgen(path: Path, model_name: str | None, num_classes: int | None, normalize=None) -> nn.Module:
    """An advgen safetensors model: architecture (models.saved_model_name of its "model" and "variant")
    and class count from its metadata, channels and normalization from its Normalize buffers ('0.mean',
    '0.std', shape (1, C, 1, 1))."""
    from .models import MODELS, build_model, is_import_path, saved_model_name
    tensors, meta = read_tensors(path)
    name = meta.get("model", model_name)
    if name is None:
        raise CheckpointError(f"{path} does not say which architecture it holds (pass --model)")
    classes = meta.get("num_classes", num_classes or 10)
    if not isinstance(name, str) or (name not in MODELS and not is_import_path(name)):
        raise CheckpointError(f"{path} holds an unknown architecture {name!r}; advgen knows "
                              f"{', '.join(sorted(MODELS))}")
    if "model" in meta:   # the name a file records; one the caller gives is built as given
        try:
            name = saved_model_name(name, meta.get("variant"))
        except UserError as e:
            raise CheckpointError(f"{path} has inconsistent metadata ({e})") from None
    if type(classes) is not int or not 1 <= classes <= 100_000:
        raise CheckpointError(f"{path} has malformed metadata (num_classes {classes!r})")
    mean, std = tensors.get("0.mean"), tensors.get("0.std")
    if mean is None or std is None or mean.dim() != 4 or mean.shape != std.shape or mean.shape[1] < 1:
        raise CheckpointError(f"{path} lacks the normalization buffers 0.mean / 0.std (1, C, 1, 1) of an advgen model")
    if normalize is not None:   # advgen files carry theirs: a statement may only repeat it
        choose_normalization((tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())), normalize,
                             mean.shape[1], path)
    try:
        model = build_model(name, classes, mean.shape[1], mean=mean.flatten().tolist(), std=std.flatten().tolist())
    except UserError as e:
        raise CheckpointError(f"{path} has bad normalization buffers ({e})") from None
    load_state(model, tensors, path, f"{name}, {classes} classes, {mean.shape[1]} channels")
    return model
