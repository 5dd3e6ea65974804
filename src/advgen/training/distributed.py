"""Data-parallel training under torchrun: the process group, the shard rule and the few collectives
the loop needs. One `Dist` describes this process's place in the job; `SINGLE` (world size 1) makes
every helper a no-op, so the step loop reads the same with or without torchrun.

    torchrun --nproc_per_node=N -m advgen train ...     # one run over N processes

Rules (docs/running.md, "Many processes, GPUs and nodes (torchrun)"):
- the batch size is the GLOBAL batch: each of the W ranks trains on batch_size / W rows of every batch
  (rank r takes rows [r*b, (r+1)*b) of global batch i of the epoch's seeded permutation), so a run has
  the same steps per epoch, learning-rate schedule and data as a one-process run with the same
  --batch-size, and every image is seen once per epoch. The augmentation of a global batch is drawn
  from the one seeded stream and sliced the same way: each image gets the augmentation it gets in a
  one-process run.
- other randomness (attack starts, generator assignment, the global RNGs) is seeded per rank,
  seed + SEED_STRIDE * rank: different across ranks, reproducible, rank 0's equal to a one-process run.
- rank 0 (`main`) alone writes files and prints; every rank's RNG and method state is gathered into
  the state file, so a run resumes exactly with the same world size (another world size is refused).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as tdist
from torch import nn

from ..data import shard_rows as shard  # noqa: F401  (the shard rule lives with the batches)
from ..errors import UserError

SEED_STRIDE = 1_000_003
# a collective that waits longer than this raises (a hung or lost peer); a rank that exits ends the job
# at once through torchrun, this is the backstop. ADVGEN_DIST_TIMEOUT overrides it (seconds).
DEFAULT_TIMEOUT_S = 300.0
# waits that are long by nature (a node downloading CIFAR while the others wait, the ranks of a sharded
# evaluation finishing at different times) go through a second (gloo) group with this timeout;
# ADVGEN_DIST_PATIENT_TIMEOUT overrides it (seconds)
DEFAULT_PATIENT_TIMEOUT_S = 6 * 3600.0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own randomness (rank 0: `seed` itself)."""
    return seed + SEED_STRIDE * rank




def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1


class Dist:
    """This process's place in a data-parallel job (rank, world size) and the collectives the loop uses.

    With world == 1 every method returns at once without touching torch.distributed. patient: a process
    group of every rank with the long timeout (DEFAULT_PATIENT_TIMEOUT_S), for the collectives that wait
    by nature (`patient=True`); None: the default group serves those too."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, patient=None):
        self.rank, self.world, self.local_rank, self.patient = rank, world, local_rank, patient

    @property
    def main(self) -> bool:
        """The one process that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world})"

    # ---------------------------------------------------------------------------------- tensors
    def average_grads(self, params) -> None:
        """Replace each parameter's .grad by its mean over the ranks (one flat all-reduce). Used for
        modules outside DDP, e.g. the generator bank: every rank then takes the same ascent step."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) tensors in place."""
        if self.active:
            for t in tensors:
                tdist.all_reduce(t)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t (same shape on each) stacked along dim 0 in rank order."""
        if not self.active:
            return t
        out = t.new_empty((self.world * t.shape[0], *t.shape[1:]))
        tdist.all_gather_into_tensor(out, t.contiguous())
        return out

    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless buffers_only) and buffers into every rank's module: one
        broadcast per dtype (the BatchNorm buffers of a ResNet-20 are 57 tensors, broadcast before every
        step), not one per tensor."""
        if not self.active:
            return
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.reshape(-1) for t in group])
                tdist.broadcast(flat, src=0)
                if self.main:   # the source: its tensors are what was sent
                    continue
                i = 0
                for t in group:
                    t.copy_(flat[i:i + t.numel()].view(t.shape))
                    i += t.numel()

    def agree(self, *values: float) -> list[float]:
        """The maximum of each value over the ranks (stop flags: one rank's request stops them all)."""
        if not self.active:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t.tolist()

    # ---------------------------------------------------------------------------------- objects
    def gather(self, obj, patient: bool = False):
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (the other ranks' tensors moved to
        the CPU; rank 0's own object as it is). patient: through the long-timeout group.

        Rank 0 does not send its own object through the collective: gather_object pads every rank's
        pickle to the largest one, so a large object of rank 0's (the generator's memory buffer, ~300 MB
        for CIFAR-10) would otherwise cross the network from every rank at every save."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.main else None
        tdist.gather_object(None if self.main else _to_cpu(obj), out, dst=0, group=self._group(patient))
        if self.main:
            out[0] = obj
        return out

    def share(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) run on rank 0 alone, its result (or its user error) handed to every rank:
        decisions such as the run folder's policy are taken once and no rank waits for a rank that failed."""
        if not self.active:
            return fn(*args, **kwargs)
        box = [None]
        if self.main:
            try:
                box[0] = ("ok", _to_cpu(fn(*args, **kwargs)))
            except UserError as e:  # sent as (class, message, field, problem): ConfigError takes two arguments
                box[0] = ("error", (type(e), str(e), getattr(e, "field", None), getattr(e, "problem", None)))
            except BaseException as e:  # still tell the others (a stop too), then fail here with the traceback
                box[0] = ("error", (RuntimeError, f"rank 0 failed: {type(e).__name__}: {e}", None, None))
                tdist.broadcast_object_list(box, src=0, device=self._object_device())
                raise
        tdist.broadcast_object_list(box, src=0, device=self._object_device())
        kind, value = box[0]
        if kind == "error":
            cls, message, field, problem = value
            raise cls(field, problem) if field is not None and problem is not None else cls(message)
        return value

    def barrier(self, patient: bool = False) -> None:
        """Wait for every rank; patient: through the long-timeout group (a download on one rank)."""
        if self.active:
            tdist.barrier(group=self._group(patient))

    def _group(self, patient: bool):
        return self.patient if patient else None

    def _device(self) -> torch.device:
        if tdist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _object_device(self):
        return self._device() if tdist.get_backend() == "nccl" else None


SINGLE = Dist()


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def current() -> Dist:
    """The Dist of the initialized default process group, or SINGLE."""
    if tdist.is_available() and tdist.is_initialized():
        return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def init(device: str) -> tuple[Dist, str]:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the
    environment): gloo on the CPU, nccl on CUDA, where `--device cuda` means cuda:LOCAL_RANK.
    Returns (dist, device name). Without torchrun: (SINGLE, device) untouched."""
    if not launched():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda:"):
        raise UserError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps":
        raise UserError("--device mps cannot be used under torchrun (no distributed backend)")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices on this node; "
                            "start at most that many processes per node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = float(os.environ.get("ADVGEN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not tdist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    patient = float(os.environ.get("ADVGEN_DIST_PATIENT_TIMEOUT", DEFAULT_PATIENT_TIMEOUT_S))
    # gloo whatever the default backend: its collectives carry CPU objects and barriers only
    group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=patient))
    return Dist(rank, world, local, group), device


def shutdown(clean: bool = False) -> None:
    """Leave the process group. clean: every rank got here without an error, so they first meet at a
    barrier: a rank that tore its gloo group down while another was still in a last collective (rank 0
    writing the run's files) could abort at exit ("terminate called without an active exception")."""
    if tdist.is_available() and tdist.is_initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()


__all__ = ["Dist", "SINGLE", "SEED_STRIDE", "current", "init", "launched", "rank_seed", "shard", "shutdown"]
