"""The Power scheduler against Shen et al. 2024 (arXiv 2408.13359), by hand.

Expected rates are written out here from the paper's equations, not taken from
t5lab: Eq. 7 lr(n) = min(lr_max, beta * a * n^b), n the tokens seen, beta the
batch size in sequences; Eq. 8 adds a linear warmup to lr(N_warmup) and a final
decay f(n) * lr(N - N_decay), exponential to 0 in Sec. 5.1.
"""
import math

import jax
import jax.numpy as jnp
import pytest

from t5lab import config as config_lib
from t5lab.config import ConfigError, schema
from t5lab.optim import make_optimizer, schedules

A, B, LR_MAX = 4.0, -0.51, 0.02  # Sec. 4: "we select a = 4 and b = -0.51", lr_max 0.02


def _paper_rate(beta, n, a=A, b=B, lr_max=LR_MAX):
    return min(lr_max, beta * a * n ** b)


def _power(rows, row_tokens, peak=LR_MAX, warmup_tokens=0, total_tokens=1e15, decay_fraction=0.0,
           end_fraction=0.0, a=A):
    return schedules.power(peak, a, -B, batch_size=rows, tokens_per_step=rows * row_tokens,
                           warmup_tokens=warmup_tokens, total_tokens=total_tokens,
                           decay_fraction=decay_fraction, end_fraction=end_fraction)


def test_paper_worked_example_10t_tokens_batch_1024():
    # Sec. 3.2: "given a 10 trillion token corpus and a batch size 1024, the
    # predicted optimal learning rate is 0.0011" with a = 4.6, b = -0.51 (Eq. 5);
    # sequences of 4096 tokens (Table 2).
    schedule = _power(1024, 4096, peak=1.0, a=4.6)
    step = 1e13 / (1024 * 4096)
    got = float(schedule(step))
    assert got == pytest.approx(1024 * 4.6 * 1e13 ** -0.51, rel=1e-4)
    assert got == pytest.approx(0.0011, rel=0.01)


@pytest.mark.parametrize("n", [2.0 ** 24, 2.0 ** 30, 3e9])
def test_two_batch_sizes_follow_the_paper_at_the_same_tokens(n):
    small, large = _power(8, 1024), _power(64, 1024)
    got_small = float(small(n / (8 * 1024)))   # same tokens, 8x the steps
    got_large = float(large(n / (64 * 1024)))
    assert got_small == pytest.approx(_paper_rate(8, n), rel=1e-4)
    assert got_large == pytest.approx(_paper_rate(64, n), rel=1e-4)


def test_cap_and_linear_in_batch_size():
    n = 2.0 ** 24  # 8 * 4 * n^-0.51 = 0.0066 is below lr_max; 64 * 4 * n^-0.51 = 0.053 is capped
    assert float(_power(8, 1024)(n / 8192)) == pytest.approx(32 * 2.0 ** (-24 * 0.51), rel=1e-4)
    assert float(_power(64, 1024)(n / 65536)) == pytest.approx(LR_MAX, rel=1e-6)
    n = 2.0 ** 30  # both uncapped: the rate is proportional to beta (Hypothesis 1)
    ratio = float(_power(64, 1024)(n / 65536)) / float(_power(8, 1024)(n / 8192))
    assert ratio == pytest.approx(8.0, rel=1e-4)


def test_run_length_does_not_change_the_stable_phase():
    # The power law depends on tokens seen only: a 2x longer run has the same
    # rates until the shorter run's decay begins.
    short = _power(16, 512, total_tokens=2.0 ** 33, decay_fraction=0.1)
    long = _power(16, 512, total_tokens=2.0 ** 34, decay_fraction=0.1)
    for n in (2.0 ** 26, 2.0 ** 30, 0.9 * 2.0 ** 33):
        step = n / (16 * 512)
        assert float(short(step)) == pytest.approx(float(long(step)), rel=1e-6)
        assert float(short(step)) == pytest.approx(_paper_rate(16, n), rel=1e-4)


def test_warmup_ramps_to_the_power_rate_at_its_end():
    rows, row_tokens, warmup = 64, 1024, 2.0 ** 30  # Eq. 8: n / N_warmup * lr(N_warmup)
    schedule = _power(rows, row_tokens, warmup_tokens=warmup)
    per_step = rows * row_tokens
    at_end = _paper_rate(rows, warmup)
    assert at_end < LR_MAX  # so the ramp's target is the power law, not the cap
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup / 4 / per_step)) == pytest.approx(at_end / 4, rel=1e-4)
    assert float(schedule(warmup / per_step)) == pytest.approx(at_end, rel=1e-4)
    assert float(schedule(2 * warmup / per_step)) == pytest.approx(_paper_rate(rows, 2 * warmup), rel=1e-4)


