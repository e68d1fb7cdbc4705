"""The batch contract: what every objective produces and every model consumes.

A batch is a dict of int32 [batch, length] arrays named as t5x's feature
converters name them. Packed rows hold several examples told apart by segment
ids (1, 2, ...; 0 is padding), with positions restarting at 0 per example.
`denoiser_ids` (which UL2 denoiser made each target token) rides along for the
per-denoiser metrics; models ignore it.

data (packing), models (init shapes), losses and the train step read the names
and lengths from here and nowhere else.
"""
from __future__ import annotations

import numpy as np

ARCHS = ("encoder_decoder", "decoder", "encoder")

DENOISER_IDS = "denoiser_ids"

# name -> the stack whose length it has; in the order packing writes them.
_FEATURES = {
    "encoder_decoder": {
        "encoder_input_tokens": "encoder", "decoder_input_tokens": "decoder",
        "decoder_target_tokens": "decoder", "decoder_loss_weights": "decoder",
        "encoder_segment_ids": "encoder", "decoder_segment_ids": "decoder",
        "encoder_positions": "encoder", "decoder_positions": "decoder",
    },
    # decoder_causal_attention is 1 over the bidirectional prefix (t5x's prefix LM).
    "decoder": {
        "decoder_input_tokens": "decoder", "decoder_target_tokens": "decoder",
        "decoder_loss_weights": "decoder", "decoder_causal_attention": "decoder",
        "decoder_segment_ids": "decoder", "decoder_positions": "decoder",
    },
    "encoder": {
        "encoder_input_tokens": "encoder", "encoder_target_tokens": "encoder",
        "encoder_loss_weights": "encoder", "encoder_segment_ids": "encoder",
        "encoder_positions": "encoder",
    },
}
# Features only packed rows carry (an unpacked encoder-decoder batch is one example per row).
_PACKING_ONLY = {"encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions"}


def _arch(arch: str) -> str:
    if arch not in _FEATURES:
        raise ValueError(f"config.model.arch={arch!r}: not one of {', '.join(ARCHS)}")
    return arch


def stack_lengths(arch: str, inputs_length: int, targets_length: int) -> dict[str, int]:
    """{'encoder': n, 'decoder': n}: the row length of each stack (0 when absent).
    A decoder-only row holds inputs and targets one after the other."""
    _arch(arch)
    if arch == "encoder_decoder":
        return {"encoder": inputs_length, "decoder": targets_length}
    if arch == "decoder":
        return {"encoder": 0, "decoder": inputs_length + targets_length}
    return {"encoder": inputs_length, "decoder": 0}


def row_tokens(arch: str, inputs_length: int, targets_length: int) -> int:
    """Token slots in one row, both stacks together (what tokens/s counts)."""
    return sum(stack_lengths(arch, inputs_length, targets_length).values())


def features(arch: str, packed: bool = True, denoiser_ids: bool = True) -> tuple[str, ...]:
    """The feature names of a batch for `arch`."""
    names = tuple(k for k in _FEATURES[_arch(arch)]
                  if packed or arch != "encoder_decoder" or k not in _PACKING_ONLY)
    return names + (DENOISER_IDS,) if denoiser_ids else names


def target_names(arch: str) -> tuple[str, str]:
    """(targets, loss weights): the features the loss reads."""
    stack = "encoder" if _arch(arch) == "encoder" else "decoder"
    return f"{stack}_target_tokens", f"{stack}_loss_weights"


def shapes(arch: str, batch_size: int, inputs_length: int, targets_length: int,
           denoiser_ids: bool = True) -> dict[str, tuple[int, int]]:
    """name -> (batch_size, length) for every feature (packed rows)."""
    lengths = stack_lengths(arch, inputs_length, targets_length)
    out = {k: (batch_size, lengths[stack]) for k, stack in _FEATURES[arch].items()}
    if denoiser_ids:
        out[DENOISER_IDS] = out[target_names(arch)[0]]
    return out


def placeholder(arch: str, batch_size: int, inputs_length: int, targets_length: int,
                denoiser_ids: bool = False) -> dict[str, np.ndarray]:
    """A batch with the contract's names and shapes for model.init and compiling:
    one segment per row, every token real (positions 0, no prefix)."""
    out = {}
    for k, shape in shapes(arch, batch_size, inputs_length, targets_length, denoiser_ids).items():
        zero = k.endswith("_positions") or k in ("decoder_causal_attention", DENOISER_IDS)
        out[k] = np.zeros(shape, np.int32) if zero else np.ones(shape, np.int32)
    return out
