"""Process settings that must exist before the interpreter starts.

XLA's CPU runtime allocates each step's temporary buffers afresh (gigabytes
for T5 small). glibc's allocator hands such blocks back to the kernel when
they are freed, so every step first-touches them again in 4 KiB pages: ~740,000 page faults and
~1.7 s of kernel time per T5-small step on this project's 2-core machine,
about a quarter of the step. glibc >= 2.35 can back its large allocations
with transparent huge pages (`glibc.malloc.hugetlb=1`, a tunable read only
at process start), which removes nearly all of them (measured: 740k -> 2k
faults, 6.6 -> 5.2 s per step). The entry points (`t5lab`, `python -m
t5lab.train`, tools/benchmark.py) therefore re-execute themselves once with
the tunable set. T5LAB_HUGEPAGES=0 turns this off.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def _glibc_has_hugetlb() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    lib, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return lib == "glibc" and (major, minor) >= (2, 35)


def reexec_with_hugepages() -> None:
    """Re-run this process (same pid, same arguments) with the tunable set;
    returns without doing anything when it is already set, turned off, or
    the C library does not have it. Call it before importing JAX."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if ("glibc.malloc.hugetlb" in tunables or os.environ.get("T5LAB_HUGEPAGES") == "0"
            or not _glibc_has_hugetlb() or not getattr(sys, "orig_argv", None)):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
