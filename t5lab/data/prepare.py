"""`t5lab prepare`: tokenize a configured source once into prepared data.

The source's documents, in source order, are cut into `shards` tasks of
consecutive documents. Task k tokenizes its documents with the run's
SentencePiece model and writes shard k (train-k and, when the split is by
hash, eval-k: held-out documents are chosen exactly as training on the raw
source chooses them), then a small `.done.json` beside it. So a killed run
resumes without redoing finished shards, tasks can be spread over worker
processes (--workers) and machines (--shard I --num-shards N over one output
directory, or several merged with --merge), and the result does not depend on
how the work was spread. When every task is done, manifest.json is written:
the prepared directory exists from then on (see t5lab/data/prepared.py).

A mixture (data.source=mixture) is prepared item by item, each into its own
prepared directory under the output (item-0-text, item-1-jsonl, ...) by the
single-source code above, with a config whose data.source and data.paths
(or tfds_name) are the item's. When every item is done, mixture.json there
holds the training override: data.mixture with each item replaced by
`prepared:ITEM_DIR` and its weight kept, in the same order, so
data.mixture_schedule still names the same items.
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

from t5lab import storage
from t5lab.data import pipeline, prepared, sources
from t5lab.data.tokenizer import Tokenizer

DEFAULT_CHUNK_TOKENS = 4096
# Default task count: at least this many (so every core has work), else one
# task per this many documents.
MIN_SHARDS, DOCS_PER_SHARD = 16, 200_000
_PLAN = "plan.json"
_ITEM = "item-"  # a mixture's item directories: item-0-text, item-1-jsonl, ...


class PrepareError(ValueError):
    """The output directory or the request cannot be prepared as asked (one line)."""


class _ChunkWriter:
    """Cuts a stream of documents into chunks of `chunk_tokens` tokens and
    writes them as the records of one ArrayRecord file."""

    def __init__(self, path: str, chunk_tokens: int, dtype: str):
        from array_record.python import array_record_module
        self.path, self.chunk_tokens, self.dtype = path, chunk_tokens, dtype
        self._w = array_record_module.ArrayRecordWriter(path, "group_size:1")
        self._pieces, self._count = [], 0
        self.records = self.documents = self.tokens = 0

    def add(self, ids: np.ndarray):
        self.documents += 1
        self.tokens += len(ids)
        pos = 0
        while pos < len(ids):
            take = min(len(ids) - pos, self.chunk_tokens - self._count)
            self._pieces.append(ids[pos:pos + take])
            self._count += take
            pos += take
            if self._count == self.chunk_tokens:
                self._flush()

    def _flush(self):
        if self._pieces:
            self._w.write(prepared.encode_chunk(self._pieces, self.dtype))
            self.records += 1
        self._pieces, self._count = [], 0

    def close(self) -> dict:
        self._flush()
        self._w.close()
        return {"records": self.records, "documents": self.documents, "tokens": self.tokens,
                "bytes": os.path.getsize(self.path)}


# ------------------------------------------------------------------ the plan
def _task_name(tag: str, k: int, n: int) -> str:
    return f"{tag}-{k:05d}-of-{n:05d}.done.json"


def _tasks(plan: dict) -> list[tuple[str, int]]:
    """(tag, k): tag "all" writes train-k and eval-k from a hash split; a
    source with its own splits has a train and an eval task per k."""
    n = plan["shards"]
    tags = ["train", "eval"] if plan["own_splits"] else ["all"]
    return [(t, k) for t in tags for k in range(n)]


def make_plan(config, tok_path: str, shards: int | None, chunk_tokens: int) -> dict:
    d = config.data
    if d.source == "prepared":
        raise PrepareError(f"config.data.source='prepared': {d.paths} is prepared already; nothing to prepare")
    if d.source == "mixture":
        raise PrepareError("config.data.source='mixture': prepare_mixture prepares a mixture, item by item")
    pipeline.validate(config)
    arg = d.tfds_name if d.source == "tfds" else d.paths
    src, own = sources.open_source(d.source, arg, d, d.train_split)
    n_docs = {"train": len(src)}
    if own:
        n_docs["eval"] = len(sources.open_source(d.source, arg, d, d.eval_split)[0])
    tok = Tokenizer(tok_path)
    shards = shards or max(MIN_SHARDS, math.ceil(max(n_docs.values()) / DOCS_PER_SHARD))
    return {"format": prepared.FORMAT, "format_version": prepared.FORMAT_VERSION,
            "source": {k: v for k, v in pipeline.describe_source(d.source, arg, d, src).items()},
            "tokenizer sha256": pipeline.file_digest(tok_path), "vocab_size": tok.vocab_size,
            "dtype": prepared.dtype_for(tok.vocab_size), "chunk_tokens": chunk_tokens,
            "shards": shards, "own_splits": own, "source_documents": n_docs,
            "eval_fraction": None if own else d.eval_fraction,
            "config": {k: d[k] for k in ("source", "paths", "text_field", "doc_per", "tfds_name",
                                         "tfds_data_dir", "train_split", "eval_split")}}


def _write_plan(out: str, plan: dict, tok_path: str):
    """Writes plan.json and tokenizer.model into `out`, or checks that the ones
    there (a run being resumed) are the same: a resume never mixes data."""
    storage.makedirs(out)
    ppath = storage.join(out, _PLAN)
    if storage.exists(ppath):
        old = json.loads(storage.read_text(ppath))
        diff = pipeline.fingerprint_difference(_flat(old), _flat(plan))
        if diff:
            raise PrepareError(f"{out} holds another preparation ({diff}); use an empty --out")
    else:
        storage.write_text(ppath, json.dumps(plan, indent=1, sort_keys=True))
    tpath = storage.join(out, prepared.TOKENIZER)
    if not storage.exists(tpath):
        storage.upload(tok_path, tpath)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------ one task
_WORKER = {}


def _open(config, split: str):
    d = config.data
    arg = d.tfds_name if d.source == "tfds" else d.paths
    key = (split, d.source, arg, d.text_field, d.doc_per, d.tfds_data_dir)  # one process may prepare several
    if key not in _WORKER:
        _WORKER[key] = sources.open_source(d.source, arg, d, d.train_split if split == "train" else d.eval_split)[0]
    return _WORKER[key]


def run_task(config, plan: dict, tok_path: str, out: str, tag: str, k: int) -> dict:
    """Writes task (tag, k)'s shards and its .done.json; returns its record."""
    n = plan["shards"]
    src = _open(config, "eval" if tag == "eval" else "train")
    lo, hi = k * len(src) // n, (k + 1) * len(src) // n
    held_out = None
    if tag == "all" and plan["eval_fraction"]:
        held_out = sources.is_eval(src.keys(lo, hi), plan["eval_fraction"])
    splits = ["train", "eval"] if tag == "all" else [tag]
    tok = Tokenizer(tok_path)
    skipped = {}  # counted here: other threads of this process may count in SKIPS too
    with tempfile.TemporaryDirectory(prefix="t5lab-prepare-",
                                     dir=None if storage.is_remote(out) else out) as tmp:
        writers = {s: _ChunkWriter(os.path.join(tmp, prepared.shard_name(s, k, n)),
                                   plan["chunk_tokens"], plan["dtype"]) for s in splits}
        for i in range(lo, hi):
            text = src[i]
            if text is None:  # the source has logged the file and the reason
                skipped[sources.UNREADABLE] = skipped.get(sources.UNREADABLE, 0) + 1
                continue
            if not text or text.isspace():
                skipped[sources.EMPTY] = skipped.get(sources.EMPTY, 0) + 1
                continue
            split = "eval" if (held_out is not None and held_out[i - lo]) or tag == "eval" else "train"
            writers[split].add(tok.encode(text))
        record = {"task": [tag, k], "splits": {}}
        for s, w in writers.items():
            record["splits"][s] = w.close() | {"file": prepared.shard_name(s, k, n)}
            storage.upload(w.path, storage.join(out, record["splits"][s]["file"])) \
                if storage.is_remote(out) else os.replace(w.path, os.path.join(out, record["splits"][s]["file"]))
    record["skipped"] = skipped
    storage.write_text(storage.join(out, _task_name(tag, k, n)), json.dumps(record, sort_keys=True))
    return record


