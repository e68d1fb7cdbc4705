"""tools/aot_compile.py: the real train step compiled for a TPU slice on this
CPU machine (needs libtpu), and its errors when it cannot."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import aot_compile  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason=f"libtpu not installed ({aot_compile.INSTALL})")


def _tool(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_libtpu
def test_too_big_a_step_is_reported_as_not_fitting(tmp_path):
    # The TPU compiler refuses a step over HBM; the tool reports it, by how much.
    out = tmp_path / "plan.jsonl"
    proc = _tool("--config", "configs/t5_1_1.py:tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=-1",
                 "--config.train.batch_size=131072", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = json.loads(out.read_text())
    assert not row["fits"] and row["peak_bytes"] > row["hbm_bytes"] and row["mfu"] is None
    assert "DOES NOT FIT (over by" in proc.stdout


@needs_libtpu
def test_scanned_layers_cost_matches_unscanned(tmp_path):
    """XLA counts a while loop's body once (here 4 layers would look like ~1);
    the tool extrapolates from a second compile with two layers per loop
    iteration, so scanning must not change the FLOPs it reports (beyond the
    loop's own bookkeeping)."""
    rows = []
    for scan in ("false", "true"):
        out = tmp_path / f"{scan}.jsonl"
        # one chip: the FLOP count does not depend on the mesh, and its compile is faster
        proc = _tool("--config", "configs/t5_1_1.py:tiny", "--topology", "v5e:1x1",
                     "--mesh", "fsdp=-1", "--config.model.num_layers=4", "--config.model.remat_policy=full",
                     # xla attention: the flash kernel pads 64 tokens to a 128-token block,
                     # which XLA counts, so the floor would not bound it closely
                     "--config.model.attention=xla",
                     f"--config.model.scan_layers={scan}", "--json", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows.append(json.loads(out.read_text()))
    flat, scanned = rows
    assert scanned["xla_flops_per_chip"] == pytest.approx(flat["xla_flops_per_chip"], rel=0.04)
    # The floor (model FLOPs + the recomputed layer forwards) is a lower bound
    # of what XLA counts for the unscanned step, and a close one.
    counted = flat["xla_flops_per_chip"] * flat["chips"]
    assert flat["floor_flops_per_step"] > 1.3 * flat["model_flops_per_step"]
    assert flat["floor_flops_per_step"] <= counted <= 1.25 * flat["floor_flops_per_step"]


def test_unknown_topology_is_one_line():
    proc = _tool("--config", "configs/t5_1_1.py:tiny", "--topology", "v9:2x2", timeout=120)
    assert proc.returncode == 2
    assert "unknown" in proc.stderr and "v5p:4x4x4" in proc.stderr and "Traceback" not in proc.stderr


@needs_libtpu
def test_topology_libtpu_rejects_is_one_line():
    proc = _tool("--config", "configs/t5_1_1.py:tiny", "--topology", "v5e:3x7", timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "libtpu rejects it" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_libtpu_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    gen, chip, chips = aot_compile.parse_topology("v5p:4x4x4")
    assert (gen, chips) == ("v5p", 64)
    with pytest.raises(aot_compile.PlanError, match=r'pip install -e "\.\[tpu-plan\]"'):
        aot_compile.setup_env(chip, chips)


def test_search_candidates_split_chips_heads_and_batch():
    from t5lab import config as config_lib
    config, _ = config_lib.parse_args(["--config", "configs/t5_1_1.py:xl",
                                       "--config.train.batch_size=64"])
    meshes = aot_compile.candidate_meshes(config, 64)
    assert {"data": 1, "fsdp": 64, "tensor": 1} in meshes
    assert {"data": 1, "fsdp": 16, "tensor": 4} in meshes
    for m in meshes:
        assert m["data"] * m["fsdp"] * m["tensor"] == 64
        assert config.model.num_heads % m["tensor"] == 0 and 64 % (m["data"] * m["fsdp"]) == 0
    assert aot_compile.parse_mesh("fsdp=-1,tensor=4") == {"data": 1, "fsdp": -1, "tensor": 4}


@needs_libtpu
def test_search_with_a_fixed_axis_ranks_the_rest(tmp_path):
    out = tmp_path / "plan.jsonl"
    proc = _tool("--config", "configs/t5_1_1.py:tiny", "--topology", "v5e:2x2", "--search",
                 "--mesh", "data=1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # tiny has 4 heads: tensor 1, 2, 4 with fsdp filling the 4 chips, data held at 1
    assert sorted((r["mesh"]["fsdp"], r["mesh"]["tensor"]) for r in rows) == [(1, 4), (2, 2), (4, 1)]
    assert all(r["mesh"]["data"] == 1 for r in rows)
    (row,) = [r for r in rows if r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}]
    assert row["chips"] == 4
    assert row["fits"] and 0 < row["peak_bytes"] < row["hbm_bytes"] == 16 * 2 ** 30
    # Each of the 4 chips holds a quarter of the float32 params (the tiny model
    # shards evenly over fsdp x tensor except small norm/bias vectors).
    assert row["params"] * 4 / 4 <= row["param_bytes"] < row["params"] * 4 / 2
    assert row["opt_bytes"] >= 2 * row["param_bytes"] * 0.9  # AdamW: two moments
    assert row["step_source"] == "xla" and row["step_s"] > 0 and 0 < row["mfu"] < 1
    # XLA counts at least the model's matmul FLOPs (it adds the rest of the step).
    assert row["xla_flops_per_chip"] * 4 >= 0.9 * row["model_flops_per_step"]
    ranked = proc.stdout[proc.stdout.index("rank"):].splitlines()[2:]
    times = [float(line.split()[6]) for line in ranked]
    assert len(ranked) == 3 and times == sorted(times)

    # The same meshes compiled as separate jobs, appended to one file with the
    # search's rows and another config's row, rank the same way per config.
    split = tmp_path / "split.jsonl"
    for line in out.read_text().splitlines()[::-1]:
        with open(split, "a") as f:
            f.write(line + "\n")
    other = dict(rows[0], config_args=["--config=configs/t5_1_1.py:tiny", "--config.train.batch_size=64"])
    with open(split, "a") as f:
        f.write(json.dumps(other) + "\n")
    proc = _tool("--rank", str(split))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("\n\n")
    assert first.splitlines()[0] == "v5e:2x2  --config=configs/t5_1_1.py:tiny"
    assert first.splitlines()[3:] == ranked and len(second.splitlines()) == 4
    assert "batch_size=64" in second.splitlines()[0]
    proc = _tool("--rank", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "missing.jsonl" in proc.stderr
