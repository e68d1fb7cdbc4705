#!/usr/bin/env bash
# Cloud TPU VMs with gcloud: create a slice (or a queued resource), copy this
# checkout to every worker, install, train on all workers, stream logs, delete.
#
#   export TPU_NAME=t5-xl ZONE=us-east5-b ACCELERATOR_TYPE=v5p-64 [PROJECT=...]
#   launch/tpu_vm.sh create                 # QUEUED=1 for a queued resource, SPOT=1 for spot
#   launch/tpu_vm.sh setup                  # copy the code, pip install -e '.[tpu,gcs]' on every worker
#   launch/tpu_vm.sh train --config configs/t5_1_1.py:xl --workdir gs://BUCKET/runs/xl
#   launch/tpu_vm.sh logs [WORKER]          # re-attach to a worker's log (default 0)
#   launch/tpu_vm.sh stop                   # SIGTERM: the trainers save and exit
#   launch/tpu_vm.sh delete
#
# `train` starts the trainer detached (nohup) on every worker, so a dropped SSH
# connection does not kill the run; Ctrl-C stops the log stream only. The
# workdir must be a gs:// path: every worker writes its checkpoint shards there
# and the VMs are disposable. Each worker runs the same command; JAX finds its
# peers through the TPU metadata (t5lab.sharding.initialize_distributed with
# T5LAB_DISTRIBUTED=1).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}  # v4: tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
REMOTE_DIR=${REMOTE_DIR:-t5lab}
LOG=t5lab-train.log
gcloud_tpu=(gcloud compute tpus)
where=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project "$PROJECT")

on_workers() {  # on_workers WORKER COMMAND: run a shell command over ssh
  "${gcloud_tpu[@]}" tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command "$2"
}

create() {
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  if [[ "${QUEUED:-0}" == 1 ]]; then
    "${gcloud_tpu[@]}" queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" "${where[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${extra[@]}"
    echo "waiting for queued resource $TPU_NAME to become ACTIVE (Ctrl-C is safe; re-run create to wait again)"
    local state
    while state=$("${gcloud_tpu[@]}" queued-resources describe "$TPU_NAME" "${where[@]}" \
                    --format='value(state.state)'); [[ "$state" != ACTIVE ]]; do
      case "$state" in FAILED|SUSPENDED) echo "queued resource is $state" >&2; exit 1;; esac
      echo "  $(date +%T) $state"
      sleep 30
    done
  else
    "${gcloud_tpu[@]}" tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${extra[@]}"
  fi
}

setup() {
  # Tracked and untracked-but-not-ignored files: what you are working on, not runs/.
  local tarball
  tarball=$(mktemp --suffix=.tar.gz)
  git ls-files -co --exclude-standard -z | tar czf "$tarball" --null -T -
  "${gcloud_tpu[@]}" tpu-vm scp "$tarball" "$TPU_NAME:t5lab.tar.gz" "${where[@]}" --worker=all
  rm -f "$tarball"
  on_workers all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf t5lab.tar.gz -C $REMOTE_DIR \
    && cd $REMOTE_DIR && pip install -q -U -e '.[tpu,gcs]'"
}

train() {
  local args
  printf -v args '%q ' "$@"
  if [[ "$args" != *"gs://"* ]]; then
    echo "tpu_vm.sh: pass --workdir gs://BUCKET/PATH: every worker must write to the same place" >&2
    exit 2
  fi
  on_workers all "cd $REMOTE_DIR && T5LAB_DISTRIBUTED=1 nohup python -m t5lab.cli train $args \
    > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/t5lab-train.pid"
  logs 0
}

logs() {
  on_workers "${1:-0}" "tail -n +1 -F ~/$LOG"
}

stop() {
  on_workers all "kill -TERM \$(cat ~/t5lab-train.pid) 2>/dev/null || true"
}

delete() {
  if [[ "${QUEUED:-0}" == 1 ]]; then
    "${gcloud_tpu[@]}" queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
  else
    "${gcloud_tpu[@]}" tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  create|setup|train|logs|stop|delete) "$cmd" "$@" ;;
  ssh) on_workers all "$*" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
