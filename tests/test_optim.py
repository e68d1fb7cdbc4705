"""Schedules against their closed forms (written out here, independently) and
the optimizer factory: decay mask, clipping, config plumbing."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lab.config import schema
from t5lab.optim import make_optimizer, schedules

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
        # min(0.1, 0.5 / sqrt(n)); decay over the last 40 of 200 steps from the value at 160
        "power": (schedules.power(0.1, WARMUP, 200, a=0.5, b=0.5, decay_fraction=0.2, end_fraction=END),
                  {5: 0.05, 20: 0.1, 100: 0.05, 160: 0.5 / math.sqrt(160),
                   180: 0.5 / math.sqrt(160) * 0.55, 200: 0.5 / math.sqrt(160) * END}),
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
