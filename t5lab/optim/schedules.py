"""Learning-rate schedules: step -> rate, as optax schedules (jit-safe).

Every schedule ramps linearly from 0 to `peak` over `warmup` steps (rsqrt can
instead hold the peak, as the original T5 did). `total` is the step where a
decaying schedule reaches its floor, `end_fraction * peak`; it stays there after.
`power` is the exception: it is defined in tokens seen (see its docstring).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from t5lab import config


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


def _exponential_decay(progress, end_fraction: float):
    """1 at progress 0 to end_fraction at 1, exponentially: the authors' engine
    (IBM/dolomite-engine, optimization/scheduler.py, ExponentialScheduler) uses
    a * exp(-x / t) + b with a, b chosen to hit both ends; written out that is
    end + (1 - end) * (e^(1 - p) - 1) / (e - 1)."""
    return end_fraction + (1 - end_fraction) * (jnp.exp(1 - progress) - 1) / (math.e - 1)


def power(peak: float, a: float, b: float, *, batch_size: int, tokens_per_step: int,
          warmup_tokens: float, total_tokens: float, decay_fraction: float = 0.0,
          end_fraction: float = 0.0) -> optax.Schedule:
    """Power scheduler (Shen et al. 2024, arXiv 2408.13359), a function of the
    tokens seen n = step * tokens_per_step, not of the step.

    Eq. 7: lr_power(n) = min(peak, beta * a * n^-b), beta the batch size in
    sequences (rows; Table 2 and the Sec. 3.2 example "10T tokens, batch size
    1024 -> 0.0011" only work in sequences), so one `a` serves every batch size
    and run length. The paper writes the exponent as b = -0.51; here b is its
    magnitude (0.51). Eq. 8: a linear ramp to lr_power(N_warmup) over the
    warmup tokens, lr_power(n), then over the last `decay_fraction` of
    `total_tokens` f(n) * lr_power(N - N_decay) with f exponential to
    end_fraction (Sec. 5.1: "exponentially decay the learning rate to 0 for the
    last 100B tokens" of 1T; f's form from the authors' engine, see
    _exponential_decay). decay_fraction 0: no decay, no horizon needed.
    """
    _check(peak, 0, None, end_fraction)
    _check_decay_fraction(decay_fraction)
    if a <= 0 or b <= 0:
        raise ValueError(f"power_a and power_b must be positive (the paper's b = -power_b), got a={a}, b={b}")
    if batch_size <= 0 or tokens_per_step <= 0:
        raise ValueError(f"power needs a positive batch size and tokens per step, got {batch_size}, "
                         f"{tokens_per_step}")
    decay_start = total_tokens * (1 - decay_fraction)
    if decay_fraction > 0 and not warmup_tokens <= decay_start:
        raise ValueError(f"power: warmup ({warmup_tokens:g} tokens) must end before the final decay "
                         f"starts ({decay_start:g} tokens)")

    def law(n):  # Eq. 7; n >= 1 token keeps n^-b finite at step 0
        return jnp.minimum(peak, batch_size * a * jnp.maximum(n, 1.0) ** (-b))

    def schedule(step):
        n = jnp.asarray(step, jnp.float32) * tokens_per_step
        rate = law(n)
        if warmup_tokens > 0:
            rate = jnp.where(n < warmup_tokens, n / warmup_tokens * law(warmup_tokens), rate)
        if decay_fraction > 0:
            progress = jnp.clip((n - decay_start) / (total_tokens - decay_start), 0.0, 1.0)
            rate = jnp.where(n > decay_start, _exponential_decay(progress, end_fraction) * law(decay_start),
                             rate)
        return rate
    return schedule


def from_config(o, total_steps: int, batch_shape: tuple[int, int] | None = None) -> optax.Schedule:
    """The schedule `optim.schedule` names, with decay_steps == -1 meaning total_steps.

    batch_shape = (rows per step, tokens per row): the power schedule counts
    tokens (Shen et al. 2024), so it needs them; the others ignore it.
    """
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
        if batch_shape is None:
            raise ValueError("optim.schedule='power' is a function of tokens seen: pass batch_shape="
                             "(train.batch_size, tokens per row) to make_optimizer / from_config")
        rows, row_tokens = batch_shape
        tokens = rows * row_tokens
        return power(peak, o.power_a, o.power_b, batch_size=rows, tokens_per_step=tokens,
                     warmup_tokens=warmup * tokens, total_tokens=total * tokens,
                     decay_fraction=o.wsd_decay_fraction, end_fraction=o.end_lr_fraction)
    raise ValueError(f"optim.schedule: {o.schedule!r} is not one of {config.SCHEDULES}")
