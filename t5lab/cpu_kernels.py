"""XLA:CPU speed tricks, in one place: each applies only where the program is
compiled for CPU devices (`compiling_for_cpu`); elsewhere the model is plain
JAX that XLA fuses.

- `row_max`: the row maximum halved elementwise before reducing (below).
- `dense`: matmuls with a hand-written VJP (one shared transposed input).
- `gelu_tanh_gate`: the gated gelu with a VJP that keeps the sigmoid.
- `softmax` (every platform): max-shifted with `row_max`, a one-pass VJP.

Row maximum:

XLA:CPU compiles a max-reduction over a long minor axis into a slow loop: on
the 2-core Xeon of the README, the max over each row of [1024, 32128] float32
logits takes ~39 ms and over [16, 6, 256, 256] attention logits ~4.7 ms, while
a plain elementwise pass over the latter takes ~1.1 ms and the same reduction
as a sum ~0.9 ms. Elementwise `maximum` vectorises, so `row_max` first halves
the row with it, max(x[:h], x[h:]), down to a width of 32, which XLA fuses into
one pass, and reduces only that: 6 ms and 0.65 ms (each op jitted alone,
median of 15). In the T5 small train step: 4.52 -> 4.44 s (alternating blocks
of steps, 6 rounds). The result is bit-identical (max is exact and order-free,
NaN propagates the same).

Only on CPU: for a TPU (tools/aot_compile.py, T5 base on v5p:2x2x1, fsdp 4)
XLA's own step-time estimate rose from 169.5 to 178.8 ms with the halving.
Halving slices the axis, so it must not be split across devices either:
attention's key axis never is ("length" is unsharded); the vocabulary axis is
under tensor parallelism, and losses.py checks that before asking for a fold.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

FOLD_WIDTH = 32


def compiling_platform() -> str:
    """The platform the traced program is for: the current mesh's devices (a
    TPU topology's when planning on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def compiling_for_cpu() -> bool:
    return compiling_platform() == "cpu"


def row_max(x, fold: bool = True):
    """max over the last axis (no gradient: callers use it as a shift); halved
    first when `fold` allows it and the program is for CPU."""
    x = jax.lax.stop_gradient(x)
    fold = fold and compiling_for_cpu()
    while fold and x.shape[-1] % 2 == 0 and x.shape[-1] // 2 >= FOLD_WIDTH:
        half = x.shape[-1] // 2
        x = jnp.maximum(x[..., :half], x[..., half:])
    return jnp.max(x, axis=-1)


@jax.custom_vjp
def softmax(x):
    """Softmax over the last axis, max-shifted with `row_max`; its VJP is the
    usual one-pass w * (g - sum(g * w)), keeping only w. Against
    jax.nn.softmax on a TPU (T5 base, v5p:2x2x1, fsdp 4, no halving): peak
    HBM 28.6 vs 32.8 GiB per chip, XLA's step estimate 169.5 vs 164.0 ms."""
    e = jnp.exp(x - row_max(x)[..., None])
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(x):
    w = softmax(x)
    return w, w


def _softmax_bwd(w, g):
    return (w * (g - jnp.sum(g * w, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dense(x, kernels, n_in: int = 1):
    """x [..., in] contracted with each kernel [in..., out...] over x's last
    `n_in` dims (the kernels' first `n_in`): one output per kernel.

    A hand-written VJP computes every kernel gradient as a plain 2-D
    [in, tokens] @ [tokens, out] product from one shared transposed copy of the
    input (or, when the outputs are narrower than the input, from transposed
    output gradients): autodiff's einsum transposes let XLA:CPU transpose each
    wide output gradient, e.g. both [tokens, d_ff] gated-MLP gradients, per
    kernel. The VJP hides the matmuls from `jax.checkpoint` policies, so
    layers use it only where no dot-saving policy is active."""
    return _dense(n_in, x, *kernels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(n_in, x, *kernels):
    lead, width = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    x2 = x.reshape(-1, width)
    return tuple((x2 @ k.reshape(width, -1)).reshape(*lead, *k.shape[n_in:]) for k in kernels)


def _dense_fwd(n_in, x, *kernels):
    return _dense(n_in, x, *kernels), (x, kernels)


def _dense_bwd(n_in, res, gs):
    x, kernels = res
    width = math.prod(x.shape[x.ndim - n_in:])
    x2 = x.reshape(-1, width)
    g2 = [g.reshape(x2.shape[0], -1).astype(x.dtype) for g in gs]
    dx = sum(jnp.einsum("nm,dm->nd", g, k.reshape(width, -1)) for g, k in zip(g2, kernels))
    if width <= sum(g.shape[1] for g in g2):
        xt = x2.T
        dks = [xt @ g for g in g2]
    else:
        dks = [(g.T @ x2).T for g in g2]
    return (dx.reshape(x.shape).astype(x.dtype),
            *(dk.reshape(k.shape).astype(k.dtype) for dk, k in zip(dks, kernels)))


_dense.defvjp(_dense_fwd, _dense_bwd)


_GELU_C2 = 2.0 * math.sqrt(2.0 / math.pi)   # gelu_tanh(a) = a * sigmoid(2u),
_GELU_K = 0.044715                          # u = sqrt(2/pi) (a + 0.044715 a^3)


def _gelu_gate_sigmoid(a):
    return jax.nn.sigmoid(a * (_GELU_C2 + (_GELU_C2 * _GELU_K) * (a * a)))


@jax.custom_vjp
def gelu_tanh_gate(a, b):
    """gelu_tanh(a) * b (HF "gelu_new" gating) as a * sigmoid(2u) * b, with a
    hand-written VJP that keeps the sigmoid: autodiff of the tanh formula costs
    XLA:CPU about twice the elementwise work (and it duplicates parts of it
    into several fusions)."""
    return a * _gelu_gate_sigmoid(a) * b


def _gelu_gate_fwd(a, b):
    s = _gelu_gate_sigmoid(a)
    return a * s * b, (a, b, s)


def _gelu_gate_bwd(res, g):
    a, b, s = res
    gb = g * b
    # d/da a s(v) = s + a s (1 - s) v',  v' = 2c (1 + 3 k a^2)
    dact = s + a * (s * (1.0 - s)) * (_GELU_C2 + (3.0 * _GELU_C2 * _GELU_K) * (a * a))
    return (gb * dact).astype(a.dtype), (g * (a * s)).astype(b.dtype)


gelu_tanh_gate.defvjp(_gelu_gate_fwd, _gelu_gate_bwd)
