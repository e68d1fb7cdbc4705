"""cpu_kernels: the folded row max equals jnp.max bit for bit; the softmax built on it
equals jax.nn.softmax in value and gradient; the cross-entropy folds the
vocabulary only where it is not split across devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from t5lab import losses, sharding
from t5lab.models.layers import MASK_VALUE
from t5lab.cpu_kernels import gelu_tanh_gate, row_max, softmax


@pytest.mark.parametrize("width", [256, 4016, 96, 50, 31])
def test_row_max_is_exact(width):
    x = np.asarray(jax.random.normal(jax.random.key(width), (3, 5, width))) * 30
    x[0, 0, -1] = 1e30             # the maximum in the last column
    x[0, 1, :] = -np.inf           # an all -inf row
    x[1, 2, width // 3] = np.nan   # NaN propagates as in jnp.max
    got = np.asarray(jax.jit(row_max)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.max(x, axis=-1))


def test_row_max_has_no_gradient():
    g = jax.grad(lambda x: jnp.sum(row_max(x)))(jnp.arange(64.0).reshape(1, 64))
    assert not np.any(np.asarray(g))


def test_softmax_matches_jax_in_value_and_gradient():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 3, 8, 256)) * 5
    mask = jax.random.uniform(k[1], (2, 1, 8, 256)) > 0.2
    mask = mask.at[0, 0, 3].set(False)  # a fully masked row softmaxes to uniform
    x = jnp.where(mask, x, MASK_VALUE)
    g = jax.random.normal(k[2], x.shape)
    ours, ours_vjp = jax.vjp(softmax, x)
    ref, ref_vjp = jax.vjp(lambda v: jax.nn.softmax(v, axis=-1), x)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[0, 0, 3], np.full(256, 1 / 256), rtol=1e-6)
    np.testing.assert_allclose(ours_vjp(g)[0], ref_vjp(g)[0], rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_with_a_folded_vocabulary():
    k = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(k[0], (2, 5, 16))
    head = jax.random.normal(k[1], (16, 512))  # 512 columns: folded to 32
    targets = jax.random.randint(k[2], (2, 5), 0, 512)
    weights = jnp.ones((2, 5), jnp.int32)
    fused = jax.jit(lambda h, w: losses.head_cross_entropy_sums(h, w, targets, weights, 1e-4))
    plain = losses.cross_entropy_sums(hidden @ head, targets, weights, 1e-4)
    got = fused(hidden, head)
    for key in ("loss", "ce", "z", "correct", "weight"):
        np.testing.assert_allclose(got[key], plain[key], rtol=1e-5, err_msg=key)


def test_vocab_split_follows_the_mesh_and_rules():
    devices = np.array(jax.devices()[:4])
    seen = {}

    def probe(name):
        def f(x):
            seen[name] = losses._vocab_split()
            return x
        return f

    probe("no mesh")(None)
    for tensor in (1, 2):
        mesh = Mesh(devices.reshape(1, 4 // tensor, tensor), ("data", "fsdp", "tensor"))
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            jax.jit(probe(f"tensor={tensor}"))(jnp.zeros(2))
    assert seen == {"no mesh": False, "tensor=1": False, "tensor=2": True}


def _halvings(mesh):
    """How many halves row_max's program slices off, traced under `mesh`."""
    with jax.set_mesh(mesh):
        text = jax.jit(row_max).trace(jax.ShapeDtypeStruct((4, 256), jnp.float32)).lower().as_text()
    return text.count("stablehlo.slice")


def test_row_max_halves_only_for_cpu():
    cpu = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    assert _halvings(cpu) == 6  # 256 -> 128 -> 64 -> 32 columns, two slices each
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    tpu = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    assert _halvings(Mesh(np.array(tpu[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))) == 0


def test_gelu_gate_matches_autodiff():
    a = jax.random.normal(jax.random.key(1), (64, 33)) * 3
    b = jax.random.normal(jax.random.key(2), (64, 33))
    c = jax.random.normal(jax.random.key(3), (64, 33))
    ref = lambda a, b: jnp.sum(jax.nn.gelu(a, approximate=True) * b * c)
    new = lambda a, b: jnp.sum(gelu_tanh_gate(a, b) * c)
    np.testing.assert_allclose(float(new(a, b)), float(ref(a, b)), rtol=1e-5)
    for x, y in zip(jax.grad(ref, (0, 1))(a, b), jax.grad(new, (0, 1))(a, b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
