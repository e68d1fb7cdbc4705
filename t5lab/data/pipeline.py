"""The input pipeline: one global stream of batches, whatever the job's shape.

How the stream is defined. The documents of a split form one sequence over the
whole corpus: a grain MapDataset shuffled anew each epoch from data.seed
(a mixture: grain's weighted mix of such sequences). The global batch has
B = train.batch_size rows, and row r of every batch comes from lane r: lane r
reads the documents at positions r, r + B, r + 2B, ... in blocks (a block is
the lane's next documents up to a character budget) and turns each block into
packed rows by a pure function of (its documents, seed, lane, block start).
Each lane gives one row per step.

So batch b is a pure function of the data config, the seed and B. Process p
of P builds only the rows of its lanes, [p*B/P, (p+1)*B/P); worker processes
build whole blocks, keyed by (lane, start), so their number changes nothing.
The iterator's state is one position per lane (its block's first document and
the rows already taken from the block), never a buffer: a checkpoint holds the
positions of all B lanes, and any process count that divides B, with any
number of workers, resumes exactly where the run stopped.

Cost per host: the tokenization, objective and packing of its own B/P rows
(1/P of the job's data work) and memory for two blocks per lane (the current
one and the next, prepared ahead).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import sys

import grain
import numpy as np

from t5lab import batch as contract, config as config_lib
from t5lab.data import denoising, packing, prepared, sources
from t5lab.data.tokenizer import Tokenizer, split_long

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
# Bump when the definition of the stream changes: checkpoints of another
# version then refuse to resume (the fingerprint names it).
STREAM_VERSION = 3
# A block: the lane's next documents until their text reaches about this many
# characters per token of a row (~8 rows at ~4 characters a token), at most
# MAX_BLOCK_DOCS documents. Larger blocks waste less in their partly filled
# last row; smaller ones cost less memory and start-up time per lane.
BLOCK_CHARS_PER_ROW_TOKEN = 32
CHARS_PER_TOKEN = 4  # what a prepared token counts for in that budget
# A document longer than this is a block of its own per part of this many
# characters (cut between words): a block's rows, and so its memory, stay
# bounded whatever the document lengths.
MAX_PART_CHARS = 1 << 20
MAX_BLOCK_DOCS = 256
# Consecutive documents of one lane that give no row before the stream stops
# with the latest reason: a source of nothing but bad documents never hangs.
MAX_UNUSABLE_DOCS = 2048


class DataError(ValueError):
    """The data cannot feed the run; the message names the file and the reason."""


def _key(name: str, ok: bool, why: str):
    if not ok:
        raise ValueError(f"config.data.{name}: {why}")


def validate(config, process_count: int = 1):
    """Checks the data keys (and the batch split) before any work starts."""
    d, arch = config.data, config.model.arch
    _key("source", d.source in config_lib.SOURCES, f"{d.source!r} is not one of {config_lib.SOURCES}")
    if d.source in ("text", "jsonl", "parquet", "hf", "prepared"):
        _key("paths", bool(d.paths.strip()), f"source {d.source!r} needs paths (comma-separated globs)")
    _key("doc_per", d.doc_per in config_lib.DOC_PER, f"{d.doc_per!r} is not one of {config_lib.DOC_PER}")
    if d.source == "tfds":
        _key("tfds_name", bool(d.tfds_name), "source 'tfds' needs a dataset name, e.g. 'c4/en:3.1.0'")
    if d.source == "mixture":
        sources.parse_mixture(d.mixture)
    phase_starts(config)
    _key("objective", d.objective in config_lib.OBJECTIVES, f"{d.objective!r} is not one of {config_lib.OBJECTIVES}")
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


def parse_schedule(config) -> list[tuple[float, list[float]]]:
    """data.mixture_schedule 'FRACTION=w1,w2,...;...' -> [(fraction, weights)]:
    from that fraction of train.steps on, data.mixture's items take those
    weights (one per item, in its order)."""
    d = config.data
    spec = d.mixture_schedule.strip()
    if not spec:
        return []
    if d.source != "mixture":
        raise ValueError("config.data.mixture_schedule: needs config.data.source=mixture")
    n = len(sources.parse_mixture(d.mixture))
    out = []
    for item in spec.split(";"):
        frac, sep, ws = item.partition("=")
        try:
            f, weights = float(frac), [float(w) for w in ws.split(",")]
        except ValueError:
            raise ValueError(f"config.data.mixture_schedule: {item!r} is not FRACTION=w1,...,w{n}") from None
        if not sep or len(weights) != n:
            raise ValueError(f"config.data.mixture_schedule: {item!r} needs {n} weights, one per "
                             f"item of config.data.mixture")
        if not (0 < f < 1) or (out and f <= out[-1][0]):
            raise ValueError(f"config.data.mixture_schedule: fractions must increase within (0, 1), "
                             f"got {item!r}")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"config.data.mixture_schedule: {item!r}: weights must be >= 0 with a "
                             f"positive sum")
        out.append((f, weights))
    return out


def phase_starts(config) -> list[int]:
    """The train steps where each phase of the mixture begins: [0] without a
    schedule."""
    starts = [0] + [round(f * config.train.steps) for f, _ in parse_schedule(config)]
    if len(set(starts)) != len(starts):
        raise ValueError(f"config.data.mixture_schedule: two phases start at the same step of "
                         f"{config.train.steps} (config.train.steps)")
    return starts


def _all_items(config) -> list[tuple[str, str, float]]:
    d = config.data
    if d.source == "mixture":
        return sources.parse_mixture(d.mixture)
    return [(d.source, d.tfds_name if d.source == "tfds" else d.paths, 1.0)]


def _phase_weights(config) -> list[list[float]]:
    """Per phase, the weight of each item of `_all_items`."""
    return [[w for *_, w in _all_items(config)]] + [ws for _, ws in parse_schedule(config)]


def _used(config) -> list[bool]:
    """Per item of `_all_items`: whether some phase draws from it (weight > 0)."""
    return [any(w > 0 for w in col) for col in zip(*_phase_weights(config))]


def _items(config) -> list[tuple[str, str, float]]:
    """The items some phase draws from, with their first weights."""
    return [item for item, u in zip(_all_items(config), _used(config)) if u]


def _used_weights(config, phase: int) -> list[float]:
    return [w for w, u in zip(_phase_weights(config)[phase], _used(config)) if u]


def _open(config, split: str):
    """[(kind, arg, weight, source of `split`)] for the configured sources."""
    d = config.data
    out = []
    for kind, arg, w in _items(config):
        src, has_split = sources.open_source(kind, arg, d, d.train_split if split == "train" else d.eval_split)
        out.append((kind, arg, w, sources.split_source(src, has_split, split, d.eval_fraction)))
    return out


def documents(config, split: str, repeat: bool = True) -> grain.MapDataset:
    """The documents of `split`, one sequence for the whole job. Train is
    shuffled anew each epoch; eval keeps its order. Both repeat forever unless
    repeat=False (one epoch; mixtures end with the first exhausted source)."""
    return _sequence(config, split, [src for *_, src in _open(config, split)], repeat)


def _sequence(config, split, srcs, repeat: bool, phase: int = 0) -> grain.MapDataset:
    """The documents of one phase (see mixture_schedule): its sources (weight > 0)
    mixed by its weights; a later phase shuffles each source afresh."""
    d = config.data
    weights = _used_weights(config, phase)
    parts, mix = [], []
    for n, (src, w) in enumerate(zip(srcs, weights)):
        if w <= 0:
            continue
        if split == "train":
            parts.append(sources.shuffled(src, (d.seed * 1_000_003 + n + 7919 * phase) % 2**32, repeat))
        else:
            ds = grain.MapDataset.source(src)
            parts.append(ds.repeat() if repeat else ds)
        mix.append(w)
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, mix)


# ------------------------------------------------------------------ fingerprint
def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_source(kind: str, arg: str, data, src) -> dict:
    """What identifies one source's documents: its files' names, sizes and
    modification times, or the TFDS name, version and split."""
    if kind == "embedded":
        files = sources.embedded_files()
        root = sources.embedded_root()
        size = sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return {"kind": kind, "python": "%d.%d" % sys.version_info[:2], "files": len(files), "bytes": size}
    if kind == "prepared":
        return {"kind": kind, "dir": src.path, "manifest sha256": prepared.manifest_digest(src.path)}
    if kind == "tfds":
        inner = getattr(getattr(src, "source", src), "_ds", None)
        version = str(inner.dataset_info.version) if inner is not None else ""
        return {"kind": kind, "name": arg.split(":")[0], "version": version,
                "split": getattr(getattr(src, "source", src), "split", "")}
    out = {"kind": kind}
    if kind in ("jsonl", "parquet", "hf"):
        out["text_field"] = data.text_field
    if kind == "text":
        out["doc_per"] = data.doc_per
    key = "config.data.paths" if arg == data.paths else "config.data.mixture"
    files = sources.hf_arrow_files(arg, data.train_split, key)[0] if kind == "hf" else \
        sources.expand_globs(arg, key)
    for f in files:
        out[f"file {f if sources.is_url(f) else os.path.abspath(f)}"] = sources.file_identity(f)
    return out


def fingerprint(config, tokenizer_path: str, opened=None) -> dict:
    """Everything that decides the train stream, flat {key: value}: a resume
    whose fingerprint differs would replay saved positions into other data."""
    d, m = config.data, config.model
    fp = {"stream_version": STREAM_VERSION, "tokenizer sha256": file_digest(tokenizer_path),
          "data.objective": d.objective, "model.arch": m.arch, "data.inputs_length": d.inputs_length,
          "data.targets_length": d.targets_length, "data.pack": d.pack, "data.seed": d.seed,
          "train.batch_size": config.train.batch_size}  # the number of lanes
    if d.objective == "ul2":
        fp["data.ul2_rates"] = d.ul2_rates
    if d.objective == "span_corruption":
        fp["data.noise_density"], fp["data.mean_span_length"] = d.noise_density, d.mean_span_length
    if d.objective == "mlm":
        fp["data.mlm_probability"] = d.mlm_probability
    if parse_schedule(config):  # phases begin at fractions of the run's length
        fp["data.mixture_schedule"], fp["train.steps"] = d.mixture_schedule, config.train.steps
    opened = opened if opened is not None else _open(config, "train")
    for n, (kind, arg, w, src) in enumerate(opened):
        if kind not in ("tfds", "prepared"):
            fp["data.eval_fraction"] = d.eval_fraction
        for k, v in describe_source(kind, arg, d, src).items():
            fp[f"source {n} {k}"] = v
        if len(opened) > 1:
            fp[f"source {n} weight"] = w
    return fp


def fingerprint_difference(saved: dict, current: dict) -> str | None:
    """'key: old -> new' for the first key that differs, or None."""
    for key in list(saved) + [k for k in current if k not in saved]:
        old, new = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if old != new:
            return f"{key}: {old!r} -> {new!r}"
    return None


# ------------------------------------------------------------------ blocks
@dataclasses.dataclass
class Block:
    rows: dict | None       # feature -> [n, length], None when the block gave no row
    next_start: int         # the lane's document index after this block
    next_part: int          # and the part of it (a long document is read in parts)
    docs: int               # documents read
    skips: dict             # reason -> count, for this block
    latest_skip: str        # the latest skipped document's file and reason

    @property
    def num_rows(self) -> int:
        return 0 if self.rows is None else len(next(iter(self.rows.values())))


class _LaneBlocks:
    """(lane, start) -> Block: a pure function of the config and its position."""

    def __init__(self, config, docs: list[grain.MapDataset], tokenizer_path: str, objective, split: str):
        d = config.data
        self.phases, self.tokenizer_path, self.objective = docs, tokenizer_path, objective
        self.lanes, self.split = config.train.batch_size, SPLITS.index(split)
        self.arch, self.pack, self.seed = config.model.arch, d.pack, d.seed
        self.lengths = (d.inputs_length, d.targets_length)
        self.chars = BLOCK_CHARS_PER_ROW_TOKEN * contract.row_tokens(self.arch, *self.lengths)
        self._tok = None

    def __getstate__(self):  # workers reload the tokenizer from its path
        return {k: v for k, v in self.__dict__.items() if k != "_tok"} | {"_tok": None}

    def __call__(self, lane: int, start: int, part: int = 0, phase: int = 0) -> Block:
        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        docs = self.phases[phase]
        before = dict(sources.SKIPS.counts)
        items, n, chars, next_part = [], 0, 0, 0  # texts, or chunks of prepared token ids
        while n < MAX_BLOCK_DOCS and chars < self.chars:
            doc = docs[(start + n) * self.lanes + lane]
            n += 1
            if doc is None:
                continue  # unreadable: counted by its source, naming the file
            if isinstance(doc, prepared.Chunk):
                items.append(doc)
                chars += CHARS_PER_TOKEN * doc.num_tokens
                continue
            if not doc or doc.isspace():
                sources.SKIPS.add(sources.EMPTY, 1, f"lane {lane} document {start + n - 1}")
                continue
            if len(doc) > MAX_PART_CHARS:
                if items:  # the long document starts the next block
                    n -= 1
                    break
                parts = split_long(doc, MAX_PART_CHARS, self._tok.dummy_prefix)
                items.append(parts[part])
                if part + 1 < len(parts):
                    n, next_part = 0, part + 1
                break
            items.append(doc)
            chars += len(doc)
        texts = [x for x in items if isinstance(x, str)]
        encoded = iter(self._tok.encode_batch(texts) if texts else ())
        tokens = []
        for x in items:  # in stream order
            if isinstance(x, str):
                tokens.append(next(encoded))
            else:
                tokens.extend(x)
        rng = np.random.default_rng([self.seed, self.split, lane, start, part] + [phase] * (phase > 0))
        examples, short = self.objective.ragged(tokens, rng) if tokens else ([], 0)
        sources.SKIPS.add(sources.SHORT, short, f"lane {lane} document {start}")
        rows = None
        if examples:
            rows = packing.pack(examples, self.arch, *self.lengths, packed=self.pack)
            order = rng.permutation(len(next(iter(rows.values()))))  # mix rows across documents
            rows = {k: v[order] for k, v in rows.items()}
        skips = {k: v - before.get(k, 0) for k, v in sources.SKIPS.counts.items() if v != before.get(k, 0)}
        return Block(rows, start + n, next_part, max(n, 1), skips, sources.SKIPS.latest if skips else "")


_WORKER_BLOCKS = None


def _worker_init(blocks):
    global _WORKER_BLOCKS
    _WORKER_BLOCKS = blocks
    sources.SKIPS.quiet = True  # the trainer reports the counts the blocks carry back


def _worker_block(lane, start, part, phase):
    return _WORKER_BLOCKS(lane, start, part, phase)


# ------------------------------------------------------------------ the stream
class Stream:
    """This process's rows of the global stream; iter() gives a fresh iterator."""

    def __init__(self, blocks: _LaneBlocks, lanes: range, num_workers: int, fingerprint: dict | None,
                 phase_starts: list[int] | None = None):
        self.blocks, self.lanes, self.num_workers = blocks, lanes, num_workers
        self.fingerprint = fingerprint
        self.phase_starts = phase_starts or [0]

    def __iter__(self) -> "StreamIterator":
        return StreamIterator(self)


