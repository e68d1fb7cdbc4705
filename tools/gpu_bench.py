r"""t5lab against the GPU peer on one NVIDIA GPU, in one call of at most 8 minutes.

    python tools/gpu_bench.py                 # T5 v1.1 base, bf16, batch 32 x (512 + 114)
    python tools/gpu_bench.py --cpu-smoke     # tiny shapes on the CPU: the same code path, < 1 min

Parts, each in its own process with its own timeout (a part that fails or
runs out of time becomes a table row saying so; the others still run):
  1. the GPU's bf16 matmul peak: a jitted n x n bf16 product, best of 5
     rounds of 10 back-to-back products; plus JAX's environment report and
     t5lab's model FLOPs per step for the config and shape;
  2. the attention check (tools/attention_check.py): --check (cudnn)
     against xla on small T5 blocks of every architecture, packed (segments
     and padding) and unpacked (key lengths): logits and gradients in bf16,
     each against xla in float32; printed as its own table;
  3. t5lab's train step (tools/benchmark.py's batch and overrides, with
     model.dtype=bfloat16 and scanned layers) once per --attention
     implementation: compile, 2 warm-up steps, --steps timed steps, median;
     then --profile-steps steps under jax.profiler, printed as where the
     step's time goes (device-busy share, per category, top ops);
  4. the peer, ../shared/bench/peer_torch_t5_gpu.py (transformers' PyTorch T5
     as nanoT5 trains it: bf16 autocast, torch.compile, fused AdamW), at the
     same shape; if its compiled run fails, again with --no-compile when time
     is left.
The last thing printed is one Markdown table: per implementation, step time,
tokens/s, MFU (t5lab's model FLOPs per step, t5lab.train._model_flops, for
every row / step time / measured bf16 peak) and tokens/s relative to the peer.

On the lent GPU machine (JAX, PyTorch and transformers preinstalled; t5lab's
ml-collections and the peer script carried): `bash tools/gpu_bench.sh prepare`
here, then the device tool's run with carry [".gpu_bench"] and the command
`bash tools/gpu_bench.sh device` (see tools/gpu_bench.sh).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
# The device machine gets a copy of the checkout, not an installed t5lab.
sys.path[:0] = [p for p in (ROOT, TOOLS) if p not in sys.path]
import attention_check  # noqa: E402  (tools/, on the path above)
import profile_summary  # noqa: E402

PEER_CANDIDATES = (os.path.join(ROOT, "..", "shared", "bench", "peer_torch_t5_gpu.py"),
                   os.path.join(ROOT, "shared", "bench", "peer_torch_t5_gpu.py"),
                   os.path.join(ROOT, ".gpu_bench", "peer", "peer_torch_t5_gpu.py"))
RESULT = "GPU_BENCH_PART "  # prefix of the one JSON line a part prints
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "ml-collections", "numpy", "torch", "transformers")
# Named XLA flag sets a t5lab row can add (--attention IMPL@SET): `maxtext` is
# the single-GPU part of MaxText's tuned GPU flags (its A3 XLA_FLAGS without
# the collective combining and pipelining ones, which need several GPUs).
XLA_FLAG_SETS = {
    "maxtext": ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
                "--xla_gpu_enable_highest_priority_async_stream=true "
                "--xla_gpu_enable_while_loop_double_buffering=true"),
}
# On the H200 an attention-check case (three small compiles) takes about 20 s
# and all six of `all` passed (docs/performance.md): the GPU default checks
# three, leaving the budget to the speed rows and the compiled peer.
GPU = dict(config="configs/t5_1_1.py:base", batch=32, inputs=512, targets=114, steps=10,
           attention="xla,cudnn,cudnn@maxtext", peak_n=8192, budget=470, timeout_peak=60, timeout_check=100,
           timeout_row=90, timeout_peer=200, check="cudnn", check_cases=",".join(
               f"{a}:unscanned:{p}" for a, p in (("encoder_decoder", "packed"), ("encoder_decoder", "unpacked"),
                                                 ("decoder", "packed"))),
           profile_steps=3)
# Tiny shapes; dpa stands in for cudnn (the same jax.nn.dot_product_attention
# call with XLA's implementation), which needs a GPU.
SMOKE = dict(config="configs/t5_1_1.py:tiny", batch=2, inputs=32, targets=16, steps=2,
             attention="xla,dpa", peak_n=512, budget=300, timeout_peak=60, timeout_check=120,
             timeout_row=120, timeout_peer=90, check="dpa",
             check_cases="encoder_decoder:scanned:packed", profile_steps=2)


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--config.KEY=VALUE overrides one config key of the t5lab rows (t5lab/config.py).\n"
               "Defaults are the GPU run's; --cpu-smoke changes every default marked [gpu|smoke].\n\n"
               "example:\n  python tools/gpu_bench.py --cpu-smoke --json /tmp/rows.jsonl\n"
               "  python tools/gpu_bench.py --attention xla,cudnn,dpa --steps 20 --log-dir $OUT")
    d = lambda k: f"[{GPU[k]}|{SMOKE[k]}]"
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on the CPU (JAX_PLATFORMS=cpu, peer --cpu): the same parts")
    p.add_argument("--config", help=f"t5lab FILE.py:preset {d('config')}")
    p.add_argument("--batch", type=int, help=f"rows per step {d('batch')}")
    p.add_argument("--inputs", type=int, help=f"encoder tokens per row {d('inputs')}")
    p.add_argument("--targets", type=int, help=f"decoder tokens per row {d('targets')}")
    p.add_argument("--steps", type=int, help=f"timed steps per row {d('steps')}")
    p.add_argument("--attention", help="t5lab rows: model.attention values, comma separated; IMPL@SET adds "
                                       f"the XLA flag set SET ({', '.join(XLA_FLAG_SETS)}) {d('attention')}")
    p.add_argument("--peak-n", type=int, help=f"matmul size for the bf16 peak {d('peak_n')}")
    p.add_argument("--budget", type=float, help=f"seconds for the whole run {d('budget')}")
    p.add_argument("--timeout-peak", type=float, help=f"seconds for part 1 {d('timeout_peak')}")
    p.add_argument("--timeout-check", type=float, help=f"seconds for part 2 {d('timeout_check')}")
    p.add_argument("--check-cases", help="part 2's ARCH:scanned|unscanned[:packed|unpacked] cases, "
                                         "comma separated, or all "
                                         f"{d('check_cases')}")
    p.add_argument("--check", help=f"part 2: the model.attention value checked against xla {d('check')}")
    p.add_argument("--no-check", action="store_true", help="leave part 2 (the attention check) out")
    p.add_argument("--profile-steps", type=int, help="part 3: steps traced with jax.profiler after the timed "
                                                     f"ones, summarised per op; 0: none {d('profile_steps')}")
    p.add_argument("--trace-dir", metavar="DIR", help="keep part 3's traces in DIR/IMPL (TensorBoard's "
                                                     "profile plugin reads them); default: deleted")
    p.add_argument("--timeout-row", type=float, help=f"seconds per t5lab row (part 3) {d('timeout_row')}")
    p.add_argument("--timeout-peer", type=float, help=f"seconds for the peer (part 4) {d('timeout_peer')}")
    p.add_argument("--peer", help="peer script (default: the first of ../shared/bench/, shared/bench/, "
                                  ".gpu_bench/peer/ that exists)")
    p.add_argument("--no-peer", action="store_true", help="leave the peer row out")
    p.add_argument("--json", metavar="FILE", help="also append one JSON object per row to FILE")
    p.add_argument("--log-dir", metavar="DIR", help="write each part's full output to DIR/PART.log")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)}")
    for k, v in (SMOKE if args.cpu_smoke else GPU).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:  # before any part runs
        attention_check.parse_cases(args.check_cases)
    except ValueError as e:
        p.error(f"--check-cases: {e}")
    for item in args.attention.split(","):
        flag_set = split_item(item)[1]
        if flag_set and flag_set not in XLA_FLAG_SETS:
            p.error(f"--attention: {item.strip()!r}: no XLA flag set {flag_set!r} (known: {', '.join(XLA_FLAG_SETS)})")
    return args, [a[len("--config."):] for a in rest]


# ------------------------------------------------------------------ parts (children)
def step_overrides(args, attention: str | None) -> list[str]:
    """tools/benchmark.py's plain span-corruption batch and AdamW without
    clipping (the peer's optimizer), in bf16 compute as the peer autocasts,
    with scanned layers (as MaxText runs): on the H200 the unscanned T5 base
    step did not compile within 150 s, the scanned one compiled in 19 s."""
    base = ["optim.name=adamw", "optim.clip_norm=0", "model.dtype=bfloat16", "model.scan_layers=true",
            "data.objective=span_corruption", "data.pack=false", "model.dropout_rate=0.0",
            f"train.batch_size={args.batch}", f"data.inputs_length={args.inputs}",
            f"data.targets_length={args.targets}"]
    return base + ([f"model.attention={attention}"] if attention else [])


def part_peak(args, overrides) -> dict:
    import jax
    import jax.numpy as jnp
    out = {"environment": jax.print_environment_info(return_string=True),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "devices": jax.device_count()}
    n, inner = args.peak_n, 10
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = math.inf
    # Back-to-back products, blocked once per round: dispatch overlaps the
    # previous product, as a step's kernels do, so the time is the chip's.
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready([f(a, b) for _ in range(inner)])
        best = min(best, (time.perf_counter() - t) / inner)
    out.update(peak_flops=2 * n ** 3 / best, peak_n=n)
    try:  # the FLOPs need only the parameters' shapes: no compile, no allocation
        out["model_flops"] = model_flops(args, overrides)
    except Exception as e:  # noqa: BLE001  the peak stands without it
        out["model_flops_error"] = f"{type(e).__name__}: {e}"
    return out


def load_config(args, overrides, attention=None):
    from t5lab import config as config_lib
    return config_lib.load(args.config, step_overrides(args, attention) + overrides)


def model_flops(args, overrides) -> float:
    from t5lab import sharding
    from t5lab.train import _model_flops
    from t5lab.train_step import build_program
    config = load_config(args, overrides)
    prog = build_program(config, sharding.make_mesh(config.mesh))
    return float(_model_flops(config, prog.abstract_state["params"]))


def part_t5lab(args, overrides, attention, label: str) -> dict:
    import jax
    import numpy as np
    from benchmark import random_batch
    from t5lab import sharding
    from t5lab.train import _model_flops
    from t5lab.train_step import build_program, global_batch

    config = load_config(args, overrides, attention)
    prog = build_program(config, sharding.make_mesh(config.mesh))
    t0 = time.perf_counter()
    lowered = prog.lower_train()
    # Progress on stderr: a part that runs out of time still says how far it got.
    print(f"lowered in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    state = prog.init_state(jax.random.key(0))
    batch = global_batch(random_batch(config, config.train.batch_size), prog.batch_sharding)
    for _ in range(2):  # warm-up: first-run autotuning and allocation
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    print(f"warm-up done at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        # The whole new state, not only the metrics: the optimizer update
        # finishes after the loss is known.
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    res = {"step_s": step_s, "times": times, "compile_s": compile_s, "loss": float(m["loss"]),
           "tokens_per_s": args.batch * (args.inputs + args.targets) / step_s,
           "model_flops": float(_model_flops(config, state["params"])),
           "device_kind": jax.devices()[0].device_kind}
    if args.profile_steps > 0:
        # The timings first: a profiler that crashes or hangs keeps them.
        print(RESULT + json.dumps(res), flush=True)
        try:
            res["profile"] = profile_steps(args, label, compiled, state, batch)
        except Exception as e:  # noqa: BLE001  e.g. no CUPTI: the row stands without its profile
            res["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return res


def profile_steps(args, name, compiled, state, batch) -> dict:
    """--profile-steps more steps under jax.profiler, summarised per op
    (tools/profile_summary.py)."""
    import tempfile
    import jax
    keep = os.path.join(args.trace_dir, name) if args.trace_dir else None
    trace_dir = keep or tempfile.mkdtemp(prefix="gpu_bench_trace_")
    try:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.profile_steps):
                state, m = compiled(state, batch)
            jax.block_until_ready((state, m))
        return profile_summary.summarize(trace_dir, args.profile_steps)
    finally:
        if keep is None:
            shutil.rmtree(trace_dir, ignore_errors=True)


def part_check(args, impl: str) -> dict:
    """tools/attention_check.py's cases; prints the cases done so far after
    each one, so a timeout keeps them (the parent reads the last)."""
    enc, dec = (24, 16) if args.cpu_smoke else (128, 64)
    return attention_check.run(impl, attention_check.parse_cases(args.check_cases), enc, dec,
                               on_case=lambda res: print(RESULT + json.dumps(res), flush=True))


def run_part(args, overrides):
    name = args.part
    if name != "peak":  # huge-page malloc helps XLA:CPU only; hostenv skips it on a GPU
        from t5lab import hostenv
        hostenv.reexec_with_hugepages()
    if name == "peak":
        out = part_peak(args, overrides)
    elif name.startswith("check:"):
        out = part_check(args, name.split(":", 1)[1])
    elif name.startswith("t5lab:"):
        item = name.split(":", 1)[1]  # IMPL or IMPL@SET (the parent set XLA_FLAGS)
        out = part_t5lab(args, overrides, split_item(item)[0] or None, item.replace("@", "_"))
    else:
        raise SystemExit(f"unknown part {name!r}")
    print(RESULT + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the parent
_CHILD: list = []  # the running part, for the signal handler


def _stop(signum, frame):
    # A child leads its own session, so it would outlive this process (and
    # hold the GPU): end its group first.
    for p in _CHILD:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_child(cmd, timeout, env, log_path=None) -> tuple[int | None, str, str]:
    """(returncode or None on timeout, stdout, stderr). The child leads its own
    process group so that a timeout also ends what it started (torch.compile's
    workers)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    _CHILD[:] = [p]
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    finally:
        _CHILD.clear()
    if log_path:
        with open(log_path, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n# rc={rc}\n--- stdout\n{out}\n--- stderr\n{err}")
    return rc, out, err


def why_failed(rc, out, err, timeout) -> str:
    if rc is None:
        return f"timed out after {timeout:.0f} s"
    lines = [l.strip() for l in (err + "\n" + out).splitlines() if l.strip()]
    # The exception line, not the traceback's frames or JAX's warnings.
    errors = [l for l in lines if ("Error" in l or "error:" in l) and not l.startswith("File ")]
    reason = (errors or lines or [f"exit status {rc}"])[-1]
    if "No module named" in reason:
        reason += " (carry its wheel: bash tools/gpu_bench.sh prepare)"
    return f"failed (rc {rc}): {reason[:300]}"


def split_item(item: str) -> tuple[str, str]:
    """An --attention item IMPL or IMPL@SET as (IMPL, SET or "")."""
    impl, _, flag_set = item.partition("@")
    return impl.strip(), flag_set.strip()


def row_env(env: dict, flag_set: str) -> dict:
    """`env` with the flag set's XLA flags after the caller's own."""
    if not flag_set:
        return env
    return dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {XLA_FLAG_SETS[flag_set]}".strip())


def child_env(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
        # One device, as on the GPU (tests simulate 8 CPU devices in XLA_FLAGS).
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def find_peer(args) -> str | None:
    for path in ([args.peer] if args.peer else PEER_CANDIDATES):
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def peer_shape(args, overrides) -> list[str]:
    """The peer's flags for the t5lab config's model (T5 v1.1: gated-gelu,
    untied head, as transformers' T5Config in ../shared/bench/_shape.py)."""
    m = load_config(args, overrides).model
    dec = m.num_decoder_layers if m.num_decoder_layers > 0 else m.num_layers
    if dec != m.num_layers or m.arch != "encoder_decoder" or not m.gated_mlp:
        raise ValueError("the peer is a T5 v1.1 encoder-decoder with equal stacks")
    return ["--batch", str(args.batch), "--inputs", str(args.inputs), "--targets", str(args.targets),
            "--d-model", str(m.d_model), "--d-ff", str(m.d_ff), "--layers", str(m.num_layers),
            "--heads", str(m.num_heads), "--head-dim", str(m.head_dim), "--vocab", str(m.vocab_size),
            "--steps", str(args.steps)]


def environment_lines() -> list[str]:
    lines = [f"python {sys.version.split()[0]} on {os.uname().nodename}"]
    found = []
    for name in VERSIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    lines.append(", ".join(found))
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            lines += [f"GPU: {l.strip()}" for l in q.stdout.splitlines() if l.strip()]
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"nvidia-smi: {e}")
    else:
        lines.append("GPU: no nvidia-smi on PATH")
    return lines


def attention_values() -> tuple:
    """The model.attention values t5lab takes (empty if its config will not
    import: the rows then report why)."""
    try:
        from t5lab import config as config_lib
        return tuple(config_lib.ATTENTIONS)
    except Exception:  # noqa: BLE001
        return ()


def fmt(x, spec):
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def table(rows, peak) -> str:
    peer = next((r for r in rows if r["kind"] == "peer" and r.get("tokens_per_s")), None)
    out = ["| implementation | attention | step ms | tokens/s | MFU | t5lab/peer | compile s | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tps, step = r.get("tokens_per_s"), r.get("step_s")
        mfu = r["model_flops"] / step / peak if step and peak and r.get("model_flops") else None
        r["mfu"] = mfu
        ratio = tps / peer["tokens_per_s"] if peer and tps and r["kind"] == "t5lab" else None
        r["vs_peer"] = ratio
        out.append(f"| {r['name']} | {r['attention']} | {fmt(step and step * 1e3, '.1f')} | "
                   f"{fmt(tps, ',.0f')} | {fmt(mfu and mfu * 100, '.3g')}{'%' if mfu else ''} | "
                   f"{fmt(ratio, '.2f')} | {fmt(r.get('compile_s'), '.1f')} | {r.get('note', '')} |")
    return "\n".join(out)


def main(argv=None):
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    if args.part:
        return run_part(args, overrides)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    t_start = time.monotonic()
    deadline = t_start + args.budget
    env = child_env(args)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    print("\n".join(environment_lines()), flush=True)

    def part(name, cmd, own_timeout, plain_json=False, part_env=None):
        left = deadline - time.monotonic()
        if left < 15:
            return None, f"skipped: {args.budget:.0f} s budget spent"
        timeout = min(own_timeout, left)
        t = time.monotonic()
        log = (os.path.join(args.log_dir, name.replace(":", "_").replace("@", "_") + ".log")
               if args.log_dir else None)
        rc, out, err = run_child(cmd, timeout, part_env or env, log)
        result = next((json.loads(l[len(RESULT):]) for l in reversed(out.splitlines())
                       if l.startswith(RESULT)), None)
        if rc == 0 and result is None and plain_json:  # the peer's one JSON line
            result = next((json.loads(l) for l in reversed(out.splitlines()) if l.startswith("{")), None)
        note = None if (rc == 0 and result is not None) else why_failed(rc, out, err, timeout)
        print(f"[{name}] {time.monotonic() - t:.1f} s: {note or 'ok'}", flush=True)
        return result, note

    # 1. peak, environment, model FLOPs
    peak_res, peak_note = part("peak", me + ["--part", "peak"], args.timeout_peak)
    peak = flops = None
    if peak_res:
        print(peak_res["environment"].rstrip(), flush=True)
        peak, flops = peak_res["peak_flops"], peak_res.get("model_flops")
        if "model_flops_error" in peak_res:
            print(f"model FLOPs: {peak_res['model_flops_error']}", flush=True)

    # JAX falls back to the CPU when its CUDA plugin fails to load: T5 base
    # there would only burn the budget.
    no_gpu = (not args.cpu_smoke and peak_res is not None and peak_res["backend"] != "gpu")

    # 2. the attention check
    check_rows = []
    if not args.no_check and not no_gpu:
        check_res, check_note = part(f"check:{args.check}", me + ["--part", f"check:{args.check}"],
                                     args.timeout_check)
        if check_res:  # all cases, or those done before a timeout (the note says)
            print(attention_check.table(check_res) + (f"\nattention check: {check_note}" if check_note else ""),
                  flush=True)
            check_rows = [dict(kind="check", **c) for c in check_res["cases"]]
        else:
            print(f"attention check: {check_note}", flush=True)
            check_rows = [dict(kind="check", impl=args.check, ok=False, error=check_note)]

    # 3. t5lab rows
    rows = []
    values = attention_values()
    for item in (a.strip() for a in args.attention.split(",") if a.strip()):
        impl, flag_set = split_item(item)
        row = {"kind": "t5lab", "name": "t5lab", "attention": item}
        if no_gpu:
            row["note"] = f"skipped: JAX sees no GPU (backend {peak_res['backend']}; see the report above)"
        elif values and impl not in values:
            row["note"] = f"not available: model.attention takes {', '.join(values)}"
        else:
            res, note = part(f"t5lab:{item}", me + ["--part", f"t5lab:{item}"], args.timeout_row,
                             part_env=row_env(env, flag_set))
            if note and res and res.get("step_s"):  # timed, then the profiler crashed
                note = f"profile {note}"
            elif res and res.get("profile_error"):
                note = f"profile failed: {res['profile_error']}"
            row.update(res or {}, note=note or (f"XLA flag set {flag_set}" if flag_set else ""))
            if res and res.get("profile"):
                print(profile_summary.summary_table(res["profile"], res["step_s"] * 1e3, f"t5lab {item}"),
                      flush=True)
        rows.append(row)
    flops = flops or next((r["model_flops"] for r in rows if r.get("model_flops")), None)

    # 4. the peer
    if not args.no_peer:
        row = {"kind": "peer", "name": "peer: transformers torch T5", "attention": "-"}
        script = find_peer(args)
        try:
            shape = peer_shape(args, overrides)
        except Exception as e:  # noqa: BLE001  a row, not a crash
            shape, row["note"] = None, f"failed: no peer shape from the t5lab config ({type(e).__name__}: {e})"
        if script is None:
            row["note"] = ("not available: no peer script (../shared/bench/peer_torch_t5_gpu.py; "
                           "bash tools/gpu_bench.sh prepare copies it to .gpu_bench/peer/)")
        elif shape is not None:
            # On the GPU, torch.compile is the peer's point; eager is the fallback
            # that still gives a row when compiling fails or runs out of time.
            modes = [["--cpu"]] if args.cpu_smoke else [[], ["--no-compile"]]
            notes = []
            for mode in modes:
                res, note = part("peer" + "".join(mode).replace("--", "_"),
                                 [sys.executable, script, *shape, *mode], args.timeout_peer, plain_json=True)
                if res is not None:
                    label = res.get("peer", "transformers torch T5") + (" (eager)" if mode == ["--no-compile"] else "")
                    row.update(res, name=f"peer: {label}",
                               note="; ".join(f"compiled run {n}" for n in notes))
                    break
                notes.append(note)
            else:
                row["note"] = "; ".join(notes)
        row["model_flops"] = flops
        rows.append(row)

    for r in rows:
        r.setdefault("model_flops", flops)
    peak_line = (f"bf16 matmul peak: {peak / 1e12:.4g} TFLOP/s ({peak_res['device_kind']}, "
                 f"{peak_res['peak_n']}^3, best of 5 x 10)" if peak else f"bf16 matmul peak: {peak_note}")
    text = table(rows, peak)
    if args.json:
        with open(args.json, "a") as f:
            for r in check_rows:
                f.write(json.dumps(r) + "\n")
            for r in rows:
                f.write(json.dumps({**{k: v for k, v in r.items() if k != "environment"},
                                    "peak_flops": peak, "config": args.config, "batch": args.batch,
                                    "inputs": args.inputs, "targets": args.targets,
                                    "overrides": overrides}) + "\n")
    print(f"\n{peak_line}; model FLOPs per step {fmt(flops, '.4g')}; "
          f"{args.config} batch {args.batch} x ({args.inputs} + {args.targets}), "
          f"{time.monotonic() - t_start:.0f} s in all\n{text}", flush=True)


if __name__ == "__main__":
    main()
