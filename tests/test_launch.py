"""launch/multiprocess.sh: real jax.distributed over 127.0.0.1 (2 processes x 4
CPU devices) against one process with 8 devices.

The data pipeline gives each process its own shard of the documents, so the
single-process reference is fed exactly the rows the two processes read
together (their two shards, concatenated per step): any difference left is the
distributed train step's or the checkpoint's.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TRAIN_ARGS = ["--config", "configs/t5_1_1.py:tiny", f"--config.train.steps={STEPS}",
              "--config.train.eval_every=0", "--config.train.log_every=1",
              "--config.checkpoint.every=0", "--config.optim.warmup_steps=1"]

# One process, 8 devices, reading process 0's and process 1's shards of a
# 2-process run and concatenating them into each global batch.
REFERENCE = """
import sys
import grain
from t5lab import train
from t5lab.data import pipeline

make_dataset = pipeline.make_dataset

def both_shards(config, split="train", *, tokenizer_path, **_):
    shards = [make_dataset(config, split, tokenizer_path=tokenizer_path, process_index=i,
                           process_count=2) for i in range(2)]
    # Equal weights alternate shard 0, shard 1; batch(2) pairs them into one step.
    pairs = grain.IterDataset.mix(shards, weights=[1, 1]).batch(2)
    return pairs.map(lambda b: {k: v.reshape(-1, v.shape[-1]) for k, v in b.items()})

pipeline.make_dataset = both_shards
train.main(sys.argv[1:])
"""


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows if "loss" in r], np.array([r["loss"] for r in rows if "loss" in r])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-process workdir, 1-process reference workdir), each trained STEPS steps."""
    base = tmp_path_factory.mktemp("launch")
    multi, single = str(base / "multi"), str(base / "single")
    proc = subprocess.run(["launch/multiprocess.sh", "2", *TRAIN_ARGS, "--workdir", multi],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0] " in proc.stdout and "[1] " in proc.stdout  # per-process prefixes
    assert "2 processes" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", REFERENCE, *TRAIN_ARGS, "--workdir", single],
                          cwd=ROOT, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return multi, single


def test_two_processes_match_one_process(runs):
    multi, single = runs
    steps_m, loss_m = _losses(multi)
    steps_s, loss_s = _losses(single)
    assert steps_m == steps_s == list(range(1, STEPS + 1))
    assert np.all(np.isfinite(loss_m))
    np.testing.assert_allclose(loss_m, loss_s, rtol=0, atol=1e-5)
    assert loss_m[-1] < loss_m[0]  # it trains


def test_two_process_checkpoint_restores_in_one_process(runs):
    """The full train state written by 2 processes restores onto this process's
    8 devices and equals the state the single-process run saved."""
    import jax
    from t5lab import checkpointing, config as config_lib, sharding
    from t5lab.train_step import build_program

    multi, single = runs
    config, _ = config_lib.parse_args(TRAIN_ARGS)
    program = build_program(config, sharding.make_mesh(config.mesh))
    states = []
    for workdir in (multi, single):
        ckpts = checkpointing.Checkpoints(workdir, config.checkpoint)
        assert ckpts.latest_step() == STEPS
        states.append(ckpts.restore(STEPS, program.abstract_state))
        ckpts.close()
    restored, reference = states
    assert int(restored["step"]) == STEPS
    leaves = jax.tree_util.tree_leaves_with_path(restored)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(reference)):
        assert a.sharding == b.sharding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_one_failing_process_fails_the_launch():
    # Bad input fails in every process before jax.distributed starts; the
    # launcher must exit with the trainers' status, not hang or report success.
    proc = subprocess.run(["launch/multiprocess.sh", "2", "--config", "configs/no_such.py",
                           "--workdir", "/nonexistent"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no config file" in proc.stdout


def test_usage_errors():
    proc = subprocess.run(["launch/multiprocess.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run(["launch/multiprocess.sh", "16"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "T5LAB_DEVICES_PER_PROCESS" in proc.stderr


@pytest.mark.parametrize("script", ["local.sh", "multiprocess.sh", "tpu_vm.sh", "slurm.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)]).returncode == 0
