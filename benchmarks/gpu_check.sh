#!/usr/bin/env bash
# On a machine with CUDA: the CUDA-marked tests (amp, CUDA RNG in resume, CUDA-event timing, DDP over
# NCCL with 2+ GPUs) and a short timed training benchmark; output in benchmarks/results/gpu-check-*.txt.
#   bash benchmarks/gpu_check.sh [--data-dir ../shared/data]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DATA="../shared/data"
if [ "${1:-}" = "--data-dir" ]; then DATA="$2"; fi
OUT="benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M%S).txt"
mkdir -p benchmarks/results
{
  echo "# gpu_check $(date -Is) $(git rev-parse --short HEAD 2>/dev/null || true)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(), 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
  python -m pytest -q -rs tests/test_distributed.py -k "cuda or nccl" || echo "TESTS FAILED"
  TMP=$(mktemp -d)
  for amp in "" "--amp"; do
    echo "## advgen train --method generator --device cuda $amp (3,000 images, 2 epochs)"
    python -m advgen train --method generator --device cuda $amp --epochs 2 --train-subset 3000 \
      --test-subset 500 --data-dir "$DATA" --out "$TMP/g$amp" --force
    python -c "import json,sys; r=json.load(open('$TMP/g$amp/run.json')); print('seconds per epoch', [round(e['seconds'],3) for e in r['epochs']])"
  done
  if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    echo "## the same over 2 GPUs (torchrun, NCCL)"
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m advgen train --method generator --device cuda \
      --epochs 2 --train-subset 3000 --test-subset 500 --data-dir "$DATA" --out "$TMP/ddp" --force
    python -c "import json; r=json.load(open('$TMP/ddp/run.json')); print('world', r['world_size'], 'seconds per epoch', [round(e['seconds'],3) for e in r['epochs']])"
  fi
} 2>&1 | tee "$OUT"
echo "written: $OUT"
