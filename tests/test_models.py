"""Model properties that do not need transformers: logical axes and naming,
packing isolation, bf16, scan/remat equivalence, 8-device sharding, dropout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lab import models, sharding
from t5lab.config import schema, validate

VOCAB = set(x for x, _ in sharding.LOGICAL_AXIS_RULES)
BASE = dict(d_model=40, num_heads=3, head_dim=12, d_ff=100, vocab_size=100, num_layers=2,
            relpos_buckets=8, relpos_max_distance=20)
ARCHS = {
    "encoder_decoder": dict(arch="encoder_decoder"),
    "decoder": dict(arch="decoder", d_model=42, position="rope", activation="silu"),
    "encoder": dict(arch="encoder", tie_embeddings=True, relpos_per_layer=True),
}


def make_config(enc=12, dec=8, **model):
    c = schema()
    c.model.update(dict(BASE, **model))
    c.data.inputs_length, c.data.targets_length = enc, dec
    return validate(c)


def init(config, seed=0):
    model = models.build(config)
    boxed = jax.jit(model.init)(jax.random.key(seed), models.dummy_batch(config, 1))["params"]
    return model, boxed, nn.unbox(boxed)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    config = make_config(**ARCHS[request.param])
    model, boxed, params = init(config)
    return config, model, boxed, params


def test_dummy_batch_shapes():
    for name, lengths in (("encoder_decoder", (12, 8)), ("decoder", (20,)), ("encoder", (12,))):
        batch = models.dummy_batch(make_config(**ARCHS[name]), 3)
        assert {a.shape[1] for a in batch.values()} == set(lengths)
        assert all(a.dtype == np.int32 and a.shape[0] == 3 for a in batch.values())


def test_every_param_has_logical_axes_and_contract_names(arch):
    config, _, boxed, _ = arch
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
        names = [k.key for k in path]
        assert isinstance(leaf, nn.LogicallyPartitioned), names
        assert set(leaf.names) <= VOCAB and len(leaf.names) == leaf.value.ndim, names
        assert leaf.value.dtype == jnp.float32
        assert names[-1] != "bias"
        if names[-1] == "scale":
            assert "norm" in names[-2]
        if names[-1] == "rel_embedding":
            assert "relpos" in names[-2]
        if names[-1] == "embedding":
            assert names[-2] == "token_embedder"
    tops = {p[0].key for p, _ in flat}
    assert ("lm_head" in tops) != config.model.tie_embeddings


def test_return_hidden_times_head_matrix_is_logits(arch):
    config, model, _, params = arch
    batch = {k: v for k, v in models.dummy_batch(config, 2).items() if "segment" not in k and "position" not in k}
    logits = model.apply({"params": params}, batch)
    hidden = model.apply({"params": params}, batch, return_hidden=True)
    np.testing.assert_allclose(np.asarray(hidden @ models.head_matrix(params, config)), logits,
                               atol=1e-5)
    assert logits.dtype == jnp.float32 and logits.shape[-1] == config.model.vocab_size


def _example(rng, n_in, n_out, v):
    return rng.integers(2, v, n_in).astype(np.int32), rng.integers(2, v, n_out).astype(np.int32)


def test_packed_rows_equal_examples_run_alone(arch):
    """Two examples packed in one row (segment ids + positions) give the logits
    each gives alone: no attention across examples, positions restart."""
    config, model, _, params = arch
    rng = np.random.default_rng(0)
    a, b = _example(rng, 5, 4, 100), _example(rng, 6, 3, 100)
    kind = config.model.arch

    def row(parts, width):
        toks, seg, pos = (np.zeros(width, np.int32) for _ in range(3))
        start = 0
        for i, p in enumerate(parts):
            toks[start:start + len(p)] = p
            seg[start:start + len(p)] = i + 1
            pos[start:start + len(p)] = np.arange(len(p))
            start += len(p)
        return toks[None], seg[None], pos[None]

    def shift(t):
        return np.concatenate([[0], t[:-1]]).astype(np.int32)

    if kind == "encoder_decoder":
        def batch(exs):
            et, es, ep = row([e[0] for e in exs], 12)
            dt, ds, dp = row([shift(e[1]) for e in exs], 8)
            out = {"encoder_input_tokens": et, "decoder_input_tokens": dt,
                   "decoder_target_tokens": row([e[1] for e in exs], 8)[0]}
            if len(exs) > 1:
                out.update(encoder_segment_ids=es, encoder_positions=ep, decoder_segment_ids=ds,
                           decoder_positions=dp)
            return out
        spans = [(0, 4), (4, 7)]
    else:
        key = "encoder" if kind == "encoder" else "decoder"

        def batch(exs):
            t, s, p = row([np.concatenate(e) for e in exs], 20)
            out = {f"{key}_input_tokens": t}
            if len(exs) > 1:
                out.update({f"{key}_segment_ids": s, f"{key}_positions": p})
            return out
        spans = [(0, 9), (9, 18)]
    packed = np.asarray(model.apply({"params": params}, batch([a, b])))
    for ex, (s, e) in zip([a, b], spans):
        alone = np.asarray(model.apply({"params": params}, batch([ex])))
        np.testing.assert_allclose(packed[0, s:e], alone[0, :e - s], atol=1e-5)


def _stack_layers(params):
    """Independent of the code under test: layers_i -> one leading 'layers' axis."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        if stack in out:
            sub = dict(out[stack])
            n = sum(k.startswith("layers_") for k in sub)
            layers = [sub.pop(f"layers_{i}") for i in range(n)]
            sub["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
            out[stack] = sub
    return out


def test_scan_and_remat_give_same_logits_and_grads():
    config = make_config(relpos_per_layer=False, arch="encoder_decoder")
    model, _, params = init(config)
    scan_cfg = make_config(arch="encoder_decoder", scan_layers=True, remat_policy="minimal")
    scan_model, scan_boxed, scan_init = init(scan_cfg)
    stacked = _stack_layers(params)
    assert jax.tree.structure(stacked) == jax.tree.structure(scan_init)
    layer_axes = jax.tree.leaves(scan_boxed["encoder"]["layers"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(p.names[0] == "layers" for p in layer_axes)
    batch = {k: v for k, v in models.dummy_batch(config, 2).items() if "segment" not in k and "position" not in k}
    batch["encoder_input_tokens"] = np.arange(24, dtype=np.int32).reshape(2, 12) % 97 + 2

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, batch) ** 2)

    l1, g1 = jax.jit(jax.value_and_grad(loss(model)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(loss(scan_model)))(stacked)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(_stack_layers(g1)), jax.tree.leaves(g2)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # Two layers per loop iteration: the same function of the same params.
    unrolled = models.build(make_config(arch="encoder_decoder", scan_layers=True, scan_unroll=2))
    np.testing.assert_allclose(jax.jit(loss(unrolled))(stacked), l1, rtol=1e-6)


def test_bfloat16_compute_is_close_to_float32(arch):
    config, _, _, params = arch
    bf = make_config(**dict(ARCHS[config.model.arch], dtype="bfloat16"))
    batch = models.dummy_batch(config, 2)
    f32 = np.asarray(models.build(config).apply({"params": params}, batch))
    b16 = models.build(bf).apply({"params": params}, batch)
    assert b16.dtype == jnp.float32
    assert np.abs(np.asarray(b16) - f32).max() < 0.05 * np.abs(f32).max()


def test_dropout_uses_the_rng():
    config = make_config(arch="encoder_decoder", dropout_rate=0.3)
    model, _, params = init(config)
    batch = models.dummy_batch(config, 2)
    noisy = jax.jit(lambda key: model.apply({"params": params}, batch, deterministic=False,
                                            rngs={"dropout": key}))
    run = lambda seed: np.asarray(noisy(jax.random.key(seed)))
    clean = np.asarray(model.apply({"params": params}, batch))
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2)) and not np.allclose(run(1), clean)


