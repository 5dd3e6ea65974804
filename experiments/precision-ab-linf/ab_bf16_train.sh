# the A/B's bf16 arms, trained first while this AMX machine is here (their fp32 evaluations run anywhere later,
# by the same benchmarks/precision_ab.py command, which skips the trained arms)
set -u
for s in 1 2; do
  run=runs/precision-ab-linf/gen-sdi-linf-scratch-bf16-s$s
  [ -f $run/model.safetensors ] && continue
  .venv/bin/python -m advgen train --recipe gen-sdi-linf-scratch --precision bf16 --seed $s --data-dir /work/shared/data \
    --device cpu --out $run --force --train-subset 5000 >> runs/precision-ab-linf/gen-sdi-linf-scratch-bf16-s$s.log 2>&1
done
