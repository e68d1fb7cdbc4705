"""Cross-entropy with z-loss, summed (not averaged) so that microbatches and
hosts add up exactly; the train step divides by the target-token count once.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from t5lab.cpu_kernels import row_max as _row_max


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
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return _sums(log_z, target_logit, jnp.argmax(logits, -1) == targets, weights, z_loss,
                 denoiser_ids, num_denoisers)


def _sums(log_z, target_logit, correct, weights, z_loss, denoiser_ids, num_denoisers):
    """The reported sums from per-token logZ, target logit and correctness."""
    weights = weights.astype(jnp.float32)
    ce = log_z - target_logit
    z = jnp.square(log_z)
    out = {
        "loss": jnp.sum(weights * (ce + z_loss * z)),
        "ce": jnp.sum(weights * ce),
        "z": jnp.sum(weights * z),
        "correct": jnp.sum(weights * correct),
        "weight": jnp.sum(weights),
    }
    if num_denoisers:
        onehot = jax.nn.one_hot(denoiser_ids, num_denoisers, dtype=jnp.float32) * weights[..., None]
        out["den_ce"] = jnp.einsum("bl,bld->d", ce, onehot)
        out["den_weight"] = jnp.sum(onehot, axis=(0, 1))
    return out


# ---------------------------------------------------------------------------
# Fused head + cross-entropy.
#
# The train step never needs the logits themselves, only per-token logZ and the
# target logit. `_head_ce` computes both from hidden states and the head matrix
# with a hand-written VJP: the forward pass keeps the float32 (max-shifted) logits as the
# only big residual (no softmax, no one-hot, no argmax over the vocabulary), and the
# backward pass builds d(logits) in one fused elementwise pass plus a
# one-value-per-token scatter,
#     dlogits = exp(logits - logZ) * g_logZ + onehot(target) * g_target,
# followed by the two head matmuls. Nothing is recomputed. Every sum the loss
# reports (loss, ce, z, per-denoiser ce) is a function of the per-token [N]
# vectors, so JAX differentiates those sums cheaply outside the custom rule.


def _head_logits(hidden, head):
    logits = jnp.einsum("...d,dv->...v", hidden, head.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return _constrain_logits(logits)


def _constrain_logits(logits):
    if logits.ndim != 3:
        return logits
    import flax.linen as nn  # local: losses stays importable without flax
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def _vocab_split() -> bool:
    """Whether the logits' vocab axis is split across devices here (tensor
    parallelism under the current mesh and logical axis rules): then
    `row_max` must not fold it, as its halves would live on other devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    import flax.linen as nn
    axes = nn.logical_to_mesh_axes(("vocab",))[0]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes) > 1


def _head_ce_fwd(hidden, head, targets):
    logits = _head_logits(hidden, head)
    row_max = _row_max(logits, fold=not _vocab_split())
    # The residual is the max-shifted logits: the backward pass then needs one
    # multiply per element, exp(shifted) * (g * exp(-log_sum)), and no subtract.
    shifted = logits - row_max[..., None]
    log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    target_shifted = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    log_z = row_max + log_sum
    outs = (log_z, row_max + target_shifted, row_max)
    return outs, (hidden, head, shifted, log_sum, targets)


def _head_ce_bwd(res, cts):
    hidden, head, shifted, log_sum, targets = res
    g_log_z, g_target, _ = cts
    # softmax * g_logZ = exp(shifted) * (g_logZ / sum exp(shifted)); exp(-log_sum) <= 1.
    dlogits = jnp.exp(shifted) * (g_log_z * jnp.exp(-log_sum))[..., None]
    # + g_target at each token's target column: a scatter of one value per token.
    dlogits = _put_along_last(dlogits, targets, g_target)
    dlogits = _constrain_logits(dlogits).astype(hidden.dtype)
    d_hidden = jnp.einsum("...v,dv->...d", dlogits, head.astype(hidden.dtype),
                          preferred_element_type=jnp.float32).astype(hidden.dtype)
    lead = "".join("abcefghijk"[:hidden.ndim - 1])
    d_head = jnp.einsum(f"{lead}d,{lead}v->dv", hidden, dlogits,
                        preferred_element_type=jnp.float32).astype(head.dtype)
    return d_hidden, d_head, None


def _put_along_last(x, index, values):
    """x with values added at x[..., index] (one column per leading position)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    rows = jnp.arange(flat.shape[0])
    flat = flat.at[rows, index.reshape(-1)].add(values.reshape(-1).astype(x.dtype))
    return flat.reshape(*lead, x.shape[-1])


@jax.custom_vjp
def _head_ce(hidden, head, targets):
    """(logZ, target logit, row max) per token of logits = hidden @ head."""
    return _head_ce_fwd(hidden, head, targets)[0]


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)


def head_cross_entropy_sums(hidden, head, targets, weights, z_loss: float, denoiser_ids=None,
                            num_denoisers: int = 0):
    """`cross_entropy_sums(hidden @ head, ...)` without autodiff through the
    [tokens, vocab] logits (see `_head_ce`). hidden: [batch, length, embed] as
    returned by `model.apply(..., return_hidden=True)`; head: [embed, vocab] from
    `models.head_matrix`. Same keys and values; `correct` counts a token right
    when its target logit is the row maximum (argmax up to exact ties)."""
    log_z, target_logit, row_max = _head_ce(hidden, head, targets)
    return _sums(log_z, target_logit, target_logit >= row_max, weights, z_loss, denoiser_ids,
                 num_denoisers)
