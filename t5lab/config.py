"""The one schema of t5lab's config keys, each with its default and why.

The defaults *are* the embedded default run: a small UL2 encoder-decoder on the
embedded corpus that trains on a laptop CPU in a few minutes. Preset files in
configs/ start from `schema()` and only override keys; `validate()` checks a
finished config and names the offending key.
"""
from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

# The choices of each key, listed here only: validation and the code that
# implements them (models, optim, data) read these tuples.
ARCHS = ("encoder_decoder", "decoder", "encoder")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
DTYPES = ("float32", "bfloat16")
POSITIONS = ("relative", "rope")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
ATTENTIONS = ("auto", "xla", "dpa", "cudnn", "flash")
OPTIMIZERS = ("adamw", "adafactor", "soap")
SCHEDULES = ("constant", "cosine", "rsqrt", "wsd", "power", "linear")
SOURCES = ("embedded", "text", "jsonl", "parquet", "tfds", "hf", "prepared", "mixture")
DOC_PER = ("line", "file")
OBJECTIVES = ("ul2", "span_corruption", "prefix_lm", "causal_lm", "mlm")
# The model keys that decide the parameters' shapes and meaning: a checkpoint
# (t5lab's or Hugging Face's) holds a model only for its values of these.
ARCH_KEYS = ("arch", "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers",
             "num_decoder_layers", "activation", "gated_mlp", "position", "relpos_buckets",
             "relpos_max_distance", "relpos_per_layer", "tie_embeddings")


