#!/usr/bin/env bash
# Catastrophic overfitting at full data, and who prevents it: Linf 16/255 from scratch on all 50,000 images,
# the cyclic learning rate of Wong et al. 2020 (peak 0.2), 10 epochs, bf16 autocast (needs native bf16: AMX or
# AVX512-BF16; evaluation fp32), the watch on the first 256 test images at 16/255, seed 0, one thread each:
#   fgsm-zero-16-full  FGSM from zero, step eps (N-FGSM with no noise), the textbook overfitting case
#   nfgsm-16-full      N-FGSM (noise 2 eps, step eps, no projection)
#   gen-sdi-16-full    the gen-sdi generators bounded at 16/255, then a gradient step (the zoo's Linf recipe)
#   fgsm-rs-16-cyclic  FGSM-RS (a random start, step 1.25 eps), the control: is a random start enough?
# Run from the main checkout: bash experiments/pilot-co/run_cyclic16.sh (resumes what is there).
set -euo pipefail
C="--schedule cyclic --lr 0.2 --epochs 10 --precision bf16 --watch-subset 256 --checkpoint-every 100
   --data-dir ../shared/data --device cpu --seed 0 --resume"
mkdir -p runs/pilot-co
run() { local name=$1; shift; OMP_NUM_THREADS=1 setsid nohup .venv/bin/advgen train "$@" $C --out runs/pilot-co/$name \
          >> runs/pilot-co/$name.log 2>&1 < /dev/null & }
run fgsm-zero-16-full --method nfgsm --nfgsm-k 0 --attack-norm linf --attack-eps 16/255 --init none
run nfgsm-16-full --method nfgsm --attack-norm linf --attack-eps 16/255 --init none
run gen-sdi-16-full --recipe gen-sdi-linf-scratch --gen-bound 16/255
run fgsm-rs-16-cyclic --recipe fgsm-rs-linf --attack-eps 16/255 --init none   # FGSM-RS, step 1.25 eps
