"""Both cross-entropy paths (on materialised logits, and the fused head) equal
an independent reference: optax's softmax cross-entropy plus a z-loss written
out by hand (values and gradients, per-denoiser sums included)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def _reference(h, w, targets, weights, z_loss, den, n_den):
    """The sums by another route: optax's cross-entropy, logZ^2 by hand, per-denoiser
    sums with a Python loop, accuracy from argmax."""
    logits = jnp.einsum("btd,dv->btv", h, w, precision="highest")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    z = jnp.log(jnp.sum(jnp.exp(logits), axis=-1)) ** 2
    wt = weights.astype(jnp.float32)
    out = {"loss": jnp.sum(wt * ce) + z_loss * jnp.sum(wt * z), "ce": jnp.sum(wt * ce),
           "z": jnp.sum(wt * z), "weight": jnp.sum(wt),
           "correct": jnp.sum(wt * (jnp.argmax(logits, -1) == targets))}
    if n_den:
        out["den_ce"] = jnp.stack([jnp.sum(jnp.where(den == i, wt * ce, 0.0)) for i in range(n_den)])
        out["den_weight"] = jnp.stack([jnp.sum(jnp.where(den == i, wt, 0.0)) for i in range(n_den)])
    return out


def _three(z_loss, n_den):
    hidden, head, targets, weights, den = _inputs()
    d = den if n_den else None

    def ref(h, w):
        return _reference(h, w, targets, weights, z_loss, den, n_den)

    def plain(h, w):
        return losses.cross_entropy_sums(jnp.einsum("btd,dv->btv", h, w), targets, weights, z_loss,
                                         d, n_den)

    def fused(h, w):
        return losses.head_cross_entropy_sums(h, w, targets, weights, z_loss, d, n_den)
    return hidden, head, ref, {"plain": plain, "fused": fused}


@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("z_loss,n_den", [(0.0, 0), (1e-4, 0), (0.1, 4)])
def test_values_equal_the_reference(path, z_loss, n_den):
    hidden, head, ref, impl = _three(z_loss, n_den)
    want, got = ref(hidden, head), impl[path](hidden, head)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-4,
                                   err_msg=k)


@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("key", ["loss", "ce", "z", "den_ce"])
def test_gradients_equal_the_reference(path, key):
    hidden, head, ref, impl = _three(0.1, 4)
    # A weighted combination exercises every per-token cotangent at once.
    scale = jnp.arange(1.0, 5.0) if key == "den_ce" else 1.0
    gr = jax.grad(lambda h, w: jnp.sum(ref(h, w)[key] * scale), (0, 1))(hidden, head)
    gi = jax.grad(lambda h, w: jnp.sum(impl[path](h, w)[key] * scale), (0, 1))(hidden, head)
    for x, y in zip(gr, gi):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-4)


def test_jit_and_large_logits():
    hidden, head, targets, weights, _ = _inputs()
    hidden = hidden * 100.0  # logits in the thousands: the max shift keeps exp finite

    def fused(h, w):
        return losses.head_cross_entropy_sums(h, w, targets, weights, 1e-4)
    logits = jnp.einsum("btd,dv->btv", hidden, head, precision="highest")
    # optax's cross-entropy is max-shifted; logZ = CE + target logit, so no exp of thousands
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_z = ce + jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    want = jnp.sum(weights * (ce + 1e-4 * log_z ** 2))
    b = jax.jit(fused)(hidden, head)
    np.testing.assert_allclose(float(b["loss"]), float(want), rtol=1e-5)
    g = jax.jit(jax.grad(lambda h, w: fused(h, w)["loss"], (0, 1)))(hidden, head)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)


def test_accuracy_counts_row_max():
    hidden, head, targets, weights, _ = _inputs()
    logits = jnp.einsum("btd,dv->btv", hidden, head)
    best = jnp.argmax(logits, -1)
    targets = jnp.where(jnp.arange(targets.shape[1])[None] % 2 == 0, best, targets)
    a = losses.cross_entropy_sums(logits, targets, weights, 0.0)
    b = losses.head_cross_entropy_sums(hidden, head, targets, weights, 0.0)
    want = float(jnp.sum(weights * (best == targets)))
    assert float(a["correct"]) == float(b["correct"]) == want > 0
