"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (Vyas et al.
2024, github.com/nikhilvyas/SOAP, the December 2024 version whose first moment
lives in parameter space).

Per parameter G (viewed as a tensor whose dims each get a preconditioner):
  first update: L_i = (1 - beta_s) * G G^T along dim i, Q_i = eigh(L_i)
                (descending); the parameter does not move, not even by decay.
  then:         G' = G x_i Q_i                   (project)
                m = b1 m + (1 - b1) G,  v = b2 v + (1 - b2) G'^2
                u = (m x_i Q_i) / (sqrt(v) + eps) x_i Q_i^T
                step = lr * sqrt(1 - b2^t) / (1 - b1^t) * u,  t = real steps
                p <- (p - step) * (1 - lr * wd)  (decoupled, on the moved p)
                L_i <- beta_s L_i + (1 - beta_s) G G^T
                every precondition_frequency steps: Q_i <- QR(L_i Q_i) with
                columns sorted by the estimated eigenvalue, v permuted alike.
A dim above max_precond_dim keeps the identity basis. Parameters marked in
`stacked_mask` hold independent layers along axis 0 (scanned models): each
slice gets its own preconditioners.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P


class SoapLeafState(NamedTuple):
    exp_avg: jax.Array       # first moment, parameter space
    exp_avg_sq: jax.Array    # second moment, eigenbasis coordinates
    gg: tuple                # per (merged) dim: E[G G^T] or None (not preconditioned)
    q: tuple                 # per (merged) dim: eigenbasis or None


class ScaleBySoapState(NamedTuple):
    count: jax.Array         # updates seen, the preconditioner-only first one included
    leaves: Any              # params tree with a SoapLeafState per parameter


class _Plan(NamedTuple):
    """How one parameter (one slice, if stacked) is seen by the preconditioner."""
    stacked: bool
    merged: tuple            # shape the preconditioners act on
    precond: tuple           # per merged dim: has a preconditioner


def _merge_small_dims(shape, max_dim: int) -> tuple:
    """The reference's merge: fuse neighbouring dims while the product stays <= max_dim."""
    merged, current = [], 1
    for d in shape:
        if current * d > max_dim:
            if current > 1:
                merged.append(current)
                current = d
            else:
                merged.append(d)
                current = 1
        else:
            current *= d
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


def _plan(shape, stacked: bool, max_dim: int, merge_dims: bool, precondition_1d: bool) -> _Plan:
    if stacked and len(shape) < 2:
        raise ValueError(f"stacked_mask marks a parameter of shape {shape}: it needs a layer axis "
                         "plus at least one more")
    matrix = tuple(shape[1:]) if stacked else tuple(shape)
    if len(matrix) <= 1:
        # 1-D: the reference never merges and only preconditions on request
        return _Plan(stacked, matrix, tuple(precondition_1d and d <= max_dim for d in matrix))
    merged = _merge_small_dims(matrix, max_dim) if merge_dims else matrix
    return _Plan(stacked, merged, tuple(d <= max_dim for d in merged))


# Every matmul of the preconditioner at full float32: the default is one bf16
# pass on TPU and TF32 on GPU, whose error the eigenbases would accumulate.
# (eigh and QR run their own float32 matmuls.)
_HIGHEST = jax.lax.Precision.HIGHEST


def _precond_dtype(dtype):
    # eigh and QR need at least float32 (no bfloat16 kernels)
    return jnp.promote_types(dtype, jnp.float32)


def _project(x, qs, plan: _Plan, back: bool = False):
    """x in coordinates of the bases qs (back=True: from them)."""
    shape = x.shape
    x = x.reshape(plan.merged)
    for q in qs:
        # contracting dim 0 appends the new dim last, so after all dims the
        # order is restored; an unpreconditioned dim just rotates to the end
        x = jnp.moveaxis(x, 0, -1) if q is None else jnp.tensordot(
            x, q.astype(x.dtype), axes=[[0], [1 if back else 0]], precision=_HIGHEST)
    return x.reshape(shape)


def _outer_products(g, plan: _Plan):
    g = g.reshape(plan.merged)
    out = []
    for i, on in enumerate(plan.precond):
        others = [j for j in range(g.ndim) if j != i]
        out.append(jnp.tensordot(g, g, axes=[others, others], precision=_HIGHEST) if on else None)
    return tuple(out)


def _eigenbasis(m):
    _, vectors = jnp.linalg.eigh(m)
    return vectors[:, ::-1]  # descending eigenvalues, as the reference


def _refresh_basis(gg, qs, exp_avg_sq, plan: _Plan):
    """One power iteration + QR per preconditioner; v follows the new column order."""
    v = exp_avg_sq.reshape(plan.merged)
    new_qs = []
    for i, (m, q) in enumerate(zip(gg, qs)):
        if m is None:
            new_qs.append(None)
            continue
        mq = jnp.matmul(m, q, precision=_HIGHEST)
        order = jnp.argsort(-jnp.sum(q * mq, axis=0))
        v = jnp.take(v, order, axis=i)
        new_qs.append(jnp.linalg.qr(mq[:, order])[0])
    return tuple(new_qs), v.reshape(exp_avg_sq.shape)


