"""Export to / import from Hugging Face transformers (safetensors + config.json).

  encoder_decoder -> T5ForConditionalGeneration (UMT5ForConditionalGeneration if relpos_per_layer)
  encoder         -> T5EncoderModel (UMT5EncoderModel); the untied MLM head, which
                     T5EncoderModel has no place for, goes to mlm_head.safetensors
                     as `lm_head.weight` [vocab, d_model]
  decoder (rope)  -> LlamaForCausalLM

Kernels become torch Linear weights [out, in]; q/k/v [embed, heads, kv] flatten
to [heads*kv, embed]. Configs without an HF equivalent raise ValueError naming
the config field. Exporting needs no torch; only loading in transformers does.
The weights are written as transformers writes them (model.safetensors, or
shards and an index beyond max_shard_size), tensor by tensor, from params in
memory or read from a checkpoint a group of leaves at a time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np
from safetensors.numpy import load_file

from t5lab.config import ARCH_KEYS, schema, validate

WEIGHTS = "model.safetensors"
INDEX = WEIGHTS + ".index.json"  # a sharded export's weight map
MLM_HEAD = "mlm_head.safetensors"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default


# ------------------------------------------------------------------ configs
def _check_exportable(m):
    def fail(field, why):
        raise ValueError(f"config.model.{field}: {why}")
    if m.arch == "decoder":
        if m.position != "rope":
            fail("position", "decoder-only export targets LlamaForCausalLM, which needs 'rope' "
                             "(transformers has no decoder-only model with T5 relative bias)")
        if m.tie_embeddings:
            fail("tie_embeddings", "LlamaForCausalLM ties the head without t5lab's d_model**-0.5 logit scale")
        if not m.gated_mlp:
            fail("gated_mlp", "LlamaForCausalLM has only a gated MLP")
        if m.d_model % m.num_heads:
            fail("num_heads", f"LlamaConfig requires d_model={m.d_model} to be a multiple of it")
    elif m.gated_mlp and m.activation == "gelu":
        fail("activation", "T5 maps 'gated-gelu' to the tanh approximation; use gelu_tanh")
    if m.position != "relative" and m.arch != "decoder":
        fail("position", "T5 models use relative position bias")


def _t5_act(m):
    name = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}[m.activation]
    if m.gated_mlp:
        return "gated-gelu" if m.activation == "gelu_tanh" else f"gated-{name}"
    return name


def hf_config(config) -> dict:
    """The config.json dict transformers' from_pretrained reads."""
    m = config.model
    _check_exportable(m)
    dec_layers = m.num_layers if m.num_decoder_layers == -1 else m.num_decoder_layers
    if m.arch == "decoder":
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_heads, "head_dim": m.head_dim,
            "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(m.activation, m.activation),
            "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "max_position_embeddings": config.data.inputs_length + config.data.targets_length,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            # T5 token ids: pad 0, eos 1, no BOS.
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None, "dtype": "float32",
        }
    umt5 = m.relpos_per_layer
    arch = {("encoder_decoder", False): "T5ForConditionalGeneration",
            ("encoder_decoder", True): "UMT5ForConditionalGeneration",
            ("encoder", False): "T5EncoderModel", ("encoder", True): "UMT5EncoderModel"}[(m.arch, umt5)]
    return {
        "architectures": [arch], "model_type": "umt5" if umt5 else "t5",
        "vocab_size": m.vocab_size, "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": m.d_ff,
        "num_layers": m.num_layers, "num_decoder_layers": dec_layers, "num_heads": m.num_heads,
        "relative_attention_num_buckets": m.relpos_buckets,
        "relative_attention_max_distance": m.relpos_max_distance,
        "dropout_rate": m.dropout_rate, "layer_norm_epsilon": m.norm_eps,
        "feed_forward_proj": _t5_act(m), "tie_word_embeddings": m.tie_embeddings,
        "is_encoder_decoder": m.arch == "encoder_decoder",
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "dtype": "float32",
    }


def _hf_scales_logits(hf: dict) -> bool:
    """Whether the HF model multiplies decoder output by d_model**-0.5 before its
    lm_head. transformers 5 forces tie_word_embeddings=True for T5 and UMT5 and
    keeps the saved value's old meaning in scale_decoder_outputs (for UMT5 only
    since 5.24: before, it scaled even untied heads, which t5x never did)."""
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))