def _pool_task(args):
    return run_task(*args)


# ------------------------------------------------------------------ the job
def _done(out: str, plan: dict) -> dict:
    names = set(storage.listdir(out))
    done = {}
    for tag, k in _tasks(plan):
        name = _task_name(tag, k, plan["shards"])
        if name in names:
            done[(tag, k)] = json.loads(storage.read_text(storage.join(out, name)))
    return done


def merge(out: str) -> dict:
    """Writes manifest.json from the finished tasks' records; names what is missing."""
    ppath = storage.join(out, _PLAN)
    if not storage.exists(ppath):
        hint = ""
        if storage.exists(out) and any(n.startswith(_ITEM) for n in storage.listdir(out)):
            hint = " (a mixture's directory: merge with the same --config.data.source=mixture --config.data.mixture)"
        raise PrepareError(f"{out}: no {_PLAN}: not a t5lab prepare output{hint}")
    plan = json.loads(storage.read_text(ppath))
    done = _done(out, plan)
    missing = [t for t in _tasks(plan) if t not in done]
    if missing:
        names = ", ".join(_task_name(t, k, plan["shards"]) for t, k in missing[:3])
        raise PrepareError(f"{out}: {len(missing)} of {len(_tasks(plan))} tasks are not done "
                           f"(e.g. {names}); run them (`--shard`), or copy their files here")
    manifest = {k: v for k, v in plan.items() if k != "shards"}
    skipped = {}
    manifest["splits"] = {}
    for split in prepared.SPLITS:
        shards = [r["splits"][split] for t, r in sorted(done.items(), key=lambda x: x[0][1])
                  if split in r["splits"]]
        manifest["splits"][split] = {
            "shards": shards, **{c: sum(s[c] for s in shards) for c in ("records", "documents", "tokens", "bytes")}}
    for r in done.values():
        for reason, c in r["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + c
    manifest["skipped"] = skipped
    storage.write_text(storage.join(out, prepared.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


class _Progress:
    def __init__(self, total_docs: int, todo: int):
        self.total, self.todo = total_docs, todo
        self.docs = self.tokens = self.tasks = 0
        self.start = time.monotonic()

    def update(self, record: dict):
        self.tasks += 1
        self.docs += sum(s["documents"] for s in record["splits"].values())
        self.tokens += sum(s["tokens"] for s in record["splits"].values())
        dt = max(time.monotonic() - self.start, 1e-9)
        frac = self.tasks / self.todo
        eta = dt / frac * (1 - frac)
        print(f"prepare: {self.tasks}/{self.todo} shards, {self.docs:,} documents, {self.tokens:,} tokens, "
              f"{self.tokens / dt:,.0f} tokens/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
              file=sys.stderr, flush=True)


def prepare(config, out: str, *, workers: int = 1, shards: int | None = None, shard: int = 0,
            num_shards: int = 1, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, tok_path: str) -> dict | None:
    """Runs this machine's tasks (those with index % num_shards == shard) that are
    not done yet; writes the manifest when every task is done and returns it."""
    if not 0 <= shard < num_shards:
        raise PrepareError(f"--shard {shard}: must be in [0, --num-shards {num_shards})")
    if chunk_tokens < 16:
        raise PrepareError(f"--chunk_tokens {chunk_tokens}: must be >= 16")
    if workers < 1:
        raise PrepareError(f"--workers {workers}: must be >= 1")
    out = storage.absolute(out)
    plan = make_plan(config, tok_path, shards, chunk_tokens)
    _write_plan(out, plan, tok_path)  # refuses a directory holding another preparation
    if storage.exists(storage.join(out, prepared.MANIFEST)):
        return prepared.read_manifest(out)
    done = _done(out, plan)
    todo = [t for i, t in enumerate(_tasks(plan)) if i % num_shards == shard and t not in done]
    progress = _Progress(sum(plan["source_documents"].values()), max(len(todo), 1))
    args = [(config, plan, tok_path, out, tag, k) for tag, k in todo]
    if workers == 1 or len(todo) <= 1:
        for a in args:
            progress.update(run_task(*a))
    else:
        with concurrent.futures.ProcessPoolExecutor(
                min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in concurrent.futures.as_completed([pool.submit(_pool_task, a) for a in args]):
                progress.update(f.result())
    try:
        return merge(out)
    except PrepareError:
        if num_shards > 1:
            return None  # other machines' tasks are still running
        raise


# ------------------------------------------------------------------ a mixture
def _weight_text(w: float) -> str:
    return str(int(w)) if w.is_integer() and abs(w) < 1e15 else repr(w)


def mixture_items(config, out: str) -> list[tuple[str, object, float]]:
    """(item directory, the item's own config, weight) for each item of
    config.data.mixture, in its order. Refuses, naming the item, what there is
    nothing to prepare for; checks the whole config before any work."""
    d = config.data
    pipeline.validate(config)  # the mixture, its schedule and the other data keys
    if "," in out:
        raise PrepareError(f"--out {out}: a mixture's directory must not contain ',' "
                           f"(data.mixture separates its items with it)")
    items = []
    for i, (kind, arg, w) in enumerate(sources.parse_mixture(d.mixture)):
        if kind == "prepared":
            raise PrepareError(f"config.data.mixture: item {i} 'prepared:{arg}' is prepared already; "
                               f"nothing to prepare (prepare the other items on their own)")
        item = copy.deepcopy(config)
        item.data.source, item.data.mixture, item.data.mixture_schedule = kind, "", ""
        item.data.paths = arg if kind not in ("tfds", "embedded") else ""
        item.data.tfds_name = arg if kind == "tfds" else ""
        items.append((storage.join(out.rstrip("/"), f"{_ITEM}{i}-{kind}"), item, w))
    return items


def mixture_override(items: list[tuple[str, object, float]]) -> str:
    """The training flags that read the prepared items, weights and order kept."""
    spec = ",".join(f"prepared:{path}={_weight_text(w)}" for path, _, w in items)
    return "--config.data.source=mixture --config.data.mixture='" + spec.replace("'", "'\"'\"'") + "'"


def _finish_mixture(out: str, items, manifests: list[dict | None]) -> dict | None:
    """Writes mixture.json once every item has its manifest (another machine
    may have written one since this machine's turn); returns what it wrote."""
    for n, (path, _, _) in enumerate(items):
        if manifests[n] is None and storage.exists(storage.join(path, prepared.MANIFEST)):
            manifests[n] = prepared.read_manifest(path)
    if any(m is None for m in manifests):
        return None
    mix = {"format": prepared.MIXTURE_FORMAT, "override": mixture_override(items),
           "items": [{"dir": path, "kind": c.data.source,
                      "arg": c.data.tfds_name if c.data.source == "tfds" else c.data.paths, "weight": w}
                     for path, c, w in items]}
    storage.write_text(storage.join(out, prepared.MIXTURE), json.dumps(mix, indent=1, sort_keys=True))
    return mix | {"manifests": manifests}


def prepare_mixture(config, out: str, *, tok_path: str, **kw) -> dict | None:
    """prepare() for each item of a mixture into its directory under `out`
    (the same options, resume and work split), then mixture.json. Returns its
    content with "manifests" (one per item), or None while other machines'
    tasks are still running."""
    items = mixture_items(config, out)
    for n, (_, item, _) in enumerate(items):  # every item's bad input is refused before any work
        try:
            make_plan(item, tok_path, kw.get("shards"), kw.get("chunk_tokens", DEFAULT_CHUNK_TOKENS))
        except (ValueError, FileNotFoundError) as e:  # named as the item, not as data.paths
            d = item.data
            spec = f"{d.source}:{d.tfds_name if d.source == 'tfds' else d.paths}".rstrip(":")
            kind = FileNotFoundError if isinstance(e, FileNotFoundError) else PrepareError
            why = str(e).strip("'").removeprefix("config.data.paths: ").removeprefix("config.data.tfds_name: ")
            raise kind(f"config.data.mixture item {n} {spec!r}: {why}") from None
    manifests = []
    for n, (path, item, _) in enumerate(items):
        print(f"prepare: item {n} of {len(items)} ({item.data.source}) -> {path}", file=sys.stderr, flush=True)
        manifests.append(prepare(item, path, tok_path=tok_path, **kw))
    return _finish_mixture(out, items, manifests)


def merge_mixture(config, out: str) -> dict:
    """merge() for each item of the mixture in `out`, then mixture.json."""
    items = mixture_items(config, out)
    return _finish_mixture(out, items, [merge(path) for path, _, _ in items])
