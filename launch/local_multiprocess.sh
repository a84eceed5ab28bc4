#!/usr/bin/env bash
# N processes of one run on this machine (CPU devices, gloo collectives), e.g.
#   NPROC=2 DEVICES_PER_PROC=2 launch/local_multiprocess.sh --config=configs/dpo.py:smoke --workdir=runs/mp
# Every process runs the same command; process 0 coordinates on 127.0.0.1:$PORT. SIGTERM (or
# Ctrl-C) to this script is passed to every process: they checkpoint one common step and exit 0.
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
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # Else a trapped signal interrupted the wait.
  done
  if ((rc)); then status=$rc; fi
done
exit $status
