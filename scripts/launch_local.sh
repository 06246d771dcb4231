#!/usr/bin/env bash
# N local processes of one jaxft command, as a multi-host run would start them: coordinator on
# 127.0.0.1, gloo collectives between the CPU processes, each process with its own simulated devices.
#
#   scripts/launch_local.sh N CONFIG [section.key=value ...] [--resume]     # jaxft train CONFIG ...
#   scripts/launch_local.sh N VERB ARGS...                                  # jaxft VERB ARGS ... (eval, export, ...)
#
# Each process gets `--mesh distributed=true --mesh coordinator_address=... --mesh num_processes=N
# --mesh process_id=I` after ARGS (every verb that runs a model takes --mesh KEY=VALUE).
#
# Environment: DEVICES_PER_PROCESS (default 2), PORT (default: a free one), PYTHON (default: python).
# Process 0 logs and writes metrics; if any process fails the others are stopped and the script fails.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [section.key=value ...] [--resume]   or   $0 N VERB ARGS..." >&2
  exit 2
fi
N=$1
shift
case $1 in
  train|eval|export|generate|score|cai|merge-adapters|lm-eval) VERB=$1; shift ;;
  *) VERB=train ;;  # a config file: a training run
esac
PY=${PYTHON:-python}
PORT=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"

pids=()
for ((i = 0; i < N; i++)); do
  "$PY" -m jaxft.cli "$VERB" "$@" --mesh distributed=true --mesh "coordinator_address=127.0.0.1:$PORT" \
    --mesh "num_processes=$N" --mesh "process_id=$i" &
  pids+=($!)
done
# SIGTERM / Ctrl-C go to every process, as a scheduler's preemption would: they agree on a step, save, exit 0
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
      still+=("$p")
    elif ! wait "$p"; then  # one failed: the others would wait for it in a collective forever
      status=1
      kill "${pids[@]}" 2>/dev/null || true
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  sleep 0.5
done
exit $status
