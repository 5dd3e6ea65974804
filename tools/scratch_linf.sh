#!/usr/bin/env bash
# The Linf zoo from scratch (issue: Linf): the recipes gen-sdi-linf-scratch and nfgsm-linf-scratch (lr 0.1,
# 10 epochs, all 50,000 images, the overfitting watch on; NAME-20ep: the same at 20 epochs, the budget matched
# between generator and schedule) trained one after the other in one thread, each
# followed by the zoo's full Linf evaluation (PGD-Linf at 0, 2, 4, 8, 16/255, the standard AutoAttack-Linf
# 8/255, first 1,000 test images). Training checkpoints every 100 steps and the evaluation after every 100
# images, so the queue resumes where it stopped. From a worktree pinned to COMMIT (the first with the recipes),
# beside this checkout; run from the main checkout:
#
#   bash tools/scratch_linf.sh start    # worktree, venv, the committed state restored, the queue started (what
#                                       # is trained or evaluated already is skipped)
#   bash tools/scratch_linf.sh status
#   bash tools/scratch_linf.sh save     # the queue's state into experiments/campaign-linf-scratch (commit it)
#   bash tools/scratch_linf.sh stop     # stop (training saves on SIGTERM), then save
#
# PRECISION=bf16 bash tools/scratch_linf.sh start trains in bf16 autocast (evaluation stays fp32); only where
# the CPU has native bf16 (avx512_bf16 or amx_bf16: about 2x fp32's speed there, 10x slower where emulated). A
# run resumes only in the precision it started in (advgen refuses otherwise), so finish a bf16 run on such a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$PWD
ROOT=$(dirname "$MAIN")
DATA=${DATA:-$ROOT/shared/data}
WT=$ROOT/scratch COMMIT=5c9544c
KEEP=$MAIN/experiments/campaign-linf-scratch
LEFT="gen-sdi-linf-scratch nfgsm-linf-scratch gen-sdi-linf-scratch-20ep nfgsm-linf-scratch-20ep"  # in order
PRECISION=${PRECISION:-fp32}                       # fp32 or bf16 (above)
JOB_RE="runs/scratch_linf\.sh queue"

has_key() {  # FILE KEY: the JSON file exists and its key is there and true
  python3 -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get(sys.argv[2]) else 1)" "$1" "$2" 2> /dev/null
}

queue() {  # run inside the worktree: train, then evaluate, each run in turn; what is done is skipped
  local advgen=$WT/.venv/bin/advgen
  mkdir -p runs/linf-scratch runs/evals
  for r in "$@"; do
    local out=runs/linf-scratch/$r recipe=${r%-20ep} more=()
    [ "$recipe" = "$r" ] || more=(--epochs 20)   # NAME-20ep: the recipe at 20 epochs
    mkdir -p "$out"
    if ! has_key "$out/run.json" finished; then   # a finished run is not resumed (its precision may need bf16)
      echo "== $(date -Is) $r: advgen train --recipe $recipe ${more[*]} --data-dir DATA --device cpu --checkpoint-every 100 --precision $PRECISION --out $out --resume" \
        | tee -a "$out/log.txt"
      "$advgen" train --recipe "$recipe" "${more[@]}" --data-dir "$DATA" --device cpu --checkpoint-every 100 \
        --precision "$PRECISION" --out "$out" --resume 2>&1 | tee -a "$out/log.txt"
    fi
    has_key "runs/evals/$r.json" clean && continue   # evaluated; a partial evaluation resumes
    echo "== $(date -Is) eval $r"
    "$advgen" eval "$out" --full --norm linf --data-dir "$DATA" --test-subset 1000 --batch-size 100 --device cpu \
      --out "runs/evals/$r.json"
  done
  echo "== $(date -Is) queue done"
}

start() {
  ! pgrep -f "$JOB_RE" > /dev/null || { echo "the scratch queue runs already" >&2; exit 2; }
  [ "$PRECISION" != bf16 ] || grep -q -E "avx512_bf16|amx_bf16" /proc/cpuinfo \
    || { echo "PRECISION=bf16 wants a CPU with native bf16 (avx512_bf16 or amx_bf16); this one has none" >&2; exit 2; }
  if [ ! -d "$WT" ]; then git worktree prune; git worktree add --detach "$WT" "$COMMIT"; fi
  [ "$(git -C "$WT" rev-parse --short=7 HEAD)" = "$COMMIT" ] || { echo "$WT is not at $COMMIT" >&2; exit 2; }
  if [ ! -x "$WT/.venv/bin/advgen" ]; then
    python3 -m venv "$WT/.venv"
    "$WT/.venv/bin/pip" install -q torch==2.13.0
    "$WT/.venv/bin/pip" install -q "$WT"
  fi
  mkdir -p "$WT/runs"
  if [ -d "$KEEP" ]; then
    [ -d "$WT/runs/linf-scratch" ] || python3 tools/carry.py restore "$KEEP/training" "$WT/runs/linf-scratch"
    [ -d "$WT/runs/evals" ] || [ ! -d "$KEEP/evals" ] || python3 tools/carry.py restore "$KEEP/evals" "$WT/runs/evals"
  fi
  cp tools/scratch_linf.sh "$WT/runs/"   # a running script is never edited under it
  (cd "$WT"; OMP_NUM_THREADS=${THREADS:-1} DATA=$DATA PRECISION=$PRECISION setsid nohup bash runs/scratch_linf.sh queue $LEFT \
     >> runs/scratch.log 2>&1 < /dev/null &)
  sleep 2; status
}

status() {
  pgrep -af "$JOB_RE|$WT/\.venv/bin/advgen" | cut -c1-160 || echo "the scratch queue is not running"
  [ -f "$WT/runs/scratch.log" ] && echo "$WT/runs/scratch.log: $(tail -n 1 "$WT/runs/scratch.log" | cut -c1-160)"
  return 0
}

save() {
  python3 tools/carry.py save "$WT/runs/linf-scratch" "$KEEP/training"
  [ ! -d "$WT/runs/evals" ] || python3 tools/carry.py save "$WT/runs/evals" "$KEEP/evals"
  echo "saved; now: git add experiments/campaign-linf-scratch && git commit"
}

stop() {
  pkill -f "$JOB_RE" || true
  pkill -TERM -f "$WT/\.venv/bin/advgen" || true
  for _ in $(seq 60); do pgrep -f "$WT/\.venv/bin/advgen" > /dev/null || break; sleep 1; done
  save
}

case ${1:-} in
  queue) shift; WT=$PWD; queue "$@" ;;
  start|status|save|stop) "$1" ;;
  *) echo "usage: scratch_linf.sh start|status|save|stop" >&2; exit 2 ;;
esac
