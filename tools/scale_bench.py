"""Scale behaviour of the train step, each point in its own process (so peak host
memory is that point's): step time against sequence length and model size,
compile time of a deep model with and without scan over layers, and memory with
and without remat. Prints a markdown table per study (--json: JSON lines).

    python tools/scale_bench.py [--only seq,size,scan,remat] [--steps 2]

  seq    T5 v1.1 small, --seq-batch rows, inputs 256..2048, targets = inputs / 4
  size   tiny / small / base, batch 16, inputs 256, targets 64
  scan   24 + 24 layers (small widths), compile only, scan_layers false / true
  remat  small, batch 16, inputs 256, targets 64, remat_policy none / full (run), and
         the same with scan_layers=true (compile only: compiled temp memory)
flops_per_step of scanned points is the whole step's: XLA counts a loop body
once, so tools/benchmark.py counts them on the step compiled without scan.
All float32 AdamW on an unpacked span-corruption-shaped batch, via tools/benchmark.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(args: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    cmd = [sys.executable, os.path.join(HERE, "benchmark.py"), "--json", "--skip-extras", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def studies(a):
    steps = ["--steps", str(a.steps)]
    if "seq" in a.only:
        for n in (256, 512, 1024, 2048):
            yield "seq", f"inputs {n} + targets {n // 4}", run(
                ["--config", "configs/t5_1_1.py:small", "--batch", str(a.seq_batch), "--inputs", str(n),
                 "--targets", str(n // 4), *steps])
    if "size" in a.only:
        for size in ("tiny", "small", "base"):
            yield "size", size, run(["--config", f"configs/t5_1_1.py:{size}", "--batch", "16",
                                     "--inputs", "256", "--targets", "64", *steps])
    if "scan" in a.only:
        for scan in ("false", "true"):
            yield "scan", f"24+24 layers, scan_layers={scan}", run(
                ["--config", "configs/t5_1_1.py:small", "--batch", "16", "--inputs", "256",
                 "--targets", "64", "--compile-only", "--config.model.num_layers=24",
                 f"--config.model.scan_layers={scan}"])
    if "remat" in a.only:
        for policy in ("none", "full"):
            yield "remat", f"remat_policy={policy}", run(
                ["--config", "configs/t5_1_1.py:small", "--batch", "16", "--inputs", "256",
                 "--targets", "64", *steps, f"--config.model.remat_policy={policy}"])
        # Unrolled layers let XLA:CPU's scheduler keep most activations anyway; the
        # scanned stack is where remat pays (compiled temp memory, compile only).
        for policy in ("none", "full"):
            yield "remat", f"scan_layers=true, remat_policy={policy} (compile only)", run(
                ["--config", "configs/t5_1_1.py:small", "--batch", "16", "--inputs", "256",
                 "--targets", "64", "--compile-only", "--config.model.scan_layers=true",
                 f"--config.model.remat_policy={policy}"])


COLUMNS = ("step_s", "tokens_per_s", "flops_per_step", "mfu", "compile_s", "compiled_temp_gib",
           "peak_host_mem_gib")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python tools/scale_bench.py --only size --steps 3 --json")
    p.add_argument("--only", default="seq,size,scan,remat", help="comma-separated studies to run (default all)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per point (default 2)")
    p.add_argument("--seq-batch", type=int, default=4, help="rows per step in the seq study (default 4)")
    p.add_argument("--json", action="store_true", help="a JSON line per point instead of tables")
    a = p.parse_args()
    a.only = set(a.only.split(","))
    current = None
    for study, label, r in studies(a):
        if a.json:
            print(json.dumps({"study": study, "point": label, **r}), flush=True)
            continue
        if study != current:
            current = study
            print(f"\n### {study}\n\n| point | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|")
        cells = [(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))) for c in COLUMNS]
        print(f"| {label} | " + " | ".join(cells) + (f" {r['error']}" if "error" in r else "") + " |",
              flush=True)


if __name__ == "__main__":
    main()
