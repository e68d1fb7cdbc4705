"""Schedules against their closed forms (written out here, independently), the
optimizer factory (decay mask, clipping, config plumbing) and Adafactor against
optax's, layer by layer for stacked leaves."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lab.config import schema
from t5lab.optim import adafactor, make_optimizer, schedules

PEAK, WARMUP, TOTAL, END = 1e-3, 10, 100, 0.1


def _values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def _cosine_closed_form(step):
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    return PEAK * (END + (1 - END) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_cosine_matches_closed_form():
    steps = [0, 3, 10, 25, 55, 99, 100, 150]
    want = [_cosine_closed_form(s) for s in steps]
    np.testing.assert_allclose(_values(schedules.cosine(PEAK, WARMUP, TOTAL, END), steps), want, rtol=1e-6)


def test_key_steps_of_every_schedule():
    cases = {
        # name: (schedule, {step: expected})
        "constant": (schedules.constant(PEAK, WARMUP), {0: 0, 5: PEAK / 2, 10: PEAK, 1000: PEAK}),
        "linear": (schedules.linear(PEAK, WARMUP, TOTAL, END),
                   {5: PEAK / 2, 10: PEAK, 55: PEAK * 0.55, 100: PEAK * END, 400: PEAK * END}),
        "rsqrt": (schedules.rsqrt(PEAK, WARMUP), {5: PEAK / 2, 10: PEAK, 40: PEAK / 2, 1000: PEAK * 0.1}),
        "rsqrt_plateau": (schedules.rsqrt(PEAK, WARMUP, linear_warmup=False),
                          {0: PEAK, 5: PEAK, 10: PEAK, 90: PEAK / 3}),
        "wsd": (schedules.wsd(PEAK, WARMUP, TOTAL, decay_fraction=0.2, end_fraction=END),
                {5: PEAK / 2, 50: PEAK, 80: PEAK, 90: PEAK * 0.55, 100: PEAK * END}),
        # power is a function of tokens seen: tests/test_schedules.py
    }
    for name, (schedule, expected) in cases.items():
        steps = list(expected)
        np.testing.assert_allclose(_values(schedule, steps), list(expected.values()),
                                   rtol=1e-5, atol=1e-12, err_msg=name)


def test_from_config_uses_total_steps_when_decay_steps_unset():
    o = schema().optim
    o.schedule, o.learning_rate, o.warmup_steps, o.end_lr_fraction = "linear", 2.0, 0, 0.0
    schedule = schedules.from_config(o, total_steps=40)
    assert float(schedule(20)) == pytest.approx(1.0)
    o.decay_steps = 80
    assert float(schedules.from_config(o, total_steps=40)(20)) == pytest.approx(1.5)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="decay_steps"):
        schedules.cosine(1.0, 10, 10)
    with pytest.raises(ValueError, match="wsd_decay_fraction"):
        schedules.wsd(1.0, 0, 10, decay_fraction=1.5)


def _optim_cfg(name, **overrides):
    o = schema().optim
    o.name, o.schedule, o.warmup_steps, o.learning_rate = name, "constant", 0, 0.1
    o.weight_decay, o.clip_norm = 0.5, 0.0
    for key, value in overrides.items():
        o[key] = value
    return o


@pytest.mark.parametrize("name", ["adamw", "adafactor", "soap"])
def test_decay_mask_is_respected_with_zero_grads(name):
    params = {"w": jnp.ones((4, 4)), "norm": jnp.ones((4,))}
    tx, _ = make_optimizer(_optim_cfg(name), total_steps=10, decay_mask={"w": True, "norm": False})
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        updates, state = tx.update(zeros, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_array_equal(params["norm"], 1.0)
    # decoupled decay multiplies by (1 - lr * wd) per step that moves the
    # parameters; SOAP's first step only builds the preconditioner
    moving_steps = 2 if name == "soap" else 3
    np.testing.assert_allclose(params["w"], (1 - 0.1 * 0.5) ** moving_steps, rtol=1e-6)


def test_callable_decay_mask():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx, _ = make_optimizer(_optim_cfg("adamw"), 10,
                           decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(updates["b"][0]) == 0.0 and float(updates["w"][0, 0]) < 0.0


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_clipping_bounds_the_update(clip_norm):
    # AdamW step 1 is -lr * g / (|g| + eps); a large eps keeps the gradient's
    # size visible, so the clipped gradient (norm 1) gives a smaller update
    o = _optim_cfg("adamw", clip_norm=clip_norm, eps=1.0, weight_decay=0.0)
    tx, _ = make_optimizer(o, total_steps=10)
    params = jnp.zeros(4)
    grad = jnp.array([300.0, 400.0, 0.0, 0.0])
    updates, _ = tx.update(grad, tx.init(params), params)
    g = np.array(grad) * (clip_norm / 500.0 if clip_norm else 1.0)
    np.testing.assert_allclose(updates, -0.1 * g / (np.abs(g) + 1.0), rtol=1e-6)


def test_unknown_optimizer_raises():
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(_optim_cfg("sgd"), 10)


# Adafactor: optax's, with stacked (scanned) leaves taken layer by layer.
# [.., 130, 140] slices are factored (both dims >= 128); [3, 6] is a stacked norm scale.
_STACKED = {"s": (3, 130, 140), "sn": (3, 6), "k": (3, 5, 2, 4)}
_ADAFACTOR = dict(learning_rate=lambda step: 0.01, decay_rate=0.8, clipping_threshold=1.0,
                  multiply_by_parameter_scale=True, weight_decay_rate=lambda step: 0.001)


def _run(tx, params, grads):
    state, out = tx.init(params), []
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out.append(params)
    return out, state


def _random_tree(shapes, rng, scale=1.0):
    return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def test_adafactor_without_stacked_leaves_is_optax_adafactor():
    rng = np.random.default_rng(0)
    shapes = {"w": (130, 140), "b": (6,), "k": (5, 2, 4)}
    params = _random_tree(shapes, rng)
    grads = [_random_tree(shapes, rng, 1e-2) for _ in range(3)]
    mask = {"w": True, "b": False, "k": True}
    ours, ours_state = _run(adafactor(**_ADAFACTOR, weight_decay_mask=mask), params, grads)
    theirs, their_state = _run(optax.adafactor(**_ADAFACTOR, weight_decay_mask=mask), params, grads)
    assert jax.tree.structure(ours_state) == jax.tree.structure(their_state)
    for a, b in zip(jax.tree.leaves((ours, ours_state)), jax.tree.leaves((theirs, their_state))):
        np.testing.assert_array_equal(a, b)


def test_adafactor_takes_a_stacked_leaf_layer_by_layer():
    """Each slice of a stacked leaf moves as optax.adafactor moves it as a leaf of its own."""
    rng = np.random.default_rng(0)
    params = _random_tree(_STACKED, rng)
    params["sn"] = params["sn"] * 0.1 + jnp.arange(1.0, 4.0)[:, None]  # layers of different RMS
    grads = [_random_tree(_STACKED, rng, 1e-2) for _ in range(3)]
    # after step 1, layer 0's gradients grow and the others' shrink: only layer
    # 0's update has an RMS above the clipping threshold (the whole leaf's has not)
    for g in grads[1:]:
        g["k"] = g["k"] * jnp.array([1e3, 1e-3, 1e-3])[:, None, None, None]
    decay = {"s": True, "sn": False, "k": True}
    ours, _ = _run(adafactor(**_ADAFACTOR, weight_decay_mask=decay,
                             stacked_mask={"s": True, "sn": True, "k": True}), params, grads)

    def apart(tree):
        return {f"{k}{i}": v[i] for k, v in tree.items() for i in range(v.shape[0])}
    mask = {f"{k}{i}": decay[k] for k in _STACKED for i in range(3)}
    theirs, _ = _run(optax.adafactor(**_ADAFACTOR, weight_decay_mask=mask), apart(params),
                     [apart(g) for g in grads])
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k, v in apart(a).items():
            np.testing.assert_allclose(v, b[k], rtol=1e-6, atol=1e-7, err_msg=f"step {step + 1} {k}")
    # not vacuous: optax on the whole stacked leaves moves them otherwise
    whole, _ = _run(optax.adafactor(**_ADAFACTOR, weight_decay_mask=decay), params, grads)
    for k in _STACKED:
        assert not np.allclose(whole[-1][k], ours[-1][k], rtol=1e-4, atol=1e-6), k
