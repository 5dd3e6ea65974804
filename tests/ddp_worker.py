"""A training job for tests/test_distributed.py, started by torchrun (2 processes, gloo on the CPU):

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py MODE OUT

MODE: run (train the generator CONFIG to the end), kill:K (both ranks SIGKILL themselves inside
global step K), resume (continue OUT), raise:K (rank 1 raises inside step K), standard (the BN-free
standard CONFIG, to compare with one process), trades (TRADES: two training forwards in one DDP call). Every rank writes its classifier and method modules to
OUT/rank-R.safetensors at the end.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402
from synth_cifar import tiny_dataset  # noqa: E402

from advgen.checkpoint import save_tensors  # noqa: E402
from advgen.cli import seed_everything  # noqa: E402
from advgen.config import TrainConfig  # noqa: E402
from advgen.models.generators import BankConfig  # noqa: E402
from advgen.training import METHODS, distributed, registered, train  # noqa: E402
from advgen.training.generator import GeneratorOptions  # noqa: E402
from advgen.training.trades import TradesOptions  # noqa: E402

torch.set_num_threads(1)
# 48 images, global batch 16: 3 steps per epoch, 8 rows per rank
CONFIG = TrainConfig(method="generator", epochs=2, batch_size=16, seed=5, options=GeneratorOptions(
    bank=BankConfig(n=4, assign="random", grad_input=True, width=4, depth=2), momentum=0.9, steps=2,
    warmup_epochs=1, reinit_every=2, clean_fraction=0.25))
STANDARD = TrainConfig(method="standard", epochs=2, batch_size=16, seed=5, lr=0.05)
TRADES = TrainConfig(method="trades", epochs=2, batch_size=16, seed=5, options=TradesOptions(steps=2))


def sets():
    return tiny_dataset(48, 1), tiny_dataset(16, 2)


INSTANCES = []


def probed(base, at_step: int = 0, action=None):
    """base, remembering its instance (for its modules), calling action() inside its at_step-th loss."""
    class Probe(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            INSTANCES.append(self)
            self.calls = 0

        def loss(self, x, y):
            self.calls += 1
            if self.calls == at_step:
                action()
            return super().loss(x, y)
    return Probe


def fail() -> None:
    raise RuntimeError("rank 1 fails on purpose")


def main(mode: str, out: Path) -> None:
    dist, _ = distributed.init("cpu")
    cfg = TrainConfig.from_dict({"standard": STANDARD, "trades": TRADES}.get(mode, CONFIG).to_dict())
    seed_everything(distributed.rank_seed(cfg.seed, dist.rank))
    model = make_tiny(batchnorm=mode != "standard")
    kind, _, k = mode.partition(":")
    base = METHODS[cfg.method].cls
    if kind == "kill":
        cls = probed(base, int(k), lambda: os.kill(os.getpid(), signal.SIGKILL))
    elif kind == "raise":
        cls = probed(base, int(k), fail if dist.rank == 1 else (lambda: None))
    else:
        cls = probed(base)
    with registered(cfg.method, cls):
        model, _ = train(cfg, *sets(), out_dir=out, progress=False, model=model, resume=kind == "resume",
                         checkpoint_every=1)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, module in INSTANCES[-1].modules().items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    save_tensors(out / f"rank-{dist.rank}.safetensors", tensors, {})
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
