"""T5-family models: `build(config)` -> flax module, `dummy_batch` for init.

    model = build(config)
    params = nn.unbox(model.init(rng, dummy_batch(config, 2))["params"])  # or keep boxed
    logits = model.apply({"params": params}, batch, deterministic=True)  # f32 [B, T, vocab]
    hidden = model.apply({"params": params}, batch, return_hidden=True)
    # logits == hidden @ head_matrix(params, config)
"""
from __future__ import annotations

import numpy as np

from t5lab import batch as contract
from t5lab.models.transformer import ARCH_CLASSES, ModelConfig


def build(config):
    """The flax module for config.model.arch (config: the full ConfigDict)."""
    cfg = ModelConfig.from_config(config)
    return ARCH_CLASSES[cfg.arch](cfg)


def dummy_batch(config, batch_size: int) -> dict[str, np.ndarray]:
    """int32 arrays with the batch contract's keys and shapes, for model.init."""
    d = config.data
    return contract.placeholder(config.model.arch, batch_size, d.inputs_length, d.targets_length)


def head_matrix(params, config):
    """[embed, vocab] output matrix: logits = hidden(return_hidden=True) @ this."""
    if config.model.tie_embeddings:
        return params["token_embedder"]["embedding"].T
    return params["lm_head"]["kernel"]


__all__ = ["build", "dummy_batch", "head_matrix", "ModelConfig"]
