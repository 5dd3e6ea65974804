#!/usr/bin/env bash
# Does this ResNet-20 overfit catastrophically at full data? FGSM-RS (step 1.25 eps) at Linf 16/255 from
# scratch on all 50,000 images, lr 0.1 cosine, 10 epochs (3,900 steps, 4x the 10,000-image pilots' 936),
# the watch on the first 256 test images at 16/255. One thread; resumes.
set -euo pipefail
cd /work/scratch
R=runs/pilot-co-full/fgsm-rs-16
mkdir -p $R
.venv/bin/advgen train --recipe fgsm-rs-linf --attack-eps 16/255 --init none --lr 0.1 --epochs 10 --watch-subset 256 \
  --data-dir /work/shared/data --device cpu --checkpoint-every 100 --out $R --resume 2>&1 | tee -a $R/log.txt
echo "== $(date -Is) done"
