"""Learning-rate schedules: step -> rate, as optax schedules (jit-safe).

Every schedule ramps linearly from 0 to `peak` over `warmup` steps (rsqrt can
instead hold the peak, as the original T5 did). `total` is the step where a
decaying schedule reaches its floor, `end_fraction * peak`; it stays there after.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def _warmup_factor(step, warmup: int):
    # warmup == 0 means no ramp; step + 0 keeps the dtype float
    if warmup <= 0:
        return jnp.ones_like(step, dtype=jnp.float32)
    return jnp.minimum(1.0, step / warmup)


def _check(peak: float, warmup: int, total: int | None = None, end_fraction: float = 0.0):
    if peak <= 0:
        raise ValueError(f"learning_rate must be positive, got {peak}")
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    if total is not None and total <= warmup:
        raise ValueError(f"decay_steps ({total}) must exceed warmup_steps ({warmup})")
    if not 0.0 <= end_fraction <= 1.0:
        raise ValueError(f"end_lr_fraction must be in [0, 1], got {end_fraction}")


def constant(peak: float, warmup: int = 0) -> optax.Schedule:
    _check(peak, warmup)
    return lambda step: peak * _warmup_factor(jnp.asarray(step, jnp.float32), warmup)


def cosine(peak: float, warmup: int, total: int, end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup, then half a cosine from peak to end_fraction * peak at `total`."""
    _check(peak, warmup, total, end_fraction)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
        shape = end_fraction + (1 - end_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return peak * _warmup_factor(step, warmup) * shape
    return schedule


def linear(peak: float, warmup: int, total: int, end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup, then a straight line from peak to end_fraction * peak at `total`."""
    _check(peak, warmup, total, end_fraction)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
        return peak * _warmup_factor(step, warmup) * (1 - (1 - end_fraction) * progress)
    return schedule


def rsqrt(peak: float, warmup: int, linear_warmup: bool = True) -> optax.Schedule:
    """T5's inverse square root: peak * sqrt(warmup / max(step, warmup)).

    T5 used 1/sqrt(max(step, 10^4)), i.e. a plateau during warmup; scaling by
    sqrt(warmup) makes the plateau equal `peak`. With linear_warmup (T5X's
    `linear_warmup*rsqrt_decay`) the plateau becomes a ramp from 0.
    """
    _check(peak, warmup)
    floor = max(warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        decay = jnp.sqrt(floor / jnp.maximum(step, floor))
        ramp = _warmup_factor(step, warmup) if linear_warmup else 1.0
        return peak * ramp * decay
    return schedule


def _final_decay(step, total: int, decay_fraction: float, end_fraction: float):
    """1 until the last `decay_fraction` of `total` steps, then linear to end_fraction."""
    decay_start = total * (1 - decay_fraction)
    if decay_fraction <= 0:
        return jnp.ones_like(step)
    progress = jnp.clip((step - decay_start) / (total - decay_start), 0.0, 1.0)
    return 1 - (1 - end_fraction) * progress


def _check_decay_fraction(decay_fraction: float):
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"wsd_decay_fraction must be in [0, 1], got {decay_fraction}")


def wsd(peak: float, warmup: int, total: int, decay_fraction: float,
        end_fraction: float = 0.0) -> optax.Schedule:
    """Warmup-stable-decay: ramp, hold peak, linear decay over the last
    `decay_fraction` of `total` steps to end_fraction * peak."""
    _check(peak, warmup, total, end_fraction)
    _check_decay_fraction(decay_fraction)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return peak * _warmup_factor(step, warmup) * _final_decay(step, total, decay_fraction, end_fraction)
    return schedule


def power(peak: float, warmup: int, total: int, a: float, b: float,
          decay_fraction: float = 0.0, end_fraction: float = 0.0) -> optax.Schedule:
    """Power scheduler (Shen et al. 2024, arXiv 2408.13359): min(peak, a * step^-b).

    The paper writes lr(n) = min(lr_max, beta * a * n^b) with n in tokens, beta
    the batch size in tokens and b = -0.51; here n is the optimizer step and the
    batch-size factor is folded into `a`, so b is the positive exponent. Like the
    paper it ramps linearly over `warmup` and (when decay_fraction > 0) decays
    over the last fraction of `total` steps — linearly to end_fraction times the
    rate at the start of that phase, where the paper decays exponentially.
    """
    _check(peak, warmup, total, end_fraction)
    _check_decay_fraction(decay_fraction)
    if a <= 0 or b <= 0:
        raise ValueError(f"power_a and power_b must be positive, got a={a}, b={b}")
    decay_start = total * (1 - decay_fraction)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        # the power law freezes where the final decay begins
        held = jnp.minimum(jnp.maximum(step, 1.0), max(decay_start, 1.0))
        rate = jnp.minimum(peak, a * held ** (-b))
        return rate * _warmup_factor(step, warmup) * _final_decay(step, total, decay_fraction, end_fraction)
    return schedule


SCHEDULES = ("constant", "cosine", "rsqrt", "wsd", "power", "linear")


def from_config(o, total_steps: int) -> optax.Schedule:
    """The schedule `optim.schedule` names, with decay_steps == -1 meaning total_steps."""
    total = total_steps if o.decay_steps == -1 else o.decay_steps
    peak, warmup = o.learning_rate, o.warmup_steps
    if o.schedule == "constant":
        return constant(peak, warmup)
    if o.schedule == "cosine":
        return cosine(peak, warmup, total, o.end_lr_fraction)
    if o.schedule == "linear":
        return linear(peak, warmup, total, o.end_lr_fraction)
    if o.schedule == "rsqrt":
        return rsqrt(peak, warmup)
    if o.schedule == "wsd":
        return wsd(peak, warmup, total, o.wsd_decay_fraction, o.end_lr_fraction)
    if o.schedule == "power":
        return power(peak, warmup, total, o.power_a, o.power_b, o.wsd_decay_fraction, o.end_lr_fraction)
    raise ValueError(f"optim.schedule: {o.schedule!r} is not one of {SCHEDULES}")