def config_from_hf(hf: dict, has_lm_head: bool):
    """A full t5lab config (schema defaults) with the model group from config.json."""
    c = schema()
    m = c.model
    if hf["model_type"] == "llama":
        if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
            raise ValueError("num_key_value_heads: grouped-query attention is not implemented in t5lab")
        m.arch, m.position, m.gated_mlp = "decoder", "rope", True
        m.vocab_size, m.d_model, m.d_ff = hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"]
        m.num_layers, m.num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        m.head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        m.activation = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}.get(
            hf["hidden_act"], hf["hidden_act"])
        m.norm_eps = float(hf["rms_norm_eps"])
        rope = hf.get("rope_parameters") or {}
        m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        m.tie_embeddings = False
        if hf.get("tie_word_embeddings"):
            raise ValueError("tie_word_embeddings: tied Llama heads are unscaled; t5lab cannot import them")
        return validate(c)
    if hf["model_type"] not in ("t5", "umt5"):
        raise ValueError(f"model_type: {hf['model_type']!r} is not t5, umt5 or llama")
    encoder_only = not any("ConditionalGeneration" in a for a in hf.get("architectures") or [])
    m.arch = "encoder" if encoder_only else "encoder_decoder"
    m.relpos_per_layer = hf["model_type"] == "umt5"
    m.vocab_size, m.d_model, m.head_dim, m.d_ff = hf["vocab_size"], hf["d_model"], hf["d_kv"], hf["d_ff"]
    m.num_layers, m.num_heads = hf["num_layers"], hf["num_heads"]
    dec = hf.get("num_decoder_layers") or hf["num_layers"]
    m.num_decoder_layers = -1 if dec == m.num_layers else dec
    m.relpos_buckets = hf.get("relative_attention_num_buckets", 32)
    m.relpos_max_distance = hf.get("relative_attention_max_distance", 128)
    m.dropout_rate = float(hf.get("dropout_rate", 0.0))
    m.norm_eps = float(hf.get("layer_norm_epsilon", 1e-6))
    proj = hf.get("feed_forward_proj", "relu")
    m.gated_mlp = proj.startswith("gated-")
    act = proj.split("-")[-1]
    m.activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
    if m.gated_mlp and act == "gelu":  # HF's backwards-compatible alias
        m.activation = "gelu_tanh"
    m.tie_embeddings = not has_lm_head
    return validate(c)


# -------------------------------------------------------------- parameters
def _scan(params, names=("encoder", "decoder")):
    out = dict(params)
    for name in names:
        if name in out:
            sub = dict(out[name])
            keys = sorted((k for k in sub if k.startswith("layers_")), key=lambda k: int(k[7:]))
            layers = [sub.pop(k) for k in keys]
            sub["layers"] = _map(lambda *xs: np.stack(xs), *layers)
            out[name] = sub
    return out


