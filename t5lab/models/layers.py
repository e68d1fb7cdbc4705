"""Building blocks: RMSNorm, embedding, dense kernels, relative position bias,
RoPE, multi-head attention (with a KV cache for decoding) and the MLP.

Every parameter is float32 and carries logical axis names from t5lab/sharding.py;
compute happens in `dtype`, with norms and softmax in float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lab import cpu_kernels
from t5lab.cpu_kernels import compiling_for_cpu, softmax
from t5lab.models import attention as attn

F32 = jnp.float32
# A large finite negative (not -inf) so a fully masked row (an all-padding query)
# softmaxes to a uniform distribution instead of NaN.
MASK_VALUE = -1e10

ACTIVATIONS: dict[str, Callable] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF "gelu_new"
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str]):
    """A float32 parameter annotated with logical axes (boxed at init, unboxed on use)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), F32)


def fan_in_init(scale: float = 1.0, in_axis=-2, out_axis=-1, distribution="truncated_normal"):
    """t5x's variance-scaling init; in/out axes may be tuples for 3-D kernels so the
    fan is the product of the contracted dims, as for the flattened matrix."""
    return nn.initializers.variance_scaling(scale, "fan_in", distribution,
                                            in_axis=in_axis, out_axis=out_axis)


def dense(x, kernels, n_in: int = 1, cpu_vjp: bool = True):
    """x [..., in] contracted with each kernel [in..., out...] over x's last
    `n_in` dims (the kernels' first `n_in`): one output per kernel. On CPU
    (and when `cpu_vjp`: no dot-saving remat policy is active) this is
    cpu_kernels.dense with its hand-written VJP; elsewhere plain dots."""
    if cpu_vjp and compiling_for_cpu():
        return cpu_kernels.dense(x, kernels, n_in)
    return tuple(jnp.tensordot(x, k, axes=n_in) for k in kernels)


