"""Orbax checkpoints of the train state and the data stream's position, sealed
with checksums.

Layout: WORKDIR/checkpoints/<step>/{state, data, t5lab_checksums.json}. Orbax
writes each step into a temporary directory and renames it when complete;
once it has, t5lab lists every file of the step with its size and CRC-32 in
t5lab_checksums.json (the seal). A step is intact when it is sealed and every
file matches; resume takes the newest intact step, and moves newer ones that
are not aside (to checkpoints/damaged-<step>) with one line naming the file.
Old steps are deleted only beyond the newest `checkpoint.keep` sealed ones,
so a damaged latest step never costs the good one before it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5lab import storage

log = logging.getLogger(__name__)

SEAL = "t5lab_checksums.json"


class CheckpointMismatch(ValueError):
    """The workdir holds a checkpoint this config cannot restore into."""


class DamagedCheckpoint(ValueError):
    """A step's files do not match their seal; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """A save failed (a full disk, a lost bucket); the message names the cause."""


def _checkpoint_root(path: str) -> str:
    """Accepts a workdir, its checkpoints/ folder, or one step folder."""
    path = storage.absolute(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        return storage.join(path, "checkpoints")
    return path


def _crc(path: str) -> int:
    crc = 0
    with storage.open_binary(path) as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def seal(step_dir: str) -> None:
    """Writes the step's checksums (atomically: a half-written seal is no seal)."""
    files = {rel: [size, _crc(storage.join(step_dir, rel))] for rel, size in storage.walk(step_dir)
             if rel != SEAL and not rel.endswith(".t5lab-tmp")}
    tmp = storage.join(step_dir, SEAL + ".t5lab-tmp")
    storage.write_text(tmp, json.dumps({"files": files}, indent=0))
    storage.rename(tmp, storage.join(step_dir, SEAL))


def verify(step_dir: str) -> None:
    """Raises DamagedCheckpoint naming the first file that does not match its seal."""
    path = storage.join(step_dir, SEAL)
    if not storage.exists(path):
        raise DamagedCheckpoint(f"{step_dir}: not sealed (no {SEAL}): its save did not finish")
    try:
        files = json.loads(storage.read_text(path))["files"]
    except (ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"{path}: unreadable ({e})") from None
    present = dict(storage.walk(step_dir))
    for rel, (size, crc) in sorted(files.items()):
        if rel not in present:
            raise DamagedCheckpoint(f"{storage.join(step_dir, rel)}: missing")
        if present[rel] != size:
            raise DamagedCheckpoint(f"{storage.join(step_dir, rel)}: {present[rel]} bytes, "
                                    f"sealed with {size} (truncated or rewritten)")
        if _crc(storage.join(step_dir, rel)) != crc:
            raise DamagedCheckpoint(f"{storage.join(step_dir, rel)}: fails its checksum (flipped bits)")


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)  # tensorstore reports ENOSPC as text: "[os_error_code='28']"
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


