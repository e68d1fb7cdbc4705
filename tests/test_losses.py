"""The fused head + cross-entropy equals the plain one on materialised logits
(values and gradients, z-loss and per-denoiser sums included), and the custom
gated-gelu VJP equals autodiff of the reference formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lab import losses


def _inputs(b=3, t=7, d=16, v=50, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (b, t, d))
    head = jax.random.normal(k[1], (d, v)) * 0.7
    targets = jax.random.randint(k[2], (b, t), 0, v)
    weights = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.int32)
    den = jax.random.randint(k[4], (b, t), 0, 4)
    return hidden, head, targets, weights, den


def _both(z_loss, n_den):
    hidden, head, targets, weights, den = _inputs()

    def plain(h, w):
        return losses.cross_entropy_sums(jnp.einsum("btd,dv->btv", h, w), targets, weights, z_loss,
                                         den if n_den else None, n_den)

    def fused(h, w):
        return losses.head_cross_entropy_sums(h, w, targets, weights, z_loss,
                                              den if n_den else None, n_den)
    return hidden, head, plain, fused


@pytest.mark.parametrize("z_loss,n_den", [(0.0, 0), (1e-4, 0), (0.1, 4)])
def test_values_match(z_loss, n_den):
    hidden, head, plain, fused = _both(z_loss, n_den)
    a, b = plain(hidden, head), fused(hidden, head)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("key", ["loss", "ce", "z", "den_ce"])
def test_gradients_match(key):
    hidden, head, plain, fused = _both(0.1, 4)
    # A weighted combination exercises every per-token cotangent at once.
    scale = jnp.arange(1.0, 5.0) if key == "den_ce" else 1.0
    gp = jax.grad(lambda h, w: jnp.sum(plain(h, w)[key] * scale), (0, 1))(hidden, head)
    gf = jax.grad(lambda h, w: jnp.sum(fused(h, w)[key] * scale), (0, 1))(hidden, head)
    for x, y in zip(gp, gf):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)


def test_jit_and_large_logits():
    hidden, head, plain, fused = _both(1e-4, 0)
    hidden = hidden * 100.0  # logits in the thousands: the max shift keeps exp finite
    a = plain(hidden, head)
    b = jax.jit(fused)(hidden, head)
    np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
    g = jax.jit(jax.grad(lambda h, w: fused(h, w)["loss"], (0, 1)))(hidden, head)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)


def test_accuracy_counts_row_max():
    hidden, head, targets, weights, _ = _inputs()
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    best = jnp.argmax(logits, -1)
    targets = jnp.where(jnp.arange(targets.shape[1])[None] % 2 == 0, best, targets)
    a = losses.cross_entropy_sums(logits, targets, weights, 0.0)
    b = losses.head_cross_entropy_sums(hidden, head, targets, weights, 0.0)
    assert float(a["correct"]) == float(b["correct"]) > 0