class RMSNorm(nn.Module):
    """T5 LayerNorm: no mean subtraction, no bias, variance in float32."""
    eps: float = 1e-6
    dtype: Any = F32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding [vocab, embed]; `attend` is the tied output projection."""
    num_embeddings: int
    features: int
    dtype: Any = F32

    def setup(self):
        # t5x initialises embeddings with stddev 1: the pre-norm blocks rescale them.
        self.embedding = param(self, "embedding", nn.initializers.normal(stddev=1.0),
                               (self.num_embeddings, self.features), ("vocab", "embed"))

    def __call__(self, ids):
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(self.dtype),
                          preferred_element_type=F32)


class DenseHead(nn.Module):
    """Untied output projection [embed, vocab] to float32 logits."""
    vocab_size: int
    dtype: Any = F32

    @nn.compact
    def __call__(self, x):
        kernel = param(self, "kernel", fan_in_init(), (x.shape[-1], self.vocab_size), ("embed", "vocab"))
        return jnp.einsum("...d,dv->...v", x, kernel.astype(self.dtype), preferred_element_type=F32)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of key_pos - query_pos: exact buckets for small distances,
    log-spaced ones up to max_distance (same float32 arithmetic as HF T5)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # maximum() keeps log away from 0 in the branch where() discards.
    rp = jnp.maximum(relative_position, max_exact).astype(F32)
    large = max_exact + (jnp.log(rp / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by bucketed relative position -> [B, H, Q, K]."""
    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos, k_pos, table_only: bool = False):
        table = param(self, "rel_embedding",
                      nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                      (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
        if table_only:  # the flash kernel builds the bias itself
            return table
        rel = k_pos[:, None, :] - q_pos[:, :, None]
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        # A one-hot contraction rather than a gather (as t5x does): the gather's
        # gradient is a scatter whose [Q*K, H] update layout forced a strided
        # transpose of the logits gradients, ~4% of a T5 small step on CPU; this one
        # is a plain matmul over the contiguous [H, Q*K] gradient.
        one_hot = (buckets[..., None] == jnp.arange(self.num_buckets)).astype(F32)
        return jnp.einsum("hn,bqkn->bhqk", table, one_hot)  # [B, H, Q, K] float32


def apply_rope(x, positions, theta: float):
    """Rotary embedding in HF Llama's rotate_half layout (first half / second half
    of each head are the pair), so Llama weights copy without permutation.
    x: [B, T, H, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=F32) / d))
    angles = positions.astype(F32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(F32) * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class HeadsProjection(nn.Module):
    """The kernel [embed, heads, kv] of a q, k or v projection; Attention
    applies the kernels of one input in one `dense`, whose CPU backward pass
    then transposes that input once."""
    num_heads: int
    head_dim: int
    kernel_init: Callable
    dtype: Any = F32

    @nn.compact
    def __call__(self, x):
        return param(self, "kernel", self.kernel_init, (x.shape[-1], self.num_heads, self.head_dim),
                     ("embed", "heads", "kv")).astype(self.dtype)


def constrain_heads(y):
    return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))


class OutputProjection(nn.Module):
    """[B, T, heads, kv] -> [B, T, embed] with kernel [heads, kv, embed]."""
    features: int
    dtype: Any = F32
    cpu_vjp: bool = True

    @nn.compact
    def __call__(self, y):
        kernel = param(self, "kernel", fan_in_init(1.0, (0, 1), 2, "normal"),
                       (y.shape[-2], y.shape[-1], self.features), ("heads", "kv", "embed"))
        return dense(y, [kernel.astype(self.dtype)], n_in=2, cpu_vjp=self.cpu_vjp)[0]


class Attention(nn.Module):
    """Multi-head attention. T5 style (scale_logits=False) leaves logits unscaled
    and folds 1/sqrt(head_dim) into the query init; Llama style scales logits.

    What `mask` and `bias` are depends on the implementation (models/attention.py):
    `xla`: mask bool or None, bias float32 broadcastable to [B, H, Q, K] (stacks
    fold the mask into the bias once, `additive_mask`, so each layer does one add
    and its backward pass no select); `dpa`/`cudnn`: mask an `attention.DotProductMask`,
    bias the relative bias [1, H, Q, K] or None; `flash`: mask an
    `attention.Masking`, bias the relative-bias table [H, buckets] or None, with
    `relpos` = (bidirectional, buckets, max_distance).
    In decode mode keys/values are written into a fixed-size 'cache' at
    `cache_index` (shapes never change, so one compiled step serves all steps)."""
    num_heads: int
    head_dim: int
    dtype: Any = F32
    dropout_rate: float = 0.0
    scale_logits: bool = False
    rope_theta: float | None = None   # None: no rotary embedding
    implementation: str = "xla"       # resolved: xla | dpa | cudnn | flash
    relpos: tuple | None = None
    cpu_vjp: bool = True

    @nn.compact
    def __call__(self, x_q, x_kv, mask, bias=None, q_pos=None, k_pos=None,
                 deterministic=True, decode=False, cache_index=None):
        h, dh = self.num_heads, self.head_dim
        q_scale = 1.0 if self.scale_logits else 1.0 / math.sqrt(dh)
        q_proj = HeadsProjection(h, dh, fan_in_init(q_scale, 0, (1, 2), "normal"), self.dtype, name="query")
        k_proj = HeadsProjection(h, dh, fan_in_init(1.0, 0, (1, 2), "normal"), self.dtype, name="key")
        v_proj = HeadsProjection(h, dh, fan_in_init(1.0, 0, (1, 2), "normal"), self.dtype, name="value")
        if x_kv is x_q:
            q, k, v = dense(x_q, [q_proj(x_q), k_proj(x_q), v_proj(x_q)], cpu_vjp=self.cpu_vjp)
        else:
            q = dense(x_q, [q_proj(x_q)], cpu_vjp=self.cpu_vjp)[0]
            k, v = dense(x_kv, [k_proj(x_kv), v_proj(x_kv)], cpu_vjp=self.cpu_vjp)
        q, k, v = constrain_heads(q), constrain_heads(k), constrain_heads(v)
        if self.rope_theta is not None:
            q = apply_rope(q, q_pos, self.rope_theta)
            k = apply_rope(k, q_pos if decode else k_pos, self.rope_theta)  # new keys sit at q_pos

        if decode:
            initialized = self.has_variable("cache", "cached_key")
            cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            if initialized:  # at init the full-length call only sizes the cache
                start = (0, cache_index, 0, 0)
                k = jax.lax.dynamic_update_slice(cached_k.value, k, start)
                v = jax.lax.dynamic_update_slice(cached_v.value, v, start)
                cached_k.value, cached_v.value = k, v

        scale = dh ** -0.5 if self.scale_logits else 1.0
        impl = "xla" if decode else self.implementation
        if impl == "xla":
            y = self._xla(q, k, v, mask, bias, scale, deterministic)
        elif impl == "flash":
            y = attn.flash(q, k, v, mask, bias, relpos=self.relpos, scale=scale)
        else:
            y = attn.dot_product(q, k, v, mask, bias, scale=scale,
                                 implementation="cudnn" if impl == "cudnn" else "xla")
        y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
        return OutputProjection(x_q.shape[-1], self.dtype, self.cpu_vjp, name="out")(y)

    def _xla(self, q, k, v, mask, bias, scale, deterministic):
        if scale != 1.0:
            q = q * jnp.asarray(scale, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32)
        if bias is not None:
            logits = logits + bias
        if mask is not None:
            logits = jnp.where(mask, logits, MASK_VALUE)
        weights = softmax(logits)  # t5lab.cpu_kernels: a fast max-shift on CPU
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)


def additive_mask(mask):
    """A boolean mask as a float32 bias: 0 where allowed, MASK_VALUE where not.
    logits + this (+ any bias) == where(mask, logits + bias, ~MASK_VALUE); a fully
    masked row still softmaxes to uniform (MASK_VALUE swallows the logits)."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(F32)


class Mlp(nn.Module):
    """T5 feed-forward: gated act(x wi_0) * (x wi_1) or plain act(x wi), then wo."""
    d_ff: int
    activation: str = "gelu_tanh"
    gated: bool = True
    dtype: Any = F32
    dropout_rate: float = 0.0
    cpu_vjp: bool = True

    @nn.compact
    def __call__(self, x, deterministic=True):
        d = x.shape[-1]

        names = ("wi_0", "wi_1") if self.gated else ("wi",)
        kernels = [param(self, n, fan_in_init(), (d, self.d_ff), ("embed", "mlp")).astype(self.dtype)
                   for n in names]
        # One `dense` for both gated inputs: its CPU backward pass transposes x once.
        pre = [nn.with_logical_constraint(y, ("batch", "length", "mlp"))
               for y in dense(x, kernels, cpu_vjp=self.cpu_vjp)]
        act = ACTIVATIONS[self.activation]
        if self.gated and self.activation == "gelu_tanh" and compiling_for_cpu():
            hidden = cpu_kernels.gelu_tanh_gate(*pre)
        else:
            hidden = act(pre[0]) * pre[1] if self.gated else act(pre[0])
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        wo = param(self, "wo", fan_in_init(), (self.d_ff, d), ("mlp", "embed"))
        return dense(hidden, [wo.astype(self.dtype)], cpu_vjp=self.cpu_vjp)[0]
