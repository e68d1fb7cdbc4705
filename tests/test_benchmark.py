"""tools/benchmark.py counts a step's FLOPs with XLA, which counts a while
loop's body once: a step with gradient accumulation or scanned layers must
still report the FLOPs of the whole step, and --dot-floor, which times each
matmul of the compiled step once, must refuse such a step before any work."""
import os
import subprocess
import sys

import pytest

from t5lab import config as config_lib, sharding
from t5lab.train_step import build_program

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)
import benchmark  # noqa: E402


def tiny(*overrides):
    return config_lib.load("configs/ul2.py:tiny", ["model.num_layers=2", "train.batch_size=8",
                                                   "model.scan_layers=false", *overrides])


def counted(config):
    compiled = build_program(config, sharding.make_mesh(config.mesh)).lower_train().compile()
    cost = compiled.cost_analysis()
    return benchmark.xla_flops(config, compiled), float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize("loop", [["train.microbatches=4"], ["model.scan_layers=true"]])
def test_a_step_with_a_loop_reports_the_whole_steps_flops(loop):
    plain, _ = counted(tiny())
    looped, raw = counted(tiny(*loop))
    if loop == ["model.scan_layers=true"]:
        assert raw < 0.75 * plain        # XLA's own count of the scanned step misses a layer
    assert looped == pytest.approx(plain, rel=1e-6)


def test_dot_floor_refuses_a_step_with_loops_before_any_work():
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "benchmark.py"), "--config", "configs/ul2.py:tiny",
                        "--batch", "8", "--inputs", "32", "--targets", "8", "--dot-floor",
                        "--config.train.microbatches=2"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "T5LAB_HUGEPAGES": "0"})
    assert r.returncode != 0
    assert "train.microbatches=1" in r.stderr and "step_s" not in r.stdout
