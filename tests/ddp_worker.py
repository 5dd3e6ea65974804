"""A training job for tests/test_distributed.py, started by torchrun (2 processes, gloo on the CPU):

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py MODE OUT [memory]

MODE: run (train the generator CONFIG to the end), kill:K (both ranks SIGKILL themselves inside
global step K), resume (continue OUT), raise:K (rank 1 raises inside step K), standard (the BN-free
standard CONFIG, to compare with one process), trades (TRADES: two training forwards in one DDP
call), download (both ranks load CIFAR with --download: one download per node), slow_eval (a sharded
evaluation whose rank 1 outlasts the collective timeout; tests/test_gpu_paths.py). With a third
argument `memory`, the generator MEMORY config instead of CONFIG. Every training rank writes its
classifier and method modules (and the buffer of previous perturbations, as "memory") to
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

from advgen.io import save_tensors# noqa: E402
from advgen.cli.args import seed_everything  # noqa: E402
from advgen.training import TrainConfig  # noqa: E402
from advgen.models.generators import BankConfig  # noqa: E402
from advgen.training import METHODS, distributed, registered, train  # noqa: E402
from advgen.training.methods.generator import GeneratorOptions  # noqa: E402
from advgen.training.methods.trades import TradesOptions  # noqa: E402

torch.set_num_threads(1)
# 48 images, global batch 16: 3 steps per epoch, 8 rows per rank
CONFIG = TrainConfig(method="generator", epochs=2, batch_size=16, seed=5, options=GeneratorOptions(
    bank=BankConfig(n=4, assign="random", grad_input=True, width=4, depth=2), momentum=0.9, steps=2,
    warmup_epochs=1, reinit_every=2, clean_fraction=0.25))
STANDARD = TrainConfig(method="standard", epochs=2, batch_size=16, seed=5, lr=0.05)
TRADES = TrainConfig(method="trades", epochs=2, batch_size=16, seed=5, options=TradesOptions(steps=2))
# memory across epochs: every image is written in epoch 1 (no clean rows) and read in epoch 2, mostly
# on the other rank than the one that wrote it
MEMORY = TrainConfig(method="generator", epochs=2, batch_size=16, seed=5, options=GeneratorOptions(
    bank=BankConfig(n=4, bound="l2", size=0.5, grad_input=True, grad_skip=True, width=4, depth=2),
    memory=True, step_after=True, lr=0.05))


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

        def loss(self, x, y, **where):
            self.calls += 1
            if self.calls == at_step:
                action()
            return super().loss(x, y, **where)
    return Probe


def fail() -> None:
    raise RuntimeError("rank 1 fails on purpose")


def download(out: Path, dist) -> None:
    """Both ranks load CIFAR-10 with --download into an empty folder, from a file:// URL (tests/
    test_gpu_paths.py made the archive: OUT/archive.tar.gz, its md5 in OUT/archive.md5); every download
    is logged to OUT/downloads.log, and each rank writes how many training images it loaded."""
    import dataclasses
    import urllib.request

    from advgen import data
    from advgen.cli import build_parser
    from advgen.cli.args import load_data
    data.LAYOUTS["cifar10"] = dataclasses.replace(data.LAYOUTS["cifar10"], url=(out / "archive.tar.gz").as_uri(),
                                                  md5=(out / "archive.md5").read_text().strip())
    real = urllib.request.urlopen

    def logged(url, *a, **k):
        with open(out / "downloads.log", "a") as f:
            f.write(f"rank {dist.rank}\n")
        return real(url, *a, **k)
    data.urllib.request.urlopen = logged
    args = build_parser().parse_args(["train", "--method", "standard", "--download", "--data-dir",
                                      str(out / "data"), "--out", str(out / "run")])
    train_set, _ = load_data(args, dist=dist)
    (out / f"rank-{dist.rank}.txt").write_text(str(len(train_set)))


def slow_eval(out: Path, dist) -> None:
    """evaluate_sharded where rank 1's shard takes longer than the job's collective timeout
    (ADVGEN_DIST_TIMEOUT, set short by the test); rank 0 writes the combined result to OUT/eval.json."""
    import json
    import time

    from advgen import EvalProtocol
    from advgen.evaluation import sharded
    real = sharded.collect

    def slow(*a, **k):
        if dist.rank == 1:
            time.sleep(float(os.environ["SLOW_EVAL_S"]))
        return real(*a, **k)
    sharded.collect = slow
    test = tiny_dataset(16, 2)
    result = sharded.evaluate_sharded(dist, make_tiny().eval(), test.images, test.labels, torch.device("cpu"),
                                      EvalProtocol(eps=(0.0,), steps=1, checks=False))
    if dist.main:
        (out / "eval.json").write_text(json.dumps(result))


def main(mode: str, out: Path, which: str = "") -> None:
    dist, _ = distributed.init("cpu")
    if mode in ("download", "slow_eval"):
        {"download": download, "slow_eval": slow_eval}[mode](out, dist)
        distributed.shutdown(clean=True)
        return
    chosen = {"standard": STANDARD, "trades": TRADES}.get(mode, MEMORY if which == "memory" else CONFIG)
    cfg = TrainConfig.from_dict(chosen.to_dict())
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
    if getattr(INSTANCES[-1], "memory", None) is not None:
        tensors["memory"] = INSTANCES[-1].memory
    save_tensors(out / f"rank-{dist.rank}.safetensors", tensors, {})
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