def test_shards_on_8_devices_and_matches_one_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    config = make_config(arch="encoder_decoder", d_model=64, num_heads=4, head_dim=16, d_ff=96, vocab_size=128)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    model = models.build(config)
    mesh = sharding.make_mesh(config.mesh)
    batch = models.dummy_batch(config, 4)
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    specs = nn.get_partition_spec(abstract)
    shardings = sharding.logical_to_sharding(specs, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), batch)
        params = nn.unbox(variables["params"])
        emb = params["token_embedder"]["embedding"]
        assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        q = params["encoder"]["layers_0"]["self_attention"]["query"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
        sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        logits = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, sharded_batch)
    single = model.apply({"params": jax.tree.map(np.asarray, params)}, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single), atol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_bias_looks_up_its_table_and_scatters_its_gradient(bidirectional):
    from t5lab.models.layers import RelativePositionBias, relative_position_bucket
    heads, n_buckets, t = 3, 8, 10
    module = RelativePositionBias(heads, n_buckets, 20, bidirectional)
    pos = jnp.arange(t)[None]
    table = np.random.default_rng(0).normal(size=(heads, n_buckets)).astype(np.float32)
    buckets = np.asarray(relative_position_bucket(pos[:, None, :] - pos[:, :, None], bidirectional,
                                                  n_buckets, 20))[0]  # [Q, K]
    bias = module.apply({"params": {"rel_embedding": table}}, pos, pos)
    np.testing.assert_array_equal(np.asarray(bias)[0], table[:, buckets])
    # The gradient of sum(bias * w): each bucket collects the weights of its (q, k) pairs.
    w = np.random.default_rng(1).normal(size=(1, heads, t, t)).astype(np.float32)
    grad = jax.grad(lambda tb: jnp.sum(module.apply({"params": {"rel_embedding": tb}}, pos, pos) * w))(table)
    expected = np.zeros_like(table)
    for q in range(t):
        for k in range(t):
            expected[:, buckets[q, k]] += w[0, :, q, k]
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)
    assert len(set(buckets.ravel())) > 3  # the check spans several buckets
