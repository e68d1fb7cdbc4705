"""Pallas TPU flash attention for T5: the relative-position bias from its
bucket table and packed segment ids, forward and backward, with every HBM
temporary O(T) (nothing [B, H, T, T], not even the bias or its gradient).

    o = flash_attention(q, k, v, q_segment_ids=s, kv_segment_ids=s, causal=False,
                        bias_table=table)        # q, k, v [B, T, H, D]; table [H, buckets]

How the bias stays O(T): with equal query and key blocks of size b, the bias
of block (i, j) depends only on the diagonal d = j - i, and inside it only on
c - r (key column minus query row). So the kernels read a per-head vector
`vec[u] = table[bucket(u - (n b - 1))]` (2 n b values, n blocks) and expand
the two b-wide windows of diagonal d into the [b, b] tile in VMEM with one
strided lane rotation (`_skew`). The bias gradient is summed the same way in
reverse: a dbias kernel whose grid holds (heads, diagonal) fixed while it
walks the batch and the blocks of that diagonal accumulates ds in VMEM and
folds it once into a 2b window (`_skew_adjoint`); XLA overlap-adds the
windows (O(H T)) and autodiff takes that to the table. TPU v4 has no
strided lane rotate: there (bias_tiles=True) XLA builds the 2n - 1 tiles,
[H, 2n - 1, b, b] in each orientation, O(H T b), and the dbias kernel
returns their gradient, which autodiff folds back through the same
reshapes.

Masking: a query attends a key when their segment ids are equal and, when
causal, key index <= query index or both are in the prefix (prefix LM).
Segment id and prefix bit travel as one int32 code, seg * 2 + prefix.
Padding up to a block multiple uses segments -1 (queries) and -2 (keys), so
user segment ids must be >= 0. Blocks that the segment ranges, causality and
prefix flags prove fully masked are skipped (per-block metadata in SMEM).

Softmax is float32 with -inf masking; a query row that can see no key
(impossible in t5lab's batches, where a token sees itself) gives output 0
and zero gradients, never NaN (t5lab's XLA path gives such a row the mean of
all values instead).

Backward: dq (query blocks outer, keys inner), dk/dv (key blocks outer,
computed keys-major so the saved logsumexp and delta rows broadcast without
a relayout) and, with a bias, dbias; each recomputes p from q, k and the
forward's logsumexp. Inputs bf16 or float32; accumulation float32.

Layout: t5lab's [B, T, H, D] is read in place as [B, T, H * D], a block of
`hb` heads at a time with hb * D a multiple of 128 lanes (D = 64: two
heads), so nothing is transposed and no vreg or HBM tile is half empty. Each
head's matmuls take the block with the other heads' lanes zeroed: on a
128-wide MXU that costs what a 64-deep contraction costs anyway.
`interpret=True` runs the same kernels on CPU (tests).

Sharding: XLA does not partition a Pallas kernel; under a mesh call this
inside shard_map over batch and heads (keeping whole hb-head groups per
shard), or XLA gathers its operands onto every device.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from t5lab.models.layers import relative_position_bucket

F32 = jnp.float32
LANES, SUBLANES = 128, 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T: the MXU takes a transposed right operand for free
NEG_INF = -jnp.inf


class _Cfg(NamedTuple):
    """Static shape and mode of one call (hashable: a custom_vjp nondiff arg)."""
    block: int
    nq: int
    nk: int
    heads: int        # H
    head_dim: int     # D
    group: int        # heads per block, hb
    causal: bool
    has_bias: bool
    bias_tiles: bool  # bias as [b, b] tiles built by XLA (no strided lane rotate, e.g. v4)
    scale: float
    interpret: bool


def flash_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal: bool, q_prefix=None,
                    bias_table=None, bidirectional: bool = True, num_buckets: int = 32,
                    max_distance: int = 128, sm_scale: float = 1.0, block: int = 128,
                    bias_tiles: bool | None = None, interpret: bool = False):
    """Attention over q [B, Tq, H, D], k, v [B, Tk, H, D] -> [B, Tq, H, D].

    q_segment_ids [B, Tq], kv_segment_ids [B, Tk]: int, >= 0 (t5lab's padding
    0 is a segment of its own: padding attends padding, which carries no loss).
    causal: key index <= query index; q_prefix [B, Tq] bool (causal
    self-attention only): prefix positions also attend each other both ways,
    as t5lab's prefix LM. bias_table [H, num_buckets] (self-attention only,
    Tq == Tk): T5's relative bias table[h, relative_position_bucket(key -
    query)]. sm_scale multiplies the logits (T5: 1, folded into the query
    init). block: 128 (the TPU minimum, and the default), 256 or 512; shorter
    sequences use one block of their length rounded up to 128. Blocks under
    128 are for interpret mode only. bias_tiles: build the bias as XLA tiles
    [H, 2n - 1, b, b] (O(H T b) HBM, 2 copies + the gradient) instead of in
    VMEM from O(H T) vectors; needed where Mosaic has no strided lane rotate
    (TPU v4 and older). None: on when the default device is such a TPU, so
    pass True when compiling ahead of time for v4 from another host."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    if k.shape != (b, tk, h, d) or v.shape != k.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected [B, T, H, D] with equal B, H, D")
    if bias_table is not None and tq != tk:
        raise ValueError("bias_table is for self-attention (Tq == Tk)")
    if bias_table is not None and bias_table.shape != (h, num_buckets):
        raise ValueError(f"bias_table {bias_table.shape}: expected [{h}, {num_buckets}]")
    if q_prefix is not None and causal and tq != tk:
        raise ValueError("q_prefix is for causal self-attention (Tq == Tk)")
    if block >= LANES:  # do not pad a short sequence (T5 targets: 114) up to a big block
        block = min(block, _round_up(max(tq, tk), LANES))
    tq_p, tk_p = _round_up(tq, block), _round_up(tk, block)
    if bias_tiles is None:
        bias_tiles = _lacks_strided_rotate()
    cfg = _Cfg(block, tq_p // block, tk_p // block, h, d, _heads_per_block(h, d), bool(causal),
               bias_table is not None, bool(bias_tiles), float(sm_scale), bool(interpret))

    prefix = (jnp.zeros((b, tq), jnp.int32) if q_prefix is None or not causal
              else q_prefix.astype(jnp.int32))
    q_code = jnp.pad(q_segment_ids.astype(jnp.int32) * 2 + prefix, ((0, 0), (0, tq_p - tq)),
                     constant_values=-2)   # segment -1
    k_prefix = prefix if tq == tk else jnp.zeros((b, tk), jnp.int32)
    k_code = jnp.pad(kv_segment_ids.astype(jnp.int32) * 2 + k_prefix, ((0, 0), (0, tk_p - tk)),
                     constant_values=-4)   # segment -2: no query matches a padded key

    def lanes(x, t_p):  # [B, T, H, D] -> [B, T_p, H * D]: a free reshape, a pad only if needed
        x = x.reshape(b, x.shape[1], h * d)
        return x if x.shape[1] == t_p else jnp.pad(x, ((0, 0), (0, t_p - x.shape[1]), (0, 0)))

    bias_q = bias_k = None
    if bias_table is not None:
        # vec[u] is the bias at relative position u - (n b - 1), vec_rev[u] at
        # (n b - 1) - u: the query-major tiles (forward, dq) are windows of the
        # first, the keys-major ones (dk/dv, dbias) windows of the second.
        n, length = cfg.nq, 2 * cfg.nq * block
        u = jnp.arange(length)
        bias_q = _bias_vector(bias_table, u - (n * block - 1), bidirectional, num_buckets, max_distance)
        bias_k = _bias_vector(bias_table, (n * block - 1) - u, bidirectional, num_buckets, max_distance)
        if cfg.bias_tiles:
            bias_q, bias_k = _tiles(bias_q, block), _tiles(bias_k, block)
    o = _attention(cfg, lanes(q, tq_p), lanes(k, tk_p), lanes(v, tk_p), bias_q, bias_k, q_code, k_code)
    return o[:, :tq].reshape(b, tq, h, d)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _heads_per_block(h: int, d: int) -> int:
    """The fewest heads whose lanes fill whole 128-lane tiles; all H (a block as
    wide as the array, always legal) when no divisor of H does."""
    for g in range(1, h + 1):
        if h % g == 0 and (g * d) % LANES == 0:
            return g
    return h


