#!/usr/bin/env bash
# One training process on this machine; every argument goes to `t5lab train`.
#
#   launch/local.sh --config configs/t5_1_1.py:tiny --workdir /tmp/run --config.train.steps=50
#   T5LAB_DEVICES=8 launch/local.sh ...   # 8 simulated CPU devices (a sharding dry run)
#
# On a single TPU VM or GPU box this is all you need: JAX finds the local chips.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${T5LAB_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${T5LAB_DEVICES}"
fi
exec "${PYTHON:-python}" -m t5lab.cli train "$@"
