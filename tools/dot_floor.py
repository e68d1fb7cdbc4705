"""The matmul floor of a compiled step: every dot in its optimised HLO, each
compiled and timed alone (best of `reps`) with the same operand shapes and
dimension numbers, times its count. A step can never run faster than this
sum unless its matmuls themselves get faster, so floor FLOPs / (floor time x
matmul peak) is the MFU it could reach if all other work were free.

The rest of the step is mostly memory-bound elementwise work and reductions.
`dot_bytes` splits XLA's bytes-accessed count into the dots' share and the
rest, and `stream_bandwidth` measures what one elementwise pass moves per
second here, so rest / bandwidth estimates that work's time at memory speed.
It is an estimate, not a bound: XLA counts a gather's or broadcast's whole
operand, and tensors that stay in cache move faster than the stream.
Used by tools/benchmark.py --dot-floor; run alone, it times the dots of one
optimised HLO module saved as text (e.g. XLA's --xla_dump_to files).
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time

_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8}
_SHAPE = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\), ([^\n]*)")


def _dims(text: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _dot_lines(hlo_text: str):
    """(operand dtype, lhs shape, rhs shape, dimension numbers, result bytes) of each dot."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = _SHAPE.match(line)
        if m:
            shapes[m.group(1)] = (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
    for line in hlo_text.splitlines():
        m = _DOT.match(line)
        if not m:
            continue
        (dtype, lhs), (_, rhs), rest = shapes[m.group(1)], shapes[m.group(2)], m.group(3)
        dn = ((_dims(rest, "lhs_contracting_dims"), _dims(rest, "rhs_contracting_dims")),
              (_dims(rest, "lhs_batch_dims"), _dims(rest, "rhs_batch_dims")))
        out_dtype, out_shape = _SHAPE.match(line).group(2, 3)
        out_bytes = _BYTES[out_dtype] * math.prod(int(d) for d in out_shape.split(",") if d)
        yield dtype, lhs, rhs, dn, out_bytes


def dots(hlo_text: str) -> collections.Counter:
    """{(dtype, lhs shape, rhs shape, dimension numbers): count} of the module's dots."""
    return collections.Counter(d[:4] for d in _dot_lines(hlo_text))


def dot_flops(lhs, rhs, dn) -> float:
    (lc, rc), (lb, _) = dn
    contracted = math.prod(lhs[i] for i in lc)
    batch = math.prod(lhs[i] for i in lb)
    free_l = math.prod(lhs) // (contracted * batch)
    free_r = math.prod(rhs) // (contracted * batch)
    return 2.0 * batch * free_l * free_r * contracted


def dot_bytes(hlo_text: str) -> float:
    """Bytes the module's dots read and write (both operands and the result),
    counted as XLA's cost analysis counts an instruction's bytes accessed."""
    return float(sum(_BYTES[dtype] * (math.prod(lhs) + math.prod(rhs)) + out
                     for dtype, lhs, rhs, _, out in _dot_lines(hlo_text)))


def stream_bandwidth(compiler_options=None, mib: int = 64, reps: int = 10) -> float:
    """Bytes per second one elementwise pass (read x, write x * a + b) moves over
    a float32 array of `mib` MiB: T5 small's large tensors here run from 24 MiB
    (attention scores) to 125 MiB (the logits)."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((mib * 256, 1024), jnp.float32)
    f = jax.jit(lambda v: v * 1.5 + 1.0).lower(x).compile(compiler_options=compiler_options)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def floor(hlo_text: str, compiler_options=None, reps: int = 5) -> dict:
    """Seconds and FLOPs of the module's dots, each timed alone."""
    import jax
    import jax.numpy as jnp
    seconds = flops = 0.0
    found = dots(hlo_text)
    for (dtype, lhs, rhs, dn), count in found.items():
        a, b = jnp.ones(lhs, _DTYPES[dtype]), jnp.ones(rhs, _DTYPES[dtype])
        f = jax.jit(lambda x, y, dn=dn: jax.lax.dot_general(x, y, dn)).lower(a, b).compile(
            compiler_options=compiler_options)
        f(a, b).block_until_ready()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t)
        seconds += best * count
        flops += dot_flops(lhs, rhs, dn) * count
    return {"dots": sum(found.values()), "seconds": seconds, "flops": flops}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: the floor of a tiny T5's train step, from XLA's dump of its compile:\n"
               "  XLA_FLAGS=--xla_dump_to=/tmp/hlo python tools/benchmark.py --config configs/t5_1_1.py:tiny \\\n"
               "      --compile-only --skip-extras\n"
               "  python tools/dot_floor.py /tmp/hlo/module_*.jit_train_step.cpu_after_optimizations.txt")
    ap.add_argument("hlo", help="an optimised HLO module as text (compiled.as_text(), or XLA's "
                                "*after_optimizations.txt dump)")
    ap.add_argument("--reps", type=int, default=5, help="timings of each dot; the best counts (default 5)")
    args = ap.parse_args(argv)
    try:
        with open(args.hlo) as f:
            hlo = f.read()
    except OSError as e:
        ap.error(f"{args.hlo}: {e.strerror}")
    if not dots(hlo):
        ap.error(f"{args.hlo}: no dot instructions (not an optimised HLO module?)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as tools/benchmark.py, whose steps it times
    f = floor(hlo, reps=args.reps)
    print(f"{f['dots']} dots, {f['flops'] / 1e9:.4g} GFLOP in {f['seconds'] * 1e3:.4g} ms "
          f"({f['flops'] / f['seconds'] / 1e9:.4g} GFLOP/s); they move {dot_bytes(hlo) / 2**20:.4g} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
