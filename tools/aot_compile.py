r"""Plan a TPU run from a CPU machine: compile t5lab's real train step for a TPU
slice with libtpu's compile-only devices and report, per chip, what it costs.

    python tools/aot_compile.py --config configs/t5_1_1.py:xl --topology v5p:4x4x4 \
        [--mesh fsdp=-1,tensor=4] [--search] [--json FILE] [--config.KEY=VALUE ...]

Topologies are libtpu's names: v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB (chips per
dimension, e.g. v5e:4x4 is a v5litepod-16). --mesh sets config.mesh (axes left
out are 1; one may be -1). --search compiles every sensible mesh (tensor 1..8
dividing the heads, data x fsdp splitting the rest and the batch) whose train
state can fit, and prints them ranked: fitting first, then by step time; with
--mesh too, the axes it names stay fixed (--search --mesh data=1 tries only
the fsdp x tensor splits).

    python tools/aot_compile.py --rank FILE

ranks the rows that earlier runs appended to a --json FILE, per topology and
config, as --search does: a search split into separate jobs (one --mesh each,
on several machines or over several days) and ranked at the end.

Per chip: parameter and optimizer-state bytes (from the state's shardings),
XLA's temporary bytes, peak HBM (arguments + outputs not aliased to them +
temporaries + code) against the chip's capacity, FLOPs per step as XLA counts
them (including rematerialisation), XLA's estimated step time
(cost_analysis()["optimal_seconds"], a roofline over its own per-chip peaks;
never below the floor: the FLOPs the step must execute, at the chips' peak)
and the MFU it implies: model FLOPs (6 x params x tokens + attention, no
recompute) / (step time x chips x peak bf16 FLOP/s).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# --help prints this, then the docstring: the arguments are t5lab's own
# (config.parse_args, as `t5lab train` takes them), so argparse cannot list them.
OPTIONS = """\
usage: python tools/aot_compile.py --config FILE.py[:preset] --topology GEN:DIMS [--mesh AXIS=N,...]
           [--search] [--json FILE] [--config.KEY=VALUE ...]
       python tools/aot_compile.py --rank FILE