def schema() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.arch = "encoder_decoder"   # one of ARCHS
    m.vocab_size = 2048          # embedding rows; >= the tokenizer's size
    m.d_model = 128
    m.num_heads = 4
    m.head_dim = 32              # T5 decouples head_dim from d_model / num_heads
    m.d_ff = 384
    m.num_layers = 2             # encoder layers (and decoder layers unless set below)
    m.num_decoder_layers = -1    # -1: same as num_layers
    m.activation = "gelu_tanh"   # T5 v1.1 gated-gelu uses the tanh approximation
    m.gated_mlp = True           # T5 v1.1 / UL2: wi_0, wi_1 -> act(wi_0 x) * wi_1 x
    m.position = "relative"      # one of POSITIONS: "relative" (T5 bias) or "rope" (decoder-only)
    m.relpos_buckets = 32
    m.relpos_max_distance = 128
    m.relpos_per_layer = False   # umT5: one bias table per layer instead of per stack
    m.rope_theta = 10000.0
    m.tie_embeddings = False     # tied head scales logits by d_model**-0.5 as in T5
    m.dropout_rate = 0.0         # T5 pretraining used 0.0 for v1.1
    m.norm_eps = 1e-6
    m.dtype = "float32"          # compute dtype; params stay float32
    m.scan_layers = False        # nn.scan over layers: fast compiles for deep models
    m.scan_unroll = 1            # layers per loop iteration when scanned (compile time vs. speed)
    m.remat_policy = "none"      # one of REMAT_POLICIES
    m.attention = "auto"         # auto | xla | dpa | cudnn | flash (t5lab/models/attention.py)

    # ----------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    d.source = "embedded"        # one of SOURCES
    d.paths = ""                 # glob(s) for text/jsonl/parquet, comma separated
    d.text_field = "text"        # field holding the text in JSONL/Parquet rows
    d.doc_per = "line"           # text files: a document per "line" or per "file"
    d.tfds_name = ""             # e.g. "c4/en:3.1.0"
    d.tfds_data_dir = ""         # local TFDS data_dir holding ArrayRecord files
    d.train_split = "train"
    d.eval_split = "validation"  # for text/embedded sources: the held-out fraction below
    d.eval_fraction = 0.01       # documents hashed to eval when the source has no split
    d.mixture = ""               # "source_spec=weight,..." see t5lab/data/sources.py
    d.mixture_schedule = ""      # "FRACTION=w1,w2,...;..." mixture weights from that fraction of train.steps on
    d.tokenizer = ""             # SentencePiece .model; "" trains one on the embedded corpus
    d.objective = "ul2"          # one of OBJECTIVES
    d.ul2_rates = ""             # 7 comma-separated rates (R1,R2,X1..X4,S); "" uniform
    d.noise_density = 0.15       # span corruption
    d.mean_span_length = 3.0     # span corruption
    d.mlm_probability = 0.15     # encoder-only MLM
    d.inputs_length = 128        # encoder (or prefix) length of a packed row
    d.targets_length = 64        # decoder length (decoder-only: total length)
    d.pack = True
    d.num_workers = 0            # grain worker processes; 0 runs in the trainer
    d.seed = 0

    # ---------------------------------------------------------------- optim
    o = c.optim = ml_collections.ConfigDict()
    o.name = "adamw"             # one of OPTIMIZERS
    o.learning_rate = 3e-3       # peak rate
    o.schedule = "cosine"        # one of SCHEDULES
    o.warmup_steps = 50
    o.decay_steps = -1           # -1: train.steps
    o.end_lr_fraction = 0.1      # cosine/linear/wsd floor as a fraction of peak; power: of its rate at decay start (paper: 0)
    o.wsd_decay_fraction = 0.2   # WSD and power: last fraction of steps decays (power paper: 0.1, exponential)
    o.power_a = 4.0              # Power scheduler (Shen et al. 2024, Eq. 7): lr = min(peak, rows * a * tokens**-b)
    o.power_b = 0.51             # ... its exponent's magnitude (paper: b = -0.51, a = 4, peak 0.02, Sec. 4)
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.01
    o.decay_norms = False        # weight decay on norm scales
    o.decay_embeddings = False   # ... on token embeddings and the LM head
    o.decay_relpos = False       # ... on relative-position bias tables
    o.clip_norm = 1.0            # global grad-norm clip; 0 disables
    o.soap_precondition_frequency = 10
    o.soap_max_precond_dim = 10000
    o.soap_shampoo_beta = -1.0
    o.soap_merge_dims = False
    o.soap_precondition_1d = False

    # ---------------------------------------------------------------- train
    t = c.train = ml_collections.ConfigDict()
    t.steps = 300
    t.batch_size = 16            # global batch, in packed rows
    t.microbatches = 1           # gradient accumulation: batch_size % microbatches == 0
    t.z_loss = 1e-4
    t.seed = 0
    t.log_every = 10
    t.eval_every = 100           # 0 disables evaluation
    t.eval_steps = 4
    t.peak_tflops_per_device = 0.0  # for MFU; 0 uses a table by device kind
    t.stop_on_nonfinite = True   # a NaN/inf loss stops the run; the last good checkpoint stays
    t.stop_at_step = 0           # >0: save and stop there without changing the schedule (job time limits)
    t.stop_check_every = 10      # multi-process: compare stop signals every N steps (each a host sync)
    t.allow_data_change = False  # resume although the data fingerprint changed: the stream restarts

    # ----------------------------------------------------------- checkpoint
    k = c.checkpoint = ml_collections.ConfigDict()
    k.every = 100                # steps between saves; 0 saves only at the end
    k.keep = 3
    k.async_save = True

    # ----------------------------------------------------------------- mesh
    s = c.mesh = ml_collections.ConfigDict()
    s.data = -1                  # -1 takes the devices the other axes leave
    s.fsdp = 1
    s.tensor = 1

    # ----------------------------------------------------------------- init
    i = c.init = ml_collections.ConfigDict()
    i.from_hf = ""               # Hugging Face directory to start from
    return c


def preset(arg: str, sizes: dict, source: str, arch: str, activation: str) -> ml_collections.ConfigDict:
    """The schema with a preset's model shape: sizes[arg] = (d_model, d_ff,
    num_heads, head_dim, num_layers). `tiny` (for tests) also gets a 512-piece
    vocabulary and a short run; the published sizes T5's 32128 vocabulary."""
    if arg not in sizes:
        raise ConfigError(f"{source}: unknown preset {arg!r}; one of {sorted(sizes)}")
    c = schema()
    m = c.model
    m.arch, m.activation, m.gated_mlp = arch, activation, True
    m.d_model, m.d_ff, m.num_heads, m.head_dim, m.num_layers = sizes[arg]
    m.vocab_size = 512 if arg == "tiny" else 32128
    if arg == "tiny":
        c.train.batch_size, c.train.steps, c.optim.warmup_steps = 8, 20, 5
    return c


