"""Cached incremental decoding equals transformers' greedy generate on the same weights."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from t5lab import hf, models
from t5lab.config import schema, validate
from t5lab.models.decoding import generate

SIZES = dict(d_model=40, num_heads=3, head_dim=12, d_ff=100, vocab_size=96, num_layers=2,
             relpos_buckets=8, relpos_max_distance=20)
NEW = 16


def setup(tmp_path_factory, name, **model):
    c = schema()
    c.model.update(dict(SIZES, **model))
    c.data.inputs_length, c.data.targets_length = 10, NEW
    c = validate(c)
    m = models.build(c)
    params = jax.tree.map(np.asarray, nn.unbox(m.init(jax.random.key(3), models.dummy_batch(c, 1))["params"]))
    out = str(tmp_path_factory.mktemp(name))
    hf.save_pretrained(params, c, out)
    return c, m, params, out


def assert_same_as_hf(ours, theirs):
    """transformers stops when every row hit eos and pads finished rows with 0;
    t5lab always runs max_new_tokens and emits 0 after eos."""
    ours = np.asarray(ours)
    n = theirs.shape[1]
    np.testing.assert_array_equal(ours[:, :n], theirs)
    assert (ours[:, n:] == 0).all()


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return setup(tmp_path_factory, "t5", arch="encoder_decoder")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return setup(tmp_path_factory, "llama", arch="decoder", d_model=42, position="rope", activation="silu")


def test_encoder_decoder_greedy_matches_transformers(t5):
    config, model, params, out = t5
    enc = np.random.default_rng(0).integers(2, 96, (3, 10)).astype(np.int32)
    enc[1, 6:] = 0  # padding in the encoder input
    ours = generate(model, params, {"encoder_input_tokens": enc}, NEW)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = ref.generate(input_ids=torch.as_tensor(enc, dtype=torch.long),
                              attention_mask=torch.as_tensor(enc != 0, dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False, decoder_start_token_id=0,
                              eos_token_id=1, pad_token_id=0).numpy()
    assert_same_as_hf(ours, theirs[:, 1:])  # drop HF's decoder start token


def test_decoder_only_greedy_matches_transformers(llama):
    config, model, params, out = llama
    prompt = np.random.default_rng(1).integers(2, 96, (2, 6)).astype(np.int32)
    ours = generate(model, params, prompt, NEW)
    ref = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = ref.generate(input_ids=torch.as_tensor(prompt, dtype=torch.long),
                              attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False, eos_token_id=1, pad_token_id=0).numpy()
    assert_same_as_hf(ours, theirs[:, prompt.shape[1]:])


def test_sampling_is_seeded_and_tends_to_greedy(llama):
    config, model, params, _ = llama
    prompt = np.random.default_rng(2).integers(2, 96, (2, 6)).astype(np.int32)
    greedy = np.asarray(generate(model, params, prompt, NEW))
    a = np.asarray(generate(model, params, prompt, NEW, temperature=1.0, rng=jax.random.key(5)))
    b = np.asarray(generate(model, params, prompt, NEW, temperature=1.0, rng=jax.random.key(5)))
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < config.model.vocab_size)).all()
    cold = generate(model, params, prompt, NEW, temperature=1e-6, rng=jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(cold), greedy)


def test_prefix_lm_prompt_matches_full_forward(llama):
    """Bidirectional-prompt decoding equals argmax of a full prefix-LM forward pass."""
    config, model, params, _ = llama
    prompt = np.random.default_rng(3).integers(2, 96, (2, 6)).astype(np.int32)
    ours = np.asarray(generate(model, params, prompt, 4, bidirectional_prompt=True))
    forward = jax.jit(lambda b: model.apply({"params": params}, b))
    seq = prompt
    for _ in range(4):
        prefix = np.zeros_like(seq)
        prefix[:, :prompt.shape[1]] = 1
        logits = forward({"decoder_input_tokens": seq, "decoder_causal_attention": prefix})
        seq = np.concatenate([seq, np.argmax(logits[:, -1], -1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(ours, seq[:, prompt.shape[1]:])
