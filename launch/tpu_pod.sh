#!/usr/bin/env bash
# Train SFD on a Cloud TPU slice and see the run through to its end: queue the slice (a spot queued resource by
# default), install sfd_jax on every worker, start the same training command detached on all of them, and act on
# how it ends. A run resumes by itself from the newest complete checkpoint in WORKDIR, so every restart below is
# the same command again.
#
#   PROJECT=my-proj ZONE=us-east5-a TPU=sfd-xl TYPE=v5litepod-64 WORKDIR=gs://my-bucket/sfd_xl \
#   DATA_BUCKET=my-bucket DATA=/gcs/my-bucket/imagenet_latents_256 launch/tpu_pod.sh
#
# Required: PROJECT, ZONE, TPU (the TPU VM's name), TYPE (accelerator type), WORKDIR and DATA (the run's workdir
# and the latent dataset, as every worker sees them: a filesystem path, e.g. a bucket mounted by DATA_BUCKET).
# Optional, with their defaults:
#   CONFIG=configs/sfd_xl.py    EXTRA=             more flags for sfd_jax.cli.train
#   RUNTIME=                                       TPU software; by default the one Cloud TPU's software-versions
#                                                  page gives for TYPE: v4 (and v2, v3) tpu-ubuntu2204-base,
#                                                  v5e (v5litepod) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                                                  v6e v2-alpha-tpuv6e
#   SPOT=1                                         SPOT=0 queues an on-demand slice
#   QUEUED=$TPU                                    the queued resource's name
#   LOGS=$WORKDIR/logs                             each launch's worker logs go to LOGS/<UTC time>/worker-<i>.log
#   DATA_BUCKET=                                   a bucket every worker mounts read-only at /gcs/DATA_BUCKET
#                                                  (gcsfuse), for a DATA=/gcs/... dataset
#   POLL_SECONDS=60                                between looks at the slice and at the run
#   BACKOFF_SECONDS=60  MAX_BACKOFF_SECONDS=1800   wait after a create that failed for want of capacity (a
#                                                  stock-out) or a transient error, doubling
#   CREATE_ATTEMPTS=30                             such failed creates before giving up
#   BUG_RETRIES=2                                  restarts after a failure that is neither 0, 2 nor 75
#   STRAGGLER_SECONDS=600                          how long the other workers may run on once one has exited
#   TAIL_LINES=40                                  log lines printed when the run stops on an error
#
# A create that gcloud refuses for good (permission denied, quota exceeded, an invalid argument such as a TYPE the
# zone does not offer) stops this script at once with gcloud's message (exit 2).
# What the run's exit code (worker 0's; the others' are compared with it and a difference is reported) leads to:
#   0   finished: the slice is deleted and this script exits 0
#   75  preempted, checkpoint saved: the same command again, on this slice or on a re-queued one
#   2   user error (bad flag, config or data): the log's last lines, the slice deleted, exit 2
#   any other code (or none): a bug; the log's last lines and up to BUG_RETRIES restarts, then the slice deleted,
#       exit 1
# A slice that goes away (queued resource SUSPENDING/SUSPENDED, TPU PREEMPTED) is deleted and queued again and the
# run resumed; waiting states (WAITING_FOR_RESOURCES, PROVISIONING, ...) are waited out; a FAILED queued resource
# stops this script (exit 1) and is left for you to inspect.
#
# Needs: gcloud (authenticated), this git checkout, whose tracked and untracked files are copied to every worker and
# installed there by launch/setup_venv.sh into ~/sfd_jax/.venv, and a slice whose service account may write to the
# bucket. Started again, this script installs its checkout anew and starts its command, after stopping (and so
# checkpointing) a run it finds still going; Ctrl-C stops only this script, the run goes on.
set -uo pipefail

REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-configs/sfd_xl.py}"
EXTRA="${EXTRA:-}"
RUNTIME="${RUNTIME:-}"
SPOT="${SPOT:-1}"
DATA_BUCKET="${DATA_BUCKET:-}"
POLL_SECONDS="${POLL_SECONDS:-60}"
BACKOFF_SECONDS="${BACKOFF_SECONDS:-60}"
MAX_BACKOFF_SECONDS="${MAX_BACKOFF_SECONDS:-1800}"
CREATE_ATTEMPTS="${CREATE_ATTEMPTS:-30}"
BUG_RETRIES="${BUG_RETRIES:-2}"
STRAGGLER_SECONDS="${STRAGGLER_SECONDS:-600}"
TAIL_LINES="${TAIL_LINES:-40}"
ERRORS="$(mktemp)"
trap 'rm -f "$ERRORS"' EXIT

say() { echo "[tpu_pod $(date -u +%H:%M:%S)] $*"; }

check_variables() {
  local name missing=""
  for name in PROJECT ZONE TPU TYPE WORKDIR DATA; do
    [[ -n "${!name:-}" ]] || missing="$missing $name"
  done
  if [[ -n "$missing" ]]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d'
    echo "error: set$missing" >&2
    exit 2
  fi
  if [[ "$DATA" == gs://* ]]; then
    echo "error: DATA=$DATA: the trainer reads the latent dataset from a filesystem path; set DATA_BUCKET=BUCKET" \
      "to mount the bucket on every worker and DATA=/gcs/BUCKET/..." >&2
    exit 2
  fi
  if [[ -z "$RUNTIME" ]] && ! RUNTIME="$(runtime_for "$TYPE")"; then
    echo "error: no TPU software version known for TYPE=$TYPE: set RUNTIME (see Cloud TPU's software versions)" >&2
    exit 2
  fi
  QUEUED="${QUEUED:-$TPU}"
  LOGS="${LOGS:-$WORKDIR/logs}"
}

# The TPU software version (runtime) of an accelerator type, from Cloud TPU's "TPU software versions" page.
runtime_for() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

qr() { gcloud compute tpus queued-resources "$@" --project="$PROJECT" --zone="$ZONE" --quiet; }
vm() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE" --quiet; }
on_workers() { vm ssh "$TPU" --worker="$1" --command="$2"; }  # on_workers all|0 COMMAND
quote() { printf '%q ' "$@"; }

# The state of a described resource: its value, MISSING (NOT_FOUND) or UNREACHABLE (any other gcloud error).
described() {
  local out
  if out="$("$@" 2>"$ERRORS")"; then
    echo "$out" | tail -n 1 | tr -d '[:space:]'
  elif grep -qi "not.found" "$ERRORS"; then
    echo MISSING
  else
    echo UNREACHABLE
  fi
}
queued_state() { described qr describe "$QUEUED" --format="value(state.state)"; }
tpu_state() { described vm describe "$TPU" --format="value(state)"; }

create_slice() {
  local spot=""
  [[ "$SPOT" == 1 ]] && spot="--spot"
  qr create "$QUEUED" --node-id="$TPU" --accelerator-type="$TYPE" --runtime-version="$RUNTIME" $spot 2>"$ERRORS"
}

# What a failed create's message (in $ERRORS) means: "refused" when waiting cannot help (permission, quota, an
# invalid argument, no credentials, no such zone), "stock-out" when the zone lacks capacity now, else "transient".
REFUSED="quota|PERMISSION_DENIED|UNAUTHENTICATED|INVALID_ARGUMENT|NOT_FOUND|active account|invalid choice|argument --"
create_failure() {
  if grep -qiE "$REFUSED" "$ERRORS"; then
    echo refused
  elif grep -qiE "RESOURCE_EXHAUSTED|capacity|stockout|stock-out" "$ERRORS"; then
    echo stock-out
  else
    echo transient
  fi
}
gcloud_message() { grep -m 1 "ERROR" "$ERRORS" || tail -n 1 "$ERRORS"; }

delete_slice() { say "deleting $QUEUED"; qr delete "$QUEUED" --force; }

delete_slice_at_end() {
  delete_slice || say "WARNING: $QUEUED is still there: gcloud compute tpus queued-resources delete $QUEUED" \
    "--project=$PROJECT --zone=$ZONE --force"
}

install_sfd_jax() {
  # This checkout (tracked and untracked files, not what .gitignore ignores) replaces ~/sfd_jax on every worker.
  local archive
  archive="$(mktemp -d)/sfd_jax.tar.gz"
  git -C "$REPO_DIR" ls-files -z --cached --others --exclude-standard \
    | tar -czf "$archive" -C "$REPO_DIR" --null -T - || return 1
  say "installing sfd_jax on every worker of $TPU"
  vm scp "$archive" "$TPU":sfd_jax.tar.gz --worker=all || return 1
  rm -rf "$(dirname "$archive")"
  # A run still going there (this script was restarted) is stopped first: it saves and exits 75.
  on_workers all 'if [ -x ~/sfd_jax/launch/pod_worker.sh ]; then ~/sfd_jax/launch/pod_worker.sh stop; fi &&
    rm -rf ~/sfd_jax && mkdir ~/sfd_jax && tar -xzf ~/sfd_jax.tar.gz -C ~/sfd_jax &&
    bash ~/sfd_jax/launch/setup_venv.sh ~/sfd_jax/.venv tpu' || return 1
  [[ -z "$DATA_BUCKET" ]] || mount_data_bucket
}

mount_data_bucket() {
  # gcsfuse from Google's apt repository (once per worker), then DATA_BUCKET read-only at /gcs/DATA_BUCKET.
  on_workers all "set -e
    if ! command -v gcsfuse >/dev/null; then
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
        | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -q && sudo apt-get install -yq gcsfuse
    fi
    sudo mkdir -p /gcs/$DATA_BUCKET && sudo chown \$USER /gcs/$DATA_BUCKET
    mountpoint -q /gcs/$DATA_BUCKET || gcsfuse -o ro --implicit-dirs $DATA_BUCKET /gcs/$DATA_BUCKET"
}

# Returns once the slice is ACTIVE, its TPU READY and sfd_jax installed on it; fails when it cannot be had (2: the
# create was refused for good).
ensure_slice() {
  local state reason failures=0 install_failures=0 backoff="$BACKOFF_SECONDS"
  while true; do
    state="$(queued_state)"
    case "$state" in
      MISSING)
        INSTALLED=0
        if create_slice; then
          say "queued $QUEUED ($TYPE, $RUNTIME, $([[ "$SPOT" == 1 ]] && echo spot || echo on-demand))"
        else
          reason="$(create_failure)"
          if [[ "$reason" == refused ]]; then
            say "gcloud refused to create $QUEUED, which waiting will not change: $(gcloud_message)"
            return 2
          fi
          failures=$((failures + 1))
          if (( failures >= CREATE_ATTEMPTS )); then
            say "could not create $QUEUED $failures times: giving up ($(gcloud_message))"
            return 1
          fi
          say "could not create $QUEUED (attempt $failures of $CREATE_ATTEMPTS, $reason: $(gcloud_message)):" \
            "again in ${backoff} s"
          sleep "$backoff"
          backoff=$((backoff * 2 > MAX_BACKOFF_SECONDS ? MAX_BACKOFF_SECONDS : backoff * 2))
          continue
        fi ;;
      ACTIVE)
        state="$(tpu_state)"
        case "$state" in
          READY)
            (( INSTALLED )) && return 0
            if install_sfd_jax; then
              INSTALLED=1
              return 0
            fi
            install_failures=$((install_failures + 1))
            if (( install_failures > BUG_RETRIES )); then
              say "installing sfd_jax on $TPU failed $install_failures times (output above)"
              return 1
            fi
            say "installing sfd_jax on $TPU failed: trying again" ;;
          PREEMPTED)
            say "$TPU was preempted: queueing it again"
            delete_slice ;;
          *) say "$QUEUED is ACTIVE, its TPU $TPU is $state: waiting" ;;
        esac ;;
      SUSPENDED)
        say "$QUEUED is SUSPENDED (its TPU was preempted or reclaimed): queueing it again"
        delete_slice ;;
      FAILED)
        say "$QUEUED FAILED: $(qr describe "$QUEUED" --format="value(state.failedData.error.message)" 2>&1)"
        say "left as it is; delete it with: gcloud compute tpus queued-resources delete $QUEUED --project=$PROJECT" \
          "--zone=$ZONE --force"
        return 1 ;;
      UNREACHABLE) say "could not describe $QUEUED ($(tail -n 1 "$ERRORS")): trying again" ;;
      *) say "$QUEUED is $state: waiting" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