def _lacks_strided_rotate() -> bool:
    """Mosaic rejects pltpu.roll's stride on TPU v4 and older
    (SupportsVectorRotateLaneStride); v5e, v5p and v6e have it."""
    device = jax.devices()[0]
    return device.platform == "tpu" and any(f"v{g}" in device.device_kind.lower() for g in (2, 3, 4))


def _tiles(vec, b):
    """[H, 2 n b] -> [H, 2n - 1, b, b]: tile w is _skew of window w
    (tile[r, c] = vec[w b + c + b - 1 - r]) by broadcast, reshape and slice:
    viewing b copies of a length-L row as rows of length L - 1 starts row r
    r places earlier. Autodiff transposes that into pads and sums, not a
    scatter."""
    h, length = vec.shape
    nd = length // b - 1
    v = jnp.roll(vec, -(b - 1), axis=1)
    rows = jnp.broadcast_to(v[:, None, :], (h, b, length)).reshape(h, b * length)
    rows = rows[:, :b * (length - 1)].reshape(h, b, length - 1)[:, :, :nd * b]  # [h, r, w b + c]
    return rows.reshape(h, b, nd, b).transpose(0, 2, 1, 3)


def _bias_vector(table, rel, bidirectional, num_buckets, max_distance):
    """[H, len(rel)] float32: table[h, bucket(rel)], as a one-hot matmul (its
    gradient is a small matmul too, not a scatter)."""
    buckets = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    one_hot = (buckets[:, None] == jnp.arange(num_buckets)).astype(F32)
    return jnp.einsum("hn,un->hu", table.astype(F32), one_hot)


