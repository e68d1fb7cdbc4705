"""SOAP against AdamW: steps to a target loss on a small MLP, and the cost of
one update on T5 v1.1 small's parameter shapes. Prints markdown tables.

    python tools/soap_vs_adamw.py                  # ~2-3 minutes on 2 CPU cores
    python tools/soap_vs_adamw.py --steps 600 --lrs 1e-3,3e-3,1e-2 --t5-steps 20

Task: a fixed random teacher MLP labels Gaussian inputs into 10 classes; the
student (64-256-256-10, GELU) trains on a fresh batch each step, the same
stream for every run. Each optimizer gets the best learning rate of a small
sweep (fewest steps to the target held-out loss, then lowest final loss).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5lab.optim import optimizer_state_bytes, soap

IN, HIDDEN, CLASSES = 64, 256, 10


def teacher_labels(x, teacher):
    return jnp.argmax(jnp.tanh(x @ teacher[0]) @ teacher[1], axis=-1)


def init_student(key):
    k1, k2, k3 = jax.random.split(key, 3)
    dense = lambda k, i, o: jax.random.normal(k, (i, o)) / np.sqrt(i)
    return {"w1": dense(k1, IN, HIDDEN), "b1": jnp.zeros(HIDDEN),
            "w2": dense(k2, HIDDEN, HIDDEN), "b2": jnp.zeros(HIDDEN),
            "w3": dense(k3, HIDDEN, CLASSES), "b3": jnp.zeros(CLASSES)}


def loss_fn(params, x, y):
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    h = jax.nn.gelu(h @ params["w2"] + params["b2"])
    logits = h @ params["w3"] + params["b3"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_optimizer(name, lr, total_steps):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, total_steps // 20, total_steps, lr * 0.1)
    if name == "adamw":
        return optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.01)
    return soap(schedule, b1=0.95, b2=0.95, weight_decay=0.01, precondition_frequency=10)


def train(name, lr, steps, batch, eval_every, target, seed=0):
    """Returns (first step whose held-out loss <= target or None, final loss, s/step)."""
    key = jax.random.PRNGKey(seed)
    tkey, skey, ekey, dkey = jax.random.split(key, 4)
    teacher = (jax.random.normal(tkey, (IN, 64)) * 1.5 / np.sqrt(IN),
               jax.random.normal(jax.random.fold_in(tkey, 1), (64, CLASSES)))
    x_eval = jax.random.normal(ekey, (2048, IN))
    y_eval = teacher_labels(x_eval, teacher)
    tx = make_optimizer(name, lr, steps)
    params = init_student(skey)
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        x = jax.random.normal(jax.random.fold_in(dkey, i), (batch, IN))
        grads = jax.grad(loss_fn)(params, x, teacher_labels(x, teacher))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    eval_loss = jax.jit(loss_fn)
    params, state = step(params, state, 0)   # compile outside the clock
    jax.block_until_ready(params)
    reached, elapsed, loss = None, 0.0, float("nan")
    for i in range(1, steps):
        start = time.perf_counter()
        params, state = step(params, state, i)
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - start
        if (i + 1) % eval_every == 0 or i == steps - 1:
            loss = float(eval_loss(params, x_eval, y_eval))
            if reached is None and loss <= target:
                reached = i + 1
    return reached, loss, elapsed / (steps - 1)


def t5_small_shapes(vocab=32128, d=512, inner=384, ff=1024, layers=8, buckets=32, heads=6):
    """T5 v1.1 small's parameter shapes (untied head, gated GELU, no biases)."""
    attn = lambda: {"q": (d, inner), "k": (d, inner), "v": (d, inner), "o": (inner, d)}
    mlp = {"wi_0": (d, ff), "wi_1": (d, ff), "wo": (ff, d)}
    enc = {f"layer_{i}": {"attn": attn(), "mlp": dict(mlp), "norm_attn": (d,), "norm_mlp": (d,)}
           for i in range(layers)}
    dec = {f"layer_{i}": {"self": attn(), "cross": attn(), "mlp": dict(mlp),
                          "norm_self": (d,), "norm_cross": (d,), "norm_mlp": (d,)}
           for i in range(layers)}
    return {"embedding": (vocab, d), "lm_head": (d, vocab),
            "encoder": {**enc, "final_norm": (d,), "relpos": (buckets, heads)},
            "decoder": {**dec, "final_norm": (d,), "relpos": (buckets, heads)}}