def _per_slice(fn, plan: _Plan):
    return jax.vmap(fn) if plan.stacked else fn


def _full_mask(mask, tree, default: bool):
    """Flat list of bools, one per leaf of `tree`; mask may be a prefix tree or callable."""
    if mask is None:
        return [default] * len(jax.tree.leaves(tree))
    if callable(mask):
        mask = mask(tree)
    treedef = jax.tree.structure(tree)
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, tree)
    return treedef.flatten_up_to(full)


# name -> (is valid, the rule in words); checked when the optimizer is built
_RULES = {
    "learning_rate": (lambda v: v >= 0, ">= 0"),
    "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "shampoo_beta": (lambda v: v < 1, "< 1 (negative means b2)"),
    "eps": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "precondition_frequency": (lambda v: int(v) == v and v >= 1, "an integer >= 1"),
    "max_precond_dim": (lambda v: int(v) == v and v >= 1, "an integer >= 1"),
}


def _check_hyperparameters(**values):
    for name, value in values.items():
        valid, rule = _RULES[name]
        if not valid(value):
            raise ValueError(f"soap: {name} must be {rule}, got {value!r}")


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, shampoo_beta: float = -1.0,
                  eps: float = 1e-8, precondition_frequency: int = 10,
                  max_precond_dim: int = 10000, merge_dims: bool = False,
                  precondition_1d: bool = False, normalize_grads: bool = False,
                  correct_bias: bool = True, stacked_mask=None) -> optax.GradientTransformation:
    """SOAP's direction, bias correction included, without learning rate or decay.

    The first update returns zeros (it only builds the preconditioner).
    stacked_mask: pytree (prefix) of bools or callable params -> bools.
    """
    _check_hyperparameters(b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
                           precondition_frequency=precondition_frequency,
                           max_precond_dim=max_precond_dim)
    beta_s = b2 if shampoo_beta < 0 else shampoo_beta

    def plans(tree):
        stacked = _full_mask(stacked_mask, tree, default=False)
        return [_plan(x.shape, s, max_precond_dim, merge_dims, precondition_1d)
                for x, s in zip(jax.tree.leaves(tree), stacked)]

    def init_leaf(p, plan: _Plan):
        dtype = _precond_dtype(p.dtype)
        lead = (p.shape[0],) if plan.stacked else ()
        mats = tuple(jnp.zeros(lead + (d, d), dtype) if on else None
                     for d, on in zip(plan.merged, plan.precond))
        return SoapLeafState(jnp.zeros_like(p), jnp.zeros_like(p), mats, mats)

    def init_fn(params):
        treedef = jax.tree.structure(params)
        leaves = [init_leaf(p, plan) for p, plan in zip(jax.tree.leaves(params), plans(params))]
        return ScaleBySoapState(jnp.zeros([], jnp.int32), treedef.unflatten(leaves))

    def first_leaf(g, s: SoapLeafState, plan: _Plan):
        def build(g, gg):
            gp = g.astype(_precond_dtype(g.dtype))
            new_gg = tuple(None if m is None else (1 - beta_s) * o
                           for m, o in zip(gg, _outer_products(gp, plan)))
            return new_gg, tuple(None if m is None else _eigenbasis(m) for m in new_gg)
        gg, q = _per_slice(build, plan)(g, s.gg)
        return jnp.zeros_like(g), s._replace(gg=gg, q=q)

    def step_leaf(g, s: SoapLeafState, plan: _Plan, t, refresh):
        def one(g, m, v, gg, q):
            g_rot = _project(g, q, plan)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g_rot * g_rot
            u = _project(_project(m, q, plan) / (jnp.sqrt(v) + eps), q, plan, back=True)
            if normalize_grads:
                u = u / (1e-30 + jnp.sqrt(jnp.mean(u * u)))
            gp = g.astype(_precond_dtype(g.dtype))
            gg = tuple(None if old is None else beta_s * old + (1 - beta_s) * o
                       for old, o in zip(gg, _outer_products(gp, plan)))
            q, v = jax.lax.cond(refresh, lambda: _refresh_basis(gg, q, v, plan), lambda: (q, v))
            return u, m, v, gg, q
        u, m, v, gg, q = _per_slice(one, plan)(g, s.exp_avg, s.exp_avg_sq, s.gg, s.q)
        if correct_bias:
            t = t.astype(u.dtype)
            u = u * (jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t))
        return u, SoapLeafState(m, v, gg, q)

    def update_fn(updates, state: ScaleBySoapState, params=None):
        del params
        treedef = jax.tree.structure(updates)
        grads = jax.tree.leaves(updates)
        leaf_states = treedef.flatten_up_to(state.leaves)
        leaf_plans = plans(updates)
        # t counts real steps: the first call only builds the preconditioner
        t = state.count
        refresh = (t > 0) & (t % precondition_frequency == 0)

        def first():
            return [first_leaf(g, s, p) for g, s, p in zip(grads, leaf_states, leaf_plans)]

        def step():
            return [step_leaf(g, s, p, t, refresh) for g, s, p in zip(grads, leaf_states, leaf_plans)]

        out = jax.lax.cond(state.count == 0, first, step)
        new_updates = treedef.unflatten([u for u, _ in out])
        new_leaves = treedef.unflatten([s for _, s in out])
        return new_updates, ScaleBySoapState(optax.safe_increment(state.count), new_leaves)

    return optax.GradientTransformation(init_fn, update_fn)