class StreamIterator:
    """Batches of this process's lanes, prepared one block ahead per lane by a
    thread (num_workers=0) or by worker processes."""

    def __init__(self, stream: Stream):
        self._fn, self.lanes = stream.blocks, list(stream.lanes)
        self._pos = {lane: [0, 0, 0] for lane in self.lanes}   # block start, rows taken, part
        # Batches given so far: a mixture schedule's phase is a function of it, and
        # each phase reads its own document sequence from position 0.
        self.batches, self._starts, self._phase = 0, stream.phase_starts, 0
        self._unusable = {lane: 0 for lane in self.lanes}
        self._cur, self._next = {}, {}
        self.skipped = collections.Counter()                 # this process's skips, by reason
        if stream.num_workers > 0:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                stream.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(self._fn,))
            self._call = _worker_block
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="t5lab-data")
            self._call = self._fn

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        """{"lanes": {lane: [block start, rows taken, part]}, "batches": n} for this
        process's lanes (positions in the current phase's sequence)."""
        return {"lanes": {str(lane): list(self._pos[lane]) for lane in self.lanes}, "batches": self.batches}

    def _phase_of(self, batches: int) -> int:
        return sum(batches >= s for s in self._starts) - 1

    def set_state(self, state: dict) -> None:
        lanes = state["lanes"]
        missing = [lane for lane in self.lanes if str(lane) not in lanes]
        if missing:
            raise DataError(f"data state has no position for lane {missing[0]}")
        for f in self._next.values():
            f.cancel()
        self._cur, self._next = {}, {}
        self._pos = {lane: [int(x) for x in lanes[str(lane)]] + [0] * (3 - len(lanes[str(lane)]))
                     for lane in self.lanes}
        self.batches = int(state.get("batches", 0))
        # The positions are in the sequence of the phase of the last batch given:
        # at a phase's first batch, __next__ starts the new phase.
        self._phase = self._phase_of(max(self.batches - 1, 0))

    def _submit(self, lane: int, start: int, part: int):
        self._next[lane] = ((start, part), self._pool.submit(self._call, lane, start, part, self._phase))

    def _advance(self, lane: int) -> Block:
        """The lane's current block, fetching (and prefetching) as needed."""
        start, taken, part = self._pos[lane]
        blk = self._cur.get(lane)
        while blk is None or taken >= blk.num_rows:
            if blk is not None:
                start, taken, part = blk.next_start, 0, blk.next_part
            if lane not in self._next or self._next[lane][0] != (start, part):
                self._submit(lane, start, part)
            blk = self._next.pop(lane)[1].result()
            self._account(lane, blk)
            self._submit(lane, blk.next_start, blk.next_part)
            self._pos[lane] = [start, taken, part]
        self._cur[lane] = blk
        return blk

    def _account(self, lane: int, blk: Block):
        self.skipped.update(blk.skips)
        if blk.num_rows:
            self._unusable[lane] = 0
            return
        self._unusable[lane] += blk.docs
        if self._unusable[lane] >= MAX_UNUSABLE_DOCS:
            raise DataError(f"data: no usable document in {self._unusable[lane]} consecutive documents "
                            f"(lane {lane}); latest skipped: {blk.latest_skip or 'empty documents'}")

    def __next__(self) -> dict:
        if self._phase_of(self.batches) != self._phase:  # the schedule's next phase begins
            for f in self._next.values():
                f[1].cancel()
            self._cur, self._next = {}, {}
            self._pos = {lane: [0, 0, 0] for lane in self.lanes}
            self._phase = self._phase_of(self.batches)
        for lane in self.lanes:  # every lane's first block in flight at once
            if lane not in self._cur and lane not in self._next:
                self._submit(lane, self._pos[lane][0], self._pos[lane][2])
        rows = []
        for lane in self.lanes:
            blk = self._advance(lane)
            i = self._pos[lane][1]
            rows.append({k: v[i] for k, v in blk.rows.items()})
            self._pos[lane][1] = i + 1
        self.batches += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_prepared(config, opened, tokenizer_path: str) -> None:
    """Prepared sources were tokenized and split once: the run must use the
    same tokenizer and eval fraction, or it would train on other data."""
    digest = None
    for kind, _, _, src in opened:
        if kind != "prepared":
            continue
        digest = digest or file_digest(tokenizer_path)
        m = src.manifest
        if m["tokenizer sha256"] != digest:
            raise ValueError(f"config.data.tokenizer: {tokenizer_path} is not the tokenizer {src.path} "
                             f"was prepared with ({prepared.TOKENIZER} there); leave the key out to use it")
        if m["eval_fraction"] is not None and m["eval_fraction"] != config.data.eval_fraction:
            raise ValueError(f"config.data.eval_fraction: {config.data.eval_fraction} but {src.path} was "
                             f"prepared with {m['eval_fraction']}; set it to that or prepare again")


