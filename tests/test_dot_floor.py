"""tools/dot_floor.py finds every matmul of a compiled program, with its
shapes and dimension numbers, and counts its FLOPs as written by hand."""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import dot_floor  # noqa: E402


def test_finds_plain_and_batched_dots_and_counts_their_flops():
    def f(x, w, q, k):
        scores = jnp.einsum("bqd,bkd->bqk", q, k)   # batched: 3 x 16 x 8 x 4
        return jnp.tanh(x @ w).sum() + jnp.tanh(scores).sum() + jnp.tanh(x @ (w * 2)).sum()
    args = (jnp.ones((32, 24)), jnp.ones((24, 40)), jnp.ones((3, 16, 4)), jnp.ones((3, 8, 4)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    found = dot_floor.dots(hlo)
    assert sum(found.values()) == 3
    flops = {key[1:3]: dot_floor.dot_flops(*key[1:]) for key in found}
    assert flops[((32, 24), (24, 40))] == 2 * 32 * 24 * 40
    batched = [v for (lhs, _), v in flops.items() if len(lhs) == 3]
    assert batched == [2 * 3 * 16 * 8 * 4]
    got = dot_floor.floor(hlo, reps=1)
    assert got["dots"] == 3
    assert got["flops"] == 2 * (2 * 32 * 24 * 40) + 2 * 3 * 16 * 8 * 4


def test_dot_bytes_are_both_operands_and_the_result():
    def f(x, w, a, b):
        return jnp.tanh(x @ w).sum() + jnp.tanh(jnp.einsum("bqd,bkd->bqk", a, b)).sum()
    args = (jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((2, 8, 4)), jnp.ones((2, 16, 4)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    plain = 4 * (64 * 32 + 32 * 48 + 64 * 48)
    batched = 4 * (2 * 8 * 4 + 2 * 16 * 4 + 2 * 8 * 16)
    assert dot_floor.dot_bytes(hlo) == plain + batched