# ---------------------------------------------------------------- in-kernel helpers

def _lane_roll(x, shift, stride, interpret):
    """pltpu.roll along lanes, row r by shift + r * stride (jnp.roll's
    direction). Interpret mode takes one gather with the same semantics:
    pltpu.roll's CPU lowering is a roll per row, minutes of XLA:CPU compile
    at b = 128."""
    if not interpret:
        return pltpu.roll(x, shift, 1, stride=stride, stride_axis=0)
    rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    src = (lax.broadcasted_iota(jnp.int32, x.shape, 1) - shift - stride * rows) % x.shape[1]
    return jnp.take_along_axis(x, src, axis=1)


def _skew(lo, hi, cfg):
    """tile[r, c] = w[c + b - 1 - r] from the window w = [lo | hi] ([8, b] each,
    rows identical): every row of the broadcast window rotated by b + 1 + r."""
    b = cfg.block
    w = jnp.broadcast_to(jnp.concatenate([lo[0:1], hi[0:1]], axis=1), (b, 2 * b))
    return _lane_roll(w, b + 1, 1, cfg.interpret)[:, :b]


def _skew_adjoint(g, cfg):
    """The transpose of _skew: [b, b] -> [1, 2b], out[k] = sum of g[r, c] over
    c + b - 1 - r == k. Rows reversed first (an exchange-matrix matmul, once
    per diagonal), so row r' lands shifted right by r': Mosaic's strided
    rotate takes only small non-negative strides, not the -1 a direct inverse
    would need."""
    b = cfg.block
    rows = lax.broadcasted_iota(jnp.int32, (b, b), 0)
    exchange = (rows + lax.broadcasted_iota(jnp.int32, (b, b), 1) == b - 1).astype(F32)
    g = jnp.dot(exchange, g, precision=lax.Precision.HIGHEST, preferred_element_type=F32)
    padded = jnp.concatenate([g, jnp.zeros_like(g)], axis=1)
    return jnp.sum(_lane_roll(padded, 0, 1, cfg.interpret), axis=0, keepdims=True)


def _eye(b):
    return lax.broadcasted_iota(jnp.int32, (b, b), 0) == lax.broadcasted_iota(jnp.int32, (b, b), 1)


def _col_to_row(x):
    """[b, 1] -> [1, b] through a masked sublane sum: once per block, and free
    of the lane<->sublane relayouts Mosaic may not lower."""
    return jnp.sum(jnp.where(_eye(x.shape[0]), x, 0.0), axis=0, keepdims=True)


def _row_to_col(x):
    return jnp.sum(jnp.where(_eye(x.shape[1]), x, 0.0), axis=1, keepdims=True)


def _head_lanes(cfg):
    """One [1, hb * D] lane mask per head of a block."""
    lane = lax.broadcasted_iota(jnp.int32, (1, cfg.group * cfg.head_dim), 1)
    d = cfg.head_dim  # ranges, not lane // d: integer floor division lowers through sign()
    return [(lane >= x * d) & (lane < (x + 1) * d) for x in range(cfg.group)]


def _only(sel, x):
    return jnp.where(sel, x, jnp.zeros((), x.dtype))


def _allowed(q_code, k_code, q_idx, k_idx, causal):
    """Same segment (the codes without their prefix bit) and, when causal,
    key <= query or both in the prefix. Arguments broadcast to the tile."""
    ok = (q_code | 1) == (k_code | 1)
    if causal:
        ok = ok & ((k_idx <= q_idx) | ((q_code & k_code & 1) == 1))
    return ok