def time_update(tx, shapes, steps, memory_shapes):
    """Mean seconds of one jitted update + apply on random grads, after compiling
    and the first call (SOAP's preconditioner-only step); `steps` should cover
    one eigenbasis refresh so its cost is amortized."""
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    key = jax.random.PRNGKey(0)
    params = jax.tree.map(lambda s: 0.02 * jax.random.normal(key, s), shapes, is_leaf=is_shape)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)

    @jax.jit  # grads as an argument: closed over, they would become huge constants
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = update(params, state, grads)
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(steps):
        params, state = update(params, state, grads)
    jax.block_until_ready(params)
    seconds = (time.perf_counter() - start) / steps
    memory = optimizer_state_bytes(tx, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                                    memory_shapes, is_leaf=is_shape))
    return seconds, memory


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python tools/soap_vs_adamw.py --steps 100 --lrs 1e-2 --t5-steps 0")
    ap.add_argument("--steps", type=int, default=300, help="MLP training steps per run (default 300)")
    ap.add_argument("--batch", type=int, default=128, help="MLP batch size (default 128)")
    ap.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="comma-separated sweep, same for both")
    ap.add_argument("--target", type=float, default=0.8, help="held-out cross-entropy to reach")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between held-out losses (default 10)")
    ap.add_argument("--t5-steps", type=int, default=3, help="timed T5-small updates (0 skips)")
    ap.add_argument("--t5-layers", type=int, default=1,
                    help="layers per stack in the timed pytree (8 is T5-small; memory always uses 8)")
    args = ap.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]

    print(f"## Small MLP ({IN}-{HIDDEN}-{HIDDEN}-{CLASSES}), batch {args.batch}, {args.steps} steps, "
          f"target held-out loss {args.target}\n")
    print("| optimizer | lr | steps to target | final loss | ms/step |")
    print("|---|---|---|---|---|")
    best = {}
    for name in ("adamw", "soap"):
        for lr in lrs:
            reached, loss, sec = train(name, lr, args.steps, args.batch, args.eval_every, args.target)
            print(f"| {name} | {lr:g} | {reached if reached else '-'} | {loss:.4f} | {sec * 1e3:.2f} |",
                  flush=True)
            rank = (reached if reached else float("inf"), loss)
            if name not in best or rank < best[name][0]:
                best[name] = (rank, lr, reached, loss, sec)
    print("\n**Tuned:** " + "; ".join(
        f"{n} lr={b[1]:g}: {b[2] if b[2] else 'not reached'} steps, final {b[3]:.4f}, {b[4] * 1e3:.2f} ms/step"
        for n, b in best.items()))

    if args.t5_steps > 0:
        shapes = t5_small_shapes(layers=args.t5_layers)
        print(f"\n## One update on T5 v1.1 small shapes, {args.t5_layers} layer(s) per stack timed "
              f"(memory: all 8) (mean of {args.t5_steps} steps, jit, "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s))\n")
        print("| optimizer | s/update | state MiB | params MiB | state / params |")
        print("|---|---|---|---|---|")
        rows = {}
        for name, tx in (("adamw", optax.adamw(1e-3, weight_decay=0.01)),
                         ("soap", soap(1e-3, precondition_frequency=10))):
            rows[name] = time_update(tx, shapes, args.t5_steps, t5_small_shapes())
            sec, mem = rows[name]
            print(f"| {name} | {sec:.3f} | {mem['state_bytes'] / 2**20:.0f} | "
                  f"{mem['param_bytes'] / 2**20:.0f} | {mem['ratio']:.2f} |", flush=True)
        (a_sec, a_mem), (s_sec, s_mem) = rows["adamw"], rows["soap"]
        print(f"\nSOAP overhead vs AdamW: {s_sec / a_sec:.1f}x update time, "
              f"+{(s_mem['state_bytes'] - a_mem['state_bytes']) / 2**20:.0f} MiB state "
              f"({s_mem['state_bytes'] / a_mem['state_bytes']:.2f}x).")


if __name__ == "__main__":
    main()
