"""Which of AutoAttack's attacks finds what PGD missed: on the samples a campaign evaluation counts robust
under PGD-L2 but not under the standard AutoAttack (per-sample bits of `advgen eval --full`), each of
AutoAttack's four attacks run alone on them (APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets,
Square with 5,000 queries), and how many each one breaks.

    OMP_NUM_THREADS=1 python tools/gap_attribution.py zoo:resnet20-base experiments/campaign/evals/base.json \
        --eps 0.25 --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json

import torch

import advgen
from advgen.attacks import AutoAttack
from advgen.data import load_cifar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("evaluation", help="a full evaluation's JSON (per-sample bits)")
    ap.add_argument("--eps", type=float, default=0.25)
    ap.add_argument("--data-dir", required=True)
    a = ap.parse_args()
    ev = json.load(open(a.evaluation))
    pgd, aa = ev["samples"][f"pgd:{a.eps}"], ev["samples"][f"aa:{a.eps}"]
    idx = [i for i in range(ev["n"]) if pgd[i] == "1" and aa[i] == "0"]
    model = advgen.load_model(a.model)
    _, test = load_cifar("cifar10", a.data_dir)
    x, y = test.float_images()[idx], test.labels[idx]
    assert fingerprint_ok(model, ev), "the evaluation was made for another model"
    out = {"model": a.model, "eps": a.eps, "samples": len(idx), "broken_by": {}}
    for attack in ("apgd-ce", "apgd-t", "fab-t", "square"):
        adv = AutoAttack(model, norm="l2", eps=a.eps, attacks=[attack], targets=9, seed=0)(x, y)
        with torch.no_grad():
            out["broken_by"][attack] = int((model(adv).argmax(1) != y).sum())
        print(attack, out["broken_by"][attack], "of", len(idx), flush=True)
    print(json.dumps(out))


def fingerprint_ok(model, ev) -> bool:
    from advgen.io import fingerprint
    return fingerprint(model) == ev["settings"]["model_sha256"]


if __name__ == "__main__":
    main()
