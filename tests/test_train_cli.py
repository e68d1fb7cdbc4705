"""`t5lab train` as a user runs it: SIGTERM saves and exits cleanly, bad input
exits 2 with one line naming the key, and --config.init.from_hf continues from
a Hugging Face checkpoint."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5lab import checkpointing, config as config_lib, train

TINY = ["--config", "configs/t5_1_1.py:tiny", "--config.train.eval_every=0", "--config.train.log_every=1"]


def t5lab(*args, **kw):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, "-m", "t5lab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    wd = str(tmp_path / "run")
    p = t5lab("train", *TINY, "--workdir", wd, "--config.train.steps=10000",
              "--config.checkpoint.every=0")
    for line in p.stdout:
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "SIGTERM received: saved step" in out
    saved = int(out.split("saved step ")[1].split()[0])
    assert saved >= 3
    assert checkpointing.Checkpoints(wd, config_lib.schema().checkpoint).latest_step() == saved
    # The same command resumes from there (stop right after, at saved + 2).
    p = t5lab("train", *TINY, "--workdir", wd, "--config.train.steps=10000",
              f"--config.train.stop_at_step={saved + 2}")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"resumed from {wd}/checkpoints/{saved}" in out


@pytest.mark.parametrize("args,named", [
    (["--config.model.num_layerz=3"], "config.model.num_layerz"),
    (["--config.data.source=text", "--config.data.paths=/no/such/*.txt"], "/no/such/*.txt"),
    (["--config.data.objective=mlm"], "config.data"),       # MLM is for the encoder-only model
    (["--config.optim.soap_precondition_frequency=0"], "soap_precondition_frequency"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, named):
    wd = tmp_path / "bad"
    p = t5lab("train", *TINY, "--workdir", str(wd), *args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    assert named in err and "Traceback" not in err
    assert not wd.exists()


def test_continued_pretraining_from_hf(tmp_path):
    """The first step's learning rate is 0 under warmup, so after one step the
    params are exactly the Hugging Face ones."""
    from t5lab import hf, models
    import flax.linen as nn
    cfg = config_lib.load("configs/t5_1_1.py:tiny")
    model = models.build(cfg)
    params = nn.unbox(model.init(jax.random.key(7), models.dummy_batch(cfg, 1))["params"])
    hf_dir = str(tmp_path / "hf")
    hf.save_pretrained(params, cfg, hf_dir)
    wd = str(tmp_path / "cont")
    run_cfg = config_lib.load("configs/t5_1_1.py:tiny", [
        f"init.from_hf={hf_dir}", "train.stop_at_step=1", "train.eval_every=0"])
    train.run(run_cfg, wd, progress=False)
    got = checkpointing.restore_params(wd)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # A config whose model differs from the checkpoint is refused, naming the key.
    bad = config_lib.load("configs/t5_1_1.py:tiny", [f"init.from_hf={hf_dir}", "model.d_ff=96"])
    with pytest.raises(config_lib.ConfigError, match="config.model.d_ff"):
        train.run(bad, str(tmp_path / "bad"), progress=False)
