"""Mesh, logical-axis rules and multi-process start-up: the one place that
decides how arrays are laid out over devices.

Logical axes (what a dimension *is*): batch, length, embed, mlp, heads, kv,
joined_kv, vocab, layers, relpos_buckets. Mesh axes (how devices are arranged):
data (pure data parallel), fsdp (data parallel whose params and optimizer
state are sharded too), tensor (Megatron-style model parallel).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Flax assigns rules in order and skips a mesh axis a dimension already took, so
# an activation (batch, length, embed) gets batch->(data, fsdp) and embed->None,
# while a parameter (vocab, embed) gets vocab->tensor and embed->fsdp.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("joined_kv", "tensor"),
    ("kv", None),
    ("embed", "fsdp"),
    ("length", None),
    ("layers", None),
    ("relpos_buckets", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Sizes for (data, fsdp, tensor); one axis may be -1 and takes the rest."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh: {num_devices} devices cannot be split with "
                             f"data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh: data*fsdp*tensor = {int(np.prod(sizes))} but "
                         f"there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # simulated or odd topologies: plain row-major order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    import flax.linen as nn
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: rows split over data and fsdp."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def initialize_distributed() -> None:
    """Starts jax.distributed when this process is one of several.

    - Local multi-process (launch/multiprocess.sh) sets T5LAB_COORDINATOR,
      T5LAB_NUM_PROCESSES and T5LAB_PROCESS_ID; CPU collectives go over gloo.
    - TPU pods, SLURM and GKE: jax.distributed.initialize() reads the
      environment those systems provide (T5LAB_DISTRIBUTED=1 forces it).
    Single-process runs do nothing.
    """
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    coord = os.environ.get("T5LAB_COORDINATOR")
    several = coord or os.environ.get("T5LAB_DISTRIBUTED") == "1" or (
        "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1)
    if not several:
        return
    # Cross-process collectives of the CPU backend (CPU-only clusters, the local
    # stand-in); GPU and TPU collectives do not read this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coord:
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["T5LAB_NUM_PROCESSES"]),
            process_id=int(os.environ["T5LAB_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