def _map(fn, *trees):
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _name_map(m) -> list[tuple[tuple[str, ...], str, str]]:
    """(t5lab path, HF tensor name, kind) for every tensor; kind says how shapes differ."""
    rows = []
    if m.arch == "decoder":
        rows.append((("token_embedder", "embedding"), "model.embed_tokens.weight", "same"))
        for i in range(m.num_layers):
            p, h = ("decoder", f"layers_{i}"), f"model.layers.{i}"
            rows += [(p + ("pre_attention_norm", "scale"), f"{h}.input_layernorm.weight", "same"),
                     (p + ("pre_mlp_norm", "scale"), f"{h}.post_attention_layernorm.weight", "same")]
            for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
                rows.append((p + ("self_attention", ours, "kernel"), f"{h}.self_attn.{theirs}_proj.weight", "qkv"))
            rows.append((p + ("self_attention", "out", "kernel"), f"{h}.self_attn.o_proj.weight", "out"))
            for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                rows.append((p + ("mlp", ours), f"{h}.mlp.{theirs}.weight", "T"))
        rows.append((("decoder", "final_norm", "scale"), "model.norm.weight", "same"))
        rows.append((("lm_head", "kernel"), "lm_head.weight", "T"))
        return rows

    rows.append((("token_embedder", "embedding"), "shared.weight", "same"))
    stacks = [("encoder", m.num_layers)]
    if m.arch == "encoder_decoder":
        stacks.append(("decoder", m.num_layers if m.num_decoder_layers == -1 else m.num_decoder_layers))
    for stack, n in stacks:
        bias_name = "layer.0.SelfAttention.relative_attention_bias.weight"
        if not m.relpos_per_layer:
            rows.append(((stack, "relpos", "rel_embedding"), f"{stack}.block.0.{bias_name}", "T"))
        for i in range(n):
            p, h = (stack, f"layers_{i}"), f"{stack}.block.{i}"
            if m.relpos_per_layer:
                rows.append((p + ("relpos", "rel_embedding"), f"{h}.{bias_name}", "T"))
            blocks = [("self_attention", "pre_attention_norm", "SelfAttention")]
            if stack == "decoder":
                blocks.append(("cross_attention", "pre_cross_attention_norm", "EncDecAttention"))
            for j, (attn, norm, hf_attn) in enumerate(blocks):
                rows.append((p + (norm, "scale"), f"{h}.layer.{j}.layer_norm.weight", "same"))
                for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
                    rows.append((p + (attn, ours, "kernel"), f"{h}.layer.{j}.{hf_attn}.{theirs}.weight",
                                 "out" if ours == "out" else "qkv"))
            j = len(blocks)
            rows.append((p + ("pre_mlp_norm", "scale"), f"{h}.layer.{j}.layer_norm.weight", "same"))
            for wi in (("wi_0", "wi_1") if m.gated_mlp else ("wi",)) + ("wo",):
                rows.append((p + ("mlp", wi), f"{h}.layer.{j}.DenseReluDense.{wi}.weight", "T"))
        rows.append(((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", "same"))
    if not m.tie_embeddings:
        rows.append((("lm_head", "kernel"), "lm_head.weight", "T"))
    return rows


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _head_fold(config, hf_json) -> float:
    """Factor folded into an exported untied lm_head when the HF class would
    scale logits that t5lab does not."""
    m = config.model
    if m.arch == "encoder_decoder" and not m.tie_embeddings and _hf_scales_logits(hf_json):
        return float(m.d_model) ** 0.5
    return 1.0


def _tensors(m, shapes) -> list[tuple[str, tuple[str, ...], int | None, str, tuple[int, ...]]]:
    """(HF name, source leaf path, layer index into a scanned stack or None, kind,
    HF shape) for every tensor, from the params' shapes alone; ordered by source
    leaf, so a writer that reads the leaves in this order needs each only once
    (a scanned stack's layers are consecutive)."""
    rows, first = [], {}
    for path, name, kind in _name_map(m):
        layer = None
        if len(path) > 1 and path[1].startswith("layers_") and "layers" in shapes.get(path[0], {}):
            path, layer = (path[0], "layers") + path[2:], int(path[1][7:])
        shape = tuple(_get(shapes, path).shape)[0 if layer is None else 1:]
        if kind == "qkv":  # [embed, heads, kv] -> [heads*kv, embed]
            shape = (int(np.prod(shape[1:])), shape[0])
        elif kind == "out":  # [heads, kv, embed] -> [embed, heads*kv]
            shape = (shape[-1], int(np.prod(shape[:-1])))
        elif kind == "T":
            shape = shape[::-1]
        first.setdefault(path, len(first))
        rows.append((name, path, layer, kind, shape))
    return sorted(rows, key=lambda r: first[r[1]])  # stable: layer order kept


def _hf_view(a, layer, kind):
    """The HF layout of one source leaf (a layer of it): views, no copies."""
    a = a[layer] if layer is not None else a
    if kind == "qkv":
        return a.reshape(a.shape[0], -1).T
    if kind == "out":
        return a.reshape(-1, a.shape[-1]).T
    return a.T if kind == "T" else a


def _float32(a, fold: float = 1.0) -> np.ndarray:
    if fold != 1.0:  # in float64, as from_hf_state divides: the round trip is exact
        a = np.array(a, np.float64)
        a *= fold
    return np.ascontiguousarray(a, dtype="<f4")


def to_hf_state(params, config) -> dict[str, np.ndarray]:
    """Flat {HF name: float32 array} (the encoder's MLM head included as lm_head.weight)."""
    fold = _head_fold(config, hf_config(config))
    return {name: _float32(_hf_view(np.asarray(_get(params, path)), layer, kind),
                           fold if name == "lm_head.weight" else 1.0)
            for name, path, layer, kind, _ in _tensors(config.model, params)}


def from_hf_state(state, config, hf_json=None) -> dict:
    """Inverse of to_hf_state: nested float32 params (scanned if config says so)."""
    m = config.model
    fold = _head_fold(config, hf_json if hf_json is not None else hf_config(config))
    params = {}
    for path, name, kind in _name_map(m):
        a = np.asarray(state[name], np.float32)
        if kind == "qkv":
            a = a.T.reshape(a.shape[1], m.num_heads, m.head_dim)
        elif kind == "out":
            a = a.T.reshape(m.num_heads, m.head_dim, a.shape[0])
        elif kind == "T":
            a = a.T
        if name == "lm_head.weight" and fold != 1.0:
            a = (a.astype(np.float64) / fold).astype(np.float32)
        _set(params, path, np.ascontiguousarray(a))
    return _scan(params) if m.scan_layers else params


# ------------------------------------------------------------------- files
def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # read without changing it (Linux)
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def parse_size(size) -> int:
    """Bytes from an int or a string like transformers' max_shard_size: "5GB"
    (10**9), "500MB", "2GiB" (2**30), "4096" (bytes)."""
    text = str(size).strip()
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
             "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1}
    unit = next((u for u in units if text.upper().endswith(u)), "")
    try:
        value = float(text[:len(text) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        value = -1
    if not 1 <= value < float("inf"):
        raise ValueError(f"{size!r} is not a size in bytes like 5GB, 500MB or 2GiB")
    return int(value)


def _shard_names(sizes: list[int], max_bytes: int) -> list[str]:
    """The file of each tensor, split as transformers' save_pretrained splits
    (a new shard when the next tensor would tip the current one over max_bytes,
    a larger tensor alone in its own, one shard keeps the plain name), except
    that each shard is a run of consecutive tensors, so the files are written
    reading the sources once, in order."""
    ids, n, current = [], 0, 0
    for size in sizes:
        if n == 0 or current + size > max_bytes:
            n, current = n + 1, 0
        ids.append(n)
        current += size
    if n == 1:
        return [WEIGHTS] * len(sizes)
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in ids]


_BLOCK_BYTES = 1 << 24  # float32 bytes of one tensor's rows converted and written at a time
# Bytes of source leaves per checkpoint read: each read parses the whole
# checkpoint's metadata (slow for many leaves), and the host holds about 1.2x
# a group while reading it (docs/models.md, host memory).
READ_BATCH_BYTES = 1 << 30


class _Sources:
    """Source leaves by path, from a nested dict of arrays or from an object with
    .shapes and .read(paths) (checkpointing.HostParams): read in groups of about
    READ_BATCH_BYTES in first-use order, each group dropped before the next is
    read, so the host holds one group rather than the model."""

    def __init__(self, params, order):
        self.params, self.lazy = params, hasattr(params, "read")
        self.group_of, self.groups, self.loaded, size = {}, [[]], {}, 0
        for path in order:
            meta = _get(params.shapes, path) if self.lazy else None
            nbytes = int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize if self.lazy else 0
            if self.groups[-1] and size + nbytes > READ_BATCH_BYTES:
                self.groups.append([])
                size = 0
            self.groups[-1].append(path)
            self.group_of[path] = len(self.groups) - 1
            size += nbytes

    def get(self, path):
        if path not in self.loaded:
            self.loaded = {}  # freed before the next group is read
            if self.lazy:
                group = self.groups[self.group_of[path]]
                self.loaded = dict(zip(group, self.params.read(group)))
            else:  # one leaf (a device array comes to the host once, not once per layer)
                self.loaded = {path: np.asarray(_get(self.params, path))}
        return self.loaded[path]


def _write_safetensors(path: str, tensors, fetch) -> None:
    """A float32 safetensors file written tensor by tensor, a block of rows at a
    time, so no whole-file buffer exists (safetensors' save_file takes a dict of
    every tensor and copies each to bytes). tensors: [(name, shape)] in file
    order; fetch(name) -> that tensor, in any layout. Written under a temporary
    name and renamed: an interrupted export leaves no truncated file. The file
    gets the permissions of any other file written here (save_file's are 0600)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        end = offset + 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
    tmp = path + ".t5lab-tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            a, fold = fetch(name)
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {a.shape}, planned {shape}")
            rows = max(1, _BLOCK_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
            for r in range(0, max(1, shape[0] if shape else 1), rows):
                f.write(memoryview(_float32(a[r:r + rows] if shape else a, fold)).cast("B"))
            del a
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _remove_stale_weights(out_dir: str, keep: set[str]) -> None:
    """A previous export's weight files the new one does not rewrite: left, a
    stale model.safetensors would shadow a new index (and stale shards linger)."""
    shard = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
    for name in os.listdir(out_dir):
        if name not in keep and (name in (WEIGHTS, INDEX) or shard.fullmatch(name)):
            os.remove(os.path.join(out_dir, name))


def save_pretrained(params, config, out_dir: str, spm_model: str | None = None,
                    max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> str:
    """Writes config.json + the weights (+ mlm_head.safetensors for an untied
    encoder-only head, + tokenizer files when spm_model is given).

    params: a nested dict of arrays, or checkpointing.HostParams, whose leaves
    are read a group at a time, converted and written a block at a time: peak
    host memory is about one read group, not the model. The weights go to
    model.safetensors, or when larger than max_shard_size (as transformers'
    save_pretrained) to model-0000i-of-0000N.safetensors shards and
    model.safetensors.index.json."""
    max_bytes = parse_size(max_shard_size)
    hf = hf_config(config)
    fold = _head_fold(config, hf)
    rows = _tensors(config.model, params.shapes if hasattr(params, "read") else params)
    sources = _Sources(params, list(dict.fromkeys(r[1] for r in rows)))
    by_name = {r[0]: r for r in rows}

    def fetch(name):
        _, path, layer, kind, _ = by_name[name]
        return _hf_view(sources.get(path), layer, kind), fold if name == "lm_head.weight" else 1.0

    os.makedirs(out_dir, exist_ok=True)
    head = [r for r in rows if config.model.arch == "encoder" and r[0] == "lm_head.weight"]
    model = [r for r in rows if r not in head]
    files = _shard_names([4 * int(np.prod(r[4])) for r in model], max_bytes)
    # Tensors in source order, files in order (the head's source is the last
    # leaf): each source group is read once.
    for file in dict.fromkeys(files):
        _write_safetensors(os.path.join(out_dir, file),
                           [(r[0], r[4]) for r, f in zip(model, files) if f == file], fetch)
    if head:
        _write_safetensors(os.path.join(out_dir, MLM_HEAD), [(head[0][0], head[0][4])], fetch)
    if len(set(files)) > 1:
        sizes = [int(np.prod(r[4])) for r in model]
        index = {"metadata": {"total_parameters": sum(sizes), "total_size": 4 * sum(sizes)},
                 "weight_map": {r[0]: f for r, f in zip(model, files)}}
        with open(os.path.join(out_dir, INDEX), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _remove_stale_weights(out_dir, set(files) | ({INDEX} if len(set(files)) > 1 else set()))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        start = {} if config.model.arch == "decoder" else {"decoder_start_token_id": 0}
        json.dump({"pad_token_id": 0, "eos_token_id": 1, **start}, f, indent=2)
    if spm_model:
        write_tokenizer(spm_model, out_dir, llama=config.model.arch == "decoder",
                        vocab_size=config.model.vocab_size)
    return out_dir


def load_pretrained(hf_dir: str, scan_layers: bool = False):
    """(params, config) from a directory written by save_pretrained or by
    transformers (T5/UMT5 conditional generation or encoder, Llama); the
    params stacked for scanned layers when scan_layers."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    state = _read_state(hf_dir)
    mlm = os.path.join(hf_dir, MLM_HEAD)
    if os.path.exists(mlm):
        state.update(load_file(mlm))
    if hf["model_type"] in ("t5", "umt5") and any("ConditionalGeneration" in a
                                                  for a in hf.get("architectures") or []):
        scales = _hf_scales_logits(hf)
        if "lm_head.weight" not in state and not scales:
            # transformers 5 ties T5 v1.1's head to `shared` but does not scale:
            # t5lab's tied head always scales, so import it as an untied copy.
            state["lm_head.weight"] = state["shared.weight"].copy()
        elif "lm_head.weight" in state and scales and np.array_equal(state["lm_head.weight"],
                                                                      state["shared.weight"]):
            del state["lm_head.weight"]  # saved explicitly but tied and scaled: t5lab's tied head
    config = config_from_hf(hf, has_lm_head="lm_head.weight" in state)
    config.model.scan_layers = scan_layers
    return from_hf_state(state, config, hf), config


# Model keys a Hugging Face checkpoint decides: a user who sets one to another
# value asks for a model the checkpoint is not (the rest, dropout included,
# default to the checkpoint's and may be overridden).
DECIDED_KEYS = ARCH_KEYS + ("norm_eps", "rope_theta")
ADOPTED_KEYS = DECIDED_KEYS + ("dropout_rate",)
SPM_FILES = ("spiece.model", "tokenizer.model")


def _weight_names(hf_dir: str) -> set[str]:
    from safetensors import safe_open
    path = os.path.join(hf_dir, WEIGHTS)
    if os.path.exists(path):
        with safe_open(path, "np") as f:
            names = set(f.keys())
    else:
        index = os.path.join(hf_dir, INDEX)
        if not os.path.exists(index):
            raise FileNotFoundError(f"config.init.from_hf: {hf_dir} has no {WEIGHTS} (or its index)")
        with open(index) as f:
            names = set(json.load(f)["weight_map"])
    if os.path.exists(os.path.join(hf_dir, MLM_HEAD)):
        names.add("lm_head.weight")
    return names


def adopt_model(config, explicit: set[str]):
    """`config` with the model shape and tokenizer of config.init.from_hf: keys
    the user did not set (`explicit` holds the dotted keys set on the command
    line) come from the checkpoint; a set key that conflicts is an error."""
    hf_dir = config.init.from_hf
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.init.from_hf: {hf_dir} has no config.json")
    with open(path) as f:
        hf = json.load(f)
    names = _weight_names(hf_dir)
    has_head = "lm_head.weight" in names
    if hf.get("model_type") in ("t5", "umt5") and any("ConditionalGeneration" in a
                                                        for a in hf.get("architectures") or []):
        scales = _hf_scales_logits(hf)
        # as load_pretrained: an unscaled tied head is imported as an untied copy,
        # a head saved beside a tied, scaled one is t5lab's tied head
        has_head = (has_head and not (scales and hf.get("tie_word_embeddings", True))) or not scales
    try:
        hf_model = config_from_hf(hf, has_lm_head=has_head).model
    except (KeyError, ValueError) as e:
        raise ValueError(f"config.init.from_hf: {path}: {e}") from None
    c = config.copy_and_resolve_references()
    for key in ADOPTED_KEYS:
        if f"model.{key}" not in explicit:
            c.model[key] = hf_model[key]
        elif key in DECIDED_KEYS and c.model[key] != hf_model[key]:
            raise ValueError(f"config.model.{key}: set to {c.model[key]!r} but the Hugging Face "
                             f"checkpoint {hf_dir} has {hf_model[key]!r}; leave it out to take the "
                             f"checkpoint's")
    spm_model = next((os.path.join(hf_dir, n) for n in SPM_FILES if os.path.isfile(os.path.join(hf_dir, n))), None)
    given = c.data.tokenizer if "data.tokenizer" in explicit else ""
    if given:
        if spm_model and os.path.isfile(given) and open(given, "rb").read() != open(spm_model, "rb").read():
            raise ValueError(f"config.data.tokenizer: {given} is not the tokenizer of the Hugging Face "
                             f"checkpoint ({spm_model}); leave it out to take the checkpoint's")
    elif spm_model:
        c.data.tokenizer = spm_model
    else:
        raise ValueError(f"config.data.tokenizer: the Hugging Face checkpoint {hf_dir} holds no "
                         f"SentencePiece model ({' or '.join(SPM_FILES)}); give the one it was trained with")
    return validate(c)


def _read_state(hf_dir):
    path = os.path.join(hf_dir, WEIGHTS)
    if os.path.exists(path):
        return load_file(path)
    index = os.path.join(hf_dir, INDEX)  # sharded checkpoints
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(os.path.join(hf_dir, name)))
    return state


# SentencePiece piece types (sentencepiece_model.proto).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
T5_EXTRA_IDS = 100  # sentinels transformers' T5 tokenizers add to a model that has none


def _tokenizer_json(spm_model: str, eos: bool, extra_ids: int = 0) -> str:
    """The SentencePiece model as a `tokenizers` Unigram that encodes as
    SentencePieceProcessor.encode does: the same pieces and scores, byte
    fallback, the model's own normaliser settings (t5lab's keep every space and
    newline; transformers' T5 converter assumes T5's, which collapses spaces and
    drops newlines), one dummy "\u2581" in front of the text, and user-defined
    pieces ([NLU], <extra_id_3>) emitted whole wherever they occur. They stay
    model pieces, as in SentencePiece and in transformers' own converter: as
    added tokens, `tokenizers` would match them either in the normalised text
    with the dummy prefix applied to them ("\u2581[NLU]", swallowing a "\u2581")
    or in the raw text, giving each chunk after one its own dummy prefix.
    `eos` appends </s> to every sequence, as T5's tokenizer does and as every
    t5lab training input ends; `extra_ids` appends T5's sentinels (user-defined
    pieces, <extra_id_0> the highest id) to a model that has none."""
    import re

    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models as tok_models, normalizers,
                            pre_tokenizers, processors)
    proto = model_pb2.ModelProto()
    with open(spm_model, "rb") as f:
        proto.ParseFromString(f.read())
    pieces, spec, trainer = proto.pieces, proto.normalizer_spec, proto.trainer_spec
    # T5's sentinels for a model without them: user-defined pieces after the others, <extra_id_0> last.
    extra = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
    tok = Tokenizer(tok_models.Unigram([(p.piece, p.score) for p in pieces] + [(e, 0.0) for e in extra],
                                       unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback))
    norm = []
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:  # once, in front of the whole text: normalizers see it before any split
        norm.append(normalizers.Prepend("\u2581"))
    if spec.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(norm)
    user = sorted([p.piece for p in pieces if p.type == _USER_DEFINED] + extra, key=len, reverse=True)
    if user:  # SentencePiece always emits these whole: isolate them for the Viterbi search
        pattern = "|".join(re.escape(u.replace(" ", "\u2581") if spec.escape_whitespaces else u) for u in user)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # </s>, <pad>, <unk> are special: matched in the raw text, as transformers does for every model.
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (_CONTROL, _UNKNOWN)])
    if eos and trainer.eos_id >= 0:
        eos_piece = pieces[trainer.eos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos_piece}", pair=f"$A {eos_piece} $B {eos_piece}",
            special_tokens=[(eos_piece, trainer.eos_id)])
    return tok.to_str()


