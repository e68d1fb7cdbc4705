"""Adafactor, optax's, with scanned layers seen as layers (as t5x does).

optax's Adafactor treats each leaf as one block: update clipping and the
parameter scale take the RMS of the whole leaf, and the second moment factors
its two largest dims. A scanned stack holds L layers in one leaf [L, ...], so
those would mix layers. Where `stacked_mask` is True, axis 0 is a batch axis:
each slice is factored, clipped and scaled on its own, as the unscanned
layer's leaf would be. The state has optax's layout (one scalar count; a
stacked leaf's moments keep the layer axis, its (1,) placeholders stay (1,)),
and without stacked leaves this is optax.adafactor exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from t5lab.optim.soap import _full_mask

_STATS = ("v_row", "v_col", "v")


def _is_factored(shape, factored: bool, min_dim_size_to_factor: int) -> bool:
    # optax's rule (factorized._factored_dims). Should optax change it, the
    # vmap below fails on a mapped placeholder instead of going wrong quietly.
    return factored and len(shape) >= 2 and sorted(shape)[-2] >= min_dim_size_to_factor


def _stat_axes(slice_shape, factored, min_dim_size_to_factor):
    """vmap axes of (v_row, v_col, v) for a stacked leaf: the statistics in use
    are per layer, the unused (1,) placeholder(s) are shared."""
    if _is_factored(slice_shape, factored, min_dim_size_to_factor):
        return (0, 0, None)
    return (None, None, 0)


def scale_by_factored_rms(stacked_mask=None, factored: bool = True, decay_rate: float = 0.8,
                          step_offset: int = 0, min_dim_size_to_factor: int = 128,
                          epsilon: float = 1e-30) -> optax.GradientTransformation:
    """optax.scale_by_factored_rms, per slice of axis 0 where stacked_mask is True."""
    inner = optax.scale_by_factored_rms(factored, decay_rate, step_offset, min_dim_size_to_factor,
                                        epsilon)

    def axes(p):
        return _stat_axes(p.shape[1:], factored, min_dim_size_to_factor)

    def assemble(count, treedef, per_leaf):
        return optax.FactoredState(count, *(treedef.unflatten([s[i] for s in per_leaf])
                                            for i in range(len(_STATS))))

    def init_fn(params):
        treedef = jax.tree.structure(params)
        per_leaf = []
        for p, stacked in zip(jax.tree.leaves(params), _full_mask(stacked_mask, params, False)):
            init = inner.init
            if stacked:
                init = jax.vmap(init, out_axes=optax.FactoredState(None, *axes(p)))
            s = init(p)
            per_leaf.append(tuple(getattr(s, f) for f in _STATS))
        return assemble(jnp.zeros([], jnp.int32), treedef, per_leaf)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adafactor: needs params: tx.update(grads, state, params)")
        treedef = jax.tree.structure(updates)
        stats = [treedef.flatten_up_to(getattr(state, f)) for f in _STATS]

        def one(g, v_row, v_col, v, p):
            u, s = inner.update(g, optax.FactoredState(state.count, v_row, v_col, v), p)
            return (u,) + tuple(getattr(s, f) for f in _STATS)

        out, per_leaf = [], []
        flags = _full_mask(stacked_mask, updates, False)
        for g, v_row, v_col, v, p, stacked in zip(jax.tree.leaves(updates), *stats,
                                                  treedef.flatten_up_to(params), flags):
            fn = one
            if stacked:
                ax = axes(p)
                fn = jax.vmap(one, in_axes=(0, *ax, 0), out_axes=(0, *ax))
            u, *s = fn(g, v_row, v_col, v, p)
            out.append(u)
            per_leaf.append(s)
        return treedef.unflatten(out), assemble(optax.safe_increment(state.count), treedef, per_leaf)

    return optax.GradientTransformation(init_fn, update_fn)


def per_layer(tx: optax.GradientTransformation, stacked_mask=None) -> optax.GradientTransformation:
    """A stateless, leaf-by-leaf transformation (block RMS clipping or scaling)
    applied to each slice of axis 0 where stacked_mask is True."""

    def update_fn(updates, state, params=None):
        treedef = jax.tree.structure(updates)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * treedef.num_leaves

        def one(u, p):
            return tx.update(u, state, p)[0]

        flags = _full_mask(stacked_mask, updates, False)
        out = [jax.vmap(one)(u, p) if stacked else one(u, p)
               for u, p, stacked in zip(jax.tree.leaves(updates), ps, flags)]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(tx.init, update_fn)


def adafactor(learning_rate=None, min_dim_size_to_factor: int = 128, decay_rate: float = 0.8,
              decay_offset: int = 0, multiply_by_parameter_scale: bool = True,
              clipping_threshold: float | None = 1.0, momentum: float | None = None,
              weight_decay_rate=None, eps: float = 1e-30, factored: bool = True,
              weight_decay_mask=None, stacked_mask=None) -> optax.GradientTransformation:
    """optax.adafactor's chain and arguments, plus stacked_mask: a pytree
    (prefix) of bools or callable params -> bools, True where a leaf's axis 0
    stacks independent layers."""
    tx = [scale_by_factored_rms(stacked_mask, factored, decay_rate, decay_offset,
                                min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        tx.append(per_layer(optax.clip_by_block_rms(clipping_threshold), stacked_mask))
    if learning_rate is not None:
        tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        tx.append(per_layer(optax.scale_by_param_block_rms(), stacked_mask))
    if momentum is not None:
        tx.append(optax.ema(momentum, debias=False, accumulator_dtype=jnp.float32))
    if weight_decay_rate is not None:
        tx.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    tx.append(optax.scale(-1))
    return optax.chain(*tx)
