#!/usr/bin/env bash
# The Linf comparison (issue: Linf 8/255): `advgen compare --preset linf-quick` and `linf16-quick`, entry by
# entry, the issue's entries only (N-FGSM, FGSM-RS, PGD-10, the catastrophic-overfitting peer GradAlign and
# the generator variants gen_sdi, gen_rec2, gen_mem). The order answers the issue's question first: N-FGSM and gen_sdi at 16/255 (where single-step
# training overfits catastrophically, the generators' best chance), then at 8/255, then FGSM-RS, the other
# generator variants, and PGD-10 last (the reference; its 16 units cost as much as all the fast entries
# together). A stopped session leaves whole entries behind. Both presets fine-tune the L2 comparison's base
# (the same 10,000 images, standard training: no threat model in it). Each call resumes what OUT holds; the 3
# seeds of an entry run as JOBS workers (default 2), one thread each.
#
#   OMP_NUM_THREADS=1 nohup bash tools/compare_linf.sh /work/shared/data runs/compare-linf > runs/compare-linf.log 2>&1 &
#
# Runs record their base's sha256 and resume from any checkout. The runs carried from the sessions of
# 2026-12-04 were made by advgen 9d08836, which recorded the base by its path only: resume those from a
# worktree at /work/cmp (they name /work/cmp/experiments/...); elsewhere a finished one reads as unfinished.
#   # before the session ends (the runs resume from what it keeps):
#   python3 tools/carry.py save runs/compare-linf experiments/compare-linf --light --keep-weights base --max-mb 20
set -euo pipefail
DATA=${1:?usage: compare_linf.sh DATA_DIR OUT_DIR}
OUT=${2:?usage: compare_linf.sh DATA_DIR OUT_DIR}
ADVGEN=${ADVGEN:-advgen}
JOBS=${JOBS:-2}
BASE=$(cd "$(dirname "$0")/.." && pwd)/experiments/compare-quick/base
# 16 = linf16-quick, 8 = linf-quick
ORDER="16:nfgsm 16:gen-sdi 8:nfgsm 8:gen-sdi 16:gen-nfgsm 16:fgsm-rs 8:fgsm-rs 8:gen-nfgsm 16:gradalign 8:gradalign
       16:gen-rec2 8:gen-rec2 16:gen-mem 8:gen-mem 8:pgd10 16:pgd10"
for item in $ORDER; do
  preset=$([ "${item%%:*}" = 16 ] && echo linf16-quick || echo linf-quick)
  e=${item#*:}-linf
  echo "== $(date -Is) $preset entry $e"
  "$ADVGEN" compare --preset "$preset" --entries "$e" --jobs "$JOBS" --base "$BASE" --data-dir "$DATA" \
    --device cpu --out "$OUT/$preset"
done
echo "== $(date -Is) compare done"
