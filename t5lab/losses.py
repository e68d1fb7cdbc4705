"""Cross-entropy with z-loss, summed (not averaged) so that microbatches and
hosts add up exactly; the train step divides by the target-token count once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def target_names(arch: str) -> tuple[str, str]:
    """(targets, loss_weights) feature names of the batch contract."""
    if arch == "encoder":
        return "encoder_target_tokens", "encoder_loss_weights"
    return "decoder_target_tokens", "decoder_loss_weights"


def cross_entropy_sums(logits, targets, weights, z_loss: float, denoiser_ids=None,
                       num_denoisers: int = 0):
    """Weighted sums over all tokens of a [batch, length, vocab] logits array.

    Returns a dict of float32 scalars (and [num_denoisers] vectors):
      loss      sum of w * (CE + z_loss * logZ^2), what is differentiated
      ce        sum of w * CE
      z         sum of w * logZ^2
      correct   sum of w * [argmax == target]
      weight    sum of w (the number of target tokens)
      den_ce, den_weight  per-denoiser CE sums and token counts
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - target_logit
    z = jnp.square(log_z)
    out = {
        "loss": jnp.sum(weights * (ce + z_loss * z)),
        "ce": jnp.sum(weights * ce),
        "z": jnp.sum(weights * z),
        "correct": jnp.sum(weights * (jnp.argmax(logits, -1) == targets)),
        "weight": jnp.sum(weights),
    }
    if num_denoisers:
        onehot = jax.nn.one_hot(denoiser_ids, num_denoisers, dtype=jnp.float32) * weights[..., None]
        out["den_ce"] = jnp.einsum("bl,bld->d", ce, onehot)
        out["den_weight"] = jnp.sum(onehot, axis=(0, 1))
    return out
