#!/usr/bin/env bash
# The first thing to run on a machine with CUDA GPUs (docs/gpu-and-precision.md says what it covers and
# what has run so far). About 10 minutes on one GPU; each stage has its own time limit, a stage that
# fails or runs out of time is reported and the next one starts; a summary of every stage ends the output.
#
#   bash benchmarks/gpu_check.sh [--data-dir ../shared/data] [--cpu-smoke]
#   GPU_CHECK_SECONDS=N (the whole script's limit, default 590), GPU_CHECK_SKIP=REGEX (stages whose names match
#   are skipped, e.g. '^(6|7)\.' where a second call runs them)
#
# Stages: (1) every test marked `cuda` (pytest -m cuda: precisions, the host data path, index-less and
# indexed devices, resume on CUDA, --compile, DDP over NCCL with 2+ GPUs), (2) the same tests' host-sync
# pass: a few training steps of each method under torch.cuda.set_sync_debug_mode("error"), (3) one GPU,
# each precision (auto, fp32, bf16, fp16), (4) resume on CUDA from the command line (kill -9, --resume,
# compared with a run left alone), (5) torchrun on all GPUs: the generator with --sync-bn, TRADES and
# Free-AT (NCCL), and a sharded evaluation, (6) the timed benchmark: images/s per method and precision
# (benchmarks/gpu_bench.py), (7) --compile of a ResNet-20 from the command line.
# Output: benchmarks/results/gpu-check-DATE.txt (and gpu-bench-DATE.json).
#
# --cpu-smoke: the same commands on the CPU at toy sizes (gloo over 2 processes instead of NCCL; --sync-bn
# and --compile left out): a check of this script itself, not of any GPU path.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export DATA="${DATA:-../shared/data}" SMOKE="${SMOKE:-0}"
STEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --step) STEP="$2"; shift 2; break ;;   # internal: one helper below, run by `stage` under `timeout`
    *) echo "usage: bash benchmarks/gpu_check.sh [--data-dir DIR] [--cpu-smoke]" >&2; exit 2 ;;
  esac
done

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; NPROC=2; SUBSET=64; TEST=16; BATCH=32; BENCH_SUBSET=64
  BENCH_ARGS=(--methods standard,fgsm --precisions fp32 --epochs 1)
  export OMP_NUM_THREADS=1
  NOTE="CPU SMOKE RUN: no GPU path was exercised"
else
  DEVICE=cuda; SUBSET=3000; TEST=500; BATCH=128; BENCH_SUBSET=5120; BENCH_ARGS=()
  NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count())")}
  NOTE=""
fi
export NPROC
COMMON=(--device "$DEVICE" --data-dir "$DATA" --train-subset "$SUBSET" --test-subset "$TEST" --batch-size "$BATCH")
TORCHRUN=(python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m advgen)
# ------------------------------------------------------------------ helpers (run as: gpu_check.sh --step NAME)
seconds() {   # seconds per epoch and the precision a run folder's run.json records
  python -c "import json,sys; r=json.load(open(sys.argv[1] + '/run.json')); p=r['precision']
print('trained in', p['training'], '(' + p['reason'] + '); world', r['world_size'], '; seconds per epoch',
      [round(e['seconds'], 3) for e in r['epochs']], '; test acc', r['epochs'][-1]['test_acc'])" "$1"
}

train_and_show() {   # train_and_show OUT ARGS...: advgen train, then its numbers
  local out="$1"; shift
  python -m advgen train "$@" --out "$out" --force && seconds "$out"
}

torchrun_and_show() {
  local out="$1"; shift
  "${TORCHRUN[@]}" train "$@" --out "$out" --force && seconds "$out"
}

