"""model.attention: every implementation equals `xla` (logits and gradients)
where it runs. On CPU that is `dpa` (jax.nn.dot_product_attention, the call
`cudnn` makes, with XLA's implementation) and `flash` (the Pallas TPU kernel
in interpret mode); `cudnn` itself needs a GPU (tools/gpu_bench.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lab import models
from t5lab.config import ConfigError, validate
from t5lab.models import attention
from test_models import ARCHS, init, make_config

ENC, DEC = 24, 16


def _packed_batch(arch: str, rng):
    """Two packed segments and trailing padding per row; the decoder-only rows
    carry a prefix-LM prefix."""
    def row(width, lens):
        toks, seg, pos = (np.zeros(width, np.int32) for _ in range(3))
        start = 0
        for i, n in enumerate(lens):
            toks[start:start + n] = rng.integers(2, 100, n)
            seg[start:start + n], pos[start:start + n] = i + 1, np.arange(n)
            start += n
        return toks, seg, pos

    def rows(width, lens):
        return [np.stack(a) for a in zip(*(row(width, l) for l in lens))]

    if arch == "encoder_decoder":
        et, es, ep = rows(ENC, [(9, 11), (14, 6)])
        dt, ds, dp = rows(DEC, [(7, 6), (5, 8)])
        return dict(encoder_input_tokens=et, encoder_segment_ids=es, encoder_positions=ep,
                    decoder_input_tokens=dt, decoder_segment_ids=ds, decoder_positions=dp)
    key = "encoder" if arch == "encoder" else "decoder"
    t, s, p = rows(ENC, [(10, 9), (15, 7)])
    out = {f"{key}_input_tokens": t, f"{key}_segment_ids": s, f"{key}_positions": p}
    if arch == "decoder":
        out["decoder_causal_attention"] = ((p < 4) & (s > 0)).astype(np.int32)
    return out


def _valid(arch, batch):
    return batch["decoder_segment_ids" if arch != "encoder" else "encoder_segment_ids"] > 0


def _loss_and_grads(config, params, batch, valid):
    """(logits, gradients of a loss on the valid positions), from one compiled
    program (a compile is most of a case's time on the CPU)."""
    model = models.build(config)

    def loss(p):
        logits = model.apply({"params": p}, batch)
        return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) / 100, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


# Every architecture scanned and unscanned for dpa; the flash kernel runs in
# interpret mode (slow on a CPU), so scanned only for encoder-decoder, whose
# three attentions (bidirectional, causal, cross) cover the others'.
CASES = [(impl, arch, scan) for impl in ("dpa", "flash") for arch in sorted(ARCHS) for scan in (False, True)
         if impl == "dpa" or arch == "encoder_decoder" or not scan]


@pytest.mark.parametrize("impl,arch,scan", CASES,
                         ids=[f"{i}-{a}-{'scanned' if s else 'unscanned'}" for i, a, s in CASES])