launch_run() {
  RUN_LOGS="$LOGS/$(date -u +%Y%m%d-%H%M%S)"
  say "starting the run on every worker of $TPU; logs in $RUN_LOGS/"
  # EXTRA is split into its flags on purpose.
  on_workers all "cd ~/sfd_jax && launch/pod_worker.sh start $(quote "$RUN_LOGS") .venv/bin/python -m \
sfd_jax.cli.train $(quote --config="$CONFIG" --workdir="$WORKDIR" --config.data.path="$DATA") $EXTRA"
}

slice_gone() {
  local state
  state="$(queued_state)"
  case "$state" in
    ACTIVE) state="$(tpu_state)"; [[ "$state" == PREEMPTED || "$state" == MISSING ]] ;;
    UNREACHABLE) return 1 ;;
    *) return 0 ;;
  esac
}

# Sets RESULT to worker 0's exit code ("none" if it has none), or to "lost" when the slice went away mid-run.
wait_run() {
  local out codes total running first_exit=""
  while true; do
    sleep "$POLL_SECONDS"
    if ! out="$(on_workers all "sfd_jax/launch/pod_worker.sh status" 2>"$ERRORS")"; then
      if slice_gone; then
        RESULT=lost
        return
      fi
      say "could not ask every worker how the run is going ($(tail -n 1 "$ERRORS")): asking again"
      continue
    fi
    codes="$(echo "$out" | awk '$1 == "sfd-worker" {print $2 ":" $3}' | sort -n | tr '\n' ' ')"
    total="$(echo "$codes" | wc -w)"
    running="$(echo "$codes" | tr ' ' '\n' | grep -c ':running$')"
    (( total > 0 )) || continue
    if (( running < total )) && [[ -z "$first_exit" ]]; then
      first_exit="$SECONDS"
    fi
    if (( running == 0 )) || { [[ -n "$first_exit" ]] && (( SECONDS - first_exit >= STRAGGLER_SECONDS )); }; then
      RESULT="$(echo "$codes" | tr ' ' '\n' | awk -F: '$1 == "0" {print $2}')"
      RESULT="${RESULT:-none}"
      [[ "$RESULT" == running ]] && RESULT=none
      if (( $(echo "$codes" | tr ' ' '\n' | grep -v '^$' | cut -d: -f2 | sort -u | wc -l) > 1 )); then
        say "the workers ended differently (worker:code ${codes% }); worker 0's code $RESULT decides"
      fi
      return
    fi
  done
}