class ConfigError(ValueError):
    """A config key holds a value t5lab cannot run with; the message names it."""


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"config.{key}: {msg}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every cross-key rule; returns the config unchanged."""
    ref = schema()
    _check_keys(c, ref, "")
    m = c.model
    _require(m.arch in ARCHS, "model.arch", f"{m.arch!r} is not one of {ARCHS}")
    for key in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_layers"):
        _require(m[key] > 0, f"model.{key}", f"must be positive, got {m[key]}")
    _require(m.num_decoder_layers == -1 or m.num_decoder_layers > 0,
             "model.num_decoder_layers", "must be -1 (same as num_layers) or positive")
    _require(m.activation in ACTIVATIONS, "model.activation", f"{m.activation!r} is not one of {ACTIVATIONS}")
    _require(m.position in POSITIONS, "model.position", f"{m.position!r} is not one of {POSITIONS}")
    _require(m.position == "relative" or m.arch == "decoder", "model.position",
             "rope is only implemented for the decoder-only model")
    _require(m.position != "rope" or m.head_dim % 2 == 0, "model.head_dim", "must be even for rope")
    _require(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} is not one of {DTYPES}")
    _require(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
             f"{m.remat_policy!r} is not one of {REMAT_POLICIES}")
    _require(m.attention in ATTENTIONS, "model.attention", f"{m.attention!r} is not one of {ATTENTIONS}")
    _require(m.attention in ("auto", "xla") or m.dropout_rate == 0, "model.attention",
             f"{m.attention} applies no attention dropout; use model.attention=xla or model.dropout_rate=0")
    _require(m.scan_unroll >= 1, "model.scan_unroll", f"must be >= 1, got {m.scan_unroll}")
    _require(0.0 <= m.dropout_rate < 1.0, "model.dropout_rate", "must be in [0, 1)")
    _require(m.relpos_buckets > 0 and m.relpos_max_distance > 0, "model.relpos_buckets",
             "buckets and max distance must be positive")
    _require(m.norm_eps > 0, "model.norm_eps", "must be positive")
    _require(m.rope_theta > 0, "model.rope_theta", "must be positive")

    t = c.train
    _require(t.steps > 0, "train.steps", "must be positive")
    _require(t.batch_size > 0, "train.batch_size", "must be positive")
    _require(t.microbatches > 0 and t.batch_size % t.microbatches == 0, "train.microbatches",
             f"must divide train.batch_size={t.batch_size}")
    _require(t.z_loss >= 0, "train.z_loss", "must be >= 0")
    _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 disables evaluation), got {t.eval_every}")
    _require(t.eval_every == 0 or t.eval_steps >= 1, "train.eval_steps",
             f"must be >= 1 while train.eval_every > 0, got {t.eval_steps}")
    _require(t.stop_check_every >= 1, "train.stop_check_every", f"must be >= 1, got {t.stop_check_every}")
    _require(t.stop_at_step >= 0, "train.stop_at_step", f"must be >= 0 (0: run to train.steps), got {t.stop_at_step}")
    _require(t.peak_tflops_per_device >= 0, "train.peak_tflops_per_device", "must be >= 0 (0: by device kind)")
    _require(0 <= t.seed < 2**31, "train.seed", "must be in [0, 2**31)")
    k = c.checkpoint
    _require(k.every >= 0, "checkpoint.every", f"must be >= 0 (0 saves only at the end), got {k.every}")
    _require(k.keep >= 1, "checkpoint.keep", f"must be >= 1 (the newest complete checkpoint is always kept), "
             f"got {k.keep}")

    o = c.optim
    _require(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {OPTIMIZERS}")
    _require(o.learning_rate > 0, "optim.learning_rate", "must be positive")
    _require(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
    _require(0 <= o.b1 < 1, "optim.b1", "must be in [0, 1)")
    _require(0 <= o.b2 < 1, "optim.b2", "must be in [0, 1)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0")
    decay_steps = o.decay_steps if o.decay_steps > 0 else t.steps
    _require(o.schedule == "constant" or o.warmup_steps < decay_steps, "optim.warmup_steps",
             f"{o.warmup_steps} must be below the {decay_steps} decay steps "
             f"(optim.decay_steps, or train.steps when it is -1)")

    _require(o.eps > 0, "optim.eps", "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.soap_precondition_frequency >= 1, "optim.soap_precondition_frequency", "must be >= 1")
    _require(o.soap_max_precond_dim >= 1, "optim.soap_max_precond_dim", "must be >= 1")
    _require(o.soap_shampoo_beta < 1, "optim.soap_shampoo_beta", "must be < 1 (negative: use b2)")
    _require(o.decay_steps == -1 or o.decay_steps > 0, "optim.decay_steps", "must be -1 (train.steps) or positive")
    _require(0 <= o.end_lr_fraction <= 1, "optim.end_lr_fraction", "must be in [0, 1]")
    _require(0 < o.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction", "must be in (0, 1]")
    _require(o.power_a > 0 and o.power_b > 0, "optim.power_a",
             "power_a and power_b must be positive (power_b is the decay exponent's magnitude: paper b = -power_b)")

    d = c.data
    _require(d.inputs_length > 0 and d.targets_length > 0, "data.inputs_length",
             "inputs_length and targets_length must be positive")

    mesh = c.mesh
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    _require(sum(1 for x in sizes if x == -1) <= 1, "mesh", "at most one axis may be -1")
    for name in ("data", "fsdp", "tensor"):
        _require(mesh[name] == -1 or mesh[name] > 0, f"mesh.{name}", "must be -1 or positive")
    _require(m.num_heads % mesh.tensor == 0 if mesh.tensor > 0 else True, "mesh.tensor",
             f"must divide model.num_heads={m.num_heads}")

    if c.init.from_hf:
        _require(os.path.isdir(c.init.from_hf), "init.from_hf", f"no directory {c.init.from_hf!r}")
    return c


def _check_keys(c, ref, prefix):
    for key in c.keys():
        _require(key in ref, prefix + key, "unknown key (see t5lab/config.py for the schema)")
        if isinstance(ref[key], ml_collections.ConfigDict):
            _require(isinstance(c[key], ml_collections.ConfigDict), prefix + key, "must be a group")
            _check_keys(c[key], ref[key], prefix + key + ".")
        elif ref[key] is not None and c[key] is not None:
            want = type(ref[key])
            ok = isinstance(c[key], want) or (want is float and isinstance(c[key], int))
            _require(ok and not (want is not bool and isinstance(c[key], bool)), prefix + key,
                     f"must be {want.__name__}, got {type(c[key]).__name__} {c[key]!r}")
            _require(want is not float or math.isfinite(c[key]), prefix + key, f"must be finite, got {c[key]}")


def load(spec: str | None, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` (or the schema defaults for None) and applies
    `key=value` overrides (the part after `--config.`), then validates."""
    if spec:
        path, _, arg = spec.partition(":")
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no config file {path!r}")
        cfg = _run_config_file(path, arg)
    else:
        cfg = schema()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: expected key=value")
        set_key(cfg, key, value)
    return validate(cfg)


def _run_config_file(path: str, arg: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `path`'s get_config([arg]); any failure is one ConfigError naming the file."""
    modspec = importlib.util.spec_from_file_location("t5lab_user_config", path)
    mod = importlib.util.module_from_spec(modspec)
    try:
        modspec.loader.exec_module(mod)
    except SyntaxError as e:
        raise ConfigError(f"--config {path}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"--config {path}: loading it raised {type(e).__name__}: {e}") from e
    if not callable(getattr(mod, "get_config", None)):
        raise ConfigError(f"--config {path}: defines no get_config() function")
    try:
        cfg = mod.get_config(arg) if arg else mod.get_config()
    except ConfigError:
        raise
    except Exception as e:
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"--config {path}: {call} raised {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path}: get_config() returned {type(cfg).__name__}, "
                          f"not an ml_collections.ConfigDict")
    return cfg


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
    """`--config FILE[:preset]`, `--config.a.b=value` (or `--config.a.b value`) and
    other `--flag value` pairs -> (validated config, {flag: value})."""
    spec, overrides, flags = None, [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 1
        if name == "config":
            spec = value
        elif name.startswith("config."):
            overrides.append(f"{name[len('config.'):]}={value}")
        else:
            flags[name.replace("-", "_")] = value
        i += 1
    return load(spec, overrides), flags


def set_key(cfg, dotted: str, text: str):
    """Sets `a.b.c` from its command-line text, parsed by the key's type."""
    parts = dotted.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise ConfigError(f"config.{'.'.join(parts[:i + 1])}: unknown key")
        node = node[p]
    leaf = parts[-1]
    if leaf not in node:
        raise ConfigError(f"config.{dotted}: unknown key (see t5lab/config.py for the schema)")
    old = node[leaf]
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            value = text.lower() in ("true", "1")
        elif isinstance(old, int):
            value = int(text)
        elif isinstance(old, float):
            value = float(text)
        else:
            value = text
    except ValueError:
        raise ConfigError(f"config.{dotted}: {text!r} is not a {type(old).__name__}") from None
    node[leaf] = value
