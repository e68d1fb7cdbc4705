"""tools/gpu_bench.py --cpu-smoke: the GPU bench's whole code path (bf16
peak, one process per t5lab row, the PyTorch peer, the table) on tiny
shapes on the CPU, so the tool cannot rot while no GPU is at hand."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI lays shared/ beside the clone; the peer runs on the CPU with --cpu.
PEER = os.path.join(ROOT, "..", "shared", "bench", "peer_torch_t5_gpu.py")


def _table(stdout: str) -> list[list[str]]:
    lines = stdout.rstrip().splitlines()
    start = max(i for i, l in enumerate(lines) if l.startswith("| implementation |"))
    assert all(l.startswith("|") for l in lines[start:]), "the table is not the last thing printed"
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[start + 2:]]


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_cpu_smoke_prints_every_row_and_a_failing_row_does_not_stop_it(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    # flash (a TPU kernel) fails inside its part on the CPU, with the maxtext XLA
    # flag set added to its environment; nosuch is refused up front.
    p = subprocess.run([sys.executable, "tools/gpu_bench.py", "--cpu-smoke", "--attention", "xla,flash@maxtext,nosuch",
                        "--json", str(rows_file), "--log-dir", str(tmp_path / "logs")],
                       cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout
    rows = _table(p.stdout)
    names = [(r[0], r[1]) for r in rows]
    assert names[:3] == [("t5lab", "xla"), ("t5lab", "flash@maxtext"), ("t5lab", "nosuch")]
    assert "failed" in rows[1][-1] and "TPU kernel" in rows[1][-1]
    assert rows[2][-1].startswith("not available")
    has_peer = os.path.isfile(PEER)
    measured = rows[:1] + (rows[3:] if has_peer else [])
    if has_peer:
        assert rows[3][0].startswith("peer:"), rows[3]
    else:
        assert rows[3][-1].startswith("not available"), rows[3]
    for r in measured:
        # columns: implementation, attention, step ms, tokens/s, MFU, t5lab/peer, compile s, note
        step_ms, tokens, mfu = _number(r[2]), _number(r[3]), _number(r[4]) / 100
        assert math.isfinite(tokens) and tokens > 0 and step_ms > 0, r
        assert 0 < mfu <= 1, r
        # tokens/s is batch x (inputs + targets) / step time: 2 x (32 + 16) rows
        assert abs(tokens * step_ms / 1e3 - 96) < 0.01 * 96 + 1, r
        if r[0] == "t5lab" and has_peer:
            assert _number(r[5]) > 0, r
    assert "bf16 matmul peak:" in p.stdout and "TFLOP/s (cpu" in p.stdout

    # The attention check (dpa for cudnn on the CPU) prints its own table first.
    check = p.stdout[p.stdout.index("attention check ("):p.stdout.index("bf16 matmul peak:")]
    check_rows = [l for l in check.splitlines() if l.startswith("| encoder_decoder |")]
    # one case on the CPU (tests/test_attention.py covers dpa on every kind of row)
    assert len(check_rows) == 1 and check_rows[0].rstrip().endswith("| yes |"), check

    # --json: one object per row, agreeing with the tables.
    objs = [json.loads(line) for line in rows_file.read_text().splitlines()]
    checks = [o for o in objs if o["kind"] == "check"]
    assert [(c["packed"], c["ok"]) for c in checks] == [(True, True)]
    for c in checks:  # dpa within bf16 rounding of float32 xla, as bf16 xla is
        assert 0 < c["impl_logits"] < 0.05 and 0 < c["impl_grads"] < 0.15, c
    # Part 3's profile: a table per t5lab row from its own jax.profiler trace.
    assert "where the time goes: t5lab xla (host ops of jit_train_step, 2 traced steps)" in p.stdout
    objs = [o for o in objs if o["kind"] != "check"]
    prof = objs[0]["profile"]
    assert prof["steps"] == 2 and prof["busy_ms_per_step"] > 0 and prof["categories"]["matmul"] > 0
    assert sum(prof["categories"].values()) == pytest.approx(prof["op_ms_per_step"])
    assert [o["attention"] for o in objs[:3]] == ["xla", "flash@maxtext", "nosuch"] and len(objs) == 4
    assert objs[0]["peak_flops"] > 0 and objs[0]["model_flops"] > 0
    assert objs[0]["mfu"] == objs[0]["model_flops"] / objs[0]["step_s"] / objs[0]["peak_flops"]
    assert {"peak.log", "t5lab_xla.log", "t5lab_flash_maxtext.log"} <= set(os.listdir(tmp_path / "logs"))


def test_a_flag_set_row_adds_its_xla_flags_and_an_unknown_set_is_refused(capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_bench
    env = gpu_bench.row_env({"XLA_FLAGS": "--xla_dump_to=/tmp/d", "A": "1"}, "maxtext")
    assert env["A"] == "1" and env["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/d --xla_gpu_")
    assert "--xla_gpu_enable_triton_gemm=false" in env["XLA_FLAGS"]
    assert gpu_bench.row_env({"A": "1"}, "") == {"A": "1"}
    with pytest.raises(SystemExit) as e:
        gpu_bench.parse(["--attention", "xla,cudnn@fast"])
    assert e.value.code == 2 and "cudnn@fast" in capsys.readouterr().err