class Checkpoints:
    def __init__(self, workdir: str, ckpt_cfg, save_data: bool = True):
        self.root = storage.join(storage.absolute(workdir), "checkpoints")
        self.keep, self.async_save = ckpt_cfg.keep, ckpt_cfg.async_save
        self.save_data = save_data
        self._primary = jax.process_index() == 0
        items = ("state", "data") if save_data else ("state",)
        handlers = {"state": ocp.StandardCheckpointHandler()}
        if save_data:
            handlers["data"] = ocp.JsonCheckpointHandler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # t5lab deletes, and only steps older than `keep` sealed ones
            enable_async_checkpointing=ckpt_cfg.async_save,
            async_options=(ocp.AsyncOptions(post_finalization_callback=self._seal_finished)
                           if ckpt_cfg.async_save else None),
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.root, options=options, item_names=items,
                                             item_handlers=handlers)

    def steps(self) -> list[int]:
        """Complete (renamed) steps on storage, oldest first."""
        if not storage.isdir(self.root):
            return []
        return sorted(int(d) for d in storage.listdir(self.root) if d.isdigit())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def latest_intact_step(self, report=log.warning) -> int | None:
        """The newest step that verifies; newer damaged ones are moved aside to
        checkpoints/damaged-<step> (kept for inspection), each reported in one line."""
        steps = self.steps()
        found = None
        if self._primary:
            for step in reversed(steps):
                try:
                    verify(storage.join(self.root, str(step)))
                    found = step
                    break
                except DamagedCheckpoint as e:
                    aside = storage.join(self.root, f"damaged-{step}")
                    storage.rename(storage.join(self.root, str(step)), aside)
                    report(f"checkpoint {step} is damaged: {e}; moved to {aside}, "
                           f"resuming from an older step")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            found = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if found is None else found)))
            found = None if found < 0 else found
        self.manager.reload()
        return found

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
        # Orbax would refuse these too, but naming neither the optimizer nor a fix.
        saved_opt = {p: s for p, s in saved_flat.items() if p.startswith("opt_state/")}
        want_opt = {p: s for p, s in want_flat.items() if p.startswith("opt_state/")}
        if saved_opt != want_opt:
            path = (next((p for p in want_opt if saved_opt.get(p) != want_opt[p]), None)
                    or next(p for p in saved_opt if p not in want_opt))
            raise CheckpointMismatch(
                f"{self.root}/{step}: its optimizer state does not fit this config's optimizer "
                f"({path}: saved {saved_opt.get(path, 'absent')}, built {want_opt.get(path, 'absent')}). "
                f"It was written with another optim.name or optimizer setting, or by an older t5lab "
                f"(Adafactor on scanned layers became per layer). Resume with the optimizer it was "
                f"written with, or `t5lab export` it and start a new run with init.from_hf.")

    def restore_data(self, step: int) -> dict:
        """The saved data state: {"fingerprint": {...}, "lanes": [[start, taken, part], ...]}."""
        if not self.save_data:
            return {}
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        except Exception as e:  # noqa: BLE001  Orbax raises several types for a missing item
            raise CheckpointMismatch(f"{self.root}/{step}: holds no readable data position ({e}); "
                                     f"written by another version of t5lab?") from None
        if not isinstance(data, dict) or "lanes" not in data or "fingerprint" not in data:
            raise CheckpointMismatch(f"{self.root}/{step}/data: not a t5lab data position "
                                     f"(written by an older t5lab, whose data stream was per process)")
        return data

    def restore(self, step: int, abstract_state):
        """Restores onto the shardings in `abstract_state` (any mesh or device count)."""
        self.check_compatible(step, abstract_state)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def save(self, step: int, state, data_state: dict | None = None, force: bool = False) -> bool:
        try:
            self.manager.wait_until_finished()
            if step in self.steps():  # the final save right after a periodic one
                return False
            self._collect()
            self._check_space(step, state)
            args = {"state": ocp.args.StandardSave(state)}
            if self.save_data and data_state is not None:
                args["data"] = ocp.args.JsonSave(data_state)
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
            if not self.async_save:
                self._seal_finished()
            return saved
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._write_error(step, e) from e

    def _check_space(self, step, state):
        """Refuses a save that cannot fit on a local disk before writing a byte: a
        save that runs out of space midway fails in every writer thread at once."""
        if storage.is_remote(self.root):
            return
        need = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) + (1 << 20)  # uncompressed
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise CheckpointWriteError(
                f"saving checkpoint {step} to {self.root}: no space left on device ({free / 1e6:.1f} MB "
                f"free, the checkpoint needs up to {need / 1e6:.1f} MB); the previous checkpoint is intact")

    def _write_error(self, step, e) -> CheckpointWriteError:
        if _is_disk_full(e):
            return CheckpointWriteError(f"saving checkpoint {step} to {self.root}: no space left on "
                                        f"device; the previous checkpoint is intact")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(first) > 300:  # tensorstore puts its whole spec into the message
            first = first[:300] + " ..."
        return CheckpointWriteError(f"saving checkpoint {step} to {self.root}: {first}")

    def _seal_finished(self):
        """Seals every complete step that is not sealed yet (Orbax calls this
        after each async save is finalised; synchronous saves call it directly)."""
        if not self._primary:
            return
        for step in self.steps():
            d = storage.join(self.root, str(step))
            if not storage.exists(storage.join(d, SEAL)):
                seal(d)

    def _collect(self):
        """Deletes steps older than the newest `keep` sealed ones."""
        steps = self.steps()
        sealed = [s for s in steps if storage.exists(storage.join(self.root, str(s), SEAL))]
        if len(sealed) <= self.keep:
            return
        oldest_kept = sealed[-self.keep]
        for s in steps:
            if s < oldest_kept:
                self.manager.delete(s)

    def close(self):
        try:
            self.manager.wait_until_finished()
            self._seal_finished()
            self._collect()
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self.latest_step(), e) from e


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


