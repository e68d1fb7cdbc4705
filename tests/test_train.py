"""The training loop end to end on the embedded corpus: exact resume, faults,
bad input, and a falling loss for the default run."""
import json
import os

import jax
import numpy as np
import pytest

from t5lab import checkpointing, config as config_lib, sharding, train

STEPS = 6


def tiny(*overrides):
    return config_lib.load("configs/ul2.py:tiny", [
        f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2",
        "checkpoint.async_save=true", "optim.warmup_steps=2", "train.batch_size=8", *overrides])


def logged(workdir, keys=("loss", "accuracy", "grad_norm", "lr", "z_loss", "loss_R3")):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: tuple(r.get(k) for k in keys) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("full"))
    train.run(tiny(), wd, progress=False)
    return wd


def test_resume_is_bit_identical(uninterrupted, tmp_path):
    wd = str(tmp_path / "resumed")
    train.run(tiny("train.stop_at_step=3"), wd, progress=False)
    assert checkpointing.Checkpoints(wd, tiny().checkpoint).latest_step() == 3
    train.run(tiny(), wd, progress=False)
    full, resumed = logged(uninterrupted), logged(wd)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == full  # every step's metrics, bit for bit
    a = checkpointing.restore_params(uninterrupted)
    b = checkpointing.restore_params(wd)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_resume_onto_another_mesh(uninterrupted, tmp_path):
    """Saved under pure DP over 8 devices, resumed under FSDP x TP."""
    wd = str(tmp_path / "remesh")
    train.run(tiny("train.stop_at_step=4"), wd, progress=False)
    train.run(tiny("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"), wd, progress=False)
    full, resumed = logged(uninterrupted), logged(wd)
    for step in range(5, STEPS + 1):
        np.testing.assert_allclose(resumed[step][0], full[step][0], atol=1e-5)


def test_incomplete_async_save_is_ignored(uninterrupted, tmp_path):
    """A save killed midway leaves only Orbax's temporary folder; the next start
    resumes from the last complete step."""
    import shutil
    wd = str(tmp_path / "crash")
    train.run(tiny("train.stop_at_step=2"), wd, progress=False)
    root = os.path.join(wd, "checkpoints")
    shutil.copytree(os.path.join(root, "2"), os.path.join(root, "4.orbax-checkpoint-tmp-1234"))
    with open(os.path.join(root, "4.orbax-checkpoint-tmp-1234", "state", "garbage"), "w") as f:
        f.write("half-written")
    assert checkpointing.Checkpoints(wd, tiny().checkpoint).latest_step() == 2
    train.run(tiny(), wd, progress=False)
    assert logged(wd)[STEPS] == logged(uninterrupted)[STEPS]


def test_other_model_in_workdir_is_refused_untouched(uninterrupted):
    before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(uninterrupted) for f in fs}
    with pytest.raises(checkpointing.CheckpointMismatch, match="d_model"):
        train.run(tiny("model.d_model=96"), uninterrupted, progress=False)
    after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(uninterrupted) for f in fs}
    assert before == after


def test_checkpoint_shape_check_names_the_parameter(uninterrupted, tmp_path):
    """Without config.json (copied checkpoints), the shapes themselves are compared."""
    import shutil
    wd = str(tmp_path / "copied")
    shutil.copytree(os.path.join(uninterrupted, "checkpoints"), os.path.join(wd, "checkpoints"))
    with pytest.raises(checkpointing.CheckpointMismatch, match=r"parameter .* has shape"):
        train.run(tiny("model.d_ff=96"), wd, progress=False)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    wd = str(tmp_path / "nan")
    cfg = tiny("optim.learning_rate=1e12", "optim.schedule=constant", "optim.clip_norm=0",
               "checkpoint.every=1", "checkpoint.async_save=false")
    with pytest.raises(train.NonFiniteLoss, match=r"step (\d+)") as err:
        train.run(cfg, wd, progress=False)
    bad = int(err.value.args[0].split()[1].rstrip(":"))
    assert checkpointing.Checkpoints(wd, cfg.checkpoint).latest_step() == bad - 1
    params = checkpointing.restore_params(wd)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_missing_data_path_fails_before_writing(tmp_path):
    wd = tmp_path / "nodata"
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        train.run(tiny("data.source=text", f"data.paths={tmp_path}/no-such-dir/*.txt"), str(wd),
                  progress=False)
    assert not wd.exists()


def test_a_batch_that_does_not_split_over_the_mesh_fails_before_writing(tmp_path):
    wd = tmp_path / "split"
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.batch_size: 4 rows .* 8 batch shards"):
        train.run(tiny("train.batch_size=4", "mesh.data=8"), str(wd), progress=False)
    assert not wd.exists()


def test_default_run_loss_falls(tmp_path):
    """The embedded default (no --config), shortened."""
    cfg = config_lib.load(None, ["train.steps=40", "train.log_every=10", "train.eval_every=20",
                                 "optim.warmup_steps=10", "checkpoint.every=20"])
    wd = str(tmp_path / "default")
    last = train.run(cfg, wd, progress=False)
    losses = [v[0] for k, v in sorted(logged(wd).items())]
    assert losses[-1] < losses[0] - 1.0, losses
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert any("eval/loss" in r for r in rows)
    assert 0 < last["nonpad_fraction"] <= 1 and last["tokens_per_s"] > 0


def test_continue_recipe_resumes_exactly_across_its_mixture_switch(tmp_path):
    """configs/continue.py: re-warmed rate, a replay mixture whose weights switch
    at half the run (data.mixture_schedule); stopped at the switch and resumed,
    every step's metrics equal the uninterrupted run's."""
    new = tmp_path / "new.txt"
    new.write_text("\n".join(f"the river {i} runs past the old stone mill" for i in range(300)) + "\n")

    def cfg(*extra):
        return config_lib.load("configs/continue.py:tiny", [
            f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
            "train.batch_size=8", f"data.mixture=text:{new}=0.95,embedded=0.05",
            "data.mixture_schedule=0.5=0.2,0.8", *extra])

    c = cfg()
    schedule = train.build_program(c, sharding.make_mesh(c.mesh)).schedule
    lr = [float(schedule(s)) for s in (0, c.optim.warmup_steps, STEPS)]
    assert lr[0] == 0 and lr[1] == pytest.approx(c.optim.learning_rate, rel=1e-6)
    assert lr[2] == pytest.approx(c.optim.end_lr_fraction * c.optim.learning_rate, rel=1e-5)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train.run(cfg(), full, progress=False)
    train.run(cfg("train.stop_at_step=3"), cut, progress=False)
    train.run(cfg(), cut, progress=False)
    assert logged(cut) == logged(full) and sorted(logged(full)) == list(range(1, STEPS + 1))
