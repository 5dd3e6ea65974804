#!/usr/bin/env bash
# gen-nfgsm at Linf 8/255 trades clean accuracy for robustness: is it above N-FGSM's own trade-off curve?
# N-FGSM trained at 16/255 (the comparison's linf16-quick, final 4-unit models) evaluated at 8/255 with the
# comparison's protocol (PGD 50 steps of 2.5·eps/50 x 2 restarts ce,margin; standard AutoAttack; first 200 test images).
set -euo pipefail
R=/work/cmp/runs/compare-linf/linf16-quick
for s in 0 1 2; do
  for e in nfgsm-linf; do
    echo "== $(date -Is) $e s$s"
    python3 -m advgen.cli eval $R/$e-s$s --full --norm linf --eps 0,8/255 --aa-eps 8/255 --test-subset 200 \
      --rel-step 0.05 --batch-size 100 --data-dir /work/shared/data --device cpu --out /work/tradeoff/$e-16at8-s$s.json
  done
done
echo "== $(date -Is) done"
