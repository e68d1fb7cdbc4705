"""Random-access document sources: embedded corpus, text, JSONL, Parquet, TFDS.

Every source is a picklable sequence of documents: str ("" for a null value,
skipped and counted as empty by the pipeline), or None for a document that
cannot be read, counted in SKIPS with its file and offset and skipped. Random access lets
grain shuffle globally, shard by process and resume from an index.

Mixture spec (config.data.mixture), comma separated `kind:arg=weight` items:
    "embedded=1,text:/data/law/*.txt=3,jsonl:/data/web/*.jsonl=1,tfds:c4/en:3.1.0=2"
text/jsonl/parquet items share config.data.text_field / doc_per; tfds items
use config.data.tfds_data_dir. Weights must be >= 0 with a positive sum.
"""
from __future__ import annotations

import collections
import functools
import glob
import hashlib
import json
import logging
import math
import os
import sysconfig

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("embedded", "text", "jsonl", "parquet", "tfds", "mixture")
# Parts of the standard library that are not prose or idiomatic code.
_EMBEDDED_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class SkipCounter:
    """Counts what this process drops (per reason) and reports it as a warning
    the first time and then every `every` skips of a reason, with the latest
    culprit (file and byte offset, dataset and index): bad input is visible
    without a log line per document."""

    def __init__(self, every: int = 1000):
        self.every, self.counts, self.latest = every, collections.Counter(), ""

    def add(self, reason: str, n: int = 1, where: str = ""):
        if n <= 0:
            return
        before = self.counts[reason]
        self.counts[reason] += n
        self.latest = f"{reason}: {where}" if where else reason
        if before == 0 or before // self.every != self.counts[reason] // self.every:
            log.warning("skipped %d %s so far in this process%s", self.counts[reason], reason,
                        f" (latest: {where})" if where else "")


# One per process: worker processes count their own; the blocks they build carry
# their counts back to the trainer (pipeline.StreamIterator.skipped).
SKIPS = SkipCounter()
# Why documents are skipped, with the metric each is logged as (summed over hosts).
UNREADABLE, EMPTY, SHORT = "unreadable documents", "empty documents", "pieces too short for the objective"
SKIP_METRICS = {UNREADABLE: "skipped_unreadable", EMPTY: "skipped_empty", SHORT: "skipped_too_short"}


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread hash of uint64 keys, vectorised."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def is_eval(keys: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Held-out membership by hash of a stable per-document key."""
    u = (_mix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < eval_fraction


def _position_keys(files: list[str], fids: np.ndarray) -> np.ndarray:
    """Eval-split keys from each document's file name and its ordinal in that file
    (`fids` is sorted by file): adding or removing a file moves no other document."""
    fids = np.asarray(fids, np.int64)
    first = np.searchsorted(fids, fids, side="left")  # index of each file's first document
    local = (np.arange(len(fids)) - first).astype(np.uint64)
    file_keys = np.array([_stable_hash(os.path.basename(f)) for f in files], np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(_mix64(file_keys[fids]) + local)


class _Source:
    """A sequence of documents with stable keys for the eval hash split."""
    name = "source"

    def __len__(self):
        raise NotImplementedError

    def __getitem__(self, i):
        raise NotImplementedError

    def keys(self) -> np.ndarray:
        raise NotImplementedError

    def _bad(self, where: str, why: str):
        SKIPS.add(UNREADABLE, where=f"{self.name}: {where}: {why}")
        return None


class FileSource(_Source):
    """A document per file: the embedded corpus and text files with doc_per="file"."""

    def __init__(self, files: list[str], root: str = "", name: str = "text"):
        self.files, self.root, self.name = list(files), root, name

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.files[i])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return self._bad(path, f"cannot read: {e.strerror or e}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(path, f"not UTF-8 at byte {e.start}")

    def keys(self):
        return np.array([_stable_hash(f) for f in self.files], np.uint64)


# Newline indexes are read in chunks of this many bytes: memory stays bounded
# whatever the file size.
INDEX_CHUNK = 16 << 20


def index_cache_dir() -> str:
    return os.environ.get("T5LAB_INDEX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "t5lab", "line-index")


def line_index(path: str) -> np.ndarray:
    """[2, lines] int64 start and end offsets of the file's non-empty lines,
    built in one streamed pass and cached (keyed by path, size and mtime), then
    memory-mapped: a restart reads no corpus byte to start."""
    st = os.stat(path)
    key = hashlib.blake2b(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode(),
                          digest_size=16).hexdigest()
    cached = os.path.join(index_cache_dir(), f"{key}.npy")
    if os.path.isfile(cached):
        return np.load(cached, mmap_mode="r")
    newlines, offset = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(INDEX_CHUNK):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset)
            offset += len(chunk)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [offset]]).astype(np.int64)
    keep = ends > starts
    index = np.stack([starts[keep], ends[keep]])
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = f"{cached}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, index)
    os.replace(tmp, cached)  # atomic: concurrent hosts never read half an index
    return np.load(cached, mmap_mode="r")


