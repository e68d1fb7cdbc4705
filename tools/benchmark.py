r"""Measure t5lab's train step (and its data pipeline and checkpoints) on this machine.

    python tools/benchmark.py --config configs/t5_1_1.py:small --batch 16 --inputs 256 \
        --targets 64 --steps 5 [--json] [--config.KEY=VALUE ...]

The step runs on a plain (unpacked) span-corruption-shaped batch of exactly
--batch x (--inputs + --targets) tokens with random ids, AdamW and float32
unless overridden, one process: the same work as ../shared/bench's peers.
Reported as medians after warm-up: step time, tokens/s, XLA-counted FLOPs per
step, achieved FLOP/s and MFU against this machine's matmul peak (measured
just before and just after the back-to-back timed steps, averaged),
compile time and peak host memory. Two MFUs: `mfu` divides XLA's FLOP count
(every op the compiled step executes, elementwise included) and `model_mfu` the
model FLOPs (6 x matmul params x tokens + attention, t5lab.metrics), both by the
step time and the measured float32 matmul peak; plus, unless --skip-extras, the UL2 data
pipeline's packed tokens/s and an Orbax save and restore of the train state.
--dot-floor adds the step's matmul floor (tools/dot_floor.py): its dots timed
one by one: the step time and MFU if everything else were free; and the bytes
XLA counts for everything else, with this machine's streaming bandwidth: that
work's time if it ran at memory speed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--config.KEY=VALUE overrides one config key (schema: t5lab/config.py).\n\n"
               "example:\n  python tools/benchmark.py --config configs/t5_1_1.py:tiny --batch 8 --inputs 128 "
               "--targets 32 --steps 3 --skip-extras")
    p.add_argument("--config", default="configs/t5_1_1.py:small", help="FILE.py[:preset] (configs/*.py)")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--inputs", type=int, default=256, help="encoder tokens per row")
    p.add_argument("--targets", type=int, default=64, help="decoder tokens per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (data parallel)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--skip-extras", action="store_true", help="only the train step")
    p.add_argument("--compile-only", action="store_true",
                   help="stop after compiling: compile time, FLOPs, compiled memory")
    p.add_argument("--dot-floor", action="store_true",
                   help="also time each of the step's matmuls alone (tools/dot_floor.py): "
                        "the step time and MFU if everything else were free; and the other "
                        "work's bytes at this machine's streaming bandwidth")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)}")
    if args.dot_floor and args.devices != 1:
        p.error("--dot-floor: one device only (simulated devices share the same cores)")
    return args, [a[len("--config."):] for a in rest]


class MatmulPeak:
    """This machine's float32 matmul FLOP/s: the best of `reps` n x n products,
    compiled both with XLA's default CPU options and with the ones t5lab
    compiles its steps with (train_step.cpu_compiler_options()), so the peak is
    the faster of the two paths. Measured right before and right after the
    timed steps, because on a shared machine the FLOP/s on offer moves from
    minute to minute."""

    def __init__(self, n: int = 2048):
        import jax
        import jax.numpy as jnp
        from t5lab.train_step import cpu_compiler_options
        self.n = n
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        lowered = jax.jit(lambda x: x @ x).lower(self.a)
        paths = [None] + ([cpu_compiler_options()] if cpu_compiler_options() else [])
        self.fs = [lowered.compile(compiler_options=opts) for opts in paths]
        for f in self.fs:
            f(self.a).block_until_ready()

    def __call__(self, reps: int = 5) -> float:
        best = float("inf")
        for _ in range(reps):
            for f in self.fs:
                t = time.perf_counter()
                f(self.a).block_until_ready()
                best = min(best, time.perf_counter() - t)
        return 2 * self.n ** 3 / best


def random_batch(config, rows: int, seed: int = 0) -> dict:
    from t5lab.train_step import batch_spec
    rng = np.random.default_rng(seed)
    out = {}
    for name, length in batch_spec(config).items():
        if name.endswith("_tokens"):
            out[name] = rng.integers(2, config.model.vocab_size - 200, (rows, length), dtype=np.int32)
        else:  # loss weights (all targets count) and causal-attention flags
            out[name] = np.ones((rows, length), np.int32)
    return out


def has_loops(config) -> bool:
    """Whether the step runs its layers or microbatches in an XLA while loop."""
    return config.train.microbatches > 1 or bool(config.model.scan_layers)


def xla_flops(config, compiled) -> float:
    """XLA's FLOP count of one step. XLA's cost analysis counts a while loop's
    body once, so a step with gradient accumulation or scanned layers is counted
    on its loop-free twin (same math: microbatches=1, scan_layers=false),
    compiled (not only lowered: the count before optimisation can be several
    times the compiled one) but never run."""
    from t5lab import sharding
    from t5lab.train_step import build_program
    if not has_loops(config):
        cost = compiled.cost_analysis()
    else:
        twin = config.copy_and_resolve_references()
        twin.train.microbatches, twin.model.scan_layers = 1, False
        cost = build_program(twin, sharding.make_mesh(twin.mesh)).lower_train().compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def bench_compile(config) -> dict:
    from t5lab import sharding
    from t5lab.train_step import build_program
    prog = build_program(config, sharding.make_mesh(config.mesh))
    t0 = time.perf_counter()
    compiled = prog.lower_train().compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return {"compile_s": compile_s, "flops_per_step": xla_flops(config, compiled),
            "compiled_temp_gib": mem.temp_size_in_bytes / 2 ** 30,
            "peak_host_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def bench_step(config, steps: int) -> dict:
    import jax
    from t5lab import sharding
    from t5lab.train_step import build_program, global_batch

    mesh = sharding.make_mesh(config.mesh)
    prog = build_program(config, mesh)
    t0 = time.perf_counter()
    compiled = prog.lower_train().compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    try:
        temp_bytes = float(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        temp_bytes = float("nan")
    state = prog.init_state(jax.random.key(0))
    batch = global_batch(random_batch(config, config.train.batch_size), prog.batch_sharding)
    peak = MatmulPeak()
    peaks = [peak()]
    # Timed steps run back to back, as in training and as the peer times its own:
    # here a step that follows a different program (the peak's matmuls) ran
    # 10-25% slower than one that follows a step, so the peak is measured before
    # the warm-up step and after the timed ones, never between steps.
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    peaks.append(peak())
    from t5lab.train import _model_flops
    return {"step_s": float(np.median(times)), "times": times, "peaks": peaks,
            "compile_s": compile_s, "temp_bytes": temp_bytes,
            "model_flops": float(_model_flops(config, state["params"])),
            "flops_per_step": xla_flops(config, compiled), "loss": float(m["loss"]),
            "bytes_per_step": float(cost.get("bytes accessed", float("nan"))),
            "nonpad_fraction": float(m["nonpad_fraction"]), "state": state, "prog": prog,
            "compiled": compiled}


def bench_data(config, seconds: float = 10.0) -> float:
    """Packed UL2 tokens per second through the whole pipeline, this process."""
    from t5lab.data import pipeline, tokenizer
    path = tokenizer.resolve(config)
    it = iter(pipeline.make_dataset(config, "train", tokenizer_path=path))
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += sum(v.size for k, v in b.items() if k in ("encoder_input_tokens", "decoder_target_tokens"))
    return n / (time.perf_counter() - t0)


def bench_checkpoint(state, prog) -> tuple[float, float]:
    import orbax.checkpoint as ocp
    import jax
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "state")
        with ocp.StandardCheckpointer() as c:
            t = time.perf_counter()
            c.save(path, state)
            c.wait_until_finished()
            save_s = time.perf_counter() - t
            t = time.perf_counter()
            restored = c.restore(path, prog.abstract_state)
            jax.block_until_ready(restored)
            restore_s = time.perf_counter() - t
    return save_s, restore_s


def main(argv=None):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before the re-exec, which applies to CPU runs only
    if argv is None:  # a fresh process: huge-page-backed malloc (t5lab/hostenv.py)
        from t5lab import hostenv
        hostenv.reexec_with_hugepages()
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    from t5lab import config as config_lib
    # The peer's optimizer is plain optax.adamw: no gradient clipping (ours clips
    # by default; --config.optim.clip_norm=1.0 puts it back, +~0.3 GF per step).
    base = ["optim.name=adamw", "optim.clip_norm=0", "model.dtype=float32", "data.objective=span_corruption",
            "data.pack=false", "model.dropout_rate=0.0",
            f"train.batch_size={args.batch}", f"data.inputs_length={args.inputs}",
            f"data.targets_length={args.targets}"]
    config = config_lib.load(args.config, base + overrides)
    if args.dot_floor and has_loops(config):
        sys.exit("--dot-floor times each matmul of the compiled step once, so it needs a "
                 "step without loops: train.microbatches=1 and model.scan_layers=false "
                 f"(got {config.train.microbatches} and {config.model.scan_layers})")
    import jax

    if args.compile_only:
        out = {"config": args.config, "overrides": overrides, **bench_compile(config)}
        print(json.dumps(out) if args.json else out)
        return
    r = bench_step(config, args.steps)
    peak = float(np.mean(r["peaks"]))  # before and after the timed steps
    per_flop = 1 / (r["step_s"] * peak * jax.device_count())
    tokens = args.batch * (args.inputs + args.targets)
    out = {
        "config": args.config, "overrides": overrides, "devices": jax.device_count(),
        "batch": args.batch, "inputs": args.inputs, "targets": args.targets,
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(r["state"]["params"]))),
        "step_s": r["step_s"], "tokens_per_s": tokens / r["step_s"],
        "nonpad_tokens_per_s": tokens * r["nonpad_fraction"] / r["step_s"],
        "flops_per_step": r["flops_per_step"],
        "achieved_flops_per_s": r["flops_per_step"] / r["step_s"],
        "matmul_peak_flops_per_s": peak,
        "step_times_s": [round(t, 3) for t in r["times"]],
        "matmul_peaks_flops_per_s": r["peaks"],
        "mfu": r["flops_per_step"] * per_flop,
        "model_flops_per_step": r["model_flops"],
        "model_mfu": r["model_flops"] * per_flop,
        "compiled_temp_gib": r["temp_bytes"] / 2 ** 30,
        "compile_s": r["compile_s"],
        "peak_host_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "loss": r["loss"],
        "hugepage_malloc": "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""),
    }
    if args.dot_floor:
        import dot_floor
        from t5lab.train_step import compiler_options
        hlo, opts = r["compiled"].as_text(), compiler_options(r["prog"].mesh)
        f = dot_floor.floor(hlo, opts)
        out["dot_floor_s"] = f["seconds"]
        out["dot_floor_gflop"] = f["flops"] / 1e9
        out["dot_floor_mfu"] = r["flops_per_step"] / (f["seconds"] * peak)
        other = r["bytes_per_step"] - dot_floor.dot_bytes(hlo)
        bandwidth = dot_floor.stream_bandwidth(opts)
        out["nonmatmul_gbytes"] = other / 1e9
        out["stream_gbytes_per_s"] = bandwidth / 1e9
        out["nonmatmul_at_stream_s"] = other / bandwidth
        # Matmuls at their own speed plus the rest at memory speed: about what
        # the step costs as XLA fuses it, and the MFU that fusion allows.
        out["dot_floor_plus_stream_s"] = f["seconds"] + other / bandwidth
        out["dot_floor_plus_stream_mfu"] = r["flops_per_step"] / (out["dot_floor_plus_stream_s"] * peak)
    if not args.skip_extras:
        data_cfg = config_lib.load(args.config, [
            "data.objective=ul2", f"data.inputs_length={args.inputs}",
            f"data.targets_length={args.targets}", f"train.batch_size={args.batch}"] + overrides)
        out["data_tokens_per_s"] = bench_data(data_cfg)
        out["checkpoint_save_s"], out["checkpoint_restore_s"] = bench_checkpoint(r["state"], r["prog"])
    if args.json:
        print(json.dumps(out))
        return
    width = max(len(k) for k in out)
    for k, v in out.items():
        text = f"{v:,.4g}" if isinstance(v, float) else (
            ", ".join(f"{x:,.4g}" for x in v) if isinstance(v, list) and v and isinstance(v[0], float) else str(v))
        print(f"{k:<{width}}  {text}")


if __name__ == "__main__":
    main()
