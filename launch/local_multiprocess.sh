#!/usr/bin/env bash
# N processes of one run on this machine (CPU devices, gloo collectives), e.g.
#   NPROC=2 DEVICES_PER_PROC=2 launch/local_multiprocess.sh --config=configs/dpo.py:smoke --workdir=runs/mp
# Every process runs the same command; process 0 coordinates on 127.0.0.1:$PORT.
set -euo pipefail
NPROC=${NPROC:-2}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-1}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROC}"
export JAX_PLATFORMS=cpu
pids=()
for ((i = 0; i < NPROC; i++)); do
  "$PYTHON" -m align_jax.main --distributed --coordinator="127.0.0.1:${PORT}" \
    --num_processes="$NPROC" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
