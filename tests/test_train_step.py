"""The sharded train step: every mesh computes the single-device numbers, and
gradient accumulation computes the full-batch numbers."""
import jax
import numpy as np
import pytest

from t5lab import config as config_lib, sharding
from t5lab.train_step import batch_spec, build_program, global_batch

STEPS = 3


def tiny(*overrides):
    return config_lib.load("configs/ul2.py:tiny", ["optim.warmup_steps=0", "model.num_layers=1",
                                                   "train.batch_size=8", *overrides])


def random_batches(config, n, seed=0):
    """Plausible packed rows: two segments per row, padding at the end."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = {}
        for name, length in batch_spec(config).items():
            rows = config.train.batch_size
            seg = np.where(np.arange(length) < length // 2, 1, 2)[None].repeat(rows, 0)
            seg[:, length - length // 8:] = 0
            if name.endswith("_tokens"):
                v = rng.integers(2, config.model.vocab_size, (rows, length))
                v[seg == 0] = 0
            elif name.endswith("segment_ids"):
                v = seg
            elif name.endswith("positions"):
                v = np.where(seg == 1, np.arange(length), np.arange(length) - length // 2) * (seg > 0)
            elif name.endswith("loss_weights"):
                v = (seg > 0).astype(np.int32)
            elif name == "denoiser_ids":
                v = rng.integers(0, 7, (rows, length))
            else:  # decoder_causal_attention: a prefix of 4 in each segment
                v = np.zeros((rows, length))
            b[name] = v.astype(np.int32)
        out.append(b)
    return out


def run_steps(config, devices, batches):
    mesh = sharding.make_mesh(config.mesh, devices)
    prog = build_program(config, mesh)
    return steps(prog, prog.init_state(jax.random.key(0)), batches)


def steps(prog, state, batches):
    """Per-step losses and the final host parameters."""
    losses = []
    for b in batches:
        state, m = prog.train_step(state, global_batch(b, prog.batch_sharding))
        losses.append(float(m["loss"]))
    return np.array(losses), jax.device_get(state["params"])


@pytest.fixture(scope="module")
def reference():
    config = tiny()
    batches = random_batches(config, 1) * STEPS  # one batch, so the loss must fall
    losses, params = run_steps(tiny("mesh.data=1"), jax.devices()[:1], batches)
    return batches, losses, params


@pytest.mark.parametrize("mesh", [
    ("mesh.data=8",),                                  # DP
    ("mesh.data=1", "mesh.fsdp=8"),                     # FSDP
    ("mesh.data=2", "mesh.tensor=4"),                   # DP + TP
])
def test_mesh_matches_single_device(reference, mesh):
    batches, ref_losses, _ = reference
    assert len(jax.devices()) == 8
    losses, _ = run_steps(tiny(*mesh), jax.devices(), batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    assert ref_losses[-1] < ref_losses[0]  # the steps did train


def test_tensor_parallel_only(reference):
    """Pure TP over 4 of the devices (the tiny model has 4 heads)."""
    batches, ref_losses, _ = reference
    losses, _ = run_steps(tiny("mesh.data=1", "mesh.tensor=4"), jax.devices()[:4], batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)


def test_microbatches_equal_full_batch(reference):
    batches, ref_losses, ref_params = reference
    losses, params = run_steps(tiny("mesh.data=1", "train.microbatches=4"), jax.devices()[:1], batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    # Adam divides by sqrt(v): where a gradient is near zero, summation-order
    # rounding (4 microbatches vs 1 batch) moves that element by up to ~lr per
    # step. So nearly every element must agree to 1e-5, and all to 1e-3.
    a = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(params)])
    b = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(ref_params)])
    assert np.mean(np.abs(a - b) > 1e-5) < 1e-3
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_params_are_sharded_as_declared():
    config = tiny("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4")
    prog = build_program(config, sharding.make_mesh(config.mesh))
    specs = {jax.tree_util.keystr(p): s.spec for p, s in
             jax.tree_util.tree_flatten_with_path(prog.state_shardings["params"])[0]}
    emb = [s for k, s in specs.items() if "token_embedder" in k][0]
    assert tuple(emb) == ("tensor", "fsdp")  # (vocab, embed)
    assert any("tensor" in tuple(s) for k, s in specs.items() if "mlp" in k or "wi" in k)
    # Adam moments follow their parameter.
    mu = [s for s in jax.tree_util.tree_leaves(prog.state_shardings["opt_state"])
          if hasattr(s, "spec") and tuple(s.spec) == ("tensor", "fsdp")]
    assert len(mu) >= 2


def test_cpu_steps_compile_without_ynnpack_fusions():
    """t5lab compiles CPU steps on XLA's Eigen path (train_step.CPU_COMPILER_OPTIONS)."""
    from t5lab.train_step import cpu_compiler_options
    if cpu_compiler_options() is None:
        pytest.skip("this XLA has no YNNPACK option")
    x = jax.numpy.ones((64, 64))
    if "ynn_fusion" not in jax.jit(lambda a: a @ a).lower(x).compile().as_text():
        pytest.skip("this XLA does not fuse with YNNPACK by default: nothing to switch off")
    config = tiny("mesh.data=1")
    prog = build_program(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    text = prog.lower_train().compile().as_text()
    assert " dot(" in text and "ynn_fusion" not in text
