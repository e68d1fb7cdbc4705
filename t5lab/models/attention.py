"""Attention implementations behind one function, chosen by `model.attention`.

- `xla`: einsum logits in float32, an additive bias (mask and relative bias
  folded together), softmax, einsum. The reference; the only one with
  attention dropout and the one decoding uses.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's
  fused attention on NVIDIA GPUs, T5's relative bias ([1, H, Q, K], shared
  by the batch) and the boolean mask passed in. `dpa` is the same call with
  XLA's implementation: it runs anywhere, so CPU tests cover the code path.
- `flash`: a Pallas TPU flash attention (t5lab/models/flash_tpu.py) that
  takes the relative-bias table and segment ids, so no [B, H, Q, K] array is
  ever formed.
- `auto`: `flash` on TPU, `cudnn` on GPU for bfloat16/float16 compute, else
  `xla`.

Fused kernels need the mask as vectors, not as a dense [B, 1, Q, K] array:
`Masking` carries segment ids, key validity, causality and the prefix-LM
prefix; `dense_mask` builds the dense mask for those that take one, and
`for_dot_product` what `dpa`/`cudnn` take (key lengths and a causal flag
for unpacked rows).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from t5lab.cpu_kernels import compiling_platform

F32 = jnp.float32
IMPLEMENTATIONS = ("auto", "xla", "dpa", "cudnn", "flash")
# Set by tests only: run the Pallas kernel in interpret mode on CPU.
FLASH_INTERPRET = False


@struct.dataclass
class Masking:
    """Which keys a query may see: same segment (when segment ids are given),
    a valid key, key <= query when causal, except that prefix positions see
    each other (prefix LM). Arrays are [B, Q] or [B, K]; None means no
    constraint of that kind."""
    q_segments: Any = None
    kv_segments: Any = None
    kv_valid: Any = None
    prefix: Any = None
    causal: bool = struct.field(pytree_node=False, default=False)


def dense_mask(m: Masking, q_len: int, k_len: int):
    """bool, broadcastable to [B, 1, Q, K] (no larger than its constraints
    need): True where attention is allowed."""
    mask = jnp.ones((1, 1, 1, k_len), jnp.bool_)
    if m.causal:
        mask = (jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]
        if m.prefix is not None:
            p = m.prefix.astype(jnp.bool_)
            mask = mask | (p[:, None, :, None] & p[:, None, None, :])
    if m.kv_valid is not None:
        mask = mask & m.kv_valid[:, None, None, :]
    if m.q_segments is not None and m.kv_segments is not None:
        mask = mask & (m.q_segments[:, None, :, None] == m.kv_segments[:, None, None, :])
    return mask


def resolve(name: str, dtype, decode: bool = False, dropout_rate: float = 0.0) -> str:
    """The implementation `name` means for this program; raises ValueError
    naming `model.attention` when it cannot run here."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention: {name!r} is not one of {IMPLEMENTATIONS}")
    if decode:
        return "xla"  # one query per step: nothing to fuse, and the cache's mask is dense
    platform = compiling_platform()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        if dropout_rate > 0:
            return "xla"
        if platform == "tpu":
            return "flash"
        return "cudnn" if platform == "gpu" and half else "xla"
    if name != "xla" and dropout_rate > 0:
        raise ValueError(f"model.attention={name} applies no attention dropout; "
                         f"use model.attention=xla or model.dropout_rate=0")
    if name == "cudnn" and (platform != "gpu" or not half):
        raise ValueError(f"model.attention=cudnn needs a CUDA GPU and model.dtype=bfloat16; "
                         f"this program is for {platform} with {jnp.dtype(dtype).name}")
    if name == "flash" and platform != "tpu" and not FLASH_INTERPRET:
        raise ValueError(f"model.attention=flash is a TPU kernel; this program is for {platform}")
    return name


@struct.dataclass
class DotProductMask:
    """A `Masking` as `jax.nn.dot_product_attention` takes it. Unpacked rows
    (no segment ids, no prefix) become key lengths and a causal flag, so no
    per-row array reaches the kernel: cuDNN folds a mask into its bias, and a
    padding mask [B, 1, Q, K] would make T5's shared [1, H, Q, K] bias a
    [B, H, Q, K] one, formed and differentiated in every layer. Key lengths
    are exact because unpacked rows pad at the end (t5lab's pipeline and
    t5x's); packed rows keep the dense mask."""
    dense: Any = None
    kv_lengths: Any = None
    causal: bool = struct.field(pytree_node=False, default=False)


