"""`t5lab train` as a user runs it: SIGTERM saves and exits 143, bad input
exits 2 with one line naming the key, and --config.init.from_hf continues from
a Hugging Face checkpoint."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import xla_flags
from t5lab import checkpointing, config as config_lib, train

TINY = ["--config", "configs/t5_1_1.py:tiny", "--config.train.eval_every=0", "--config.train.log_every=1"]


def t5lab(*args, **kw):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
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
    assert p.returncode == 143, err[-3000:]  # saved, not finished: `train && export` stops here
    assert "SIGTERM received: saved step" in out and "not finished" in out
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
    (["--config.train.log_every=0"], "config.train.log_every"),
    (["--config.checkpoint.keep=0"], "config.checkpoint.keep"),
    (["--config.mesh.data=4"], "config.mesh"),           # one device here
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, named):
    wd = tmp_path / "bad"
    p = t5lab("train", *TINY, "--workdir", str(wd), *args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    assert named in err and "Traceback" not in err
    assert not wd.exists()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny T5 v1.1 with its tokenizer, as a Hugging Face directory."""
    from t5lab import hf, models
    from t5lab.data import tokenizer
    import flax.linen as nn
    cfg = config_lib.load("configs/t5_1_1.py:tiny")
    params = nn.unbox(models.build(cfg).init(jax.random.key(7), models.dummy_batch(cfg, 1))["params"])
    out = str(tmp_path_factory.mktemp("hf") / "hf")
    hf.save_pretrained(params, cfg, out, spm_model=tokenizer.resolve(cfg))
    return out


def test_a_workdir_that_cannot_be_one_is_refused_in_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    p = t5lab("train", *TINY, "--workdir", str(afile))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "afile: is a file" in err and "Traceback" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        p = t5lab("train", *TINY, "--workdir", str(ro / "run"))
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "is not writable" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", "-l", str(ro)])


@pytest.mark.parametrize("scan", [False, True])
def test_continued_pretraining_takes_the_model_and_tokenizer_from_hf(tmp_path, hf_dir, scan):
    """Only --config.init.from_hf is given (the defaults are another model): the
    shape and tokenizer come from the directory. The first step's learning rate
    is 0 under warmup, so after one step the params are exactly the Hugging Face ones."""
    from t5lab import hf
    wd = str(tmp_path / "cont")
    train.main([f"--config.init.from_hf={hf_dir}", f"--config.model.scan_layers={scan}",
                "--config.train.stop_at_step=1", "--config.train.eval_every=0",
                "--config.train.batch_size=8", "--workdir", wd])
    saved = config_lib.load(None)
    saved.update_from_flattened_dict({f"model.{k}": v for k, v in json.load(open(f"{wd}/config.json"))["model"].items()})
    want, hf_cfg = hf.load_pretrained(hf_dir, scan_layers=scan)
    assert saved.model.d_model == hf_cfg.model.d_model != config_lib.schema().model.d_model
    assert open(f"{wd}/tokenizer.model", "rb").read() == open(f"{hf_dir}/spiece.model", "rb").read()
    got = checkpointing.restore_params(wd)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_continued_pretraining_refuses_a_conflicting_model_key(tmp_path, hf_dir):
    wd = tmp_path / "bad"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.d_ff.*leave it out"):
        train.main([f"--config.init.from_hf={hf_dir}", "--config.model.d_ff=96", "--workdir", str(wd)])
    assert not wd.exists()