class NoSuchStep(FileNotFoundError):
    """The step asked for is not among the checkpoints (never saved, or pruned)."""

    def __init__(self, root: str, step: int, steps: list[int]):
        self.step, self.steps = step, steps
        super().__init__(f"{root}: no checkpoint of step {step}; steps: {', '.join(map(str, steps))}")


def open_params(checkpoint_dir: str, step: int | None = None) -> "HostParams":
    """The `params` of a t5lab checkpoint, verified, to be read into host memory.

    checkpoint_dir: a workdir, its checkpoints/ folder, or a step folder; step:
    which one (default the newest; NoSuchStep names the others)."""
    root = _checkpoint_root(checkpoint_dir)
    if storage.isdir(storage.join(root, "state")):  # a step folder
        step_dir = root
    else:
        if not storage.isdir(root):
            raise FileNotFoundError(f"no checkpoint directory {checkpoint_dir!r}")
        steps = sorted(int(d) for d in storage.listdir(root) if d.isdigit())
        if not steps:
            raise FileNotFoundError(f"{root}: holds no complete checkpoint")
        if step is not None and step not in steps:
            raise NoSuchStep(root, step, steps)
        step_dir = storage.join(root, str(step if step is not None else steps[-1]))
    verify(step_dir)  # never export flipped bits
    return HostParams(storage.join(step_dir, "state"))


def restore_params(checkpoint_dir: str, step: int | None = None):
    """The `params` of a t5lab checkpoint as numpy arrays on the host (all of
    them: an exporter that needs less at a time uses open_params)."""
    params = open_params(checkpoint_dir, step)
    flat = params.paths()
    tree = {}
    for path, array in zip(flat, params.read(flat)):
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = array
    return tree


class HostParams:
    """A checkpoint's `params`, read as numpy arrays straight from storage into
    host memory (never onto a device, so a model larger than one chip's memory
    exports), only the leaves asked for: the optimizer state is never read.

    shapes: the nested dict of the params' leaf metadata (.shape, .dtype)."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        with _quiet_step_metadata(), ocp.PyTreeCheckpointer() as ckptr:
            self.shapes = ckptr.metadata(state_dir).item_metadata.tree["params"]

    def paths(self) -> list[tuple[str, ...]]:
        return [tuple(_key_name(k) for k in path)
                for path, _ in jax.tree_util.tree_flatten_with_path(self.shapes)[0]]

    def read(self, paths) -> list[np.ndarray]:
        """The leaves at `paths` (tuples of keys under params), in one Orbax
        restore: each costs a few tens of ms, so callers read groups of leaves."""
        item = {}
        for path in paths:
            node, meta = item, self.shapes
            for k in path[:-1]:
                node, meta = node.setdefault(k, {}), meta[k]
            node[path[-1]] = meta[path[-1]]
        # restore_type np.ndarray: Orbax's NumpyHandler reads the whole array
        # (every shard of a sharded save) into one host array, with no device.
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        with _quiet_step_metadata(), ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(self.state_dir, args=ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": args}, partial_restore=True))
        out = []
        for path in paths:
            node = restored["params"]
            for k in path:
                node = node[k]
            out.append(node)
        return out


@contextlib.contextmanager
def _quiet_step_metadata():
    quiet = _NoStepMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(quiet)
