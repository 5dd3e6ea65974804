#!/usr/bin/env bash
# The research comparison (issue: fast-AT state of the art): `advgen compare --preset quick`, entry by
# entry, the most informative first, so that a stopped session leaves whole entries behind. Each call
# resumes what OUT holds. Run from a worktree pinned to one commit (0ee6e99 since 2026-12-02 21:14, the same training code
# with PGD-10 to 16 units; 2d14d2e from 2026-12-01 22:55; f520c91 before):
#
#   git worktree add ../research 0ee6e99 && cd ../research
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install '.[autoattack]'
#   python3 ../main/tools/carry.py restore ../main/experiments/compare-quick runs/compare-quick
#   OMP_NUM_THREADS=1 ADVGEN=$PWD/.venv/bin/advgen nohup bash ../main/tools/compare_quick.sh \
#       /work/shared/data runs/compare-quick > runs/compare.log 2>&1 &
#   # before the session ends, from the main checkout:
#   python3 tools/carry.py save ../research/runs/compare-quick experiments/compare-quick --light
set -euo pipefail
DATA=${1:?usage: compare_quick.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: compare_quick.sh DATA_DIR OUT_DIR}
ADVGEN=${ADVGEN:-advgen}
# pgd10 last: its budgets went to 16 units on 2026-12-02 (its 8-unit runs of 2d14d2e are kept in
# experiments/compare-quick-pgd10-8units/ for the record), so it is retrained after the rest; its
# three seeds train at once (--jobs 3, one thread each) since 2026-12-03, when it was the last entry left
for e in nfgsm gen_mem mem_step gen_sdi fgsm_rs free trades gen_grad gen_rec2 pgd10; do
  echo "== $(date -Is) entry $e"
  jobs=1; [ "$e" = pgd10 ] && jobs=3
  "$ADVGEN" compare --preset quick --entries "$e" --jobs "$jobs" --data-dir "$DATA" --device cpu --out "$OUT"
done
echo "== $(date -Is) compare done"
