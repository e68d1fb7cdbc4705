#!/usr/bin/env bash
# N training processes on this machine, joined by jax.distributed over
# 127.0.0.1 with CPU (gloo) collectives: the local stand-in for a multi-host
# job. Each process gets 8/N simulated CPU devices unless
# T5LAB_DEVICES_PER_PROCESS says otherwise; the rest of the arguments go to
# `t5lab train`.
#
#   launch/multiprocess.sh 2 --config configs/t5_1_1.py:tiny --workdir /tmp/run
#
# Output lines are prefixed with [process id]; Gloo's connection lines are
# dropped (T5LAB_SHOW_GLOO=1 keeps them). If one process fails the others
# are stopped (SIGTERM, then SIGKILL after T5LAB_KILL_GRACE seconds, since a
# survivor may be blocked in a collective) and the script exits with the first
# failure's status. SIGTERM/SIGINT are forwarded, so the trainers save a
# checkpoint and exit together.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [t5lab train arguments...]" >&2
  exit 2
fi
num=$1
shift
per=${T5LAB_DEVICES_PER_PROCESS:-$((8 / num))}
if (( per < 1 )); then
  echo "$0: $num processes leave no device each; set T5LAB_DEVICES_PER_PROCESS" >&2
  exit 2
fi
grace=${T5LAB_KILL_GRACE:-10}
python=${PYTHON:-python}

# The coordinator binds this port in process 0; asking the kernel for a free
# one avoids clashes between concurrent runs (tests, other users).
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Each trainer writes into its own prefixer, opened on a file descriptor first
# so that $! names the trainer (for signals and its exit status) and the
# prefixer's pid is kept to wait for the log to drain.
pids=()
prefixers=()
# Gloo (the CPU collectives) prints a line per rank and communicator when its
# peers connect; T5LAB_SHOW_GLOO=1 keeps them. Two of its threads can write
# at once, splitting one line into two fragments ("[Gloo] Rank [Gloo] Rank 0
# is connected..." then "0 is connected..."), so any line with either part goes.
quiet='/\[Gloo\] Rank\|is connected to [0-9]* peer ranks/d'
[[ "${T5LAB_SHOW_GLOO:-0}" == 1 ]] && quiet=''
for ((i = 0; i < num; i++)); do
  exec {log}> >(sed -u -e "$quiet" -e "s/^/[$i] /")
  prefixers+=($!)
  T5LAB_COORDINATOR=127.0.0.1:$port T5LAB_NUM_PROCESSES=$num T5LAB_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" \
    "$python" -m t5lab.cli train "$@" >&"$log" 2>&1 &
  pids+=($!)
  exec {log}>&-
done

alive() {
  local p
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done
  return 1
}

signal_all() {
  local p
  for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null || true; done
}

stop_all() {
  signal_all TERM
  for ((t = 0; t < grace * 10; t++)); do alive || return 0; sleep 0.1; done
  echo "multiprocess.sh: processes still running after ${grace}s; killing them" >&2
  signal_all KILL
}

trap 'signal_all TERM' TERM
trap 'signal_all INT' INT

# Poll rather than `wait -n`: when several trainers exit at once, bash may
# report only one of them to `wait -n`; `wait PID` on an exited child always
# returns its status.
status=0
running=("${pids[@]}")
while (( ${#running[@]} > 0 )); do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
    rc=0
    wait "$p" || rc=$?
    if (( rc != 0 && status == 0 )); then
      status=$rc
      echo "multiprocess.sh: process pid $p exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  running=("${still[@]}")
  sleep 0.2
done
wait "${prefixers[@]}"
exit "$status"
