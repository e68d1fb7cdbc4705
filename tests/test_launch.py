"""launch/multiprocess.sh and launch/slurm.sbatch: real jax.distributed over
127.0.0.1 (2 processes x 4 CPU devices) against one process with 8 devices;
launch/tpu_vm.sh against a stand-in gcloud.

The data stream is global (t5lab/data/pipeline.py): each process builds its
rows of every global batch, so a 2-process run trains on exactly the batches
of a 1-process run, and a run resumes on another process count.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import xla_flags

# One worker runs them all, one after another: Gloo gives up on a peer that
# is 30 s late to connect, which two concurrent 2-process runs on 2 cores can be.
pytestmark = pytest.mark.xdist_group("multiprocess")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TRAIN_ARGS = ["--config", "configs/t5_1_1.py:tiny", f"--config.train.steps={STEPS}",
              "--config.train.eval_every=0", "--config.train.log_every=1",
              "--config.checkpoint.every=0", "--config.optim.warmup_steps=1"]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["step"] for r in rows if "loss" in r], np.array([r["loss"] for r in rows if "loss" in r])


def _train(processes: int, workdir: str, *extra):
    if processes == 1:
        cmd = [sys.executable, "-m", "t5lab.cli", "train"]
        env = _env(XLA_FLAGS=xla_flags(8))
    else:
        cmd, env = ["launch/multiprocess.sh", str(processes)], _env()
    proc = subprocess.run([*cmd, *TRAIN_ARGS, "--workdir", workdir, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-process workdir, 1-process workdir), each trained STEPS steps."""
    base = tmp_path_factory.mktemp("launch")
    multi, single = str(base / "multi"), str(base / "single")
    proc = _train(2, multi)
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith(("[0] ", "[1] ")) for line in lines)  # per-process prefixes
    assert "2 processes" in proc.stdout
    assert "[Gloo]" not in proc.stdout  # the launcher drops Gloo's connection lines
    _train(1, single)
    return multi, single


def test_resume_on_more_processes(runs, tmp_path):
    """Stopped at step 2 on one process, finished on two: the same losses as
    the uninterrupted 1-process run. (Two onto one, scanned: the SLURM test.)"""
    wd = str(tmp_path / "run")
    _train(1, wd, "--config.train.stop_at_step=2")
    proc = _train(2, wd)
    assert f"resumed from {wd}/checkpoints/2" in proc.stdout
    steps, losses = _losses(wd)
    ref_steps, ref = _losses(runs[1])
    assert steps == ref_steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-5)


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


