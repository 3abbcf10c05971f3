#!/usr/bin/env bash
# Train SFD on a Cloud TPU pod slice: create it (spot/preemptible by default), install sfd_jax on every worker,
# start the same command on all of them, and start it again after a preemption. The run resumes by itself from
# the newest complete checkpoint in WORKDIR. sfd_jax reads and writes filesystem paths: every worker mounts the
# bucket BUCKET with gcsfuse at /gcs/BUCKET, so WORKDIR and DATA are paths under that mount.
#
#   PROJECT=my-proj ZONE=us-east5-a TPU=sfd-xl TYPE=v5litepod-64 BUCKET=my-bucket \
#   WORKDIR=/gcs/my-bucket/sfd_xl DATA=/gcs/my-bucket/imagenet_latents_256 CONFIG=configs/sfd_xl.py \
#   EXTRA="--config.model.dtype=bfloat16 --config.model.remat_policy=dots_saveable --config.mesh.fsdp=8" \
#   launch/tpu_pod.sh
#
# Needs: gcloud (authenticated), a TPU quota, and this repository on your machine (it is copied to the workers).
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU:?set TPU (the pod name)}" "${TYPE:?set TYPE, e.g. v5litepod-64}"
: "${BUCKET:?set BUCKET (the GCS bucket, without gs://)}"
: "${WORKDIR:?set WORKDIR (/gcs/$BUCKET/...)}" "${DATA:?set DATA (the latent dataset directory under /gcs/$BUCKET)}"
CONFIG="${CONFIG:-configs/sfd_xl.py}"
EXTRA="${EXTRA:-}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"   # v4: tpu-ubuntu2204-base; v5p: v2-alpha-tpuv5
SPOT="${SPOT:---spot}"                      # set SPOT= for an on-demand slice
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
tpu() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }

create() {
  tpu create "$TPU" --accelerator-type="$TYPE" --version="$RUNTIME" $SPOT
  tpu scp --recurse --worker=all "$REPO_DIR" "$TPU":~/sfd_jax
  tpu ssh "$TPU" --worker=all --command="cd ~/sfd_jax && python3.11 -m venv .venv && .venv/bin/pip install -q -e . \
    && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
}

mount_bucket() {
  # gcsfuse from Google's apt repository (once per worker), then the bucket at /gcs/$BUCKET (idempotent).
  tpu ssh "$TPU" --worker=all --command="set -e
    if ! command -v gcsfuse >/dev/null; then
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
        | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt \
gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      sudo apt-get update -q && sudo apt-get install -yq gcsfuse
    fi
    sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET
    mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET"
}

state() { tpu describe "$TPU" --format='value(state)' 2>/dev/null || echo MISSING; }

train() {
  # Every worker runs the same command; jax.distributed initialises from the TPU environment.
  tpu ssh "$TPU" --worker=all --command="cd ~/sfd_jax && .venv/bin/python -m sfd_jax.cli.train \
    --config=$CONFIG --workdir=$WORKDIR --config.data.path=$DATA $EXTRA"
}

while true; do
  case "$(state)" in
    READY) ;;
    MISSING) create ;;
    *) echo "TPU $TPU is $(state) (preempted?): recreating"; tpu delete "$TPU" --quiet || true; create ;;
  esac
  mount_bucket
  if train; then
    echo "training finished"; break
  fi
  echo "training command ended early (preemption or error); checking the slice and resuming in 60 s"
  sleep 60
done
