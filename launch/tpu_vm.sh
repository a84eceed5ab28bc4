#!/usr/bin/env bash
# One run on every worker of a Cloud TPU VM slice, started from your machine, e.g.
#   TPU_NAME=my-v5p-32 ZONE=europe-west4-b launch/tpu_vm.sh --config=configs/dpo.py \
#     --workdir=/mnt/shared/runs/dpo
# All workers run the same command with --distributed; JAX reads the slice (worker id, process
# count, coordinator) from the TPU metadata server. The repository and its venv must already be at
# $REPO on every worker, and the workdir on storage that all workers share (NFS, a gcsfuse mount).
# A preemption notice (SIGTERM) makes every worker checkpoint one common step and exit 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-align_jax}           # Checkout on each worker, relative to the home directory.
PYTHON=${PYTHON:-.venv/bin/python}
RUN_ENV=${RUN_ENV:-}              # Extra VAR=value words for the run, e.g. "XLA_FLAGS=...".
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all \
  --command="cd $REPO && env PYTHONUNBUFFERED=1 $RUN_ENV $PYTHON -m align_jax.main --distributed$args"