def process_lanes(batch_size: int, process_index: int, process_count: int) -> range:
    per = batch_size // process_count
    return range(process_index * per, (process_index + 1) * per)


def make_dataset(config, split: str = "train", *, tokenizer_path: str, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int | None = None) -> Stream:
    """This process's batches: dict of int32 [train.batch_size // process_count, length],
    its rows of the global stream (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if process_index is None or process_count is None:
        import jax  # only for the default shard of a multi-process run
        process_index, process_count = jax.process_index(), jax.process_count()
    validate(config, process_count)
    tok = Tokenizer(tokenizer_path)
    objective = make_objective(config, tok)
    opened = _open(config, split)
    check_prepared(config, opened, tokenizer_path)
    srcs = [src for *_, src in opened]
    starts = phase_starts(config) if split == "train" else [0]  # eval keeps the first weights
    docs = [_sequence(config, split, srcs, True, phase) for phase in range(len(starts))]
    fp = fingerprint(config, tokenizer_path, opened) if split == "train" else None
    blocks = _LaneBlocks(config, docs, tokenizer_path, objective, split)
    workers = config.data.num_workers if num_workers is None else num_workers
    return Stream(blocks, process_lanes(config.train.batch_size, process_index, process_count), workers, fp,
                  starts)


def probe(stream: Stream) -> None:
    """Builds the first block of the process's first lane: a corpus that gives
    no row fails here, before the run writes anything."""
    lane = stream.lanes[0]
    start, part, unusable = 0, 0, 0
    while True:
        blk = stream.blocks(lane, start, part)
        if blk.num_rows:
            return
        unusable += blk.docs
        if unusable >= MAX_UNUSABLE_DOCS:
            raise DataError(f"data: no usable document in the first {unusable} documents of lane {lane}; "
                            f"latest skipped: {blk.latest_skip or 'empty documents'}")
        start, part = blk.next_start, blk.next_part
