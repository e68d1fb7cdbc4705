"""Test-wide JAX setup: CPU only, 8 simulated devices, so sharded tests can run
in-process. Must run before anything imports jax's backend."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests that compile for TPU topologies (in-process and in tool subprocesses)
# load libtpu concurrently under xdist; without this its lockfile refuses all but one.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Backend optimisation level 0: the suite's time is mostly XLA:CPU compiles of
# tiny programs, which this makes about 1.7x faster; the tests time nothing,
# and subprocesses (tools, launches) inherit it through XLA_FLAGS.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()

# Many tests build the same tiny programs: share compiled executables across
# them (and across xdist workers) through JAX's persistent compilation cache.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "t5lab-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def xla_flags(devices: int | None) -> str:
    """The suite's XLA_FLAGS for a subprocess with `devices` simulated CPU
    devices (None: XLA's own count, 1), keeping the other flags."""
    flags = [f for f in os.environ["XLA_FLAGS"].split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))
