"""Hugging Face round trip: t5lab logits equal transformers' logits on the same
weights, export/import is bit-exact, and HF-initialised models import cleanly.
Expected values always come from transformers (torch), never from t5lab."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from t5lab import hf, models
from t5lab.config import schema, validate

# Odd sizes on purpose: 3 heads, head_dim*heads != d_model, d_ff not a multiple of d_model.
ODD = dict(d_model=40, num_heads=3, head_dim=12, d_ff=100, vocab_size=128, num_layers=2,
           relpos_buckets=8, relpos_max_distance=20)
CASES = {
    "t5": dict(ODD, arch="encoder_decoder", num_decoder_layers=3, activation="gelu_tanh"),
    "t5_tied_silu": dict(ODD, arch="encoder_decoder", activation="silu", tie_embeddings=True),
    # Per-layer relative bias; transformers >= 5.24 leaves its untied head unscaled.
    "umt5": dict(ODD, arch="encoder_decoder", d_model=64, relpos_per_layer=True),
    "encoder": dict(ODD, arch="encoder", activation="relu", gated_mlp=False),
    # LlamaConfig insists d_model % num_heads == 0 (head_dim*heads is still != d_model).
    "llama": dict(ODD, arch="decoder", d_model=42, position="rope", activation="silu", rope_theta=500.0),
}
HF_CLASSES = {"T5ForConditionalGeneration": transformers.T5ForConditionalGeneration,
              "UMT5ForConditionalGeneration": transformers.UMT5ForConditionalGeneration,
              "T5EncoderModel": transformers.T5EncoderModel,
              "LlamaForCausalLM": transformers.LlamaForCausalLM}
ENC_LEN, DEC_LEN = 14, 10


def make_config(**model):
    c = schema()
    c.model.update(model)
    c.data.inputs_length, c.data.targets_length = ENC_LEN, DEC_LEN
    return validate(c)


def padded_tokens(rng, lengths, width, vocab, first=None):
    """Random ids in [2, vocab) right-padded with 0 to `width`."""
    out = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        out[i, :n] = rng.integers(2, vocab, n)
        if first is not None:
            out[i, 0] = first
    return out


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    v, arch = config.model.vocab_size, config.model.arch
    if arch == "encoder_decoder":
        targets = padded_tokens(rng, [DEC_LEN, 6, 9], DEC_LEN, v)
        inputs = np.zeros_like(targets)
        inputs[:, 1:] = targets[:, :-1]  # shift right, start token 0
        return {"encoder_input_tokens": padded_tokens(rng, [ENC_LEN, 9, 5], ENC_LEN, v),
                "decoder_input_tokens": inputs, "decoder_target_tokens": targets}
    if arch == "encoder":
        return {"encoder_input_tokens": padded_tokens(rng, [ENC_LEN, 9, 5], ENC_LEN, v)}
    n = ENC_LEN + DEC_LEN
    return {"decoder_input_tokens": padded_tokens(rng, [n, 15, 7], n, v)}


def hf_forward(model, config, batch):
    """transformers' output (logits, or hidden for T5EncoderModel) and the valid mask."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        if config.model.arch == "encoder_decoder":
            enc = batch["encoder_input_tokens"]
            out = model(input_ids=t(enc), attention_mask=t(enc != 0),
                        decoder_input_ids=t(batch["decoder_input_tokens"])).logits
            valid = batch["decoder_target_tokens"] != 0
        elif config.model.arch == "encoder":
            enc = batch["encoder_input_tokens"]
            out = model(input_ids=t(enc), attention_mask=t(enc != 0)).last_hidden_state
            valid = enc != 0
        else:
            ids = batch["decoder_input_tokens"]
            out = model(input_ids=t(ids), attention_mask=t(ids != 0)).logits
            valid = ids != 0
    return out.numpy(), valid


def tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config = make_config(**CASES[request.param])
    model = models.build(config)
    batch = make_batch(config)
    params = nn.unbox(model.init(jax.random.key(1), models.dummy_batch(config, 1))["params"])
    params = jax.tree.map(np.asarray, params)
    out_dir = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(params, config, out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        cls = HF_CLASSES[json.load(f)["architectures"][0]]
    hf_model = cls.from_pretrained(out_dir).eval()
    fwd = jax.jit(lambda p, b, hidden: model.apply({"params": p}, b, return_hidden=hidden),
                  static_argnums=2)
    return dict(name=request.param, config=config, params=params, batch=batch, dir=out_dir,
                cls=cls, hf_model=hf_model, fwd=fwd)


def test_logits_match_transformers(case):
    config, batch = case["config"], case["batch"]
    want, valid = hf_forward(case["hf_model"], config, batch)
    encoder_only = config.model.arch == "encoder"
    got = np.asarray(case["fwd"](case["params"], batch, encoder_only))
    assert got.shape == want.shape
    assert np.abs(got - want)[valid].max() < 1e-4
    if encoder_only:  # the MLM head lives in mlm_head.safetensors: check it against HF hidden states
        head = load_file(os.path.join(case["dir"], hf.MLM_HEAD))["lm_head.weight"]
        logits = np.asarray(case["fwd"](case["params"], batch, False))
        assert np.abs(logits - want @ head.T)[valid].max() < 1e-4


def test_export_import_is_bit_exact(case):
    params, config = hf.load_pretrained(case["dir"])
    assert tree_equal(params, case["params"])
    for key in CASES[case["name"]]:
        if config.model.position == "rope" and key.startswith("relpos"):
            continue  # meaningless for rope models, so not exported
        assert config.model[key] == case["config"].model[key], key


def test_hf_random_model_imports_and_reexports_identically(case, tmp_path):
    torch.manual_seed(7)
    hf_random = case["cls"](case["hf_model"].config).eval()
    hf_random.save_pretrained(tmp_path / "hf")
    params, config = hf.load_pretrained(str(tmp_path / "hf"))
    hf.save_pretrained(params, config, str(tmp_path / "again"))
    theirs = load_file(str(tmp_path / "hf" / hf.WEIGHTS))
    ours = load_file(str(tmp_path / "again" / hf.WEIGHTS))
    for name, tensor in theirs.items():
        assert np.array_equal(ours[name], tensor), name
    if set(ours) - set(theirs):  # only T5 v1.1's tied-but-unscaled head is written explicitly
        assert set(ours) - set(theirs) == {"lm_head.weight"}
        assert np.array_equal(ours["lm_head.weight"], theirs["shared.weight"])
    # The imported params compute what transformers computes.
    want, valid = hf_forward(hf_random, config, case["batch"])
    got = np.asarray(jax.jit(models.build(config).apply, static_argnames="return_hidden")(
        {"params": params}, case["batch"], return_hidden=config.model.arch == "encoder"))
    if config.model.arch == "encoder" and config.model.tie_embeddings:
        got = got * config.model.d_model ** 0.5  # hidden includes the tied head's scale
    assert np.abs(got - want)[valid].max() < 1e-4


def test_untied_head_stays_untied_through_transformers_save_and_reload(case, tmp_path):
    """transformers 5 declares every T5's head tied to `shared` (and warns on
    load that the checkpoint's differs); it keeps the checkpoint's head."""
    config = case["config"]
    if config.model.tie_embeddings or config.model.arch == "encoder":
        pytest.skip("no untied head in transformers' model")
    model = case["hf_model"]
    want, valid = hf_forward(model, config, case["batch"])
    model.save_pretrained(tmp_path / "resaved")
    for m in (model, case["cls"].from_pretrained(tmp_path / "resaved").eval()):
        head, emb = m.get_output_embeddings().weight, m.get_input_embeddings().weight
        assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
        got, _ = hf_forward(m, config, case["batch"])
        assert np.array_equal(got, want)
    ours = np.asarray(case["fwd"](case["params"], case["batch"], False))
    assert np.abs(ours - want)[valid].max() < 1e-4


@pytest.mark.parametrize("field,value,arch", [
    ("position", "relative", "decoder"),
    ("tie_embeddings", True, "decoder"),
    ("gated_mlp", False, "decoder"),
    ("num_heads", 5, "decoder"),
    ("activation", "gelu", "encoder_decoder"),
])
def test_exporter_names_the_field_without_hf_equivalent(field, value, arch):
    base = CASES["llama"] if arch == "decoder" else CASES["t5"]
    config = make_config(**dict(base, **{field: value}))
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf.hf_config(config)


def test_scanned_checkpoint_exports_in_shards_that_transformers_loads(case, tmp_path, monkeypatch):
    """A real Orbax checkpoint of scanned params, read a few leaves at a time
    (checkpointing.HostParams) and written in several shards: transformers
    computes what the scanned t5lab model computes."""
    from t5lab import checkpointing
    config = make_config(**CASES[case["name"]], scan_layers=True)
    model = models.build(config)
    params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(2), models.dummy_batch(config, 1))["params"]))
    assert "layers" in params["decoder" if config.model.arch == "decoder" else "encoder"]
    ckpts = checkpointing.Checkpoints(str(tmp_path / "run"), config.checkpoint, save_data=False)
    ckpts.save(1, {"step": np.int32(1), "params": params, "opt_state": {"mu": params}}, force=True)
    ckpts.close()
    monkeypatch.setattr(hf, "READ_BATCH_BYTES", 60_000)  # several reads
    out = str(tmp_path / "hf")
    hf.save_pretrained(checkpointing.open_params(str(tmp_path / "run")), config, out, max_shard_size="50KB")

    with open(os.path.join(out, hf.INDEX)) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not os.path.exists(os.path.join(out, hf.WEIGHTS))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    tensors = {}
    for name in files:
        shard = load_file(os.path.join(out, name))
        assert all(index["weight_map"][k] == name for k in shard)
        tensors.update(shard)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    hf_model = case["cls"].from_pretrained(out).eval()
    want, valid = hf_forward(hf_model, config, case["batch"])
    encoder_only = config.model.arch == "encoder"
    got = np.asarray(model.apply({"params": params}, case["batch"], return_hidden=encoder_only))
    assert np.abs(got - want)[valid].max() < 1e-4
    if encoder_only:
        head = load_file(os.path.join(out, hf.MLM_HEAD))["lm_head.weight"]
        logits = np.asarray(model.apply({"params": params}, case["batch"]))
        assert np.abs(logits - want @ head.T)[valid].max() < 1e-4