def _live(q_meta, k_meta, b, i, j, cfg):
    """False when block (i, j) of row b is provably fully masked: disjoint
    segment ranges, or above the diagonal with no prefix on both sides."""
    qo, ko = (b * cfg.nq + i) * 3, (b * cfg.nk + j) * 3
    live = jnp.logical_and(q_meta[qo] <= k_meta[ko + 1], k_meta[ko] <= q_meta[qo + 1])
    if cfg.causal:
        live = jnp.logical_and(live, jnp.logical_or(j <= i, (q_meta[qo + 2] & k_meta[ko + 2]) == 1))
    return live


def _block_meta(code, n, block):
    """Per block, flattened for SMEM: [min segment, max segment, any prefix]."""
    c = code.reshape(code.shape[0], n, block)
    seg = c | 1
    return jnp.stack([seg.min(-1), seg.max(-1), (c & 1).max(-1)], -1).reshape(-1)


def _logits(a, b, cfg, bias):
    s = lax.dot_general(a, b, NT, preferred_element_type=F32)
    if cfg.scale != 1.0:
        s = s * cfg.scale
    return s if bias is None else s + bias


def _query_major_mask(qc_ref, kc_ref, i, j, cfg):
    b = cfg.block
    q_idx = i * b + lax.broadcasted_iota(jnp.int32, (b, 1), 0)
    k_idx = j * b + lax.broadcasted_iota(jnp.int32, (1, b), 1)
    return _allowed(qc_ref[:, 0:1], kc_ref[0:1, :], q_idx, k_idx, cfg.causal)


def _key_major_mask(qc_ref, kc_ref, i, j, cfg):
    b = cfg.block
    q_idx = i * b + lax.broadcasted_iota(jnp.int32, (1, b), 1)
    k_idx = j * b + lax.broadcasted_iota(jnp.int32, (b, 1), 0)
    return _allowed(qc_ref[0:1, :], kc_ref[:, 0:1], q_idx, k_idx, cfg.causal)


# ---------------------------------------------------------------- kernels
# Refs: q, k, v, do, o blocks [b, hb * D]; lse / delta / bias-window blocks
# [hb, 8, b] (rows repeated over 8 sublanes); per-head scratch leads with hb.

def _split_bias(refs, cfg):
    """(bias refs, the rest): two window halves, one XLA tile, or none."""
    n = 0 if not cfg.has_bias else 1 if cfg.bias_tiles else 2
    return refs[:n], refs[n:]


def _bias_tile(bias_refs, x, cfg):
    if not cfg.has_bias:
        return None
    if cfg.bias_tiles:
        return bias_refs[0][x]
    lo_ref, hi_ref = bias_refs
    return _skew(lo_ref[x], hi_ref[x], cfg)


def _fwd_kernel(q_meta, k_meta, q_ref, k_ref, v_ref, qc_ref, kc_ref, *refs, cfg):
    bias_refs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_bias(refs, cfg)
    bb, i, j, blk = pl.program_id(0), pl.program_id(2), pl.program_id(3), cfg.block

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(_live(q_meta, k_meta, bb, i, j, cfg))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        ok = _query_major_mask(qc_ref, kc_ref, i, j, cfg)
        alpha_lanes = jnp.zeros((blk, q.shape[1]), F32)
        pv = jnp.zeros((blk, q.shape[1]), F32)
        for x, sel in enumerate(_head_lanes(cfg)):
            bias = _bias_tile(bias_refs, x, cfg)
            s = jnp.where(ok, _logits(_only(sel, q), k, cfg, bias), NEG_INF)
            m_prev, l_prev = m_sc[x][:, 0:1], l_sc[x][:, 0:1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)   # a row with nothing seen yet
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m_prev - m_safe)
            l_sc[x] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), (blk, LANES))
            m_sc[x] = jnp.broadcast_to(m_new, (blk, LANES))
            alpha_lanes = jnp.where(sel, alpha, alpha_lanes)
            pv = pv + jnp.dot(p.astype(v.dtype), _only(sel, v), preferred_element_type=F32)
        acc_sc[...] = alpha_lanes * acc_sc[...] + pv

    @pl.when(j == cfg.nk - 1)
    def _finish():
        l_lanes = jnp.ones(acc_sc.shape, F32)
        for x, sel in enumerate(_head_lanes(cfg)):
            l, m = l_sc[x][:, 0:1], m_sc[x][:, 0:1]
            empty = l == 0.0
            l = jnp.where(empty, 1.0, l)
            l_lanes = jnp.where(sel, l, l_lanes)
            lse = jnp.where(empty, 0.0, m + jnp.log(l))   # finite: exp(-inf - lse) stays 0
            lse_ref[x] = jnp.broadcast_to(_col_to_row(lse), (SUBLANES, blk))
        o_ref[...] = (acc_sc[...] / l_lanes).astype(o_ref.dtype)


