"""Test-wide JAX setup: CPU only, 8 simulated devices, so sharded tests can run
in-process. Must run before anything imports jax's backend."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
