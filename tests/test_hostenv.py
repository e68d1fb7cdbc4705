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
hostenv.reexec_with_hugepages()
import numpy as np
np._core.multiarray._set_madvise_hugepage(False)  # numpy's own huge-page advice; XLA has none
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(64 * 2 ** 20, np.float32)
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("ran", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults, flush=True)
"""


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         env={**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **env})
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
