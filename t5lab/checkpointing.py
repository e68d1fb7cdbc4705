"""Orbax checkpoints of the train state *and* the data-iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Orbax writes each step into a
temporary directory and renames it when complete, so a crash in the middle of
an (async) save leaves no step behind that `latest_step` would pick up.
"""
from __future__ import annotations

import logging

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from t5lab import storage

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """The workdir holds a checkpoint this config cannot restore into."""


def _checkpoint_root(path: str) -> str:
    """Accepts a workdir, its checkpoints/ folder, or one step folder."""
    path = storage.absolute(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        return storage.join(path, "checkpoints")
    return path


class Checkpoints:
    def __init__(self, workdir: str, ckpt_cfg, save_data: bool = True):
        self.root = storage.join(storage.absolute(workdir), "checkpoints")
        self.save_data = save_data
        items = ("state", "data") if save_data else ("state",)
        handlers = {"state": ocp.StandardCheckpointHandler()}
        if save_data:
            handlers["data"] = grain.checkpoint.CheckpointHandler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep,
            enable_async_checkpointing=ckpt_cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.root, options=options, item_names=items,
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(self, step: int, abstract_state) -> None:
        """Compares saved shapes with the ones this config builds, before any
        restore, so a workdir of another model is reported and left untouched."""
        saved = self.manager.item_metadata(step)["state"]
        saved_flat = dict(_flatten_shapes(saved))
        want_flat = dict(_flatten_shapes(abstract_state))
        for path, shape in want_flat.items():
            if not path.startswith("params/"):
                continue
            if path not in saved_flat:
                raise CheckpointMismatch(
                    f"{self.root}/{step}: has no parameter {path}; it was written by a model of a "
                    f"different architecture. Use another --workdir or matching config.model keys.")
            if tuple(saved_flat[path]) != tuple(shape):
                raise CheckpointMismatch(
                    f"{self.root}/{step}: parameter {path} has shape {tuple(saved_flat[path])} "
                    f"but this config builds {tuple(shape)}. Use another --workdir or the "
                    f"config.model keys the checkpoint was trained with.")
        extra = [p for p in saved_flat if p.startswith("params/") and p not in want_flat]
        if extra:
            raise CheckpointMismatch(f"{self.root}/{step}: has parameter {extra[0]} that this "
                                     f"config does not build (a different architecture).")

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores onto the shardings in `abstract_state` (any mesh or device
        count) and, when given, sets the data iterator to its saved position."""
        self.check_compatible(step, abstract_state)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None and self.save_data:
            try:
                self.manager.restore(step, args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(data_iter)))
            except (FileNotFoundError, ValueError, KeyError) as e:
                # Written by another number of processes: the per-process data
                # positions do not map onto this run's shards.
                log.warning("checkpoint %d: data-iterator state not restored (%s); the data "
                            "stream restarts from its start for this process layout", step, e)
        return restored["state"]

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        if step in self.manager.all_steps():  # the final save right after a periodic one
            return False
        args = {"state": ocp.args.StandardSave(state)}
        if self.save_data and data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _flatten_shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    for path, leaf in leaves:
        yield "/".join(_key_name(k) for k in path), tuple(getattr(leaf, "shape", ()))


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class _NoStepMetadataWarning(logging.Filter):
    """A step's _CHECKPOINT_METADATA sits in the step folder, written there by
    the CheckpointManager; a bare Checkpointer reading the step's `state` item
    looks for it in the item and warns that it is missing, on every export."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()


def restore_params(checkpoint_dir: str, config=None, step: int | None = None):
    """The `params` of a t5lab checkpoint as numpy arrays on the host.

    checkpoint_dir: a workdir, its checkpoints/ folder, or a step folder. The
    config is only used to name the file in errors; shapes come from the file."""
    root = _checkpoint_root(checkpoint_dir)
    if storage.isdir(storage.join(root, "state")):  # a step folder
        state_dir = storage.join(root, "state")
    else:
        if not storage.isdir(root):
            raise FileNotFoundError(f"no checkpoint directory {checkpoint_dir!r}")
        steps = sorted(int(d) for d in storage.listdir(root) if d.isdigit())
        if not steps:
            raise FileNotFoundError(f"{root}: holds no complete checkpoint")
        state_dir = storage.join(root, str(step if step is not None else steps[-1]), "state")
    quiet = _NoStepMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _restore_params(state_dir)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _restore_params(state_dir: str):
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(state_dir).item_metadata.tree
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {"params": jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree["params"])}
        restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    return jax.tree_util.tree_map(np.asarray, restored["params"])
