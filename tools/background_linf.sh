#!/usr/bin/env bash
# The Linf zoo's background jobs (issue: Linf), beside this checkout, one thread each: the training
# stages (tools/campaign_linf.sh) from a worktree pinned to b9f45b1, and their full Linf evaluations
# (tools/eval_queue.sh with NORM=linf) from a worktree pinned to EVAL_COMMIT (the first commit whose
# advgen eval --full takes --norm linf). Run from the main checkout:
#
#   bash tools/background_linf.sh start [train|eval]   # worktrees, venvs, the committed state restored, the
#                                                        # jobs started (both, or only the training or evaluation queue)
#   bash tools/background_linf.sh status
#   bash tools/background_linf.sh save     # the jobs' state into experiments/campaign-linf (commit it)
#   bash tools/background_linf.sh stop     # stop (training saves on SIGTERM), then save
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$PWD
ROOT=$(dirname "$MAIN")
DATA=${DATA:-$ROOT/shared/data}
TRAIN_WT=$ROOT/linf TRAIN_COMMIT=b9f45b1
EVAL_WT=$ROOT/evalwt EVAL_COMMIT=${EVAL_COMMIT:-150b978}
KEEP=$MAIN/experiments/campaign-linf
TRAIN_LEFT=""   # stages still to train, in order
EVAL_LEFT=""   # evaluations still to finish, in order (each waits for its training)

worktree() {  # worktree DIR COMMIT
  local dir=$1 commit=$2
  if [ ! -d "$dir" ]; then git worktree prune; git worktree add --detach "$dir" "$commit"; fi
  [ "$(git -C "$dir" rev-parse --short=7 HEAD)" = "$commit" ] || { echo "$dir is not at $commit" >&2; exit 2; }
  if [ ! -x "$dir/.venv/bin/advgen" ]; then
    python3 -m venv "$dir/.venv"
    "$dir/.venv/bin/pip" install -q torch==2.13.0
    "$dir/.venv/bin/pip" install -q "$dir"
  fi
}

# the queues run as `bash runs/NAME.sh ...` from $TRAIN_WT: matched by their arguments (runs/linf), not a path
JOBS_RE="runs/(campaign_linf|eval_queue|train_linf|eval_linf)\.sh .*runs/linf"
running() { pgrep -f "$JOBS_RE" > /dev/null; }

start() {
  ! running || { echo "the Linf jobs are running already" >&2; exit 2; }
  worktree "$TRAIN_WT" "$TRAIN_COMMIT"
  worktree "$EVAL_WT" "$EVAL_COMMIT"
  mkdir -p "$TRAIN_WT/runs"
  [ -d "$TRAIN_WT/runs/linf" ] || python3 tools/carry.py restore "$KEEP" "$TRAIN_WT/runs/linf"
  [ -d "$TRAIN_WT/runs/evals" ] || python3 tools/carry.py restore "$KEEP/evals" "$TRAIN_WT/runs/evals"
  cp tools/campaign_linf.sh tools/eval_queue.sh "$TRAIN_WT/runs/"   # a running script is never edited under it
  export OMP_NUM_THREADS=${THREADS:-1}
  local which=${1:-both}
  [ "$which" = eval ] || (cd "$TRAIN_WT"; ADVGEN=$TRAIN_WT/.venv/bin/advgen setsid nohup bash runs/campaign_linf.sh \
     "$DATA" "$MAIN/experiments/campaign/base" runs/linf $TRAIN_LEFT >> runs/train.log 2>&1 < /dev/null &)
  [ "$which" = train ] || (cd "$TRAIN_WT"; NORM=linf ADVGEN=$EVAL_WT/.venv/bin/advgen setsid nohup nice -n 5 \
     bash runs/eval_queue.sh "$DATA" runs/linf runs/evals $EVAL_LEFT >> runs/evals.log 2>&1 < /dev/null &)
  sleep 2; status
}

status() {
  pgrep -af "$JOBS_RE|($TRAIN_WT|$EVAL_WT)/\.venv/bin/advgen" | cut -c1-160 || echo "no Linf job runs"
  for log in "$TRAIN_WT/runs/train.log" "$TRAIN_WT/runs/evals.log"; do
    [ -f "$log" ] && echo "$log: $(tail -n 1 "$log" | cut -c1-160)"
  done
  return 0
}

save() {
  python3 tools/carry.py save "$TRAIN_WT/runs/linf" "$KEEP"
  python3 tools/carry.py save "$TRAIN_WT/runs/evals" "$KEEP/evals"
  echo "saved; now: git add experiments/campaign-linf && git commit"
}

stop() {
  pkill -f "$JOBS_RE" || true
  pkill -TERM -f "($TRAIN_WT|$EVAL_WT)/\.venv/bin/advgen" || true
  for _ in $(seq 60); do pgrep -f "($TRAIN_WT|$EVAL_WT)/\.venv/bin/advgen" > /dev/null || break; sleep 1; done
  save
}

case ${1:-} in
  start) [[ ${2:-both} =~ ^(both|train|eval)$ ]] || { echo "start takes train, eval or nothing" >&2; exit 2; }
         start "${2:-both}" ;;
  status|save|stop) "$1" ;;
  *) echo "usage: background_linf.sh start [train|eval]|status|save|stop" >&2; exit 2 ;;
esac
