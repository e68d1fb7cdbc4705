"""The pure part of training: state layout, the sharded train and eval steps.

Nothing here touches files or the data pipeline: `TrainProgram` is built from a
config and a mesh and holds the compiled-on-first-call step functions, the
shardings of every state leaf and the abstract state that checkpoints restore
into. tools/aot_compile.py and tools/benchmark.py use it as is.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from t5lab import batch as contract, losses, models, optim, sharding


def decay_mask_fn(optim_cfg) -> Callable:
    """params -> bools: which leaves get decoupled weight decay. Matrices always;
    norms, relative-bias tables, embeddings and the head as configured."""
    def is_decayed(path: str) -> bool:
        if "norm" in path:
            return optim_cfg.decay_norms
        if "relpos" in path:
            return optim_cfg.decay_relpos
        if "token_embedder" in path or "lm_head" in path:
            return optim_cfg.decay_embeddings
        if path.endswith("bias"):
            return False
        return True

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: is_decayed("/".join(str(getattr(k, "key", k)) for k in p)), params)
    return mask


def batch_spec(config) -> dict[str, int]:
    """Feature name -> row length for the batches this config trains on."""
    d, arch = config.data, config.model.arch
    shapes = contract.shapes(arch, 1, d.inputs_length, d.targets_length)
    names = contract.features(arch, packed=d.pack, denoiser_ids=d.objective == "ul2")
    return {k: shapes[k][1] for k in names}


def schedule_batch_shape(config) -> tuple[int, int]:
    """(rows per step, tokens per row) for token-based schedules (optim.schedule=power),
    the tokens as tokens_per_s counts them."""
    d = config.data
    return config.train.batch_size, contract.row_tokens(config.model.arch, d.inputs_length, d.targets_length)


def num_denoisers(config) -> int:
    if config.data.objective != "ul2":
        return 0
    from t5lab.data.denoising import DENOISER_NAMES
    return len(DENOISER_NAMES)


@dataclass
class TrainProgram:
    config: Any
    mesh: jax.sharding.Mesh
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: Any
    abstract_state: Any
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    init_state: Callable
    jit_train: Any  # the raw jitted step, for lowering (AOT planning, benchmarks)

    def abstract_batch(self) -> dict:
        rows = self.config.train.batch_size
        return {k: jax.ShapeDtypeStruct((rows, n), jnp.int32, sharding=self.batch_sharding)
                for k, n in batch_spec(self.config).items()}

    def lower_train(self):
        """The train step lowered for abstract inputs: `.compile()` it for cost and
        memory analysis, on this machine's devices or on a TPU topology's."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return self.jit_train.lower(self.abstract_state, self.abstract_batch())


def build_program(config, mesh, total_steps: int | None = None) -> TrainProgram:
    rules = sharding.LOGICAL_AXIS_RULES
    model = models.build(config)
    m = config.model
    arch = m.arch
    tgt_name, w_name = contract.target_names(arch)
    n_den = num_denoisers(config)
    total_steps = total_steps or config.train.steps
    dropout = m.dropout_rate > 0

    dummy = models.dummy_batch(config, 1)

    def init_params(rng):
        return model.init({"params": rng, "dropout": rng}, dummy, deterministic=True)["params"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # The key is made inside the trace: an eager key would be placed on the
        # mesh, whose devices may be compile-only (tools/aot_compile.py).
        boxed = jax.eval_shape(lambda: init_params(jax.random.key(0)))
    param_specs = nn.get_partition_spec(boxed)
    # Scanned stacks: SOAP and Adafactor treat each layer's slice on its own.
    stacked = jax.tree_util.tree_map(lambda s: len(s) > 0 and s[0] == "layers", param_specs,
                                     is_leaf=lambda x: isinstance(x, P))
    tx, schedule = optim.make_optimizer(config.optim, total_steps, decay_mask_fn(config.optim),
                                        stacked_mask=stacked, batch_shape=schedule_batch_shape(config))
    param_sh = nn.logical_to_mesh_sharding(param_specs, mesh, rules)
    abstract_params = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), param_sh)
    repl = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = _opt_state_shardings(config.optim.name, abstract_opt, abstract_params, param_sh, mesh)
    abstract_opt = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt, opt_sh)
    state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh}
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
                      "params": abstract_params, "opt_state": abstract_opt}
    batch_sh = sharding.batch_sharding(mesh)

    def _init(rng):
        params = nn.unbox(init_params(rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def loss_sums(params, batch, rng):
        # Hidden states, not logits: the fused head + cross-entropy never lets
        # autodiff see the [tokens, vocab] logits (losses.head_cross_entropy_sums).
        hidden = model.apply({"params": params}, batch, deterministic=not dropout,
                             rngs={"dropout": rng} if dropout else {}, return_hidden=True)
        return losses.head_cross_entropy_sums(hidden, models.head_matrix(params, config),
                                              batch[tgt_name], batch[w_name], config.train.z_loss,
                                              batch.get("denoiser_ids"), n_den)

    def grads_and_sums(params, batch, rng):
        grad_fn = jax.grad(lambda p, b, r: (lambda s: (s["loss"], s))(loss_sums(p, b, r)),
                           has_aux=True)
        k = config.train.microbatches
        if k == 1:
            return grad_fn(params, batch, rng)
        micro = jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(
                x.reshape(k, x.shape[0] // k, *x.shape[1:]),
                NamedSharding(mesh, P(None, ("data", "fsdp")))), batch)

        def body(carry, xs):
            mb, i = xs
            g, s = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree_util.tree_map(jnp.add, carry, (g, s)), None

        zero_g = jax.tree_util.tree_map(jnp.zeros_like, params)
        zero_s = jax.tree_util.tree_map(jnp.zeros_like,
                                        jax.eval_shape(loss_sums, params, jax.tree_util.tree_map(
                                            lambda x: x[0], micro), rng))
        (g, s), _ = jax.lax.scan(body, (zero_g, zero_s), (micro, jnp.arange(k)))
        return g, s

    def batch_stats(batch):
        real = sum(jnp.sum(batch[f] != 0) for f in _token_features(arch))
        total = sum(batch[f].size for f in _token_features(arch))
        return real.astype(jnp.float32) / total

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.key(config.train.seed + 1), state["step"])
        grads, sums = grads_and_sums(state["params"], batch, rng)
        denom = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = _summarise(sums, n_den, config.train.z_loss)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # The checkpoint after this step holds `params`: a finite loss can hide
        # non-finite updates, so the loop checks the parameters themselves.
        metrics["params_finite"] = jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))
        metrics["lr"] = schedule(state["step"])
        metrics["nonpad_fraction"] = batch_stats(batch)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    def eval_step(params, batch):
        return loss_sums(params, batch, jax.random.key(0))

    def with_context(fn):
        def wrapped(*a):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(*a)
        return wrapped

    options = compiler_options(mesh)
    jit_train = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                        out_shardings=(state_sh, repl), donate_argnums=(0,), compiler_options=options)
    jit_eval = jax.jit(eval_step, in_shardings=(param_sh, batch_sh), out_shardings=repl,
                       compiler_options=options)
    jit_init = jax.jit(_init, out_shardings=state_sh)
    return TrainProgram(config=config, mesh=mesh, model=model, tx=tx, schedule=schedule,
                        state_shardings=state_sh, abstract_state=abstract_state,
                        batch_sharding=batch_sh, train_step=with_context(jit_train),
                        eval_step=with_context(jit_eval), init_state=with_context(jit_init),
                        jit_train=jit_train)


