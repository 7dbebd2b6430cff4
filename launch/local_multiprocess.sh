#!/usr/bin/env bash
# Runs N processes of `python -m skipnet_jax.main` on this machine as one JAX
# multi-process job (coordinator 127.0.0.1 on a free port).
#
#   launch/local_multiprocess.sh N -- --config=configs/digits.py --workdir=/tmp/run [--config.KEY=VALUE ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and its own
# JAX_PROCESS_ID; skipnet_jax.main then calls jax.distributed.initialize().
# Output lines are prefixed with "[pK] ". Waits for all processes; if one
# fails, the others are stopped (SIGTERM, SIGKILL 15 s later) and its exit
# status is returned (0 when all succeed). Ctrl-C / SIGTERM to the launcher is
# passed on as SIGTERM (the job checkpoints and stops; SIGKILL after 300 s).
#
# Environment: PYTHON (default: python3) is the interpreter; anything else
# (XLA_FLAGS, e.g. --xla_force_host_platform_device_count=4 for several CPU
# devices per process) is passed through unchanged.
set -euo pipefail

usage() {
  echo "usage: $0 N -- <skipnet_jax.main arguments>" >&2
  exit 2
}

[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ && $2 == "--" ]] || usage
num_processes=$1
shift 2
python=${PYTHON:-python3}

# A port nobody listens on right now (closed again before the job binds it).
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

running=()   # processes not yet waited for
deadline=""  # once stopping: when ($SECONDS) to SIGKILL what still runs
interrupted=0
# SIGTERM to the processes still running, SIGKILL $1 seconds later. Training
# processes treat SIGTERM as "checkpoint at the next step, then stop"; one
# blocked in a collective with a dead peer never gets there, hence the KILL.
stop_all() {
  local pid
  for pid in "${running[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  if [[ -z $deadline ]]; then
    deadline=$((SECONDS + $1))
  fi
}
# Ctrl-C / SIGTERM to the launcher: let the job checkpoint and stop.
trap 'interrupted=130; stop_all 300' INT
trap 'interrupted=143; stop_all 300' TERM

for ((k = 0; k < num_processes; k++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
    JAX_NUM_PROCESSES="$num_processes" \
    JAX_PROCESS_ID="$k" \
    "$python" -u -m skipnet_jax.main "$@" > >(sed -u "s/^/[p${k}] /") 2>&1 &
  running+=("$!")
done

# Poll rather than `wait -n`: a process that exits before it is waited for
# is no longer a "job" for `wait -n`, but `wait PID` still returns its status.
status=0
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && status == 0 && interrupted == 0)); then
      status=$rc
      echo "local_multiprocess: process ${pid} exited with status ${rc}; stopping the others" >&2
      stop_all 15
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  if ((${#running[@]} > 0)); then
    if [[ -n $deadline ]] && ((SECONDS >= deadline)); then
      kill -KILL "${running[@]}" 2>/dev/null || true
    fi
    sleep 0.5
  fi
done
# (The [pK] output filters end on their own once their process is gone.)
if ((interrupted != 0)); then
  exit "$interrupted"
fi
exit "$status"
