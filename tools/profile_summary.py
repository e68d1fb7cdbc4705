r"""Where a compiled step's time goes, from a jax.profiler trace.

    python tools/profile_summary.py TRACE_DIR_OR_XPLANE [--steps N] [--top 12]

Reads the trace's XLA op events (events with an `hlo_op` stat) of its
busiest HLO module: from the accelerator planes (/device:GPU:N, /device:TPU:N)
when they have any, else from the host's (XLA:CPU). An op's time is its
self time: on the CPU a while loop's event contains its body's, so the
contained events are subtracted. Prints the device-busy time per step (the
union of the op intervals), the time per category (matmul, attention,
copies and layout, loop control, other fusions) and the top ops. Used by
tools/gpu_bench.py after its timed steps; standalone for any trace.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os

CATEGORIES = ("matmul", "attention", "copy/layout", "loop control", "other fusions")
# Substrings of an op's HLO name or kernel name, first match wins. Kernel names
# (GPU): cuBLAS's nvjet_/sm90_xmma_/cutlass, Triton's gemm fusions, cuDNN's
# fused attention (sdpa/fmha/flash). XLA:CPU names its dots dot.N / ynn_fusion.
_PATTERNS = (
    ("attention", ("fmha", "sdpa", "flash", "cudnn", "attention", "splash")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "dot", "matmul", "convolution", "ynn_fusion",
                "onednn")),
    ("copy/layout", ("copy", "transpose", "dynamic-update-slice", "dynamic_update_slice", "dynamic-slice",
                     "dynamic_slice", "memcpy", "memset", "concatenate", "pad.", "slice")),
)
_CONTROL = ("while", "conditional", "call.", "call ")  # HLO control flow (XLA:CPU runs it as ops)


def category(op: str, kernel: str) -> str:
    if op.lower().startswith(_CONTROL):
        return "loop control"
    text = f"{op} {kernel}".lower()
    for cat, needles in _PATTERNS:
        if any(n in text for n in needles):
            return cat
    return "other fusions"


def find_xplane(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"{path}: no *.xplane.pb under it (a jax.profiler.trace directory?)")
    return found[-1]


def _op_events(profile):
    """{plane kind: [(line key, start, end, op, kernel, module)]} for events with an hlo_op."""
    out = collections.defaultdict(list)
    for plane in profile.planes:
        kind = "device" if plane.name.startswith("/device:") else "host"
        for li, line in enumerate(plane.lines):
            for e in line.events:
                st = dict(e.stats)
                op = st.get("hlo_op")
                if isinstance(op, str) and e.duration_ns > 0:
                    out[kind].append(((plane.name, li), e.start_ns, e.start_ns + e.duration_ns, op, e.name,
                                      st.get("hlo_module", "?")))
    return out


def _self_times(events):
    """Self time per event: its duration less its direct children's on the
    same line (events nest, they do not partly overlap, on one line)."""
    by_line = collections.defaultdict(list)
    for i, ev in enumerate(events):
        by_line[ev[0]].append(i)
    self_ns = [ev[2] - ev[1] for ev in events]
    for idx in by_line.values():
        idx.sort(key=lambda i: (events[i][1], -events[i][2]))
        stack = []
        for i in idx:
            while stack and events[stack[-1]][2] <= events[i][1]:
                stack.pop()
            if stack and events[i][2] <= events[stack[-1]][2]:
                self_ns[stack[-1]] -= events[i][2] - events[i][1]
            stack.append(i)
    return self_ns


def _union_ns(intervals) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(profile, steps: int, top: int = 12) -> dict:
    """`profile`: a jax.profiler.ProfileData (or a path to a trace)."""
    if isinstance(profile, str):
        from jax.profiler import ProfileData
        profile = ProfileData.from_file(find_xplane(profile))
    events_by_kind = _op_events(profile)
    source = "device" if events_by_kind.get("device") else "host"
    events = events_by_kind.get(source, [])
    if not events:
        raise ValueError("the trace has no XLA op events (hlo_op stats)")
    per_module = collections.Counter()
    for ev in events:
        per_module[ev[5]] += ev[2] - ev[1]
    module = per_module.most_common(1)[0][0]
    events = [ev for ev in events if ev[5] == module]
    self_ns = _self_times(events)
    ops = {}
    for ev, s in zip(events, self_ns):
        rec = ops.setdefault(ev[3], {"op": ev[3], "kernel": ev[4], "ns": 0.0, "calls": 0})
        rec["ns"] += s
        rec["calls"] += 1
    busy = _union_ns((ev[1], ev[2]) for ev in events)
    total_self = sum(r["ns"] for r in ops.values()) or 1.0
    cats = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for r in sorted(ops.values(), key=lambda r: -r["ns"]):
        cat = category(r["op"], r["kernel"])
        cats[cat] += r["ns"] / steps / 1e6
        rows.append(dict(op=r["op"], kernel=r["kernel"], category=cat, calls_per_step=r["calls"] / steps,
                         ms_per_step=r["ns"] / steps / 1e6, share=r["ns"] / total_self))
    return {"source": source, "module": module, "steps": steps, "busy_ms_per_step": busy / steps / 1e6,
            "op_ms_per_step": total_self / steps / 1e6, "categories": cats, "ops": rows[:top],
            "op_count": len(rows)}


def summary_table(s: dict, step_ms: float | None = None, title: str = "") -> str:
    busy = s["busy_ms_per_step"]
    head = (f"where the time goes{': ' + title if title else ''} ({s['source']} ops of {s['module']}, "
            f"{s['steps']} traced steps): busy {busy:.2f} ms/step")
    if step_ms and busy <= step_ms:
        head += f" of {step_ms:.2f} ms measured ({100 * busy / step_ms:.0f}%; the rest: host, launches, gaps)"
    elif step_ms:  # the profiler slows the steps it traces (on the CPU above all)
        head += f", more than the {step_ms:.2f} ms measured untraced"
    ops_total = s["op_ms_per_step"] or 1.0
    out = [head, "| category | ms/step | share of op time |", "|---|---|---|"]
    out += [f"| {c} | {ms:.3f} | {100 * ms / ops_total:.1f}% |" for c, ms in s["categories"].items()]
    out += ["", "| op | category | calls/step | ms/step | share | kernel |", "|---|---|---|---|---|---|"]
    out += [f"| {r['op']} | {r['category']} | {r['calls_per_step']:g} | {r['ms_per_step']:.3f} | "
            f"{100 * r['share']:.1f}% | {r['kernel'][:60]} |" for r in s["ops"]]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/gpu_bench.py --trace-dir /tmp/traces   # keeps each row's trace\n"
               "  python tools/profile_summary.py /tmp/traces/cudnn --steps 3")
    p.add_argument("trace", help="a jax.profiler.trace directory or one .xplane.pb file")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (times are per step)")
    p.add_argument("--top", type=int, default=12, help="ops listed")
    args = p.parse_args(argv)
    try:
        path = find_xplane(args.trace)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    print(summary_table(summarize(path, args.steps, args.top)))


if __name__ == "__main__":
    main()
