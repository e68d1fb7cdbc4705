"""tools/profile_summary.py on traces whose answer is known by hand: a GPU
trace (leaf kernels on two overlapping streams) and an XLA:CPU trace (a
while loop's event containing its body's); gpu_bench's smoke test runs it
on a real trace."""
import os
import sys

import pytest
from jax.profiler import ProfileData

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import profile_summary  # noqa: E402


def _trace(planes: dict) -> ProfileData:
    """planes: {plane name: [[(kernel, start us, duration us, hlo_op, module), ...] per line]}"""
    text = []
    for pid, (pname, lines) in enumerate(planes.items(), 1):
        names = sorted({e[0] for line in lines for e in line})
        ids = {n: i for i, n in enumerate(names, 1)}
        body = [f'planes {{ id: {pid} name: "{pname}"']
        for lid, line in enumerate(lines, 1):
            evs = " ".join(
                f'events {{ metadata_id: {ids[k]} offset_ps: {int(s * 1e6)} duration_ps: {int(d * 1e6)} '
                f'stats {{ metadata_id: 1 str_value: "{op}" }} stats {{ metadata_id: 2 str_value: "{mod}" }} }}'
                for k, s, d, op, mod in line)
            body.append(f'lines {{ id: {lid} name: "line {lid}" timestamp_ns: 5000 {evs} }}')
        body += [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in ids.items()]
        body += ['stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }',
                 'stat_metadata { key: 2 value { id: 2 name: "hlo_module" } }', "}"]
        text.append("\n".join(body))
    return ProfileData.from_text_proto("\n".join(text))


def test_gpu_trace_counts_kernels_per_category_and_busy_time_as_a_union():
    step = "jit_train_step"
    profile = _trace({
        "/device:GPU:0": [
            [("cudnn_generated_fort_native_sdpa_sm90", 0, 30, "custom-call.3", step),
             ("loop_multiply_fusion", 40, 10, "fusion.7", step),
             ("cudnn_generated_fort_native_sdpa_sm90", 60, 30, "custom-call.3", step),
             ("small_other_module", 100, 5, "fusion.1", "jit_other")],
            [("nvjet_tst_128x256_64x4", 20, 30, "cublas-gemm.1", step)],
        ],
        # the host's own XLA events are ignored when a device plane has some
        "/host:CPU": [[("dot.1", 0, 500, "dot.1", step)]],
    })
    s = profile_summary.summarize(profile, steps=2)
    assert (s["source"], s["module"]) == ("device", step)
    # kernels cover [0, 50] and [60, 90] us: 80 us over 2 steps
    assert s["busy_ms_per_step"] == pytest.approx(0.040)
    assert s["categories"]["attention"] == pytest.approx(0.030)
    assert s["categories"]["matmul"] == pytest.approx(0.015)
    assert s["categories"]["other fusions"] == pytest.approx(0.005)
    assert s["categories"]["copy/layout"] == 0 and s["categories"]["loop control"] == 0
    top = s["ops"][0]
    assert (top["op"], top["calls_per_step"], top["share"]) == ("custom-call.3", 1, pytest.approx(60 / 100))
    assert [r["op"] for r in s["ops"]] == ["custom-call.3", "cublas-gemm.1", "fusion.7"]
    table = profile_summary.summary_table(s, step_ms=0.1)
    assert "busy 0.04 ms/step of 0.10 ms measured (40%" in table


def test_cpu_trace_subtracts_nested_events_and_unions_threads():
    m = "jit_train_step"
    profile = _trace({"/host:CPU": [
        [("while.1", 0, 100, "while.1", m), ("dot.2", 10, 30, "dot.2", m),
         ("add_fusion.3", 50, 20, "add_fusion.3", m), ("copy.4", 55, 5, "copy.4", m)],
        [("dot.2", 90, 20, "dot.2", m)],  # another thread, partly after the loop
    ]})
    s = profile_summary.summarize(profile, steps=1, top=10)
    assert s["source"] == "host"
    ops = {r["op"]: r for r in s["ops"]}
    # while: 100 - 30 (dot) - 20 (fusion, which holds the copy) = 50
    assert ops["while.1"]["ms_per_step"] == pytest.approx(0.050)
    assert ops["add_fusion.3"]["ms_per_step"] == pytest.approx(0.015)
    assert ops["copy.4"]["ms_per_step"] == pytest.approx(0.005)
    assert (ops["dot.2"]["ms_per_step"], ops["dot.2"]["calls_per_step"]) == (pytest.approx(0.050), 2)
    assert s["busy_ms_per_step"] == pytest.approx(0.110)  # [0, 110] us
    assert s["categories"] == pytest.approx({"matmul": 0.05, "attention": 0, "copy/layout": 0.005,
                                             "loop control": 0.05, "other fusions": 0.015})


def test_a_directory_without_a_trace_is_named(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)):
        profile_summary.main([str(tmp_path)])
