"""Optimizers see a scanned stack as its layers (issue 17): the same initial
parameters, trained by the real train program with model.scan_layers false and
true, give the same losses and parameters. The scanned layout is made from the
unscanned one by hf's converter, so both runs start from the same numbers, and
the unscanned run's results are compared in that layout too."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lab import checkpointing, config as config_lib, sharding
from t5lab.hf import _scan
from t5lab.train_step import build_program, decay_mask_fn
from test_train_step import random_batches, steps

STEPS = 5
# 2 layers per stack and tiny dims: one small program per optimizer and layout.
# eps 1e-6: a rotated (SOAP) or raw (Adam) coordinate whose gradient is rounding
# noise, e.g. along a softmax's invariant direction, is not scaled up to a full
# step, where the two layouts' different rounding would decide its sign.
TINY = ["model.num_layers=2", "model.d_model=16", "model.d_ff=32", "model.num_heads=4",
        "model.head_dim=4", "model.vocab_size=64", "model.relpos_buckets=8",
        "data.inputs_length=16", "data.targets_length=8", "train.batch_size=4",
        "optim.warmup_steps=0", "optim.schedule=constant", "optim.eps=1e-6", "mesh.data=1"]
OPTIMIZERS = {
    "adamw": [],
    "adafactor": [],
    # Preconditioners on the heads and kv dims (4) only: a 16 x 16 one here is
    # built from a near-singular square gradient, whose eigenvectors rounding
    # decides. A basis refresh (power iteration + QR) runs at steps 3 and 5.
    "soap": ["optim.soap_precondition_frequency=2", "optim.soap_max_precond_dim=4"],
}


def tiny(name, scan, *overrides):
    return config_lib.load("configs/ul2.py:tiny", [*TINY, f"optim.name={name}",
                                                   f"model.scan_layers={scan}",
                                                   *OPTIMIZERS[name], *overrides])


def _program(config):
    return build_program(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


def _random_params(abstract, seed=0):
    """Distinct random layers (no init program to compile): norm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return (1 + 0.1 * rng.normal(size=s.shape)).astype(s.dtype)
        return (0.3 * rng.normal(size=s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def train(config, params, batches):
    """Per-step losses and the final parameters, from host `params` in this config's layout."""
    prog = _program(config)
    sh = prog.state_shardings
    params = jax.device_put(params, sh["params"])
    state = {"step": jax.device_put(np.int32(0), sh["step"]), "params": params,
             "opt_state": jax.jit(prog.tx.init, out_shardings=sh["opt_state"])(params)}
    return steps(prog, state, batches)


@pytest.fixture(scope="module")
def start():
    config = tiny("adamw", False)
    return _random_params(_program(config).abstract_state["params"]), random_batches(config, STEPS)


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scanned_trains_as_unscanned(start, name):
    params, batches = start
    flat_losses, flat_params = train(tiny(name, False), params, batches)
    scan_losses, scan_params = train(tiny(name, True), _scan(params), batches)
    np.testing.assert_allclose(scan_losses, flat_losses, rtol=1e-5, atol=1e-5)
    got, want, init = _flat(scan_params), _flat(_scan(flat_params)), _flat(_scan(params))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # not vacuous: every stacked parameter moved well past the tolerance
    assert min(np.abs(want[k] - init[k]).max() for k in want if "layers" in k) > 1e-3


def _abstract_program(name, *overrides):
    """A scanned program big enough for Adafactor to factor ([128, 256] slices),
    on a 2 x 2 (fsdp, tensor) mesh; only traced, never compiled."""
    config = tiny(name, True, "model.d_model=128", "model.d_ff=256", "mesh.fsdp=2",
                  "mesh.tensor=2", *overrides)
    return build_program(config, sharding.make_mesh(config.mesh, jax.devices()[:4]))


def _optax_adafactor_state(prog):
    """The state optax.adafactor (what t5lab used before) builds for the program's params."""
    o, schedule = prog.config.optim, prog.schedule
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.adafactor(
        schedule, decay_rate=0.8, clipping_threshold=1.0, multiply_by_parameter_scale=True,
        factored=True, momentum=None, weight_decay_rate=lambda step: o.weight_decay * schedule(step),
        weight_decay_mask=decay_mask_fn(o)))
    return jax.eval_shape(tx.init, prog.abstract_state["params"])


def test_scanned_adafactor_state_keeps_its_layout_and_shardings():
    prog = _abstract_program("adafactor")
    state = prog.abstract_state["opt_state"]
    old = _optax_adafactor_state(prog)
    # the layout optax.adafactor gave scanned models (below 128 layers), so
    # their checkpoints restore; only the update is now per layer
    assert jax.tree.structure(state) == jax.tree.structure(old)
    assert jax.tree.map(lambda s: s.shape, state) == jax.tree.map(lambda s: s.shape, old)
    moments = prog.state_shardings["opt_state"][1][0]  # after clip_by_global_norm
    assert isinstance(moments, optax.FactoredState)
    wi = ("encoder", "layers", "mlp", "wi_0")
    get = lambda tree: tree[wi[0]][wi[1]][wi[2]][wi[3]]
    assert get(prog.abstract_state["params"]).shape == (2, 128, 256)
    layers, embed, mlp = tuple(get(prog.state_shardings["params"]).spec)
    # row and column moments keep the layer axis and follow the parameter's split
    assert get(state[1][0].v_row).shape == (2, 128)
    assert tuple(get(moments.v_row).spec) == (layers, embed)
    assert tuple(get(moments.v_col).spec) == (layers, mlp)
    assert (embed, mlp) == ("fsdp", "tensor")


def _zeros(abstract):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), abstract)


def test_checkpoint_of_another_optimizer_state_is_refused_by_name(tmp_path):
    prog = _abstract_program("adafactor")
    saved = {"step": np.int32(0), "params": _zeros(prog.abstract_state["params"]),
             "opt_state": _zeros(_optax_adafactor_state(prog))}
    ckpt_cfg = prog.config.checkpoint
    ckpt_cfg.async_save = False
    ckpts = checkpointing.Checkpoints(str(tmp_path), ckpt_cfg, save_data=False)
    ckpts.save(1, saved)
    ckpts.close()
    ckpts = checkpointing.Checkpoints(str(tmp_path), ckpt_cfg, save_data=False)
    # the old optax layout restores into today's Adafactor ...
    restored = ckpts.restore(1, prog.abstract_state)
    assert jax.tree.structure(restored) == jax.tree.structure(prog.abstract_state)
    # ... but into another optimizer's state it is refused, naming the cause,
    # before Orbax reports a tree or shape mismatch of its own
    with pytest.raises(checkpointing.CheckpointMismatch, match="optimizer state .*optim.name"):
        ckpts.restore(1, _abstract_program("adamw").abstract_state)
    ckpts.close()