def for_dot_product(m: Masking, q_len: int, k_len: int) -> DotProductMask:
    if m.q_segments is not None or m.kv_segments is not None or (m.causal and m.prefix is not None):
        return DotProductMask(dense=dense_mask(m, q_len, k_len))
    lengths = None
    if m.kv_valid is not None:
        # At least one key: a row of padding then attends to its first
        # position, not to a length 0 that the kernel need not define.
        lengths = jnp.maximum(jnp.sum(m.kv_valid, axis=-1, dtype=jnp.int32), 1)
    return DotProductMask(kv_lengths=lengths, causal=m.causal)


def dot_product(q, k, v, mask: DotProductMask, bias=None, *, scale: float, implementation: str):
    """`jax.nn.dot_product_attention` on [B, T, H, D] inputs. bias: float,
    broadcastable to [B, H, Q, K] (cuDNN differentiates a bias only when it
    is shared by the batch, as T5's is)."""
    if bias is not None:
        bias = bias.astype(q.dtype)
    dense = mask.dense
    if dense is not None and implementation == "cudnn":
        # cuDNN folds the mask into the bias and wants its last two dims [Q, K].
        dense = jnp.broadcast_to(dense, (dense.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense, scale=scale,
                                        is_causal=mask.causal, key_value_seq_lengths=mask.kv_lengths,
                                        implementation=implementation)


def flash(q, k, v, masking: Masking, table=None, *, relpos=None, scale: float):
    """The Pallas TPU kernel. table: [H, buckets] float32 relative-bias table
    or None; relpos: (bidirectional, num_buckets, max_distance). Under a mesh
    it runs per shard (shard_map over batch and heads, as the activations are
    laid out): XLA cannot partition a Pallas call, and would gather its
    operands onto every device."""
    from flax import linen as nn
    from jax.sharding import PartitionSpec as P

    from t5lab.models import flash_tpu  # Pallas loads only for runs that use it

    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    ones = lambda t: jnp.ones((b, t), jnp.int32)
    q_seg = masking.q_segments if masking.q_segments is not None else ones(tq)
    kv_seg = masking.kv_segments if masking.kv_segments is not None else ones(tk)
    if masking.kv_valid is not None:
        # An invalid key matches no query; the kernel wants ids >= 0, so valid
        # segments move up by one and invalid keys take 0, which no query has
        # (a fully masked query row gives 0, where only padding lies).
        kv_seg = jnp.where(masking.kv_valid, kv_seg + 1, 0)
        q_seg = q_seg + 1
    prefix = masking.prefix
    mesh = jax.sharding.get_abstract_mesh()
    kind = "" if mesh.empty else getattr(getattr(mesh, "abstract_device", None), "device_kind", "")
    # TPU v4 and older have no strided lane rotate: the kernel builds its bias tiles in XLA there.
    tiles = any(f"v{g}" in kind.lower() for g in (2, 3, 4)) or None
    kwargs = dict(causal=masking.causal, sm_scale=scale, interpret=FLASH_INTERPRET, bias_tiles=tiles)
    if table is not None:
        bidirectional, num_buckets, max_distance = relpos
        kwargs.update(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)

    def call(q, k, v, q_seg, kv_seg, prefix, table):
        return flash_tpu.flash_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                         q_prefix=prefix, bias_table=table, **kwargs)

    args = (q, k, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32), prefix, table)
    if mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return call(*args)
    batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    # An axis that does not split evenly (init's one-row dummy batch) stays whole.
    batch = batch if b % _size(mesh, batch) == 0 else None
    heads = heads if q.shape[2] % _size(mesh, heads) == 0 else None
    x, row = P(batch, None, heads, None), P(batch, None)
    specs = (x, x, x, row, row, None if prefix is None else row, None if table is None else P(heads, None))
    # check_vma=False: the Pallas call has no varying-axes rule; the transpose then
    # sums the replicated table's gradient over the batch shards itself.
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=x, check_vma=False)(*args)


def _size(mesh, axes) -> int:
    """Devices along mesh axis name(s) `axes` (None: 1)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return size
