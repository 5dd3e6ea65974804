#!/usr/bin/env bash
# The campaign's evaluation queue (issue: full scale): for each stage in turn, wait until its run.json
# says finished, then `advgen eval --full` on the first 1,000 test images (PGD-L2 sweep, the standard
# AutoAttack at L2 0.25 and 0.5, worst case, sanity checks) into EVALS/STAGE.json. The evaluation saves
# its per-sample results after every chunk of 100 images and resumes from them, so the queue is simply
# started again after a stop. Run from the campaign's worktree (tools/background.sh does):
#
#   OMP_NUM_THREADS=1 ADVGEN=$PWD/.venv/bin/advgen bash eval_queue.sh DATA runs/campaign runs/evals fgsm_rs pgd10
set -euo pipefail
DATA=${1:?usage: eval_queue.sh DATA_DIR RUNS_DIR EVALS_DIR STAGE...}
RUNS=${2:?usage: eval_queue.sh DATA_DIR RUNS_DIR EVALS_DIR STAGE...}
EVALS=${3:?usage: eval_queue.sh DATA_DIR RUNS_DIR EVALS_DIR STAGE...}
shift 3
ADVGEN=${ADVGEN:-advgen}
NORM=${NORM:-l2}   # NORM=linf: the Linf zoo's evaluation (PGD at 0, 2, 4, 8, 16/255, AutoAttack at 8/255)
mkdir -p "$EVALS"

finished() {  # finished STAGE: its run.json exists and says finished
  python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("finished") else 1)' \
    "$RUNS/$1/run.json" 2>/dev/null
}

for s in "$@"; do
  until finished "$s"; do sleep 300; done
  echo "== $(date -Is) eval $s"
  "$ADVGEN" eval "$RUNS/$s" --full --norm "$NORM" --data-dir "$DATA" --test-subset 1000 --batch-size 100 \
    --device cpu --out "$EVALS/$s.json"
done
echo "== $(date -Is) evaluations done"
