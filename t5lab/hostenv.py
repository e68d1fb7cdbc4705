"""Process settings that must exist before the interpreter starts.

XLA's CPU runtime allocates each step's temporary buffers afresh (gigabytes
for T5 small). glibc's allocator hands such blocks back to the kernel when
they are freed, so every step first-touches them again in 4 KiB pages: page
faults cost about a quarter of a T5-small step on a 2-core machine. glibc >=
2.35 can back its large allocations with transparent huge pages
(`glibc.malloc.hugetlb=1`, a tunable read only at process start), which
removes nearly all of them (docs/performance.md has the figures). The entry points (`t5lab`, `python -m
t5lab.train`, tools/benchmark.py) therefore re-execute themselves once with
the tunable set, but only when the run will compute on the CPU: with a GPU
or TPU the step's buffers live in device memory and the re-exec buys nothing.
T5LAB_HUGEPAGES=0 turns it off.
"""
from __future__ import annotations

import glob
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


def accelerator_present(dev: str = "/dev") -> bool:
    """Whether this machine has a GPU or TPU device node. Device nodes, not
    packages: libtpu is installed on CPU machines too (AOT planning), and a
    CUDA jaxlib on a login node has no GPU. CUDA: nvidia0 / nvidiactl; TPU
    VMs: accel0 (v4, v5p) or numbered VFIO groups (v5e, v6e). The VFIO
    control node `vfio/vfio` alone exists on CPU hosts that pass devices to
    VMs, so it does not count."""
    if any(os.path.exists(os.path.join(dev, n)) for n in ("nvidia0", "nvidiactl", "accel0")):
        return True
    return any(os.path.basename(p) != "vfio" for p in glob.glob(os.path.join(dev, "vfio", "*")))


def runs_on_cpu(env=None, dev: str = "/dev") -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS names only cpu, or
    it is unset and no accelerator node exists (JAX then falls back to CPU)."""
    env = os.environ if env is None else env
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    return not accelerator_present(dev)


def reexec_with_hugepages(dev: str = "/dev") -> None:
    """Re-run this process (same pid, same arguments) with the tunable set;
    returns without doing anything when it is already set, turned off, the
    C library does not have it, or the run will not use the CPU
    (runs_on_cpu; `dev` is where device nodes are looked for). Call it
    before importing JAX."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if ("glibc.malloc.hugetlb" in tunables or os.environ.get("T5LAB_HUGEPAGES") == "0"
            or not _glibc_has_hugetlb() or not getattr(sys, "orig_argv", None)
            or not runs_on_cpu(dev=dev)):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