resume_check() {   # a run killed with SIGKILL after its first saved state, resumed, against one left alone
  local args=(--method minmax --attack-steps 3 --epochs 2 --schedule constant --checkpoint-every 4 "${COMMON[@]}")
  python -m advgen train "${args[@]}" --out "$TMP/alone" --force || return 1
  python -m advgen train "${args[@]}" --out "$TMP/killed" --force & local pid=$!
  while [ ! -f "$TMP/killed/state.safetensors" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  python -m advgen train "${args[@]}" --out "$TMP/killed" --resume || return 1
  python - "$TMP/alone" "$TMP/killed" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/model.safetensors") for d in sys.argv[1:])
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print("resumed run bit-identical to the run left alone:", all((a[k] == b[k]).all() for k in a),
      f"(largest weight difference {diff:.3g})")
EOF
}

if [ -n "$STEP" ]; then
  "$STEP" "$@"
  exit $?
fi

# ------------------------------------------------------------------ the stages
STAMP=$(date +%Y%m%d-%H%M%S)
OUT="benchmarks/results/gpu-check-$STAMP.txt"
BENCH="benchmarks/results/gpu-bench-$STAMP.json"
mkdir -p benchmarks/results
export TMP
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
DEADLINE=${GPU_CHECK_SECONDS:-590}   # the whole script, seconds
SUMMARY=()

# stage NAME LIMIT_S COMMAND...: run it under `timeout` (a helper of this script through --step), within
# what is left of DEADLINE; record the outcome
stage() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ -n "${GPU_CHECK_SKIP:-}" ] && [[ "$name" =~ $GPU_CHECK_SKIP ]]; then
    echo "## $name: SKIPPED (GPU_CHECK_SKIP)"; SUMMARY+=("SKIPPED (GPU_CHECK_SKIP)  $name"); return
  fi
  if [ "$left" -lt 15 ]; then
    echo "## $name: SKIPPED (out of time)"; SUMMARY+=("SKIPPED (out of time)  $name"); return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "## $name (limit ${limit} s)"
  local t0=$SECONDS rc
  if [ "$(type -t "$1")" = function ]; then
    timeout --kill-after=10 "$limit" bash "$SELF" --step "$@"; rc=$?
  else
    timeout --kill-after=10 "$limit" "$@"; rc=$?
  fi
  local took=$((SECONDS - t0)) verdict
  case $rc in
    0) verdict="ok" ;;
    124|137) verdict="TIMED OUT" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  echo "## $name: $verdict in ${took} s"
  SUMMARY+=("$verdict  ${took} s  $name")
}

{
  echo "# gpu_check $(date -Is) $(git rev-parse --short HEAD 2>/dev/null || true) ${NOTE}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
  python - <<'EOF'
import torch
from advgen import precision
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "devices", torch.cuda.device_count())
for d in [torch.device("cuda", i) for i in range(torch.cuda.device_count())] + [torch.device("cpu")]:
    print(d, "native bf16:", precision.native_bf16(d), "| --precision auto:", precision.resolve("auto", d).reason)
EOF
  if [ "$SMOKE" = 1 ]; then
    stage "1. CUDA tests (collected and skipped without a GPU)" 120 \
      python -m pytest -q -rs -m cuda tests/test_gpu_paths.py tests/test_distributed.py
  else
    stage "1. every test marked cuda" 240 \
      python -m pytest -q -rs -m cuda -k "not host_sync" --continue-on-collection-errors tests
    stage "2. host-sync pass: training steps under set_sync_debug_mode('error')" 90 \
      python -m pytest -q -rs -m cuda -k host_sync -v tests/test_gpu_paths.py
  fi
  for p in auto fp32 bf16 fp16; do
    stage "3. one $DEVICE, --precision $p: generator, $SUBSET images, 2 epochs" 60 \
      train_and_show "$TMP/g-$p" --method generator --precision "$p" --epochs 2 "${COMMON[@]}"
  done
  stage "4. resume on $DEVICE from the command line (kill -9, --resume)" 90 resume_check
  if [ "$SMOKE" = 1 ]; then SYNC=(); else SYNC=(--sync-bn); fi
  if [ "$NPROC" -lt 2 ]; then
    echo "# only $NPROC GPU: torchrun runs one process (NCCL initialised, no all-reduce); DDP over NCCL is untested here"
  fi
  stage "5a. torchrun x $NPROC: generator ${SYNC[*]:-}" 90 \
    torchrun_and_show "$TMP/ddp-gen" --method generator "${SYNC[@]}" --epochs 2 "${COMMON[@]}"
  stage "5b. torchrun x $NPROC: TRADES" 90 \
    torchrun_and_show "$TMP/ddp-trades" --method trades --attack-steps 3 --epochs 1 "${COMMON[@]}"
  stage "5c. torchrun x $NPROC: Free-AT" 90 \
    torchrun_and_show "$TMP/ddp-free" --method free --free-replays 4 --epochs 1 "${COMMON[@]}"
  stage "5d. torchrun x $NPROC: sharded evaluation" 60 \
    "${TORCHRUN[@]}" eval "$TMP/ddp-trades" --device "$DEVICE" --data-dir "$DATA" --test-subset "$TEST" \
      --eps 0,0.25,0.5 --steps 5
  stage "6. benchmark: images/s per method and precision" 240 \
    python benchmarks/gpu_bench.py --data-dir "$DATA" --device "$DEVICE" --train-subset "$BENCH_SUBSET" \
      --batch-size "$BATCH" --out "$BENCH" "${BENCH_ARGS[@]}"
  if [ "$SMOKE" = 0 ]; then
    stage "7. --compile: min-max PGD-3 on a ResNet-20" 150 \
      train_and_show "$TMP/compiled" --method minmax --attack-steps 3 --compile --epochs 2 "${COMMON[@]}"
  fi
  echo "# summary ($SECONDS s in all)"
  printf '  %s\n' "${SUMMARY[@]}"
} 2>&1 | tee "$OUT"
echo "written: $OUT"