def test_implementation_equals_xla(arch, impl, scan, monkeypatch):
    if impl == "flash":
        monkeypatch.setattr(attention, "FLASH_INTERPRET", True)
    kw = dict(ARCHS[arch], scan_layers=scan)
    xla_cfg = make_config(ENC, DEC, attention="xla", **kw)
    _, _, params = init(xla_cfg)
    batch = _packed_batch(arch, np.random.default_rng(0))
    valid = _valid(arch, batch)
    ref_logits, ref_grads = _loss_and_grads(xla_cfg, params, batch, valid)
    logits, grads = _loss_and_grads(make_config(ENC, DEC, attention=impl, **kw), params, batch, valid)
    np.testing.assert_allclose(logits[valid], ref_logits[valid], atol=2e-5, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def _unpacked_batch(arch: str, rng):
    """No segment ids: one example per row, padded at the end (rows of
    different lengths, one of them full); decoder-only rows without a prefix."""
    def rows(width, lens):
        toks = np.zeros((len(lens), width), np.int32)
        for r, n in enumerate(lens):
            toks[r, :n] = rng.integers(2, 100, n)
        return toks

    if arch == "encoder_decoder":
        return dict(encoder_input_tokens=rows(ENC, (ENC, 13)), decoder_input_tokens=rows(DEC, (9, DEC)))
    return {f"{'encoder' if arch == 'encoder' else 'decoder'}_input_tokens": rows(ENC, (17, ENC))}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dpa_on_unpacked_rows_uses_key_lengths_and_equals_xla(arch, monkeypatch):
    """Unpacked rows reach jax.nn.dot_product_attention as key lengths and a
    causal flag (no [B, 1, Q, K] mask for cuDNN to fold into T5's bias)."""
    kw = dict(ARCHS[arch], scan_layers=True)
    xla_cfg = make_config(ENC, DEC, attention="xla", **kw)
    _, _, params = init(xla_cfg)
    batch = _unpacked_batch(arch, np.random.default_rng(2))
    tokens = batch["encoder_input_tokens" if arch == "encoder" else "decoder_input_tokens"]
    valid = tokens > 0
    ref_logits, ref_grads = _loss_and_grads(xla_cfg, params, batch, valid)

    masks, real = [], attention.for_dot_product
    monkeypatch.setattr(attention, "for_dot_product", lambda *a: masks.append(real(*a)) or masks[-1])
    logits, grads = _loss_and_grads(make_config(ENC, DEC, attention="dpa", **kw), params, batch, valid)
    assert masks and all(m.dense is None for m in masks)
    if arch != "decoder":  # the encoder's keys (and the cross-attention's) by length
        assert any(m.kv_lengths is not None and not m.causal for m in masks)
    if arch != "encoder":
        assert any(m.causal for m in masks)
    np.testing.assert_allclose(logits[valid], ref_logits[valid], atol=2e-5, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_key_lengths_count_valid_keys_and_never_zero():
    valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    m = attention.for_dot_product(attention.Masking(kv_valid=valid), 5, 5)
    assert m.dense is None and not m.causal
    np.testing.assert_array_equal(m.kv_lengths, [3, 5, 1])
    seg = jnp.ones((3, 5), jnp.int32)
    packed = attention.for_dot_product(attention.Masking(seg, seg, valid, causal=True), 5, 5)
    assert packed.kv_lengths is None and packed.dense.shape == (3, 1, 5, 5)
    prefix = attention.for_dot_product(attention.Masking(prefix=valid, causal=True), 5, 5)
    assert prefix.dense is not None


def test_auto_resolves_per_platform_and_explicit_kernels_refuse_the_wrong_one():
    assert attention.resolve("auto", jnp.bfloat16) == "xla"          # this CPU
    assert attention.resolve("auto", jnp.bfloat16, decode=True) == "xla"
    with pytest.raises(ValueError, match="model.attention=cudnn needs a CUDA GPU"):
        attention.resolve("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention=flash is a TPU kernel"):
        attention.resolve("flash", jnp.float32)
    config = make_config(attention="cudnn")
    model = models.build(config)
    with pytest.raises(ValueError, match="model.attention=cudnn"):
        model.init(jax.random.key(0), models.dummy_batch(config, 1))


def test_config_names_the_key():
    config = make_config()
    config.model.attention = "fused"
    with pytest.raises(ConfigError, match="model.attention"):
        validate(config)
    config.model.attention, config.model.dropout_rate = "dpa", 0.1
    with pytest.raises(ConfigError, match="model.attention"):
        validate(config)


def test_flash_under_a_mesh_runs_per_shard_and_equals_xla(monkeypatch):
    """Batch over fsdp, heads over tensor (shard_map): logits and gradients,
    the relative-bias table's summed over the batch shards, equal `xla`."""
    import flax.linen as nn
    from t5lab import sharding
    monkeypatch.setattr(attention, "FLASH_INTERPRET", True)
    kw = dict(ARCHS["encoder_decoder"], num_heads=4)
    xla_cfg = make_config(ENC, DEC, attention="xla", **kw)
    _, _, params = init(xla_cfg)
    batch = _packed_batch("encoder_decoder", np.random.default_rng(1))
    valid = _valid("encoder_decoder", batch)
    ref_logits, ref_grads = _loss_and_grads(xla_cfg, params, batch, valid)
    cfg = make_config(ENC, DEC, attention="flash", **kw)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 1, 2
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
        logits, grads = _loss_and_grads(cfg, params, sharded, valid)
    np.testing.assert_allclose(logits[valid], ref_logits[valid], atol=2e-5, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
