"""How tight advgen's PGD-L2 is against AutoAttack, by step size: on the first N test images of a campaign
evaluation (`advgen eval --full`, whose per-sample AutoAttack bits it reads), PGD at each step size given
(steps, restarts ascending the cross-entropy then the margin loss, each sample's worst case), and how
many samples it counts robust that AutoAttack broke (the gap) and the reverse.

    OMP_NUM_THREADS=1 python tools/pgd_step_probe.py zoo:resnet20-base experiments/campaign/evals/base.json \
        --eps 0.25 --n 300 --rel-steps 0.05,0.1,0.2,0.4 --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import advgen
from advgen.attacks import PGD
from advgen.data import load_cifar
from advgen.evaluation import robust_flags
from advgen.io import fingerprint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("evaluation", help="a full evaluation's JSON (per-sample bits)")
    ap.add_argument("--eps", type=float, default=0.25)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rel-steps", default="0.05,0.1,0.2,0.4", help="step sizes as fractions of eps")
    ap.add_argument("--data-dir", required=True)
    a = ap.parse_args()
    ev = json.load(open(a.evaluation))
    model = advgen.load_model(a.model)
    if fingerprint(model) != ev["settings"]["model_sha256"]:
        raise SystemExit(f"{a.evaluation} was made for another model than {a.model}")
    _, test = load_cifar("cifar10", a.data_dir)
    x, y = test.float_images()[:a.n], test.labels[:a.n]
    aa = torch.tensor([c == "1" for c in ev["samples"][f"aa:{a.eps}"][:a.n]])
    out = {"model": a.model, "eps": a.eps, "n": a.n, "steps": a.steps, "autoattack_robust": int(aa.sum()), "pgd": {}}
    print(f"{a.model} L2 {a.eps}, first {a.n} test images: AutoAttack robust {int(aa.sum())}", flush=True)
    for rel in (float(r) for r in a.rel_steps.split(",")):
        t0 = time.perf_counter()
        flags = robust_flags(model, x, y, lambda e: PGD(model, norm="l2", eps=e, steps=a.steps, rel_step=rel,
                                                         restarts=2, objective=("ce", "margin")), [a.eps], 500)[0]
        row = {"robust": int(flags.sum()), "robust_but_aa_broke": int((flags & ~aa).sum()),
               "broken_but_aa_robust": int((~flags & aa).sum()), "seconds": round(time.perf_counter() - t0, 1)}
        out["pgd"][str(rel)] = row
        print(f"rel step {rel}: {row}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
