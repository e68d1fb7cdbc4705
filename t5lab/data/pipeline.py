"""The grain input pipeline: source -> tokenize -> chunk -> objective -> pack -> batch.

Determinism and exact resume come from random access: documents are a grain
MapDataset (this process's shard, shuffled anew each epoch from the seed),
grouped into fixed blocks of DOCS_PER_BLOCK documents. Block k is turned into
packed rows by a pure function of (its documents, seed, k), so the iterator
state is just (block index, rows already taken from it) and a restored
iterator replays exactly the batches an uninterrupted one would have produced.
Rows never span blocks: the cost is at most one partly filled row per block.
"""
from __future__ import annotations

import logging

import grain
import numpy as np

from t5lab.data import denoising, packing, sources
from t5lab.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Documents per block: large enough that the partly filled last row of a block
# costs little, small enough that a block takes well under a second.
DOCS_PER_BLOCK = 128
SPLITS = ("train", "eval")


def _key(name: str, ok: bool, why: str):
    if not ok:
        raise ValueError(f"config.data.{name}: {why}")


def validate(config, process_count: int = 1):
    """Checks the data keys (and the batch split) before any work starts."""
    d, arch = config.data, config.model.arch
    _key("source", d.source in sources.KINDS, f"{d.source!r} is not one of {sources.KINDS}")
    if d.source in ("text", "jsonl", "parquet"):
        _key("paths", bool(d.paths.strip()), f"source {d.source!r} needs paths (comma-separated globs)")
    _key("doc_per", d.doc_per in ("line", "file"), f"{d.doc_per!r} is not 'line' or 'file'")
    if d.source == "tfds":
        _key("tfds_name", bool(d.tfds_name), "source 'tfds' needs a dataset name, e.g. 'c4/en:3.1.0'")
    if d.source == "mixture":
        sources.parse_mixture(d.mixture)
    _key("objective", d.objective in denoising.OBJECTIVES, f"{d.objective!r} is not one of {denoising.OBJECTIVES}")
    if arch == "encoder":
        _key("objective", d.objective == "mlm", f"the encoder-only model trains with 'mlm', not {d.objective!r}")
    else:
        _key("objective", d.objective != "mlm", f"'mlm' needs config.model.arch='encoder', not {arch!r}")
    if d.objective == "causal_lm":
        _key("objective", arch == "decoder", "'causal_lm' needs config.model.arch='decoder'")
    _ul2_rates(d.ul2_rates)
    _key("noise_density", 0 < d.noise_density < 1, f"must be in (0, 1), got {d.noise_density}")
    _key("mean_span_length", d.mean_span_length >= 1, f"must be >= 1, got {d.mean_span_length}")
    _key("mlm_probability", 0 < d.mlm_probability < 1, f"must be in (0, 1), got {d.mlm_probability}")
    _key("eval_fraction", 0 <= d.eval_fraction < 1, f"must be in [0, 1), got {d.eval_fraction}")
    _key("inputs_length", d.inputs_length >= 4 and d.targets_length >= 4,
         "inputs_length and targets_length must be >= 4")
    _key("num_workers", d.num_workers >= 0, "must be >= 0")
    _key("seed", 0 <= d.seed < 2**31, "must be in [0, 2**31)")
    b = config.train.batch_size
    if b % process_count:
        raise ValueError(f"config.train.batch_size={b} must be divisible by the {process_count} processes")


def _ul2_rates(text: str):
    if not text.strip():
        return None
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"config.data.ul2_rates: {text!r} is not 7 comma-separated numbers") from None
    n = len(denoising.DENOISER_NAMES)
    _key("ul2_rates", len(rates) == n and min(rates) >= 0 and sum(rates) > 0,
         f"needs {n} rates >= 0 with a positive sum (order {denoising.DENOISER_NAMES}), got {text!r}")
    return rates


def make_objective(config, tok: Tokenizer) -> denoising.Objective:
    d = config.data
    if d.objective in ("ul2", "span_corruption", "mlm") and not tok.sentinels_ordered:
        raise ValueError(f"tokenizer {tok.path!r}: objective {d.objective!r} needs 100 sentinels "
                         f"<extra_id_0..99> counting down from the top id (tools/train_tokenizer.py)")
    if d.objective == "ul2" and not tok.has_mode_tokens:
        raise ValueError(f"tokenizer {tok.path!r}: objective 'ul2' needs the mode tokens "
                         f"[NLU] [NLG] [S2S] as pieces (tools/train_tokenizer.py)")
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size} pieces ({tok.path})")
    sentinel0 = tok.sentinel_id(0) if tok.num_sentinels else -1
    return denoising.Objective(
        d.objective, config.model.arch, d.inputs_length, d.targets_length,
        eos_id=tok.eos_id, vocab_size=tok.vocab_size, sentinel0=sentinel0,
        num_sentinels=tok.num_sentinels, mode_ids=tok.mode_ids, rates=_ul2_rates(d.ul2_rates),
        noise_density=d.noise_density, mean_span_length=d.mean_span_length,
        mlm_probability=d.mlm_probability, first_ordinary_id=3 + len(tok.mode_ids))


