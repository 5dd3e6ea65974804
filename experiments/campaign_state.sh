#!/usr/bin/env bash
# Carry the campaign across machines through git: a session's background jobs end when it stops, and a
# new session may get a fresh machine, so whatever the campaign has must be committed to survive.
#
#   bash experiments/campaign_state.sh save RUNS      # RUNS/STAGE -> experiments/campaign/STAGE, evals too
#   bash experiments/campaign_state.sh restore RUNS   # the reverse, before re-running campaign.sh
#
# save copies every stage folder of RUNS (runs/campaign of the pinned worktree) without its lock; a
# finished stage (run.json says "finished") without its training state (state.safetensors is only
# needed to resume), an unfinished one with it, so it resumes where it stopped. RUNS/../evals/*.json
# (the resumable full evaluations, finished or not) go to experiments/campaign/evals/.
set -euo pipefail
shopt -s nullglob
MODE=${1:?usage: campaign_state.sh save|restore RUNS}
RUNS=${2:?usage: campaign_state.sh save|restore RUNS}
REPO=$(cd "$(dirname "$0")/.." && pwd)
KEEP=$REPO/experiments/campaign
EVALS=$(dirname "$RUNS")/evals
[ "$MODE" = restore ] || [ -d "$RUNS" ] || { echo "campaign_state.sh: no folder $RUNS" >&2; exit 2; }
finished() { [ -f "$1/run.json" ] && python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("finished") else 1)' "$1/run.json"; }
case $MODE in
  save)
    for d in "$RUNS"/*/; do
      s=$(basename "$d"); mkdir -p "$KEEP/$s"
      for f in "$d"*; do
        [ "$(basename "$f")" = state.safetensors ] && finished "$d" && { rm -f "$KEEP/$s/state.safetensors"; continue; }
        cp -p "$f" "$KEEP/$s/"
      done
      echo "saved $s ($(finished "$d" && echo finished || echo "in progress, with its state"))"
    done
    if compgen -G "$EVALS/*.json" >/dev/null; then mkdir -p "$KEEP/evals" && cp -p "$EVALS"/*.json "$KEEP/evals/"; fi ;;
  restore)
    mkdir -p "$RUNS" "$EVALS"
    for d in "$KEEP"/*/; do
      s=$(basename "$d"); [ "$s" = evals ] && continue
      mkdir -p "$RUNS/$s" && cp -p "$d"* "$RUNS/$s/" && echo "restored $s"
    done
    if compgen -G "$KEEP/evals/*.json" >/dev/null; then cp -p "$KEEP"/evals/*.json "$EVALS/"; fi ;;
  *) echo "usage: campaign_state.sh save|restore RUNS" >&2; exit 2 ;;
esac