options:
  --config FILE.py[:preset]  the run to plan: a config file and preset (configs/*.py)
  --config.KEY=VALUE         override one config key (schema: t5lab/config.py)
  --topology GEN:DIMS        the TPU slice: v4:AxBxC, v5e:AxB, v5p:AxBxC or v6e:AxB
  --mesh AXIS=N,...          config.mesh for the compile, axes data, fsdp, tensor (left out: 1;
                             one may be -1); with --search, the axes that stay fixed
  --search                   compile every sensible mesh that can fit and rank them
  --json FILE                append each compiled mesh's row to FILE (JSON lines)
  --rank FILE                rank the rows of earlier --json runs, per topology and config
  -h, --help                 this help

exit status: 0 planned; 2 bad input (one line)

example:
  python tools/aot_compile.py --config configs/t5_1_1.py:xl --topology v5p:4x4x4 --search --json plans.jsonl
"""

INSTALL = 'pip install -e ".[tpu-plan]"'
GIB = 1024 ** 3


@dataclass(frozen=True)
class Chip:
    hbm_gib: float
    peak_tflops: float      # dense bf16
    hbm_tb_s: float         # for the roofline fallback when XLA gives no step time
    megacore: bool          # two TensorCores that JAX drives as one device
    accelerator: str        # gcloud's accelerator-type prefix; counts cores when megacore


CHIPS = {
    "v4": Chip(32, 275, 1.2, True, "v4"),
    "v5e": Chip(16, 197, 0.82, False, "v5litepod"),
    "v5p": Chip(95, 459, 2.76, True, "v5p"),
    "v6e": Chip(32, 918, 1.64, False, "v6e"),
}


class PlanError(Exception):
    """Bad input or a missing dependency; main() prints it on one line."""


def parse_topology(name: str) -> tuple[str, Chip, int]:
    gen, _, dims = name.partition(":")
    if gen not in CHIPS or not dims:
        raise PlanError(f"--topology {name!r}: unknown; use one of "
                        "v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB (e.g. v5p:4x4x4, v5e:4x4)")
    try:
        chips = math.prod(int(d) for d in dims.split("x"))
    except ValueError:
        raise PlanError(f"--topology {name!r}: dimensions must look like 4x4 or 4x4x4") from None
    return gen, CHIPS[gen], chips


def setup_env(chip: Chip, chips: int) -> None:
    """Before jax loads: CPU as the default backend (tests and this machine),
    and what libtpu would otherwise look up on a TPU VM's metadata server, so
    it starts quietly and without taking the one-process-per-machine lock."""
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(f"libtpu is not installed; it compiles for TPUs on this machine: {INSTALL}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.accelerator}-{chips * (2 if chip.megacore else 1)}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str, chip: Chip):
    from jax.experimental import topologies
    kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except RuntimeError as e:  # JaxRuntimeError is one
        if "not installed" in str(e):
            raise PlanError(f"JAX cannot load libtpu ({e}); {INSTALL}") from None
        raise PlanError(f"--topology {name!r}: libtpu rejects it: {str(e).splitlines()[0]}") from None


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in filter(None, text.split(",")):
        axis, eq, value = item.partition("=")
        if axis not in sizes or not eq:
            raise PlanError(f"--mesh {text!r}: expected axis=size,... with axes data, fsdp, tensor")
        sizes[axis] = int(value)
    return sizes


def candidate_meshes(config, chips: int) -> list[dict[str, int]]:
    """tensor in 1, 2, 4, 8 (dividing the heads), then every power-of-two data
    split of the rest; fsdp takes what is left. Batch rows must split evenly."""
    out = []
    for tensor in (1, 2, 4, 8):
        if chips % tensor or config.model.num_heads % tensor:
            continue
        data = 1
        while data <= chips // tensor:
            fsdp = chips // tensor // data
            if data * fsdp * tensor == chips and config.train.batch_size % (data * fsdp) == 0:
                out.append({"data": data, "fsdp": fsdp, "tensor": tensor})
            data *= 2
    return out


def shard_bytes(tree) -> int:
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


def total_bytes(tree) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


class CompileOom(Exception):
    """The TPU compiler refused the step: its buffers exceed the chip's HBM."""

    def __init__(self, program, compile_s, temp_bytes, usable_bytes, message):
        super().__init__(message)
        self.program, self.compile_s = program, compile_s
        self.temp_bytes, self.usable_bytes = temp_bytes, usable_bytes


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def compile_step(config, devices):
    """(TrainProgram, compiled train step, compile seconds) on `devices`;
    CompileOom when the step cannot fit, with the sizes XLA names."""
    import re
    from t5lab import sharding
    from t5lab.train_step import build_program
    mesh = sharding.make_mesh(config.mesh, devices)
    t0 = time.time()
    program = build_program(config, mesh)
    try:
        compiled = program.lower_train().compile()
    except Exception as e:  # noqa: BLE001  JaxRuntimeError; only its OOM form is expected
        found = re.search(r"required for .*?\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)",
                          str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        need, unit, have, unit2 = found.groups()
        raise CompileOom(program, time.time() - t0, float(need) * _UNITS[unit],
                         float(have) * _UNITS[unit2], str(e).splitlines()[0]) from None
    return program, compiled, time.time() - t0


def step_cost(compiled) -> tuple[float, float, float]:
    """(flops, bytes accessed, XLA's optimal_seconds or 0) per chip."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return (float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
            float(cost.get("optimal_seconds", 0.0)))


def scanned_step_cost(config, devices, compiled) -> tuple[float, float, float]:
    """XLA's cost analysis counts a while loop's body once, so a scanned stack
    of L layers looks like one layer: `compiled` costs c1 = rest + one layer.
    The same step with two layers per loop iteration (model.scan_unroll=2)
    costs c2 = rest + two layers, so the real step is c1 + (L - 1)(c2 - c1):
    one more compile, as quick as the scanned one. Stacks of different depths
    need each stack's layer on its own: fitted on shallow unscanned copies
    (1/1, 2/1 and 1/2 layers)."""
    m = config.model
    enc, dec = m.num_layers, (m.num_decoder_layers if m.num_decoder_layers > 0 else m.num_layers)
    if m.arch != "encoder_decoder" or enc == dec:
        twice = config.copy_and_resolve_references()
        twice.model.scan_unroll = 2 * m.scan_unroll
        one, two = step_cost(compiled), step_cost(compile_step(twice, devices)[1])
        per_layer = [(t - o) / m.scan_unroll for o, t in zip(one, two)]
        return tuple(o + (enc - m.scan_unroll) * p for o, p in zip(one, per_layer))
    costs = []
    for e, d in [(1, 1), (2, 1), (1, 2)]:
        shallow = config.copy_and_resolve_references()
        shallow.model.scan_layers = False
        shallow.model.num_layers, shallow.model.num_decoder_layers = e, d
        costs.append(step_cost(compile_step(shallow, devices)[1]))
    base, more_enc, more_dec = costs
    return tuple(b + (enc - 1) * (x - b) + (dec - 1) * (y - b) for b, x, y in zip(base, more_enc, more_dec))


def flops_floor(config, params) -> float:
    """FLOPs a step must execute at least: the model's matmuls, plus, with
    remat_policy=full, every layer's forward once more (forward, recompute and
    backward: 4/3 of the layers' 3 forward-equivalents; the head is not
    recomputed). Other remat policies recompute an unknown share: not counted."""
    from t5lab import train
    total = train._model_flops(config, params)
    if config.model.remat_policy != "full":
        return total
    return total + train._model_flops(config, params, head=False) / 3


def floored_step(step_s: float, source: str, floor_flops: float, chips: int, chip: Chip):
    """XLA's step time, or the time the floor FLOPs take at the chips' peak if
    that is longer: XLA's TPU cost analysis sometimes counts far fewer FLOPs
    than the model needs (seen at 0.6x for some tensor-parallel and scanned
    steps), and a step time from that count would rank such meshes too high."""
    floor_s = floor_flops / (chips * chip.peak_tflops * 1e12)
    return (floor_s, "floor") if floor_s > step_s else (step_s, source)


def plan(config, mesh_sizes: dict, devices, chip: Chip) -> dict:
    """Compiles the train step on `devices` with `mesh_sizes`; one report row."""
    import jax
    from t5lab import config as config_lib, train

    for axis, size in mesh_sizes.items():
        config.mesh[axis] = size
    config_lib.validate(config)
    hbm = chip.hbm_gib * GIB
    try:
        program, compiled, compile_s = compile_step(config, devices)
    except CompileOom as oom:
        # The compiler stops before a memory analysis: report what it needs.
        state = oom.program.abstract_state
        return {"mesh": dict(oom.program.mesh.shape), "chips": len(devices),
                "params": sum(x.size for x in jax.tree_util.tree_leaves(state["params"])),
                "param_bytes": shard_bytes(state["params"]), "opt_bytes": shard_bytes(state["opt_state"]),
                "temp_bytes": oom.temp_bytes,
                "peak_bytes": shard_bytes(state) + oom.temp_bytes,  # a lower bound
                "hbm_bytes": hbm, "fits": False, "xla_flops_per_chip": None,
                "model_flops_per_step": train._model_flops(config, state["params"]),
                "step_s": None, "step_source": None, "mfu": None, "compile_s": oom.compile_s,
                "xla_message": str(oom)}
    mem = compiled.memory_analysis()
    flops, bytes_accessed, xla_s = (scanned_step_cost(config, devices, compiled) if config.model.scan_layers
                                    else step_cost(compiled))
    if xla_s > 0:
        step_s, step_source = xla_s, "xla"
    else:  # roofline from this table's peaks
        step_s = max(flops / (chip.peak_tflops * 1e12), bytes_accessed / (chip.hbm_tb_s * 1e12))
        step_source = "roofline"
    state = program.abstract_state
    chips = len(devices)
    floor_flops = flops_floor(config, state["params"])
    step_s, step_source = floored_step(step_s, step_source, floor_flops, chips, chip)
    peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    model_flops = train._model_flops(config, state["params"])
    return {
        "mesh": dict(program.mesh.shape),
        "chips": chips,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(state["params"])),
        "param_bytes": shard_bytes(state["params"]),
        "opt_bytes": shard_bytes(state["opt_state"]),
        "temp_bytes": mem.temp_size_in_bytes,
        "peak_bytes": peak_bytes,
        "hbm_bytes": hbm,
        "fits": peak_bytes <= hbm,
        "xla_flops_per_chip": flops,
        "model_flops_per_step": model_flops,
        "floor_flops_per_step": floor_flops,
        "step_s": step_s,
        "step_source": step_source,
        "mfu": model_flops / (step_s * chips * chip.peak_tflops * 1e12) if step_s else None,
        "compile_s": compile_s,
    }


def state_bytes(config) -> int:
    """Unsharded params + optimizer state, from shapes alone (no compile)."""
    import flax.linen as nn
    import jax
    from t5lab import models, optim
    model = models.build(config)
    batch = models.dummy_batch(config, 1)
    params = nn.unbox(jax.eval_shape(
        lambda r: model.init({"params": r, "dropout": r}, batch, deterministic=True)["params"],
        jax.random.key(0)))
    from t5lab.train_step import schedule_batch_shape
    tx, _ = optim.make_optimizer(config.optim, config.train.steps, batch_shape=schedule_batch_shape(config))
    return total_bytes(params) + total_bytes(jax.eval_shape(tx.init, params))


def gib(n: float) -> str:
    return f"{n / GIB:.3f}" if n < GIB else f"{n / GIB:.2f}"


STEP_SOURCES = {
    "xla": "XLA estimate",
    "roofline": "roofline: flops/peak vs bytes/HBM bandwidth",
    "floor": "floor: the model's FLOPs (with remat) at peak; XLA's count was lower",
}


def describe(row: dict) -> str:
    m = row["mesh"]
    margin = row["hbm_bytes"] - row["peak_bytes"]
    verdict = (f"fits ({gib(margin)} GiB spare)" if row["fits"]
               else f"DOES NOT FIT (over by {gib(-margin)} GiB)")
    head = [
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} on {row['chips']} chips, "
        f"{row['params'] / 1e9:.3g}B params (compiled in {row['compile_s']:.0f}s)",
        f"  per chip: params {gib(row['param_bytes'])} GiB, optimizer state {gib(row['opt_bytes'])} GiB, "
        f"temporaries {gib(row['temp_bytes'])} GiB",
    ]
    if row["step_s"] is None:  # the compiler refused it
        return "\n".join(head + [f"  peak HBM at least {gib(row['peak_bytes'])} / {gib(row['hbm_bytes'])} GiB: "
                                 f"{verdict}", f"  XLA: {row['xla_message']}"])
    return "\n".join(head + [
        f"  peak HBM {gib(row['peak_bytes'])} / {gib(row['hbm_bytes'])} GiB: {verdict}",
        f"  FLOPs/step per chip (XLA, with remat) {row['xla_flops_per_chip']:.3e}; "
        f"model FLOPs/step {row['model_flops_per_step']:.3e}",
        f"  step time {row['step_s'] * 1e3:.1f} ms ({STEP_SOURCES[row['step_source']]})"
        f" -> MFU {row['mfu'] * 100:.1f}%",
    ] + ([f"  warning: XLA counts {counted / row['floor_flops_per_step']:.2f}x the FLOPs the model needs "
          "(with remat); the step time is at least the floor's"]
         if (counted := row["xla_flops_per_chip"] * row["chips"]) < row["floor_flops_per_step"] else []))


def ranked_table(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (not r["fits"], r["step_s"] or math.inf, r["peak_bytes"]))
    lines = ["rank  data fsdp tensor  peak GiB  fits  step ms   MFU  step time from",
             "----  ---- ---- ------  --------  ----  -------  -----  --------------"]
    for i, r in enumerate(rows, 1):
        m = r["mesh"]
        lines.append(f"{i:>4}  {m['data']:>4} {m['fsdp']:>4} {m['tensor']:>6}  {gib(r['peak_bytes']):>8}  "
                     f"{'yes' if r['fits'] else 'no':>4}  "
                     + (f"{r['step_s'] * 1e3:>7.1f}  {r['mfu'] * 100:>4.1f}%  {r['step_source']}"
                        if r["step_s"] else "      -      -"))
    return "\n".join(lines)


def config_args(argv: list[str]) -> list[str]:
    """The --config FILE and --config.KEY=VALUE arguments (what identifies a
    plan's model and training set-up; the mesh is the row's own)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config") and not a.startswith("--config.mesh."):
            if "=" not in a and i + 1 < len(argv):
                out.append(f"{a}={argv[i + 1]}")
                i += 1
            else:
                out.append(a)
        i += 1
    return out


def rank_file(path: str) -> str:
    """Ranked tables from the rows of one or several runs' --json files:
    meshes compiled as separate jobs (e.g. on several machines) ranked as one
    --search would, per topology and config."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise PlanError(f"--rank {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"--rank {path}: not JSON lines from --json ({e})") from None
    if not rows:
        raise PlanError(f"--rank {path}: no rows")
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r.get("topology", "?"), " ".join(r.get("config_args", []))), []).append(r)
    return "\n\n".join(f"{topology}  {args}\n{ranked_table(g)}" for (topology, args), g in groups.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(OPTIONS + "\n" + __doc__, end="")
        return 0
    if argv[:1] == ["--rank"] or (argv and argv[0].startswith("--rank=")):
        try:
            print(rank_file(argv[1] if argv[0] == "--rank" and len(argv) > 1 else argv[0].partition("=")[2]))
        except PlanError as e:
            print(f"aot_compile: error: {e}", file=sys.stderr)
            return 2
        return 0
    search = "--search" in argv
    argv = [a for a in argv if a != "--search"]
    from t5lab import config as config_lib
    try:
        config, flags = config_lib.parse_args(argv)
        unknown = set(flags) - {"topology", "mesh", "json"}
        if unknown or "topology" not in flags:
            raise PlanError(OPTIONS.splitlines()[0] if "topology" not in flags
                            else f"unknown flag --{sorted(unknown)[0]}")
        _, chip, chips = parse_topology(flags["topology"])
        setup_env(chip, chips)
        devices = topology_devices(flags["topology"], chip)
        print(f"{flags['topology']}: {len(devices)} chips of {devices[0].device_kind}, "
              f"{chip.hbm_gib:g} GiB HBM, {chip.peak_tflops:g} bf16 TFLOP/s each", flush=True)
        if search:
            # Compiling is the slow part: skip meshes whose sharded train state
            # alone (over fsdp x tensor) already exceeds HBM.
            state = state_bytes(config)
            fixed = {k: v for k, v in parse_mesh(flags.get("mesh", "")).items()
                     if f"{k}=" in flags.get("mesh", "") and v > 0}
            meshes = [m for m in candidate_meshes(config, len(devices))
                      if state / (m["fsdp"] * m["tensor"]) <= chip.hbm_gib * GIB
                      and all(m[k] == v for k, v in fixed.items())]
            if not meshes:
                raise PlanError("no mesh holds the train state in HBM: use more chips or a "
                                "smaller model/optimizer")
        else:
            meshes = [parse_mesh(flags["mesh"]) if "mesh" in flags else dict(config.mesh)]
        rows = []
        for m in meshes:
            try:
                row = plan(config.copy_and_resolve_references(), m, devices, chip)
            except Exception as e:  # noqa: BLE001  a search reports a failed candidate and goes on
                if not search:
                    raise
                print(f"mesh {m}: failed to compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      flush=True)
                continue
            rows.append(row)
            print(describe(row), flush=True)
            if "json" in flags:
                with open(flags["json"], "a") as f:
                    f.write(json.dumps({"topology": flags["topology"], "config_args": config_args(argv),
                                        **row}) + "\n")
        if search and rows:
            print("\n" + ranked_table(rows))
    except (PlanError, config_lib.ConfigError, ValueError) as e:
        print(f"aot_compile: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