def _shard(source, process_index: int, process_count: int):
    idx = np.arange(process_index, len(source), process_count)
    if len(idx) == 0:
        raise ValueError(f"{source.name}: {len(source)} documents cannot feed {process_count} processes")
    return sources.Subset(source, idx)


def documents(config, split: str, process_index: int = 0, process_count: int = 1,
              repeat: bool = True) -> grain.MapDataset:
    """This process's documents of `split`: disjoint across processes, covering
    the split together. Train is shuffled anew each epoch; eval keeps its order.
    Both repeat forever unless repeat=False (one epoch; mixtures end with the
    first exhausted source)."""
    d = config.data
    if d.source == "mixture":
        items = [(k, a, w) for k, a, w in sources.parse_mixture(d.mixture) if w > 0]
    else:
        arg = d.tfds_name if d.source == "tfds" else d.paths
        items = [(d.source, arg, 1.0)]
    parts = []
    for n, (kind, arg, _) in enumerate(items):
        src, has_split = sources.open_source(kind, arg, d, d.train_split if split == "train" else d.eval_split)
        src = _shard(sources.split_source(src, has_split, split, d.eval_fraction), process_index, process_count)
        ds = grain.MapDataset.source(src)
        if split == "train":
            ds = ds.shuffle(seed=(d.seed * 1_000_003 + n) % 2**32)  # reseeded per epoch by repeat()
        parts.append(ds.repeat() if repeat else ds)
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, [w for _, _, w in items])


class _BlockToRows:
    """Block index and its documents -> packed rows (dict of [rows, len] arrays)."""

    def __init__(self, config, tokenizer_path: str, objective, stream: int):
        d = config.data
        self.tokenizer_path, self.objective, self.stream = tokenizer_path, objective, stream
        self.arch, self.pack = config.model.arch, d.pack
        self.lengths, self.seed = (d.inputs_length, d.targets_length), d.seed
        self._tok = None

    def __getstate__(self):  # workers reload the tokenizer from its path
        return {k: v for k, v in self.__dict__.items() if k != "_tok"} | {"_tok": None}

    def __call__(self, index: int, docs):
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        rng = np.random.default_rng([self.seed, self.stream, index])
        texts = [t for t in docs if t and not t.isspace()]
        examples, skipped = self.objective(self._tok.encode_batch(texts), rng)
        # Unreadable documents are counted by their source (naming the file);
        # here: empty or whitespace-only documents and pieces too short to corrupt.
        sources.SKIPS.add("empty documents", sum(t is not None for t in docs) - len(texts),
                          f"block {index}")
        sources.SKIPS.add("pieces too short for the objective", skipped, f"block {index}")
        rows = packing.pack(examples, self.arch, *self.lengths, packed=self.pack)
        order = rng.permutation(len(next(iter(rows.values()))))  # mix rows across documents
        return {k: v[order] for k, v in rows.items()}


class _Rows(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 16

    def flat_map(self, rows):
        n = len(next(iter(rows.values())))
        return [{k: v[i] for k, v in rows.items()} for i in range(n)]


def _absl_flags_parsed():
    """grain's worker processes read absl flags, which raise unless parsed; t5lab
    has its own command line, so take absl's defaults (a no-op once parsed)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(config, split: str = "train", *, tokenizer_path: str, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """Per-process batches: dict of int32 [train.batch_size // process_count, length]."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if process_index is None or process_count is None:
        import jax  # only for the default shard of a multi-process run
        process_index, process_count = jax.process_index(), jax.process_count()
    validate(config, process_count)
    tok = Tokenizer(tokenizer_path)
    objective = make_objective(config, tok)
    docs = documents(config, split, process_index, process_count)
    stream = SPLITS.index(split) * 1_000_003 + process_index
    blocks = docs.batch(DOCS_PER_BLOCK).map_with_index(_BlockToRows(config, tokenizer_path, objective, stream))
    # One prefetch thread overlaps block preparation with the training step.
    ds = blocks.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if config.data.num_workers > 0:
        # Workers prepare whole blocks: worker w takes blocks w, w + n, ... and
        # grain interleaves them round-robin, so the main process sees blocks in
        # index order and rows and batches are exactly those of num_workers=0.
        # (Batching inside the workers would give each worker its own batches.)
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    ds = grain.experimental.FlatMapIterDataset(ds, _Rows())
    ds = ds.batch(config.train.batch_size // process_count, drop_remainder=True)
    return ds
