"""Remote workdirs (gs:// on TPU VMs): the files t5lab writes beside Orbax's
checkpoints go through t5lab.storage. fsspec's in-memory file system stands
in for a bucket: the same code path, no network."""
import importlib.util
import json
import os

import fsspec
import pytest

from t5lab import checkpointing, cli, config as config_lib, metrics, storage, train


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    root = f"memory://t5lab-test-{os.getpid()}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_metrics_reach_the_bucket_and_a_resumed_run_appends(bucket, tmp_path):
    fs, root = bucket
    w = metrics.MetricWriter(root, upload_every=0.0)
    staging = os.path.dirname(w._files["metrics.jsonl"])
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
    # Uploaded as it goes (object stores cannot append: whole-file copies).
    lines = fs.cat(f"{root}/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    w.close()
    assert not os.path.exists(staging)
    (event_file,) = fs.ls(f"{root}/tensorboard", detail=False)
    (tmp_path / os.path.basename(event_file)).write_bytes(fs.cat(event_file))
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]

    w = metrics.MetricWriter(root, upload_every=3600.0)
    w.write(4, {"loss": 0.25})  # the first write goes up at once, later ones every hour ...
    w.write(5, {"loss": 0.2})
    assert len(fs.cat(f"{root}/metrics.jsonl").decode().splitlines()) == 4
    w.close()  # ... and on close
    lines = fs.cat(f"{root}/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5]


def test_a_remote_workdir_of_another_model_is_refused(bucket):
    fs, root = bucket
    config = config_lib.load("configs/t5_1_1.py:tiny")
    storage.makedirs(root)
    saved = json.loads(config.to_json_best_effort())
    saved["model"]["d_model"] = config.model.d_model * 2
    storage.write_text(f"{root}/config.json", json.dumps(saved))
    with pytest.raises(checkpointing.CheckpointMismatch, match="d_model"):
        train._check_workdir_config(root, config)
    train._check_workdir_config(f"{root}/elsewhere", config)  # nothing there: fine


def test_urls_are_not_made_local_paths():
    assert storage.absolute("gs://bucket/runs/x") == "gs://bucket/runs/x"
    assert storage.join("gs://bucket/runs/x", "checkpoints") == "gs://bucket/runs/x/checkpoints"
    assert storage.absolute("runs/x") == os.path.abspath("runs/x")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_workdir_without_gcsfs_stops_before_work(tmp_path, capsys):
    code = cli.main(["train", "--config", "configs/t5_1_1.py:tiny", "--workdir", "gs://some-bucket/run"])
    err = capsys.readouterr().err
    assert code == 2 and "gs://some-bucket/run" in err and "gcsfs" in err