def write_tokenizer(spm_model: str, out_dir: str, llama: bool = False, vocab_size: int | None = None):
    """Tokenizer files from a SentencePiece model: tokenizer.json (exact, loaded by
    AutoTokenizer as PreTrainedTokenizerFast), the .model file, and a config with
    T5's special tokens (pad 0, eos 1, unk 2). T5 models append </s> to every
    text, Llama ones add nothing (no BOS in t5lab, no EOS in a prompt). A T5
    model's SentencePiece model without sentinels gets T5's 100 <extra_id_*>
    after its pieces, as transformers' T5 tokenizer gives it, when they fit in
    `vocab_size` (the model's embedding rows; None: unchecked)."""
    with open(spm_model, "rb") as f:
        proto = f.read()
    import sentencepiece as spm
    size = spm.SentencePieceProcessor(model_file=spm_model).get_piece_size()
    extra_ids = 0
    if not llama and b"<extra_id_0>" not in proto and (vocab_size is None or size + T5_EXTRA_IDS <= vocab_size):
        extra_ids = T5_EXTRA_IDS
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    shutil.copyfile(spm_model, os.path.join(out_dir, "tokenizer.model" if llama else "spiece.model"))
    # transformers 5 ignores add_eos_token beside a tokenizer.json: its post-processor appends </s>.
    tok = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(_tokenizer_json(spm_model, eos=not llama, extra_ids=extra_ids))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
