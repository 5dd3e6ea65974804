#!/usr/bin/env bash
# The full-data campaign (issue: full scale): a ResNet-20 base by standard training on all 50,000
# CIFAR-10 training images, then 8 epochs of each robust fine-tuning from it. Every stage resumes from
# its last saved state when the script is run again, and a finished stage is skipped, so the script is
# simply re-run after a stop. Meant to run from a git worktree pinned to one commit, single-threaded:
#
#   git worktree add ../campaign <commit> && cd ../campaign
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install .
#   OMP_NUM_THREADS=1 nohup bash tools/campaign.sh /work/shared/data runs/campaign > campaign.log 2>&1 &
#
# Stages run cheapest first, so a lost machine costs at most the stage in progress; nfgsm, the peer
# the research comparison added (issue: fast-AT state of the art), and gen_sdi, its best generator
# variant so far, come last.
set -euo pipefail
DATA=${1:?usage: campaign.sh DATA_DIR OUT_DIR [STAGE...]}
OUT=${2:?usage: campaign.sh DATA_DIR OUT_DIR [STAGE...]}
shift 2
ADVGEN=${ADVGEN:-advgen}
COMMON=(--data-dir "$DATA" --device cpu --checkpoint-every 50)
FT=(--init "$OUT/base" --epochs 8)
L2=(--attack-norm l2 --attack-eps 0.5)
GEN_GRAD=(--method generator --gen-preset gradient --gen-bound 0.5)   # advgen's gradient generators at L2 0.5

stage() {  # stage NAME ARGS...: train into OUT/NAME, resuming whatever is there
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "== $(date -Is) stage $name: $ADVGEN train $* ${COMMON[*]} --out $OUT/$name --resume" | tee -a "$OUT/$name/log.txt"
  "$ADVGEN" train "$@" "${COMMON[@]}" --out "$OUT/$name" --resume 2>&1 | tee -a "$OUT/$name/log.txt"
}

run() {
  case $1 in
    base)          stage base --method standard --model resnet20 --epochs 40 --lr 0.1 --weight-decay 5e-4 ;;
    gen_paper)     stage gen_paper --method generator --gen-preset paper "${FT[@]}" --lr 0.005 ;;
    fgsm_rs)       stage fgsm_rs --method fgsm "${L2[@]}" "${FT[@]}" --lr 0.01 ;;
    gen_gradient)  stage gen_gradient "${GEN_GRAD[@]}" "${FT[@]}" --lr 0.01 ;;
    pgd10)         stage pgd10 --method minmax "${L2[@]}" --attack-steps 10 --attack-step-size 0.125 "${FT[@]}" --lr 0.01 ;;
    nfgsm)         stage nfgsm --method nfgsm "${L2[@]}" "${FT[@]}" --lr 0.01 ;;
    gen_sdi)       stage gen_sdi "${GEN_GRAD[@]}" --gen-step-after true "${FT[@]}" --lr 0.01 ;;
    minmax_paper)  stage minmax_paper --method minmax --attack-norm l2 --attack-eps 0.05 --attack-steps 40 \
                     --attack-step-size 0.005 "${FT[@]}" --lr 0.005 ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(base gen_paper fgsm_rs gen_gradient pgd10 minmax_paper nfgsm gen_sdi)
for s in "${STAGES[@]}"; do run "$s"; done
echo "== $(date -Is) campaign done"