def _dq_kernel(q_meta, k_meta, q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, qc_ref, kc_ref, *refs, cfg):
    bias_refs, (dq_ref, dl_ref, lse_sc, dl_sc, acc_sc) = _split_bias(refs, cfg)
    bb, i, j, blk = pl.program_id(0), pl.program_id(2), pl.program_id(3), cfg.block

    @pl.when(j == 0)
    def _init():
        # delta = rowsum(p * dp) = rowsum(o * do) per head, here rather than in
        # XLA (which may materialise o * do in float32); dk/dv and dbias read
        # it as the rows this kernel writes.
        prod = o_ref[...].astype(F32) * do_ref[...].astype(F32)
        for x, sel in enumerate(_head_lanes(cfg)):
            lse_sc[x] = jnp.broadcast_to(_row_to_col(lse_ref[x][0:1, :]), (blk, LANES))
            delta = jnp.sum(jnp.where(sel, prod, 0.0), axis=1, keepdims=True)
            dl_sc[x] = jnp.broadcast_to(delta, (blk, LANES))
            dl_ref[x] = jnp.broadcast_to(_col_to_row(delta), (SUBLANES, blk))
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(_live(q_meta, k_meta, bb, i, j, cfg))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        ok = _query_major_mask(qc_ref, kc_ref, i, j, cfg)
        dq = jnp.zeros(acc_sc.shape, F32)
        for x, sel in enumerate(_head_lanes(cfg)):
            bias = _bias_tile(bias_refs, x, cfg)
            s = jnp.where(ok, _logits(_only(sel, q), k, cfg, bias), NEG_INF)
            p = jnp.exp(s - lse_sc[x][:, 0:1])
            dp = lax.dot_general(_only(sel, do), v, NT, preferred_element_type=F32)
            ds = p * (dp - dl_sc[x][:, 0:1])
            dq = dq + jnp.dot(ds.astype(k.dtype), _only(sel, k), preferred_element_type=F32)
        acc_sc[...] += dq

    @pl.when(j == cfg.nk - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _key_major_ds(q, k, v, do, lse_ref, dl_ref, ok, sel, x, bias, cfg):
    """Head x of block (i, j) keys-major: (p^T, ds^T) [b_k, b_q]. Keys on
    sublanes lets the saved logsumexp and delta rows broadcast as stored."""
    st = jnp.where(ok, _logits(_only(sel, k), q, cfg, bias), NEG_INF)
    pt = jnp.exp(st - lse_ref[x][0:1, :])
    dpt = lax.dot_general(_only(sel, v), do, NT, preferred_element_type=F32)
    return pt, pt * (dpt - dl_ref[x][0:1, :])


def _dkv_kernel(q_meta, k_meta, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qc_ref, kc_ref, *refs,
                cfg):
    bias_refs, (dk_ref, dv_ref, dk_sc, dv_sc) = _split_bias(refs, cfg)
    bb, j, i, blk = pl.program_id(0), pl.program_id(2), pl.program_id(3), cfg.block

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    @pl.when(_live(q_meta, k_meta, bb, i, j, cfg))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        ok = _key_major_mask(qc_ref, kc_ref, i, j, cfg)
        dk = dv = jnp.zeros(dk_sc.shape, F32)
        for x, sel in enumerate(_head_lanes(cfg)):
            bias = _bias_tile(bias_refs, x, cfg)
            pt, dst = _key_major_ds(q, k, v, do, lse_ref, dl_ref, ok, sel, x, bias, cfg)
            dv = dv + jnp.dot(pt.astype(do.dtype), _only(sel, do), preferred_element_type=F32)
            dk = dk + jnp.dot(dst.astype(q.dtype), _only(sel, q), preferred_element_type=F32)
        dk_sc[...] += dk
        dv_sc[...] += dv

    @pl.when(i == cfg.nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _diagonal_block(d, t, n):
    """Grid step t of diagonal d (d = j - i + n - 1) -> (query block, key block,
    valid). The n - |d - n + 1| real steps come first; the rest repeat the last
    one, so their block indices do not change and Pallas fetches nothing."""
    first = jnp.maximum(0, n - 1 - d)
    count = n - jnp.maximum(d - (n - 1), (n - 1) - d)
    i = first + jnp.minimum(t, count - 1)
    return i, i + d - (n - 1), t < count


def _dbias_kernel(q_meta, k_meta, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qc_ref, kc_ref, *refs,
                  cfg, batch):
    bias_refs, (dw_ref, g_sc) = _split_bias(refs, cfg)
    d, bb, t, blk = pl.program_id(1), pl.program_id(2), pl.program_id(3), cfg.block
    i, j, valid = _diagonal_block(d, t, cfg.nq)

    @pl.when(jnp.logical_and(bb == 0, t == 0))
    def _init():
        g_sc[...] = jnp.zeros(g_sc.shape, F32)

    @pl.when(jnp.logical_and(valid, _live(q_meta, k_meta, bb, i, j, cfg)))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        ok = _key_major_mask(qc_ref, kc_ref, i, j, cfg)
        for x, sel in enumerate(_head_lanes(cfg)):
            bias = _bias_tile(bias_refs, x, cfg)
            g_sc[x] += _key_major_ds(q, k, v, do, lse_ref, dl_ref, ok, sel, x, bias, cfg)[1]

    @pl.when(jnp.logical_and(bb == batch - 1, t == cfg.nq - 1))
    def _finish():
        for x in range(cfg.group):
            dw_ref[x] = (g_sc[x] if cfg.bias_tiles
                         else jnp.broadcast_to(_skew_adjoint(g_sc[x], cfg), (SUBLANES, 2 * blk)))


# ---------------------------------------------------------------- pallas_calls

def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _cost(cfg, bsz, matmuls, operands, outputs):
    """What XLA's cost analysis (and tools/aot_compile.py's step time) would
    otherwise count as zero: `matmuls` [T, T] x D products per head (half
    when causal: the blocks above the diagonal are skipped), one exp per
    logit, and every operand and output read or written once."""
    pairs = bsz * cfg.heads * cfg.nq * cfg.nk * cfg.block ** 2 // (2 if cfg.causal else 1)
    size = lambda x: x.size * jnp.dtype(x.dtype).itemsize
    return pl.CostEstimate(flops=2 * matmuls * pairs * cfg.head_dim, transcendentals=pairs,
                           bytes_accessed=sum(size(x) for x in (*operands, *outputs)))


def _code_layouts(code):
    """A code per position as a column ([B, T, 128], lanes repeated) and as a
    row ([B, 8, T], sublanes repeated): the two tile orientations used."""
    b, t = code.shape
    return (jnp.broadcast_to(code[:, :, None], (b, t, LANES)),
            jnp.broadcast_to(code[:, None, :], (b, SUBLANES, t)))


def _rows(x):
    """[..., T] -> [..., 8, T]: per-position floats as row blocks."""
    return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def _specs(cfg, order):
    """BlockSpec makers for a grid whose first three axes are (b, head group,
    outer block) and whose last is the inner block; `order` says which of
    query (i) and key (j) is outer."""
    blk, g, lanes = cfg.block, cfg.group, cfg.group * cfg.head_dim

    def ij(o, inner):
        return (o, inner) if order == "ij" else (inner, o)

    def tokens(which):       # q, k, v, do, o blocks: [b, hb * D]
        def index(b, hh, o, inner, *_):
            i, j = ij(o, inner)
            return (b, i if which == "q" else j, hh)
        return pl.BlockSpec((None, blk, lanes), index)

    def per_head_rows():     # lse, delta: [hb, 8, b] of [B, H, 8, Tq]
        return pl.BlockSpec((None, g, SUBLANES, blk), lambda b, hh, o, inner, *_: (b, hh, 0, ij(o, inner)[0]))

    def code(which, layout):
        def index(b, hh, o, inner, *_):
            i, j = ij(o, inner)
            pos = i if which == "q" else j
            return (b, pos, 0) if layout == "col" else (b, 0, pos)
        shape = (None, blk, LANES) if layout == "col" else (None, SUBLANES, blk)
        return pl.BlockSpec(shape, index)

    def bias(window):        # window(i, j): which diagonal's window or tile
        def index(b, hh, o, inner, *_):
            return hh, window(*ij(o, inner))
        return _bias_specs(cfg, index)

    return tokens, per_head_rows, code, bias


def _bias_specs(cfg, index):
    """BlockSpecs of one diagonal's bias for a head group, given index(...) ->
    (head group, window w): halves w, w + 1 of the [H, 8, 2nb] vector rows
    ([hb, 8, b] each), or tile w of [H, 2n - 1, b, b]."""
    blk, g = cfg.block, cfg.group
    if cfg.bias_tiles:
        return [pl.BlockSpec((g, None, blk, blk), lambda *a: (*index(*a), 0, 0))]
    def half(offset):
        def at(*a):
            hh, w = index(*a)
            return hh, 0, w + offset
        return pl.BlockSpec((g, SUBLANES, blk), at)
    return [half(0), half(1)]


def _bias_args(cfg, operand):
    return [operand] if cfg.bias_tiles else [_rows(operand)] * 2


def _forward(cfg, q, k, v, bias_q, q_code, k_code):
    bsz, tq, _ = q.shape
    blk, n, g, h = cfg.block, cfg.nq, cfg.group, cfg.heads
    tokens, _, code, bias = _specs(cfg, "ij")
    qc_col, _ = _code_layouts(q_code)
    _, kc_row = _code_layouts(k_code)
    in_specs = [tokens("q"), tokens("k"), tokens("k"), code("q", "col"), code("k", "row")]
    args = [q, k, v, qc_col, kc_row]
    if cfg.has_bias:
        in_specs += bias(lambda i, j: j - i + n - 1)
        args += _bias_args(cfg, bias_q)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, h, SUBLANES, tq), F32)]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, h // g, cfg.nq, cfg.nk), in_specs=in_specs,
            out_specs=[tokens("q"),
                       pl.BlockSpec((None, g, SUBLANES, blk), lambda b, hh, i, j, *_: (b, hh, 0, i))],
            scratch_shapes=[pltpu.VMEM((g, blk, LANES), F32), pltpu.VMEM((g, blk, LANES), F32),
                            pltpu.VMEM((blk, g * cfg.head_dim), F32)]),
        out_shape=out_shape,
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        cost_estimate=_cost(cfg, bsz, 2, args, out_shape), interpret=cfg.interpret,
    )(_block_meta(q_code, cfg.nq, blk), _block_meta(k_code, cfg.nk, blk), *args)
    return o, lse[:, :, 0, :]   # one row of the 8 is kept between forward and backward