# XLA's CPU backend hands dots and elementwise ops to YNNPACK by default; its
# Eigen path was faster for the train step and for plain matmuls here
# (docs/performance.md has the measurements).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def cpu_compiler_options() -> dict | None:
    """CPU_COMPILER_OPTIONS, or None where this XLA rejects them by name (older
    versions have no YNNPACK)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(
            compiler_options=CPU_COMPILER_OPTIONS)
        return dict(CPU_COMPILER_OPTIONS)
    except Exception:  # noqa: BLE001  JaxRuntimeError: INVALID_ARGUMENT, unknown option
        return None


def compiler_options(mesh) -> dict | None:
    """XLA options for the steps compiled for `mesh`'s platform (None: XLA's own)."""
    return cpu_compiler_options() if mesh.devices.flat[0].platform == "cpu" else None


def _opt_state_shardings(name, abstract_opt, abstract_params, param_sh, mesh):
    """Optimizer state follows the parameters it belongs to: a leaf found under a
    parameter's key path with the parameter's shape takes its sharding; one with
    a dimension dropped (Adafactor's factored rows and columns) takes the rest;
    anything else (counts, (1,) placeholders) is replicated. SOAP's
    preconditioners are laid out by optim.soap_state_specs."""
    repl = sharding.replicated(mesh)
    if name == "soap":
        specs = optim.soap_state_specs(abstract_opt, jax.tree_util.tree_map(lambda s: s.spec, param_sh))
        return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                      is_leaf=lambda x: isinstance(x, P))
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        by_path[_keys(path)] = leaf.shape
    specs = {_keys(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def pick(path, leaf):
        keys = _keys(path)
        hit = next((keys[i:] for i in range(len(keys)) if keys[i:] in by_path), None)
        if hit is None:
            return repl
        shape = by_path[hit]
        spec = tuple(specs[hit]) + (None,) * (len(shape) - len(specs[hit]))
        if leaf.shape == shape:
            return NamedSharding(mesh, P(*spec))
        for i in range(len(shape)):
            if leaf.shape == shape[:i] + shape[i + 1:]:
                return NamedSharding(mesh, P(*(spec[:i] + spec[i + 1:])))
        return repl
    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _token_features(arch: str) -> tuple[str, ...]:
    if arch == "encoder_decoder":
        return ("encoder_input_tokens", "decoder_target_tokens")
    if arch == "decoder":
        return ("decoder_target_tokens",)
    return ("encoder_input_tokens",)


def _summarise(sums, n_den: int, z_coeff: float) -> dict:
    """Per-token means; `loss` is the cross-entropy alone, `z_loss` the added term."""
    w = jnp.maximum(sums["weight"], 1.0)
    out = {"loss": sums["ce"] / w, "z_loss": z_coeff * sums["z"] / w, "accuracy": sums["correct"] / w,
           "target_tokens": sums["weight"]}
    if n_den:
        out["denoiser_loss"] = sums["den_ce"] / jnp.maximum(sums["den_weight"], 1.0)
        out["denoiser_tokens"] = sums["den_weight"]
    return out


def global_batch(local: dict, batch_sh: NamedSharding) -> dict:
    """Per-process numpy rows -> one global jax.Array per feature."""
    return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v)) for k, v in local.items()}


def params_by_stack(params) -> dict[str, int]:
    """Matmul parameter counts per stack, for the model-FLOPs estimate."""
    out = {"encoder": 0, "decoder": 0, "head": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if leaf.ndim < 2 or "relpos" in name or re.search(r"token_embedder", name):
            continue
        if "lm_head" in name:
            out["head"] += leaf.size
        elif "decoder" in name:
            out["decoder"] += leaf.size
        else:
            out["encoder"] += leaf.size
    return out
