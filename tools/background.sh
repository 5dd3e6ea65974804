#!/usr/bin/env bash
# The long background runs of this round, on one machine: the full-data campaign's training and its
# evaluation queues (issue: full scale), one thread each, from a git worktree pinned to the commit the
# campaign started at, beside this checkout. (The research comparison, tools/compare_quick.sh, ran
# here too until it finished; its records are in experiments/compare-quick.) Run from the main checkout:
#
#   bash tools/background.sh start   # make what is missing (worktrees, their venvs, their runs
#                                          # restored from the state committed in experiments/), then
#                                          # start the jobs; refused while they run
#   bash tools/background.sh status  # which jobs run, the last line of each log
#   bash tools/background.sh save    # save their state into experiments/ with carry.py while they
#                                          # run (a session can end without warning: save and commit often)
#   THREADS=2 bash tools/background.sh start   # the same, each job on 2 threads (for a lone job)
#   bash tools/background.sh stop    # stop them (training saves its state on SIGTERM), then save;
#                                          # then commit it
#
# What is left to run is named below; edit it as stages finish. A stop loses at most the work since
# each job's last save: 50 training steps or an AutoAttack chunk of 100 images.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$PWD
ROOT=$(dirname "$MAIN")
DATA=${DATA:-$ROOT/shared/data}
CAMPAIGN=$ROOT/campaign CAMPAIGN_COMMIT=dcd5982
TRAIN_LEFT=""   # campaign stages still to train, in order
EVAL_LEFT=""   # campaign evaluations still to finish, in order, of trained stages
EVAL_AFTER_TRAIN=""   # a second queue: these wait for their training to finish, then take
                             # the core it frees, beside the first queue

worktree() {  # worktree DIR COMMIT: the pinned worktree with its venv, made if missing
  local dir=$1 commit=$2
  if [ ! -d "$dir" ]; then
    git worktree prune
    git worktree add --detach "$dir" "$commit"
  fi
  [ "$(git -C "$dir" rev-parse --short=7 HEAD)" = "$commit" ] || { echo "$dir is not at $commit" >&2; exit 2; }
  if [ ! -x "$dir/.venv/bin/advgen" ]; then
    python3 -m venv "$dir/.venv"
    "$dir/.venv/bin/pip" install -q torch==2.13.0
    "$dir/.venv/bin/pip" install -q "$dir[autoattack]"
  fi
}

restore() {  # restore SAVED RUNS: the committed state into a worktree's runs, unless it holds some already
  [ -d "$2" ] || python3 "$MAIN/tools/carry.py" restore "$1" "$2"
}

jobs_running() {
  pgrep -f "$CAMPAIGN/runs/(campaign|eval_queue)\.sh" > /dev/null
}

start() {  # each job runs a copy of its script in runs/: bash reads a script as it goes, so an edit here
           # must not reach a running one
  ! jobs_running || { echo "the background jobs are running already (background.sh status)" >&2; exit 2; }
  worktree "$CAMPAIGN" "$CAMPAIGN_COMMIT"
  restore "$MAIN/experiments/campaign" "$CAMPAIGN/runs/campaign"
  restore "$MAIN/experiments/campaign/evals" "$CAMPAIGN/runs/evals"
  cp "$MAIN/tools/campaign.sh" "$CAMPAIGN/runs/campaign.sh"   # the stage list; advgen stays pinned
  cp "$MAIN/tools/eval_queue.sh" "$CAMPAIGN/runs/eval_queue.sh"
  export OMP_NUM_THREADS=${THREADS:-1}   # THREADS=2 when a single job is left, to take both cores
  # training at normal priority (the longest chain); the evaluations share the rest.
  # `(cd D; job &)`: only the job goes to the background, so nothing waits on it holding this output
  if [ -n "$TRAIN_LEFT" ]; then
    (cd "$CAMPAIGN"; ADVGEN=$CAMPAIGN/.venv/bin/advgen setsid nohup bash "$CAMPAIGN/runs/campaign.sh" "$DATA" \
       runs/campaign $TRAIN_LEFT >> runs/campaign.log 2>&1 < /dev/null &)
  fi
  queue() {  # queue LOG STAGE...: an evaluation queue, if it has stages
    [ $# -gt 1 ] || return 0
    local log=$1; shift
    (cd "$CAMPAIGN"; ADVGEN=$CAMPAIGN/.venv/bin/advgen setsid nohup nice -n 5 bash "$CAMPAIGN/runs/eval_queue.sh" \
       "$DATA" runs/campaign runs/evals "$@" >> "$log" 2>&1 < /dev/null &)
  }
  queue runs/evals.log $EVAL_LEFT
  queue runs/evals-after-train.log $EVAL_AFTER_TRAIN
  sleep 2
  status
}

status() {
  pgrep -af "$CAMPAIGN/runs/(campaign|eval_queue)\.sh" || echo "no background job runs"
  for log in "$CAMPAIGN/runs/campaign.log" "$CAMPAIGN"/runs/evals*.log; do
    [ -f "$log" ] && echo "$log: $(tail -n 1 "$log" | cut -c1-160)"
  done
  return 0
}

stop() {
  pkill -f "$CAMPAIGN/runs/(campaign|eval_queue)\.sh" || true
  pkill -TERM -f "$CAMPAIGN/\.venv/bin/advgen" || true
  for _ in $(seq 60); do   # training ends its step and saves its state: give it a minute
    pgrep -f "$CAMPAIGN/\.venv/bin/advgen" > /dev/null || break
    sleep 1
  done
  if pgrep -f "$CAMPAIGN/\.venv/bin/advgen" > /dev/null; then
    echo "advgen processes still running after SIGTERM; state not saved" >&2; exit 1
  fi
  save
}

save() {  # also while the jobs run: each file is written atomically, so this takes what each job saved last
  python3 tools/carry.py save "$CAMPAIGN/runs/campaign" experiments/campaign
  python3 tools/carry.py save "$CAMPAIGN/runs/evals" experiments/campaign/evals
  echo "saved; now: git add experiments && git commit"
}

case ${1:-} in
  start|status|save|stop) "$1" ;;
  *) echo "usage: background.sh start|status|save|stop" >&2; exit 2 ;;
esac
