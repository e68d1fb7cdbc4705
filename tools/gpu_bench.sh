#!/usr/bin/env bash
# tools/gpu_bench.py on the lent GPU machine (JAX, PyTorch, transformers are
# preinstalled there; nothing can be downloaded there). Two steps:
#
#   bash tools/gpu_bench.sh prepare [NAME==VERSION ...]
#       here: t5lab's missing dependency (ml-collections) as a wheel, plus any
#       NAME==VERSION given, and the peer script (../shared does not travel)
#       into .gpu_bench/, which .git/info/exclude ignores.
#   then the device tool's `run` with
#       command: bash tools/gpu_bench.sh device      carry: [".gpu_bench"]      timeout_s: 540
#       there: installs the wheels into /tmp/site, runs the bench under an
#       8-minute limit; the table is the output's end, and $OUT gets
#       gpu_bench.txt, rows.jsonl and each part's log (logs/).
# Extra arguments after `device` go to tools/gpu_bench.py (e.g. --budget 300).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.gpu_bench

case "${1:-}" in
  prepare)
    shift
    mkdir -p .git/info "$dir/peer"
    grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
    rm -rf "$dir/wheels"  # one version of each package: two stop the install there
    ml=$(python -c 'import importlib.metadata as m; print(m.version("ml-collections"))' 2>/dev/null || echo 1.1.0)
    # The machine's python3 is CPython 3.12 on x86-64.
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$dir/wheels" "ml-collections==$ml" "$@"
    peer=${T5LAB_PEER_DIR:-../shared/bench}
    cp "$peer/peer_torch_t5_gpu.py" "$peer/_shape.py" "$dir/peer/"
    du -sh "$dir"; ls "$dir/wheels" "$dir/peer"
    ;;
  device)
    shift
    if compgen -G "$dir/wheels/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$dir"/wheels/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    out=${OUT:-/tmp/gpu_bench}
    mkdir -p "$out/logs"
    export PYTHONUNBUFFERED=1
    # TERM first: the bench then ends its running part's process group.
    timeout -k 15 480 python3 tools/gpu_bench.py --json "$out/rows.jsonl" --log-dir "$out/logs" "$@" \
      2>&1 | tee "$out/gpu_bench.txt"
    ;;
  *)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
