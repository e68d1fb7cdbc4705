"""Checkpoint -> Hugging Face directory: the one export path (`t5lab export`
and tools/convert_to_hf.py both call it).

The params are read from storage into host memory a group at a time while
they are written (checkpointing.open_params), so a model larger than one
accelerator's memory exports on any machine with RAM for about one copy.
"""
from __future__ import annotations

import json
import os
import tempfile

from t5lab import checkpointing, hf, storage
from t5lab import config as config_lib


def workdir_config(workdir: str):
    """The config a run saved in its workdir (config.json), over today's schema."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: not a t5lab workdir (no config.json)")
    config = config_lib.schema()
    for group, values in json.loads(storage.read_text(path)).items():
        for key, value in values.items():
            config[group][key] = value
    return config


def export_checkpoint(checkpoint: str, config, out: str, *, step: int | None = None,
                      spm_model: str | None = None,
                      max_shard_size=hf.DEFAULT_MAX_SHARD_SIZE) -> str:
    """Writes the checkpoint's params (a workdir, its checkpoints/ or a step
    folder; `step` picks one, default the newest) as a transformers directory.
    Raises config.ConfigError for a step that does not exist, naming the others."""
    hf.parse_size(max_shard_size)
    hf.hf_config(config)  # a config without an HF equivalent fails before any read
    try:
        params = checkpointing.open_params(checkpoint, step=step)
    except checkpointing.NoSuchStep as e:
        raise config_lib.ConfigError(f"--step {step}: no such checkpoint; steps: "
                                     f"{', '.join(map(str, e.steps))}") from None
    hf.save_pretrained(params, config, out, spm_model=spm_model, max_shard_size=max_shard_size)
    return out


def export_workdir(workdir: str, out: str | None = None, *, step: int | None = None,
                   max_shard_size=hf.DEFAULT_MAX_SHARD_SIZE) -> str:
    """A training run's workdir (local or remote) -> transformers directory
    (default WORKDIR/hf), with the run's config and tokenizer."""
    config = workdir_config(workdir)
    if out is None:
        if storage.is_remote(workdir):
            raise config_lib.ConfigError(f"--out: give a local directory to export {workdir} into")
        out = os.path.join(workdir, "hf")
    with tempfile.TemporaryDirectory() as tmp:
        spm = storage.join(workdir, "tokenizer.model")
        if storage.exists(spm):
            storage.download(spm, os.path.join(tmp, "tokenizer.model"))
            spm = os.path.join(tmp, "tokenizer.model")
        else:
            spm = None
        return export_checkpoint(workdir, config, out, step=step, spm_model=spm,
                                 max_shard_size=max_shard_size)
