"""The entry points' huge-page re-exec (t5lab/hostenv.py) in real processes."""
import os
import subprocess
import sys

import pytest

from t5lab import hostenv

# Re-execs, then allocates and touches 256 MiB five times the way XLA's
# per-step buffers are, and reports the page faults that cost.
PROBE = """
import os, resource, sys
print("start", os.getpid(), flush=True)
from t5lab import hostenv
hostenv.reexec_with_hugepages(dev=os.environ.get("PROBE_DEV", "/dev"))
import numpy as np
np._core.multiarray._set_madvise_hugepage(False)  # numpy's own huge-page advice; XLA has none
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(64 * 2 ** 20, np.float32)
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("ran", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults, flush=True)
"""


def _probe(drop=(), **env):
    keep = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", *drop)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         env={**keep, **env})
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def _thp_usable() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not hostenv._glibc_has_hugetlb(), reason="needs Linux with glibc >= 2.35")
def test_reexec_sets_the_tunable_once_in_the_same_process_and_cuts_page_faults():
    lines = _probe()
    starts = [l for l in lines if l[0] == "start"]
    (ran,) = [l for l in lines if l[0] == "ran"]
    assert len(starts) == 2                      # the script ran again after exec ...
    assert starts[0][1] == starts[1][1] == ran[1]  # ... as the same process (signals, launchers)
    assert ran[2] == hostenv.TUNABLE
    off = [l for l in _probe(T5LAB_HUGEPAGES="0") if l[0] == "ran"][0]
    assert len(off) == 3 or off[2] == ""          # turned off: no tunable, no re-exec
    if _thp_usable():
        # 5 x 256 MiB in 4 KiB pages is ~330k faults; huge pages need ~1/100 of that.
        assert int(ran[-1]) * 20 < int(off[-1]), (ran, off)


def test_an_existing_tunable_is_kept():
    if not hostenv._glibc_has_hugetlb():
        pytest.skip("needs Linux with glibc >= 2.35")
    (ran,) = [l for l in _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2") if l[0] == "ran"]
    assert ran[2] == "glibc.malloc.arena_max=2:" + hostenv.TUNABLE


def _fake_dev(root, nodes):
    for n in nodes:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).touch()
    return str(root)


@pytest.mark.parametrize("nodes,cpu", [
    ([], True), (["vfio/vfio"], True),            # VFIO's control node alone: a CPU host
    (["nvidia0"], False), (["nvidiactl"], False),  # CUDA
    (["accel0"], False), (["vfio/vfio", "vfio/0"], False),  # TPU VMs (v4/v5p; v5e/v6e)
])
def test_device_nodes_decide_when_jax_platforms_is_unset(tmp_path, nodes, cpu):
    dev = _fake_dev(tmp_path, nodes)
    assert hostenv.runs_on_cpu({}, dev=dev) is cpu
    # JAX_PLATFORMS wins over the nodes: cpu alone forces the CPU, any other name does not.
    assert hostenv.runs_on_cpu({"JAX_PLATFORMS": "cpu"}, dev=dev) is True
    assert hostenv.runs_on_cpu({"JAX_PLATFORMS": "cuda"}, dev=dev) is False
    assert hostenv.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"}, dev=dev) is False


@pytest.mark.skipif(not hostenv._glibc_has_hugetlb(), reason="needs Linux with glibc >= 2.35")
def test_no_reexec_when_the_run_uses_an_accelerator(tmp_path):
    def runs(**env):
        lines = _probe(**env)
        ran = [l for l in lines if l[0] == "ran"][0]
        return sum(l[0] == "start" for l in lines), (ran[2] if len(ran) == 4 else "")

    # XLA:CPU alone gains from the tunable: a GPU/TPU run starts once, untouched.
    assert runs(JAX_PLATFORMS="cuda") == (1, "")
    # JAX_PLATFORMS unset: the machine's device nodes decide.
    gpu_dev, cpu_dev = _fake_dev(tmp_path / "gpu", ["nvidia0"]), _fake_dev(tmp_path / "cpu", ["vfio/vfio"])
    assert runs(drop=("JAX_PLATFORMS",), PROBE_DEV=gpu_dev) == (1, "")
    assert runs(drop=("JAX_PLATFORMS",), PROBE_DEV=cpu_dev) == (2, hostenv.TUNABLE)
