"""Faults a week-long run meets, on the tiny UL2 model: changed data, a second
trainer, damaged checkpoints, a crash past the last checkpoint, a full disk,
another worker count. Each test fails without the behaviour it names."""
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5lab import checkpointing, config as config_lib, train
from t5lab.data import sources, tokenizer

STEPS = 6


def tiny(*overrides):
    return config_lib.load("configs/ul2.py:tiny", [
        f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2",
        "checkpoint.async_save=true", "optim.warmup_steps=2", "train.batch_size=8", *overrides])


def rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def losses(workdir):
    return {r["step"]: r["loss"] for r in rows(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("full"))
    train.run(tiny(), wd, progress=False)
    return wd


@pytest.fixture(scope="module")
def at4(tmp_path_factory):
    """A run stopped at step 4 (checkpoints 2 and 4); tests resume copies of it."""
    wd = str(tmp_path_factory.mktemp("at4"))
    train.run(tiny("train.stop_at_step=4"), wd, progress=False)
    return wd


def _copy(src, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("trainer.lock"))
    return dst


def test_changed_data_is_refused_naming_the_key_then_allowed(at4, tmp_path):
    wd = _copy(at4, tmp_path)
    before = open(os.path.join(wd, "metrics.jsonl")).read()
    with pytest.raises(config_lib.ConfigError, match=r"data\.seed: 0 -> 1") as err:
        train.run(tiny("data.seed=1"), wd, progress=False)
    assert "allow_data_change" in str(err.value)
    assert open(os.path.join(wd, "metrics.jsonl")).read() == before
    train.run(tiny("data.seed=1", "train.allow_data_change=true"), wd, progress=False)
    restarted = [r for r in rows(wd) if "data_restarted" in r]
    assert [r["step"] for r in restarted] == [4]
    assert sorted(losses(wd)) == list(range(1, STEPS + 1))


def test_the_run_keeps_its_tokenizer(tmp_path):
    """Started with an explicit tokenizer that is then deleted, the run resumes with
    WORKDIR/tokenizer.model, not the default one (which would change the data)."""
    emb = sources.embedded_documents()
    own = tokenizer.train([emb[i] for i in range(3, len(emb), 60)], str(tmp_path / "own.model"), 512)
    wd = str(tmp_path / "run")
    train.run(tiny("train.stop_at_step=2", f"data.tokenizer={own}"), wd, progress=False)
    saved = open(os.path.join(wd, "tokenizer.model"), "rb").read()
    assert saved == open(own, "rb").read()
    other = str(tmp_path / "other.model")
    shutil.copy(tokenizer.resolve(tiny()), other)
    with pytest.raises(config_lib.ConfigError, match="other.model.*not the tokenizer this run"):
        train.run(tiny(f"data.tokenizer={other}"), wd, progress=False)
    os.remove(own)
    train.run(tiny("train.stop_at_step=4"), wd, progress=False)
    assert sorted(losses(wd)) == [1, 2, 3, 4]


def test_a_second_trainer_is_refused_naming_the_holder(at4, tmp_path):
    wd = _copy(at4, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from t5lab import train; train._WorkdirLock(sys.argv[1]);"
                               " print('held', flush=True); time.sleep(600)", wd],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(config_lib.ConfigError, match=f"in use by trainer pid {holder.pid}"):
            train.run(tiny(), wd, progress=False)
        assert time.time() - t0 < 120  # refused at once, not after a hang
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait()
    train.run(tiny(), wd, progress=False)
    assert sorted(losses(wd)) == list(range(1, STEPS + 1))


def _largest(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if f != checkpointing.SEAL]
    return max(files, key=os.path.getsize)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


DAMAGE = {  # kind: (damage(step_dir), what the message names)
    "flipped bits": (lambda d: _flip(_largest(d)), "fails its checksum"),
    "truncated file": (lambda d: os.truncate(_largest(d), os.path.getsize(_largest(d)) // 2), "truncated"),
    "missing data position": (lambda d: shutil.rmtree(os.path.join(d, "data")), "missing"),
    "missing seal": (lambda d: os.remove(os.path.join(d, checkpointing.SEAL)), "not sealed"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_kind_of_damage_is_found_by_verify(at4, tmp_path, kind):
    step_dir = os.path.join(_copy(at4, tmp_path), "checkpoints", "4")
    checkpointing.verify(step_dir)  # intact before
    damage, named = DAMAGE[kind]
    damage(step_dir)
    with pytest.raises(checkpointing.DamagedCheckpoint, match=named):
        checkpointing.verify(step_dir)


@pytest.mark.parametrize("kind", ["flipped bits", "missing data position"])
def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact(full, at4, tmp_path, kind):
    wd = _copy(at4, tmp_path)
    DAMAGE[kind][0](os.path.join(wd, "checkpoints", "4"))
    train.run(tiny(), wd, progress=False)
    assert os.path.isdir(os.path.join(wd, "checkpoints", "damaged-4"))  # kept for inspection
    assert losses(wd) == losses(full)  # resumed at 2: every step once, as the uninterrupted run


def test_export_refuses_a_damaged_checkpoint(at4, tmp_path):
    wd = _copy(at4, tmp_path)
    _flip(_largest(os.path.join(wd, "checkpoints", "4")))
    with pytest.raises(checkpointing.DamagedCheckpoint, match="fails its checksum"):
        checkpointing.restore_params(wd)
    assert np.isfinite(jax.tree_util.tree_leaves(checkpointing.restore_params(wd, step=2))[0]).all()


def test_metrics_hold_each_step_once_after_a_crash(full, at4, tmp_path):
    """A run killed after logging steps 5-6 but before checkpointing them."""
    wd = _copy(at4, tmp_path)
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        for step in (5, 6):
            f.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
    train.run(tiny(), wd, progress=False)
    steps = [r["step"] for r in rows(wd) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert losses(wd) == losses(full)


@pytest.mark.parametrize("scan", [False, True])
def test_other_worker_count_resumes_the_same_stream(full, at4, tmp_path, scan):
    """num_workers 0 -> 2, against the uninterrupted run (scanned layers draw their
    initial weights otherwise, so they get a reference of their own)."""
    reference = full
    if scan:
        wd, reference = str(tmp_path / "scanned"), str(tmp_path / "scanned-reference")
        train.run(tiny("model.scan_layers=true"), reference, progress=False)
        train.run(tiny("train.stop_at_step=4", "model.scan_layers=true"), wd, progress=False)
    else:
        wd = _copy(at4, tmp_path)
    train.run(tiny("data.num_workers=2", f"model.scan_layers={str(scan).lower()}"), wd, progress=False)
    assert sorted(losses(wd)) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        np.testing.assert_allclose(losses(wd)[step], losses(reference)[step], atol=1e-5)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_is_one_error_and_the_previous_checkpoint_restores(at4, small_disk):
    wd = str(small_disk / "run")
    shutil.copytree(at4, wd, ignore=shutil.ignore_patterns("trainer.lock"))
    stat = os.statvfs(wd)
    with open(small_disk / "filler", "wb") as f:  # leave ~40 KB: less than one checkpoint
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 40_000))
    with pytest.raises(checkpointing.CheckpointWriteError) as err:
        train.run(tiny(), wd, progress=False)
    assert "no space left on device" in str(err.value) and "\n" not in str(err.value)
    os.remove(small_disk / "filler")
    params = checkpointing.restore_params(wd, step=4)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_skipped_documents_reach_the_metrics_from_the_workers(tmp_path):
    """Every 5th line of the corpus is not UTF-8: the workers' skip counts are the
    trainer's, the same as without workers."""
    lines = [f"line {i} of a small corpus about rivers, stones and {i % 7} birds".encode() for i in range(3000)]
    lines = [b"\xff\xfe broken " + l if i % 5 == 0 else l for i, l in enumerate(lines)]
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    got = []
    for workers in (0, 2):
        wd = str(tmp_path / f"w{workers}")
        train.run(tiny("train.stop_at_step=2", "data.source=text", f"data.paths={corpus}",
                       f"data.num_workers={workers}"), wd, progress=False)
        got.append([(r["step"], r["skipped_unreadable"]) for r in rows(wd) if "loss" in r])
    assert got[0] == got[1] and got[0][-1][1] > 0