def _backward(cfg, q, k, v, bias_q, bias_k, q_code, k_code, o, lse, do):
    bsz = q.shape[0]
    blk, n, g, h, dh = cfg.block, cfg.nq, cfg.group, cfg.heads, cfg.head_dim
    q_meta, k_meta = _block_meta(q_code, cfg.nq, blk), _block_meta(k_code, cfg.nk, blk)
    qc_col, qc_row = _code_layouts(q_code)
    kc_col, kc_row = _code_layouts(k_code)
    lse8 = _rows(lse)
    grid = (bsz, h // g, cfg.nq, cfg.nk)
    semantics = _params("parallel", "parallel", "parallel", "arbitrary")

    # dq: query blocks outer, key blocks inner, the forward's orientation.
    tokens, rows, code, bias = _specs(cfg, "ij")
    in_specs = [tokens("q"), tokens("k"), tokens("k"), tokens("q"), tokens("q"), rows(),
                code("q", "col"), code("k", "row")]
    args = [q, k, v, do, o, lse8, qc_col, kc_row]
    if cfg.has_bias:
        in_specs += bias(lambda i, j: j - i + n - 1)
        args += _bias_args(cfg, bias_q)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(lse8.shape, F32)]
    dq, dl8 = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=[tokens("q"), rows()],
            scratch_shapes=[pltpu.VMEM((g, blk, LANES), F32), pltpu.VMEM((g, blk, LANES), F32),
                            pltpu.VMEM((blk, g * dh), F32)]),
        out_shape=out_shape, compiler_params=semantics,
        cost_estimate=_cost(cfg, bsz, 3, args, out_shape), interpret=cfg.interpret,
    )(q_meta, k_meta, *args)

    # dk, dv: key blocks outer, query blocks inner, keys-major tiles; diagonal
    # d = j - i + n - 1 reads window 2n - 2 - d of vec_rev.
    tokens, rows, code, bias = _specs(cfg, "ji")
    in_specs = [tokens("q"), tokens("k"), tokens("k"), tokens("q"), rows(), rows(),
                code("q", "row"), code("k", "col")]
    args = [q, k, v, do, lse8, dl8, qc_row, kc_col]
    if cfg.has_bias:
        in_specs += bias(lambda i, j: n - 1 - j + i)
        args += _bias_args(cfg, bias_k)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(bsz, h // g, cfg.nk, cfg.nq), in_specs=in_specs,
            out_specs=[tokens("k"), tokens("k")],
            scratch_shapes=[pltpu.VMEM((blk, g * dh), F32), pltpu.VMEM((blk, g * dh), F32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=semantics, cost_estimate=_cost(cfg, bsz, 4, args, [k, v]), interpret=cfg.interpret,
    )(q_meta, k_meta, *args)
    if not cfg.has_bias:
        return dq, dk, dv, None

    # dbias: grid (head group, diagonal, b, t); the output window stays put
    # while b and t walk the batch and the diagonal's blocks, so ds sums in VMEM.
    def at(f):
        def index(hh, d, b, t, *_):
            i, j, _ = _diagonal_block(d, t, n)
            return f(b, hh, i, j)
        return index

    lanes = g * dh
    in_specs = [pl.BlockSpec((None, blk, lanes), at(lambda b, hh, i, j: (b, i, hh))),
                pl.BlockSpec((None, blk, lanes), at(lambda b, hh, i, j: (b, j, hh))),
                pl.BlockSpec((None, blk, lanes), at(lambda b, hh, i, j: (b, j, hh))),
                pl.BlockSpec((None, blk, lanes), at(lambda b, hh, i, j: (b, i, hh))),
                pl.BlockSpec((None, g, SUBLANES, blk), at(lambda b, hh, i, j: (b, hh, 0, i))),
                pl.BlockSpec((None, g, SUBLANES, blk), at(lambda b, hh, i, j: (b, hh, 0, i))),
                pl.BlockSpec((None, SUBLANES, blk), at(lambda b, hh, i, j: (b, 0, i))),
                pl.BlockSpec((None, blk, LANES), at(lambda b, hh, i, j: (b, j, 0))),
                *_bias_specs(cfg, lambda hh, d, b, t, *_: (hh, 2 * n - 2 - d))]
    if cfg.bias_tiles:
        dw_shape, dw_block = (h, 2 * n - 1, blk, blk), (g, None, blk, blk)
    else:
        dw_shape, dw_block = (h, 2 * n - 1, SUBLANES, 2 * blk), (g, None, SUBLANES, 2 * blk)
    args = [q, k, v, do, lse8, dl8, qc_row, kc_col, *_bias_args(cfg, bias_k)]
    dw = pl.pallas_call(
        functools.partial(_dbias_kernel, cfg=cfg, batch=bsz),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(h // g, 2 * n - 1, bsz, n), in_specs=in_specs,
            out_specs=pl.BlockSpec(dw_block, lambda hh, d, b, t, *_: (hh, 2 * n - 2 - d, 0, 0)),
            scratch_shapes=[pltpu.VMEM((g, blk, blk), F32)]),
        out_shape=jax.ShapeDtypeStruct(dw_shape, F32),
        compiler_params=_params("parallel", "parallel", "arbitrary", "arbitrary"),
        cost_estimate=_cost(cfg, bsz, 2, args, [jax.ShapeDtypeStruct(dw_shape, F32)]),
        interpret=cfg.interpret,
    )(q_meta, k_meta, *args)
    if cfg.bias_tiles:
        return dq, dk, dv, dw
    # Window w covers vec_rev[w b : w b + 2b]: overlap-add the halves.
    dw = dw[:, :, 0, :]
    zero = jnp.zeros((h, 1, blk), F32)
    d_vec_rev = jnp.concatenate([dw[:, :, :blk], zero], 1) + jnp.concatenate([zero, dw[:, :, blk:]], 1)
    return dq, dk, dv, d_vec_rev.reshape(h, 2 * n * blk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias_q, bias_k, q_code, k_code):
    """bias_q / bias_k: the bias query-major / keys-major (vec, vec_rev or
    their XLA tiles), or None."""
    return _forward(cfg, q, k, v, bias_q, q_code, k_code)[0]


def _attention_fwd(cfg, q, k, v, bias_q, bias_k, q_code, k_code):
    o, lse = _forward(cfg, q, k, v, bias_q, q_code, k_code)
    return o, (q, k, v, bias_q, bias_k, q_code, k_code, o, lse)


def _attention_bwd(cfg, res, do):
    q, k, v, bias_q, bias_k, q_code, k_code, o, lse = res
    dq, dk, dv, d_bias_k = _backward(cfg, q, k, v, bias_q, bias_k, q_code, k_code, o, lse, do)
    # The whole bias gradient is reported through bias_k (bias_q holds the
    # same table values); None, a symbolic zero, for bias_q costs nothing.
    return dq, dk, dv, None, d_bias_k, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
