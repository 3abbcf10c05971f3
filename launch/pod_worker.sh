#!/usr/bin/env bash
# The worker side of launch/tpu_pod.sh, run on every TPU VM of the slice from the copy of this repository that
# tpu_pod.sh installs there. A run lives in RUN_DIR (default ~/sfd_run): its process group id (pid), its output
# (train.log, copied to LOG_DIR/worker-INDEX.log every LOG_COPY_SECONDS and when it ends) and, once it has ended,
# its exit code (exit_code).
#
#   pod_worker.sh start LOG_DIR COMMAND...   stop a previous run, start COMMAND detached from this shell; return
#   pod_worker.sh status                     print "sfd-worker INDEX CODE": the exit code, "running" or "none"
#   pod_worker.sh tail [LINES]               print the last LINES (40) of the log
#   pod_worker.sh stop                       SIGTERM the run (it saves and exits 75), SIGKILL after STOP_SECONDS
#
# INDEX is this VM's worker number in the slice, from the metadata server (GCE_METADATA_IP, as JAX reads it).
set -uo pipefail

RUN_DIR="${RUN_DIR:-$HOME/sfd_run}"
LOG_COPY_SECONDS="${LOG_COPY_SECONDS:-60}"
STOP_SECONDS="${STOP_SECONDS:-300}"

worker_index() {
  curl -fsS -H "Metadata-Flavor: Google" \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/agent-worker-number" \
    2>/dev/null || echo "?"
}

running() { [[ -f "$RUN_DIR/pid" ]] && kill -0 -- "-$(cat "$RUN_DIR/pid")" 2>/dev/null; }

copy_log() { gcloud storage cp --quiet "$RUN_DIR/train.log" "$1/worker-$(worker_index).log" >/dev/null 2>&1; }

run() {  # the detached session: COMMAND, its log copies, then its exit code (written last, atomically)
  local log_dir="$1" copier code
  shift
  echo $$ > "$RUN_DIR/pid"
  (while sleep "$LOG_COPY_SECONDS"; do copy_log "$log_dir"; done) &
  copier=$!
  # A preemption or `stop` sends SIGTERM to the whole group: COMMAND saves and exits, while this shell, which runs
  # a trap only once its foreground command has ended, stays to record the code.
  trap : TERM INT HUP
  "$@" > "$RUN_DIR/train.log" 2>&1 < /dev/null
  code=$?
  kill "$copier" 2>/dev/null
  copy_log "$log_dir"
  echo "$code" > "$RUN_DIR/exit_code.tmp" && mv "$RUN_DIR/exit_code.tmp" "$RUN_DIR/exit_code"
}

stop() {
  running || return 0
  local group waited=0
  group="$(cat "$RUN_DIR/pid")"
  kill -TERM -- "-$group" 2>/dev/null
  while running && (( waited < STOP_SECONDS )); do sleep 1; waited=$((waited + 1)); done
  running && kill -KILL -- "-$group" 2>/dev/null
  return 0
}

start() {
  stop
  mkdir -p "$RUN_DIR"
  rm -f "$RUN_DIR/exit_code" "$RUN_DIR/pid"
  setsid nohup "$0" run "$@" > /dev/null 2>&1 < /dev/null &
  local waited=0  # return once the run has recorded its process group, so that `status` never sees "none"
  while [[ ! -f "$RUN_DIR/pid" ]] && (( waited < 100 )); do sleep 0.1; waited=$((waited + 1)); done
}

status() {
  local code=none
  if [[ -f "$RUN_DIR/exit_code" ]]; then code="$(cat "$RUN_DIR/exit_code")"; elif running; then code=running; fi
  echo "sfd-worker $(worker_index) $code"
}

case "${1:-}" in
  start) shift; (( $# >= 2 )) || { echo "usage: $0 start LOG_DIR COMMAND..." >&2; exit 2; }; start "$@" ;;
  run) shift; run "$@" ;;
  status) status ;;
  tail) tail -n "${2:-40}" "$RUN_DIR/train.log" 2>/dev/null ;;
  stop) stop ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