class LineSource(_Source):
    """A document per non-blank line (text) or a JSON object per line (jsonl).
    Each file's line offsets come from its cached index (`line_index`)."""

    def __init__(self, files: list[str], name: str, text_field: str | None = None):
        self.name, self.text_field = name, text_field
        self.files, self._index, counts = [], [], []
        for path in files:
            index = line_index(path)
            if index.shape[1] == 0:
                log.warning("%s: skipping empty file %s", name, path)
                continue
            self.files.append(path)
            self._index.append(index)
            counts.append(index.shape[1])
        if not self.files:
            raise ValueError(f"{name}: all files are empty: {files[:3]}")
        self.offsets = np.cumsum([0] + counts)

    def __getstate__(self):  # workers map the cached indexes themselves
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._index = [line_index(p) for p in self.files]

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        fid = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start, end = (int(x) for x in self._index[fid][:, i - self.offsets[fid]])
        path = self.files[fid]
        where = f"{path} line at byte {start}"
        try:
            with open(path, "rb") as f:
                f.seek(start)
                raw = f.read(end - start)
        except OSError as e:
            return self._bad(where, f"cannot read: {e.strerror or e}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(where, f"not UTF-8 at byte {e.start}")
        if self.text_field is None:
            return text  # blank lines are counted as empty documents by the pipeline
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            return self._bad(where, f"invalid JSON: {e.msg}")
        if not isinstance(row, dict) or self.text_field not in row:
            return self._bad(where, f"no field {self.text_field!r} (config.data.text_field)")
        text = row[self.text_field]
        if text is None:
            return ""  # a null value: an empty document
        if not isinstance(text, str):
            return self._bad(where, f"field {self.text_field!r} is {type(text).__name__}, not a string")
        return text

    def keys(self):
        return _position_keys(self.files, np.repeat(np.arange(len(self.files)), np.diff(self.offsets)))


class ParquetSource(_Source):
    """A document per row of a string column; reads whole row groups, cached."""

    def __init__(self, files: list[str], text_field: str):
        import pyarrow.parquet as pq
        self.files, self.text_field, self.name = files, text_field, "parquet"
        groups = []  # (file id, row group, rows)
        for fid, path in enumerate(files):
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
                raise ValueError(f"parquet: {path} is not a readable Parquet file: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            if text_field not in meta.schema_arrow.names:
                raise KeyError(f"config.data.text_field: {path} has no column {text_field!r} "
                               f"(columns: {meta.schema_arrow.names})")
            if meta.metadata.num_rows == 0:
                log.warning("parquet: skipping empty file %s", path)
            for g in range(meta.num_row_groups):
                groups.append((fid, g, meta.metadata.row_group(g).num_rows))
        self.groups = groups
        self.offsets = np.cumsum([0] + [n for _, _, n in groups])
        if self.offsets[-1] == 0:
            raise ValueError(f"parquet: all files are empty: {files[:3]}")

    def __len__(self):
        return int(self.offsets[-1])

    @functools.lru_cache(maxsize=4)
    def _group(self, k):
        import pyarrow.parquet as pq
        fid, g, _ = self.groups[k]
        return pq.ParquetFile(self.files[fid]).read_row_group(g, columns=[self.text_field]) \
            .column(0).to_pylist()

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        try:
            text = self._group(k)[i - self.offsets[k]]
        except OSError as e:
            return self._bad(f"{self.files[self.groups[k][0]]} row group {self.groups[k][1]}",
                             f"cannot read: {e}")
        if text is None:
            return ""
        if not isinstance(text, str):
            return self._bad(f"{self.files[self.groups[k][0]]} row {i - self.offsets[k]}",
                             f"column {self.text_field!r} is {type(text).__name__}, not a string")
        return text

    def keys(self):
        fid = np.repeat([f for f, _, _ in self.groups], [n for _, _, n in self.groups]).astype(np.int64)
        return _position_keys(self.files, fid)


class TfdsSource(_Source):
    """A TFDS dataset read from ArrayRecord files with tfds.data_source (no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str, text_field: str):
        import tensorflow_datasets as tfds
        data_dir = os.path.expanduser(data_dir or "")
        if not data_dir or not os.path.isdir(data_dir):
            raise FileNotFoundError(f"config.data.tfds_data_dir: no directory {data_dir!r}")
        self.name, self.split, self.data_dir, self.text_field = name, split, data_dir, text_field
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for a missing dataset/version/split
            why = str(e).split("\n")[0]  # not tfds's list of every dataset it knows
            raise FileNotFoundError(f"config.data.tfds_name: cannot open {name!r} split {split!r} "
                                    f"in {data_dir!r}: {why}") from None
        fields = list(self._ds.dataset_info.features.keys())
        if text_field not in fields:
            raise KeyError(f"config.data.text_field: TFDS {name!r} has no feature {text_field!r} "
                           f"(features: {fields})")

    def __len__(self):
        return len(self._ds)

    def __getitem__(self, i):
        text = self._ds[int(i)][self.text_field]
        if isinstance(text, bytes):
            try:
                return text.decode("utf-8")
            except UnicodeDecodeError as e:
                return self._bad(f"{self.name}[{i}]", f"not UTF-8 at byte {e.start}")
        return text

    def __getstate__(self):
        return {"name": self.name, "split": self.split, "data_dir": self.data_dir,
                "text_field": self.text_field}

    def __setstate__(self, s):
        self.__init__(s["name"], s["split"], s["data_dir"], s["text_field"])


class Subset(_Source):
    def __init__(self, source: _Source, indices: np.ndarray):
        self.source, self.indices, self.name = source, indices, source.name

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


def embedded_root() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=1)
def embedded_files() -> tuple[str, ...]:
    """The running interpreter's standard library sources (code and docstrings),
    present on every machine: the default corpus needs no download."""
    root = embedded_root()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _EMBEDDED_SKIP)
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    if not out:
        raise FileNotFoundError(f"embedded corpus: no .py files under {root!r}")
    return tuple(sorted(out))


def embedded_documents() -> FileSource:
    return FileSource(list(embedded_files()), embedded_root(), name="embedded")


def expand_globs(paths: str, key: str = "config.data.paths") -> list[str]:
    patterns = [p.strip() for p in paths.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"{key}: no paths given")
    files = []
    for p in patterns:
        hits = sorted(f for f in glob.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(f))
        if not hits:
            raise FileNotFoundError(f"{key}: {p!r} matches no file")
        files += hits
    return files


def open_source(kind: str, arg: str, data, split: str) -> tuple[_Source, bool]:
    """Opens one source; returns it and whether it has its own `split` (TFDS)."""
    if kind == "embedded":
        return embedded_documents(), False
    if kind == "tfds":
        return TfdsSource(arg, split, data.tfds_data_dir, data.text_field), True
    files = expand_globs(arg, "config.data.paths" if arg == data.paths else "config.data.mixture")
    if kind == "text":
        if data.doc_per == "file":
            for f in files:
                if os.path.getsize(f) == 0:
                    log.warning("text: skipping empty file %s", f)
            return FileSource([f for f in files if os.path.getsize(f) > 0]), False
        return LineSource(files, "text"), False
    if kind == "jsonl":
        return LineSource(files, "jsonl", data.text_field), False
    if kind == "parquet":
        return ParquetSource(files, data.text_field), False
    raise ValueError(f"config.data.source: unknown kind {kind!r}; one of {KINDS}")


def split_source(source: _Source, has_split: bool, split: str, eval_fraction: float) -> _Source:
    """The train or eval part of a source without its own split, by hash."""
    if has_split:
        return source
    held_out = is_eval(source.keys(), eval_fraction)
    idx = np.flatnonzero(held_out if split == "eval" else ~held_out)
    if len(idx) == 0:
        raise ValueError(f"config.data.eval_fraction={eval_fraction}: the {split} split of "
                         f"{source.name} has no documents")
    return Subset(source, idx)


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
    """'kind:arg=weight,...' -> [(kind, arg, weight)]; validated."""
    items = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        body, eq, w = item.rpartition("=")
        if not eq:
            raise ValueError(f"config.data.mixture: item {item!r} needs '=weight'")
        kind, _, arg = body.partition(":")
        if kind not in KINDS[:-1]:
            raise ValueError(f"config.data.mixture: item {item!r}: kind {kind!r} is not one of {KINDS[:-1]}")
        if kind != "embedded" and not arg:
            raise ValueError(f"config.data.mixture: item {item!r} needs '{kind}:<path or name>'")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"config.data.mixture: weight {w!r} of {item!r} is not a number") from None
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"config.data.mixture: weight of {item!r} must be finite and >= 0")
        items.append((kind, arg, weight))
    if not items or not sum(w for _, _, w in items) > 0:
        raise ValueError(f"config.data.mixture: weights must sum to a positive number, got {spec!r}")
    return items