def _ibm_exponential(x, t, d):
    # IBM/dolomite-engine ExponentialScheduler: a * exp(-x / t) + b with
    # a = (1 - d) e / (e - 1), b = (d e - 1) / (e - 1): 1 at x = 0, d at x = t
    e = math.e
    return (1 - d) * e / (e - 1) * math.exp(-x / t) + (d * e - 1) / (e - 1)


@pytest.mark.parametrize("end_fraction", [0.0, 0.1])
def test_final_decay_is_exponential_from_the_frozen_power_rate(end_fraction):
    rows, row_tokens, total = 32, 1024, 2.0 ** 36
    per_step = rows * row_tokens
    schedule = _power(rows, row_tokens, warmup_tokens=2.0 ** 28, total_tokens=total, decay_fraction=0.1,
                      end_fraction=end_fraction)
    start = 0.9 * total  # Sec. 5.1: the last 100B of 1T tokens decay, i.e. 10%
    frozen = _paper_rate(rows, start)
    for p in (0.0, 0.25, 0.5, 0.9, 1.0):
        n = start + p * 0.1 * total
        want = frozen * _ibm_exponential(p * 0.1 * total, 0.1 * total, end_fraction)
        assert float(schedule(n / per_step)) == pytest.approx(want, rel=1e-3, abs=1e-12), p
    assert float(schedule(total / per_step)) == pytest.approx(frozen * end_fraction, abs=1e-9)
    assert float(schedule(2 * total / per_step)) == pytest.approx(frozen * end_fraction, abs=1e-9)
    # exponential, not linear: halfway down the rate is below the linear midpoint
    half = float(schedule((start + 0.05 * total) / per_step)) / frozen
    assert half < end_fraction + (1 - end_fraction) * 0.5 - 0.1


def _power_cfg(**overrides):
    o = schema().optim
    o.schedule, o.learning_rate, o.warmup_steps, o.power_a, o.power_b = "power", LR_MAX, 100, A, -B
    o.wsd_decay_fraction, o.end_lr_fraction = 0.1, 0.0
    for key, value in overrides.items():
        o[key] = value
    return o


def test_from_config_counts_tokens_and_converts_steps():
    rows, row_tokens, total_steps = 64, 1024, 10_000
    o = _power_cfg()
    schedule = schedules.from_config(o, total_steps, batch_shape=(rows, row_tokens))
    per_step = rows * row_tokens
    warm = _paper_rate(rows, 100 * per_step)
    assert float(schedule(50)) == pytest.approx(warm / 2, rel=1e-4)
    assert float(schedule(5000)) == pytest.approx(_paper_rate(rows, 5000 * per_step), rel=1e-4)
    assert float(schedule(total_steps)) == pytest.approx(0.0, abs=1e-9)
    # jit-safe on the trainer's int32 step
    assert float(jax.jit(schedule)(jnp.int32(5000))) == pytest.approx(float(schedule(5000)), rel=1e-6)
    # make_optimizer hands batch_shape through to the same schedule
    _, from_factory = make_optimizer(o, total_steps, batch_shape=(rows, row_tokens))
    assert float(from_factory(5000)) == pytest.approx(float(schedule(5000)), rel=1e-6)


def test_power_without_batch_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_shape"):
        schedules.from_config(_power_cfg(), 1000)
    with pytest.raises(ValueError, match="batch_shape"):
        make_optimizer(_power_cfg(), 1000)
    # the other schedules do not need it
    schedules.from_config(_power_cfg(schedule="cosine"), 1000)


def test_bad_power_arguments_raise():
    with pytest.raises(ValueError, match="power_a and power_b"):
        _power(8, 128, a=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        _power(8, 128, warmup_tokens=1e6, total_tokens=1e6, decay_fraction=0.5)
    with pytest.raises(ConfigError, match=r"config\.optim\.power_a"):
        config_lib.load("configs/ul2.py:tiny", ["optim.schedule=power", "optim.power_b=-0.51"])


def test_trainer_batch_shape_is_rows_and_row_tokens():
    from t5lab.train_step import schedule_batch_shape
    c = config_lib.load("configs/ul2.py:tiny")  # 8 rows of 64 encoder + 32 decoder tokens
    assert schedule_batch_shape(c) == (8, 96)
    c = config_lib.load("configs/encoder.py:tiny")
    assert schedule_batch_shape(c) == (c.train.batch_size, c.data.inputs_length)
