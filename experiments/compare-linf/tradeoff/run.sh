#!/usr/bin/env bash
# gen-nfgsm at Linf 8/255 trades clean accuracy for robustness: is it above N-FGSM's own trade-off curve?
# N-FGSM trained at 16/255 (the comparison's linf16-quick, final 4-unit models) evaluated at 8/255 with the
# comparison's protocol (PGD 50 steps of 2.5·eps/50 x 2 restarts ce, margin; standard AutoAttack; first 200
# test images). One thread, about 11 minutes a seed on the 2-core machine (2026-12-05):
#
#   OMP_NUM_THREADS=1 bash experiments/compare-linf/tradeoff/run.sh runs/compare-linf/linf16-quick \
#       experiments/compare-linf/tradeoff ../shared/data
set -euo pipefail
RUNS=${1:?usage: run.sh LINF16_RUNS OUT_DIR DATA_DIR}
OUT=${2:?usage: run.sh LINF16_RUNS OUT_DIR DATA_DIR}
DATA=${3:?usage: run.sh LINF16_RUNS OUT_DIR DATA_DIR}
ADVGEN=${ADVGEN:-advgen}
for s in 0 1 2; do
  echo "== $(date -Is) nfgsm-linf s$s"
  "$ADVGEN" eval "$RUNS/nfgsm-linf-s$s" --full --norm linf --eps 0,8/255 --aa-eps 8/255 --test-subset 200 \
    --rel-step 0.05 --batch-size 100 --data-dir "$DATA" --device cpu --out "$OUT/nfgsm-linf-16at8-s$s.json"
done
echo "== $(date -Is) done"
