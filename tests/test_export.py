"""A training run's checkpoint, exported with `t5lab export`, is a transformers
model that computes what t5lab computes, with a tokenizer that agrees."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from t5lab import checkpointing, cli, config as config_lib, models, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("export_run"))
    cfg = config_lib.load("configs/ul2.py:tiny", ["train.steps=3", "train.eval_every=0",
                                                  "optim.warmup_steps=1", "checkpoint.every=0"])
    train.run(cfg, wd, progress=False)
    return wd, cfg


def test_export_matches_t5lab_logits(run_dir, tmp_path):
    wd, cfg = run_dir
    out = str(tmp_path / "hf")
    assert cli.main(["export", "--workdir", wd, "--out", out]) == 0
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()

    params = checkpointing.restore_params(wd)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, cfg.model.vocab_size, (2, 12)).astype(np.int32)
    enc[1, 9:] = 0  # padding
    dec_in = np.concatenate([np.zeros((2, 1), np.int32), rng.integers(2, 500, (2, 7))], 1).astype(np.int32)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": dec_in, "decoder_loss_weights": np.ones_like(dec_in)}
    ours = np.asarray(models.build(cfg).apply({"params": params}, batch))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(enc, dtype=torch.long),
                          attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                          decoder_input_ids=torch.tensor(dec_in, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_exported_tokenizer_agrees_with_training_tokenizer(run_dir, tmp_path):
    from t5lab.data.tokenizer import Tokenizer
    wd, _ = run_dir
    out = str(tmp_path / "hf_tok")
    assert cli.main(["export", "--workdir", wd, "--out", out]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(os.path.join(wd, "tokenizer.model"))
    # Code keeps its newlines, runs of spaces and non-ASCII bytes (byte fallback).
    text = open(os.__file__, encoding="utf-8").read()[:3000] + "\n  café 中文 🙂  "
    ids = [int(i) for i in ours.encode_batch([text])[0]]
    got = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert got == ids
    assert hf_tok.decode(got) == text
    assert hf_tok.convert_tokens_to_ids("<extra_id_0>") == ours.sentinel_id(0)
    assert hf_tok.pad_token_id == 0 and hf_tok.eos_token_id == 1


def test_export_reads_the_checkpoint_without_warnings(run_dir, tmp_path, caplog):
    wd, _ = run_dir
    with caplog.at_level(logging.WARNING):
        assert cli.main(["export", "--workdir", wd, "--out", str(tmp_path / "quiet")]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_convert_tool_reads_a_checkpoint(run_dir, tmp_path):
    wd, _ = run_dir
    out = str(tmp_path / "tool")
    r = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--config", "configs/ul2.py:tiny",
                        "--checkpoint", wd, "--out", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(out)
    params = checkpointing.restore_params(wd)
    emb = hf_model.shared.weight.detach().numpy()
    np.testing.assert_array_equal(emb, params["token_embedder"]["embedding"])


def test_export_of_a_non_workdir_is_named(tmp_path, capsys):
    assert cli.main(["export", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_llama_tokenizer_files_agree_too(run_dir, tmp_path):
    from t5lab import hf
    from t5lab.data.tokenizer import Tokenizer
    wd, _ = run_dir
    spm = os.path.join(wd, "tokenizer.model")
    out = tmp_path / "llama_tok"
    out.mkdir()
    hf.write_tokenizer(spm, str(out), llama=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "for x in range(3):\n\tprint(x)   # déjà vu"
    ids = [int(i) for i in Tokenizer(spm).encode_batch([text])[0]]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