show_log_tail() {
  say "the last $TAIL_LINES lines of worker 0's log (all logs: $RUN_LOGS/):"
  on_workers 0 "sfd_jax/launch/pod_worker.sh tail $TAIL_LINES" \
    || gcloud storage cat "$RUN_LOGS/worker-0.log" | tail -n "$TAIL_LINES"
}

main() {
  check_variables
  local failures=0
  INSTALLED=0
  while true; do
    ensure_slice || exit $?
    if launch_run; then
      wait_run
    else
      RESULT="none (the run could not be started on every worker)"
    fi
    case "$RESULT" in
      lost) say "$TPU went away during the run (preempted): resuming on a re-queued slice" ;;
      0)
        say "training finished"
        delete_slice_at_end
        exit 0 ;;
      75) say "the run was preempted (exit 75) after saving its checkpoint: resuming" ;;
      2)
        say "the run stopped on a user error (exit 2): fix the command and run this script again"
        show_log_tail
        delete_slice_at_end
        exit 2 ;;
      *)
        failures=$((failures + 1))
        say "the run failed with exit code $RESULT: a bug (failure $failures, BUG_RETRIES=$BUG_RETRIES)"
        show_log_tail
        if (( failures > BUG_RETRIES )); then
          delete_slice_at_end
          exit 1
        fi
        say "starting it again" ;;
    esac
  done
}

main
