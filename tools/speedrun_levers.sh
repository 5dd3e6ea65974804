#!/usr/bin/env bash
# The speedrun's schedule levers at subset scale (docs/speedrun.md, Levers): 10,000 training images,
# 6 epochs of recipe speedrun-l2 from scratch, 3 seeds per arm, PGD-L2 0.5 (20 steps) on the first 500
# test images. Resumable: a finished run or evaluation is skipped. One thread is enough:
#   OMP_NUM_THREADS=1 bash tools/speedrun_levers.sh DATA OUT      (ADVGEN=path/to/advgen to pick one)
set -u
D=${1:?data dir} OUT=${2:?output folder}
A=${ADVGEN:-advgen}
mkdir -p "$OUT"
ARMS=${ARMS:-cyclic02 cosine01}   # cyclic04: the cycle's peak doubled (2026-12-04)
for seed in ${SEEDS:-0 1 2}; do
  for arm in $ARMS; do
    out=$OUT/$arm-s$seed
    case $arm in
      cyclic02) extra=(--schedule cyclic --lr 0.2) ;;   # the recipe's own
      cosine01) extra=(--schedule cosine --lr 0.1) ;;
      cyclic04) extra=(--schedule cyclic --lr 0.4) ;;
    esac
    echo "== $(date -Is) $arm seed $seed"
    if ! { [ -f "$out/run.json" ] && grep -q '"finished": true' "$out/run.json"; }; then
      "$A" train --recipe speedrun-l2 "${extra[@]}" --seed $seed --train-subset 10000 --test-subset 500 \
        --data-dir "$D" --out "$out" $([ -d "$out" ] && echo --resume) --checkpoint-every 50 2>&1 | tail -2
    fi
    [ -f "$out/pgd.json" ] || "$A" eval "$out" --data-dir "$D" --test-subset 500 --eps 0.5 --steps 20 \
      --out "$out/pgd.json" 2>&1 | tail -1
  done
done
echo "== $(date -Is) done"