# srun cannot exist here: this stand-in starts SLURM_NTASKS copies of its
# command on this machine with the variables real srun gives each task.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost "$@" > "$FAKE_SRUN_LOGS/$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def _free_slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free here."""
    import random
    import socket
    for port in random.sample(range(61440, 65536), 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 61440
    raise RuntimeError("no free port in 61440-65535")


def test_slurm_run_stopped_on_two_tasks_resumes_on_one_process_scanned(tmp_path):
    """launch/slurm.sbatch under a stand-in srun (2 tasks on this machine):
    jax.distributed.initialize() finds the coordinator, process count and ids
    in SLURM's variables alone. With scanned layers, stopped at step 2 and
    finished by one process, the losses equal an uninterrupted 1-process run
    (scanned layers draw their initial weights otherwise: their own reference)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    job_id = _free_slurm_job_id()
    workdir = str(tmp_path / "slurm")
    scan = "--config.model.scan_layers=true"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SRUN_LOGS=str(tmp_path),
               SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               XLA_FLAGS=xla_flags(4))
    proc = subprocess.run(["bash", "launch/slurm.sbatch", *TRAIN_ARGS, "--workdir", workdir,
                           "--config.train.stop_at_step=2", scan],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    assert "2 processes" in logs[0]
    proc = _train(1, workdir, scan)
    assert f"resumed from {workdir}/checkpoints/2" in proc.stdout
    reference = str(tmp_path / "scanned-reference")
    _train(1, reference, scan)
    steps, losses = _losses(workdir)
    ref_steps, ref = _losses(reference)
    assert steps == ref_steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-5)


def test_a_signal_to_one_process_stops_both_at_a_check_step(tmp_path):
    """SIGTERM to one of two trainers: both save the same step, one where
    they compare stop flags (every train.stop_check_every steps, not every
    step), and exit 143; the launch resumes from it."""
    import signal
    import time
    wd = str(tmp_path / "run")
    args = [a for a in TRAIN_ARGS if not a.startswith("--config.train.steps")]
    launcher = subprocess.Popen(["launch/multiprocess.sh", "2", *args, "--config.train.steps=100000",
                                 "--config.train.stop_check_every=3", "--workdir", wd],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-3000:]
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(launcher.pid), "-f", "t5lab.cli"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[1]), signal.SIGTERM)   # one trainer only, not the launcher
    out = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 143, out[-3000:]
    saved = sorted(set(int(x) for x in __import__("re").findall(r"received: saved step (\d+)", out)))
    assert len(saved) == 1 and saved[0] % 3 == 0, out[-3000:]
    assert out.count("received: saved step") == 2   # both processes stopped there
    assert os.path.isdir(os.path.join(wd, "checkpoints", str(saved[0])))


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


def test_gloo_filter_drops_split_lines():
    """Two Gloo threads writing at once split a connection line in two (seen
    under a loaded suite); both fragments go, the trainer's lines stay."""
    import re
    script = open(os.path.join(ROOT, "launch", "multiprocess.sh")).read()
    quiet = re.search(r"^quiet='(.*)'$", script, re.M).group(1)
    gloo = "is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
    text = (f"[Gloo] Rank [Gloo] Rank 0 {gloo}\n0 {gloo}\n[Gloo] Rank 1 {gloo}\n"
            "t5lab: encoder_decoder model\nstep 1 loss 5.0\n")
    out = subprocess.run(["sed", "-e", quiet], input=text, capture_output=True, text=True).stdout
    assert out == "t5lab: encoder_decoder model\nstep 1 loss 5.0\n"


@pytest.mark.parametrize("script", ["local.sh", "multiprocess.sh", "tpu_vm.sh", "slurm.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)]).returncode == 0


# gcloud and a TPU cannot exist here: this stand-in records each call (one
# JSON list per line), copies what `scp` uploads and reports queued resources
# as ACTIVE, so the test checks the commands tpu_vm.sh would run.
FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[2:4] == ["tpu-vm", "scp"]:
    shutil.copy(args[4], os.environ["FAKE_GCLOUD_LOG"] + ".upload.tar.gz")
if args[2:4] == ["queued-resources", "describe"]:
    print("ACTIVE")
"""


def _tpu_vm(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    log.unlink(missing_ok=True)
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
                    TPU_NAME="t5", ZONE="us-east5-b", ACCELERATOR_TYPE="v5p-64",
                    RUNTIME_VERSION="v2-alpha-tpuv5", **env)
    proc = subprocess.run(["bash", "launch/tpu_vm.sh", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _flag(call, name):
    return call[call.index(name) + 1]


def test_tpu_vm_script_issues_the_gcloud_commands(tmp_path):
    import shlex
    import tarfile

    proc, calls = _tpu_vm(tmp_path, "create")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "t5"]
    assert (_flag(call, "--zone"), _flag(call, "--accelerator-type"), _flag(call, "--version")) == \
        ("us-east5-b", "v5p-64", "v2-alpha-tpuv5")

    proc, calls = _tpu_vm(tmp_path, "create", QUEUED="1", SPOT="1")
    assert proc.returncode == 0, proc.stderr
    assert calls[0][2:5] == ["queued-resources", "create", "t5"] and "--spot" in calls[0]
    assert _flag(calls[0], "--node-id") == "t5" and calls[1][2:4] == ["queued-resources", "describe"]

    proc, calls = _tpu_vm(tmp_path, "setup")
    assert proc.returncode == 0, proc.stderr
    scp, install = calls
    assert scp[2:4] == ["tpu-vm", "scp"] and "--worker=all" in scp and "--worker=all" in install
    with tarfile.open(str(tmp_path / "gcloud.log") + ".upload.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "t5lab/train.py", "launch/tpu_vm.sh"} <= names
    assert not any(n.startswith(".git/") for n in names)
    assert "pip install -q -U -e '.[tpu,gcs]'" in _flag(install, "--command")

    # A local workdir would leave each worker's shards on its own disk: refused before any call.
    proc, calls = _tpu_vm(tmp_path, "train", "--config", "configs/t5_1_1.py:xl", "--workdir", "/tmp/x")
    assert proc.returncode == 2 and calls == [] and "gs://" in proc.stderr

    train_args = ["--config", "configs/t5_1_1.py:xl", "--workdir", "gs://b/runs/xl",
                  "--config.train.steps=10", "--config.data.paths=/data/my corpus/*.txt"]
    proc, calls = _tpu_vm(tmp_path, "train", *train_args)
    assert proc.returncode == 0, proc.stderr
    start, stream = calls
    assert "--worker=all" in start and "--worker=0" in stream
    remote = _flag(start, "--command")
    assert "T5LAB_DISTRIBUTED=1" in remote
    # Every worker's shell must see exactly the arguments given here, spaces included.
    words = shlex.split(remote.split("python -m t5lab.cli train", 1)[1].split(">", 1)[0])
    assert words == train_args

    proc, calls = _tpu_vm(tmp_path, "delete", QUEUED="1")
    assert proc.returncode == 0 and calls[0][2:5] == ["queued-resources", "delete", "t5"]