class _ScaleDecayState(NamedTuple):
    count: jax.Array


def _scale_and_decay(learning_rate, weight_decay: float, weight_decay_mask) -> optax.GradientTransformation:
    """-lr * u, then decoupled decay of the *moved* parameter, as the reference
    does: p_new = (p - lr u)(1 - lr wd). Skips the first (preconditioner-only) call."""

    def init_fn(params):
        del params
        return _ScaleDecayState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        moved = jax.tree.map(lambda u: -lr * u, updates)
        if weight_decay > 0:
            if params is None:
                raise ValueError("soap: weight decay needs params: tx.update(grads, state, params)")
            treedef = jax.tree.structure(updates)
            decays = _full_mask(weight_decay_mask, params, default=True)
            live = state.count > 0
            flat = [jnp.where(live, d - lr * weight_decay * (p + d), d) if on else d
                    for d, p, on in zip(jax.tree.leaves(moved), jax.tree.leaves(params), decays)]
            moved = treedef.unflatten(flat)
        return moved, _ScaleDecayState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def soap(learning_rate, b1: float = 0.95, b2: float = 0.95, shampoo_beta: float = -1.0,
         eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
         max_precond_dim: int = 10000, merge_dims: bool = False, precondition_1d: bool = False,
         normalize_grads: bool = False, correct_bias: bool = True, weight_decay_mask=None,
         stacked_mask=None) -> optax.GradientTransformation:
    """SOAP with learning rate (float or optax schedule, read at the call count,
    so the first real step uses schedule(1)) and decoupled weight decay where
    weight_decay_mask is True (None: everywhere)."""
    _check_hyperparameters(weight_decay=weight_decay,
                           **({} if callable(learning_rate) else {"learning_rate": learning_rate}))
    return optax.chain(
        scale_by_soap(b1, b2, shampoo_beta, eps, precondition_frequency, max_precond_dim,
                      merge_dims, precondition_1d, normalize_grads, correct_bias, stacked_mask),
        _scale_and_decay(learning_rate, weight_decay, weight_decay_mask))


def soap_state_specs(state, param_specs):
    """PartitionSpecs for a SOAP optimizer state (or its jax.eval_shape).

    Moments follow their parameter. A preconditioner (and its basis) for
    dim i is split by rows like the parameter's dim i (layer axis included when
    stacked): G G^T is then reduce-scattered straight into place, and memory per
    device falls with the parameter's. Merged dims have no such mapping and are
    replicated, as is every scalar.
    """
    def leaf_specs(spec, s: SoapLeafState):
        ndim = s.exp_avg.ndim
        spec = tuple(spec or ()) + (None,) * (ndim - len(tuple(spec or ())))
        stacked = any(m is not None and m.ndim == 3 for m in s.gg)
        matrix_dims = spec[1:] if stacked else spec
        merged = len(s.gg) != len(matrix_dims) or any(
            m is not None and m.shape[-1] != s.exp_avg.shape[i + stacked] for i, m in enumerate(s.gg))

        def mat(i, m):
            if m is None:
                return None
            row = None if merged else matrix_dims[i]
            return P(spec[0], row, None) if stacked else P(row, None)
        mats = tuple(mat(i, m) for i, m in enumerate(s.gg))
        return SoapLeafState(P(*spec), P(*spec), mats, mats)

    def visit(node):
        if isinstance(node, ScaleBySoapState):
            is_leaf_state = lambda x: isinstance(x, SoapLeafState)
            leaves, treedef = jax.tree.flatten(node.leaves, is_leaf=is_leaf_state)
            specs = jax.tree.leaves(param_specs, is_leaf=lambda x: x is None or isinstance(x, P))
            return ScaleBySoapState(P(), treedef.unflatten(
                [leaf_specs(p, s) for p, s in zip(specs, leaves)]))
        return P()

    return jax.tree.map(visit, state, is_leaf=lambda x: isinstance(x, ScaleBySoapState))


def tree_bytes(tree) -> int:
    """Bytes held by a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def optimizer_state_bytes(tx: optax.GradientTransformation, params) -> dict:
    """Memory of tx's state against the parameters', without allocating either."""
    state = jax.eval_shape(tx.init, params)
    state_bytes, param_bytes = tree_bytes(state), tree_bytes(params)
    return {"state_bytes": state_bytes, "param_bytes": param_bytes,
            "ratio": state_bytes / max(param_bytes, 1)}
