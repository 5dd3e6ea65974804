#!/usr/bin/env bash
# The Linf 8/255 zoo (issue: Linf): the full-data campaign's fine-tuning (8 epochs from the 40-epoch base,
# lr 0.01, cosine, batch 128) at the field's threat model, with the catastrophic-overfitting watch on the
# first 256 test images. The recipes nfgsm-linf, fgsm-rs-linf, gen-sdi-linf and pgd10-linf say the same;
# the stages name the flags because the commit that runs them (b9f45b1, pinned, like the L2 campaign)
# predates the recipes. Every stage resumes when the script is run again; one thread each:
#
#   OMP_NUM_THREADS=1 bash tools/campaign_linf.sh DATA_DIR BASE_RUN OUT_DIR nfgsm fgsm_rs gen_sdi pgd10
set -euo pipefail
DATA=${1:?usage: campaign_linf.sh DATA_DIR BASE_RUN OUT_DIR STAGE...}
BASE=${2:?usage: campaign_linf.sh DATA_DIR BASE_RUN OUT_DIR STAGE...}
OUT=${3:?usage: campaign_linf.sh DATA_DIR BASE_RUN OUT_DIR STAGE...}
shift 3
ADVGEN=${ADVGEN:-advgen}
COMMON=(--data-dir "$DATA" --device cpu --checkpoint-every 50 --init "$BASE" --epochs 8 --lr 0.01
        --attack-norm linf --attack-eps 8/255 --watch-subset 256 --watch-norm linf --watch-eps 8/255)

stage() {  # stage NAME ARGS...: train into OUT/NAME, resuming whatever is there
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "== $(date -Is) $name: $ADVGEN train $* ${COMMON[*]} --out $OUT/$name --resume" | tee -a "$OUT/$name/log.txt"
  "$ADVGEN" train "$@" "${COMMON[@]}" --out "$OUT/$name" --resume 2>&1 | tee -a "$OUT/$name/log.txt"
}

for s in "$@"; do
  case $s in
    nfgsm)   stage nfgsm --method nfgsm ;;
    fgsm_rs) stage fgsm_rs --method fgsm ;;
    gen_sdi) stage gen_sdi --method generator --gen-preset gradient --gen-bound-type linf --gen-bound 8/255 \
               --gen-step-after true ;;
    pgd10)   stage pgd10 --method minmax --attack-steps 10 --attack-step-size 2/255 ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
