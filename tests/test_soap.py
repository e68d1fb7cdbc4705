"""SOAP against the reference (pytorch_optimizer.SOAP, which follows
nikhilvyas/SOAP), under sharding, and its argument checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pytorch_optimizer import SOAP as ReferenceSOAP

from t5lab.optim import optimizer_state_bytes, scale_by_soap, soap, soap_state_specs

MAX_DIM = 12  # wbig's 16 columns stay unpreconditioned


# The first eigenbasis comes from one gradient. Where that leaves L or R
# rank-deficient, the basis of its null space is arbitrary (rounding decides)
# and two correct implementations part ways. So every preconditioned matrix is
# square or has each dim <= the product of the others (w3d: 4x3x12, merged
# 12x12), wbig's long dim is unpreconditioned, and the 1-D bias (rank-1 g g^T)
# gets a zero first gradient, whose eigenbasis is the (reversed) identity.
def _init_params(rng):
    shapes = {"w2d": (6, 6), "b": (6,), "w3d": (4, 3, 12), "wbig": (12, 16), "stack": (2, 6, 6)}
    return {k: rng.normal(0, 0.4, s) for k, s in shapes.items()}


def _loss(params, x, y1, y2):
    h = jnp.tanh(x @ params["w2d"] + params["b"])
    z = jnp.tanh(jnp.einsum("bi,bj,ijk->bk", x[:, :4], h[:, :3], params["w3d"]))
    out = z @ params["wbig"]
    extra = jnp.tanh(h @ params["stack"][0]) * (x @ params["stack"][1])  # every column of h matters
    return jnp.mean((out - y1) ** 2) + jnp.mean((extra - y2) ** 2)


def _grads(grad_fn, params, step, batch):
    grads = jax.tree.map(np.asarray, grad_fn(params, *batch))
    if step == 0:
        grads["b"] = np.zeros_like(grads["b"])
    return grads


def _batches(steps, rng):
    # a fresh batch per step: on a fixed batch the first real step would see the
    # gradient the eigenbasis was built from, and compare rounding noise
    teacher1, teacher2 = rng.normal(size=(6, 16)), rng.normal(size=(6, 6))
    for _ in range(steps):
        x = rng.normal(size=(64, 6))
        yield x, np.sin(x @ teacher1), np.cos(x @ teacher2)


def _run_ours(params, batches, grad_fn, **kw):
    tx = soap(**kw, stacked_mask={k: k == "stack" for k in params})
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    trajectory = []
    for t, batch in enumerate(batches):
        params, state = step(params, state, _grads(grad_fn, params, t, batch))
        trajectory.append(jax.tree.map(np.asarray, params))
    return trajectory


def _apply(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _run_reference(params, batches, grad_fn, merge_dims, **kw):
    # the stack's slices are separate matrices to the reference; 1-D params go
    # in a group without merge_dims, which the reference cannot reshape
    tensors = {k: torch.tensor(v) for k, v in params.items() if k != "stack"}
    tensors["stack0"], tensors["stack1"] = (torch.tensor(params["stack"][i]) for i in range(2))
    multi = [t for t in tensors.values() if t.dim() > 1]
    groups = [{"params": multi, "merge_dims": merge_dims}, {"params": [tensors["b"]], "merge_dims": False}]
    opt = ReferenceSOAP(groups, **kw)
    trajectory = []
    for t, batch in enumerate(batches):
        current = {k: t.numpy() for k, t in tensors.items() if not k.startswith("stack")}
        current["stack"] = np.stack([tensors["stack0"].numpy(), tensors["stack1"].numpy()])
        grads = _grads(grad_fn, current, t, batch)
        for k, t in tensors.items():
            t.grad = torch.tensor(grads["stack"][int(k[-1])] if k.startswith("stack") else grads[k])
        opt.step()
        snapshot = {k: t.numpy().copy() for k, t in tensors.items() if not k.startswith("stack")}
        snapshot["stack"] = np.stack([tensors["stack0"].numpy(), tensors["stack1"].numpy()])
        trajectory.append(snapshot)
    return trajectory


@pytest.mark.parametrize("variant", [
    dict(),
    dict(precondition_1d=True, shampoo_beta=0.9, normalize_grads=True),
    dict(merge_dims=True, b1=0.9, b2=0.99, weight_decay=0.1),
])
def test_trajectory_matches_reference_in_float64(variant):
    kw = dict(learning_rate=3e-3, b1=0.95, b2=0.95, weight_decay=0.01, precondition_frequency=10,
              max_precond_dim=MAX_DIM, precondition_1d=False, merge_dims=False,
              normalize_grads=False, shampoo_beta=-1.0)
    kw.update(variant)
    steps = 30
    with jax.enable_x64(True):
        grad_fn = jax.jit(jax.grad(_loss))
        params = _init_params(np.random.default_rng(0))
        ours = _run_ours(params, _batches(steps, np.random.default_rng(1)), grad_fn, **kw)
        reference = _run_reference(
            params, _batches(steps, np.random.default_rng(1)), grad_fn, merge_dims=kw["merge_dims"],
            lr=kw["learning_rate"], betas=(kw["b1"], kw["b2"]),
            shampoo_beta=None if kw["shampoo_beta"] < 0 else kw["shampoo_beta"],
            weight_decay=kw["weight_decay"], precondition_frequency=kw["precondition_frequency"],
            max_precondition_dim=MAX_DIM, precondition_1d=kw["precondition_1d"],
            normalize_gradient=kw["normalize_grads"], eps=1e-8)
    assert ours[0]["w2d"].dtype == np.float64
    # step 1 only builds the preconditioner: nothing moves, decay included
    for k in params:
        np.testing.assert_array_equal(ours[0][k], params[k])
    for t, (a, b) in enumerate(zip(ours, reference)):
        for k in params:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=f"step {t + 1} {k}")
    moved = max(np.abs(ours[-1][k] - params[k]).max() for k in params)
    assert moved > 1e-2, "the comparison is vacuous if nothing moved"


def test_sharded_step_equals_single_device():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("fsdp", "tensor"))
    rng = np.random.default_rng(0)
    # full-rank statistics from the first gradient (see _init_params)
    params = {"w": rng.normal(size=(8, 8)), "stack": rng.normal(size=(2, 8, 8)),
              "bias": rng.normal(size=(16,)), "w3": rng.normal(size=(4, 8, 12))}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    specs = {"w": P("fsdp", "tensor"), "stack": P(None, "fsdp", "tensor"), "bias": P("tensor"),
             "w3": P(None, "fsdp", "tensor")}
    tx = soap(1e-2, precondition_frequency=3, precondition_1d=True,
              stacked_mask={"w": False, "stack": True, "bias": False, "w3": False})
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(8)]
    grads[0]["bias"] = jnp.zeros_like(grads[0]["bias"])

    def run(step, params, state):
        for g in grads:
            params, state = step(params, state, g)
        return params, state

    single = run(jax.jit(lambda p, s, g: _apply(tx, p, s, g)), params, tx.init(params))

    to_sharding = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree,
                                            is_leaf=lambda x: isinstance(x, P))
    param_sh = to_sharding(specs)
    state_sh = to_sharding(soap_state_specs(jax.eval_shape(tx.init, params), specs))
    sharded_step = jax.jit(lambda p, s, g: _apply(tx, p, s, g),
                           in_shardings=(param_sh, state_sh, param_sh), out_shardings=(param_sh, state_sh))
    sharded_params = jax.device_put(params, param_sh)
    sharded_state = jax.jit(tx.init, out_shardings=state_sh)(sharded_params)
    sharded = run(sharded_step, sharded_params, sharded_state)

    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    soap_state = sharded[1][0]
    # preconditioners split by rows like the parameter's dims
    assert soap_state.leaves["w"].gg[0].sharding.spec == P("fsdp", None)
    assert soap_state.leaves["w"].gg[1].sharding.spec == P("tensor", None)
    assert soap_state.leaves["stack"].q[1].sharding.spec == P(None, "tensor", None)
    assert soap_state.leaves["bias"].gg[0].sharding.spec == P("tensor", None)


def test_state_bytes_counts_moments_and_preconditioners():
    params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros((6,))}
    report = optimizer_state_bytes(soap(1e-3), params)
    floats = 2 * 24 + 2 * (16 + 36) + 2 * 6   # moments, L/R + bases for w; moments for b
    int_counters = 2                          # scale_by_soap + learning-rate step counts
    assert report["state_bytes"] == 4 * floats + 4 * int_counters
    assert report["param_bytes"] == 4 * 30


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(eps=0.0), "eps"),
    (dict(max_precond_dim=0), "max_precond_dim"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(shampoo_beta=1.0), "shampoo_beta"),
])
def test_bad_hyperparameters_raise_at_build_time(kwargs, name):
    with pytest.raises(ValueError, match=name):
        soap(**{"learning_rate": 1e-3, **kwargs})


def test_scale_by_soap_has_no_learning_rate_or_decay():
    params = {"w": jnp.ones((3, 3))}
    tx = scale_by_soap()
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.zeros((3, 3))}, state)
    updates, state = tx.update({"w": jnp.zeros((3, 3))}, state)
    np.testing.assert_array_equal(updates["w"], 0.0)


def _dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in a jaxpr, sub-jaxprs (cond branches) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _dot_precisions(sub)
    return found


def test_preconditioner_matmuls_run_at_highest_precision():
    # Default precision is one bf16 pass on TPU and TF32 on GPU, while CPU
    # computes float32 regardless: so the traced program itself is checked.
    params = {"w": jnp.ones((6, 5)), "w3": jnp.ones((4, 3, 6)), "stack": jnp.ones((2, 6, 6)),
              "b": jnp.ones((6,))}
    tx = scale_by_soap(precondition_1d=True, merge_dims=True, max_precond_dim=12,
                       stacked_mask={"w": False, "w3": False, "stack": True, "b": False})
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state).jaxpr
    precisions = _dot_precisions(jaxpr)
    # outer products (both branches), projections and the refresh's L Q
    assert len(precisions) >= 20
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(p == highest for p in precisions), set(precisions)
