"""Random-access document sources: embedded corpus, text, JSONL, Parquet, TFDS,
Hugging Face datasets on disk (Arrow files).

Every source is a picklable sequence of documents: str ("" for a null value,
skipped and counted as empty by the pipeline), or None for a document that
cannot be read, counted in SKIPS with its file and offset and skipped. Random access lets
grain shuffle globally, shard by process and resume from an index.

Mixture spec (config.data.mixture), comma separated `kind:arg=weight` items:
    "embedded=1,text:/data/law/*.txt=3,jsonl:/data/web/*.jsonl=1,tfds:c4/en:3.1.0=2"
text/jsonl/parquet/hf items share config.data.text_field / doc_per; tfds items
use config.data.tfds_data_dir. Weights must be >= 0 with a positive sum.
Text, JSONL and Parquet paths may be fsspec URLs (gs://bucket/dir/*.jsonl).
"""
from __future__ import annotations

import collections
import datetime
import functools
import glob
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import threading

import numpy as np

from t5lab.config import SOURCES

log = logging.getLogger(__name__)

# Parts of the standard library that are not prose or idiomatic code.
_EMBEDDED_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class SkipCounter:
    """Counts what this process drops, per reason, and warns once per reason
    (with the culprit: file and byte offset, dataset and index); from then on
    the counts reach the training metrics (skipped_*), not the terminal.
    Worker processes are `quiet`: the trainer warns for the blocks they build."""

    def __init__(self, quiet: bool = False):
        self.counts, self.latest, self.quiet = collections.Counter(), "", quiet
        self._warned = set()

    def add(self, reason: str, n: int = 1, where: str = ""):
        if n <= 0:
            return
        self.counts[reason] += n
        self.latest = f"{reason}: {where}" if where else reason
        if reason not in self._warned:
            self._warned.add(reason)
            if not self.quiet:
                log.warning("skipped %d %s%s; further skips are counted in the metrics (%s), not shown",
                            n, reason, f" (at {where})" if where else "", SKIP_METRICS.get(reason, reason))


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


def _position_keys(files: list[str], file_offsets: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Eval-split keys of documents [lo, hi) from each one's file name and its
    ordinal in that file (file f holds documents file_offsets[f:f+2]): adding
    or removing a file moves no other document."""
    file_offsets = np.asarray(file_offsets, np.int64)
    i = np.arange(lo, int(file_offsets[-1]) if hi is None else hi, dtype=np.int64)
    fids = np.searchsorted(file_offsets, i, side="right") - 1
    local = (i - file_offsets[fids]).astype(np.uint64)
    file_keys = np.array([_stable_hash(os.path.basename(f)) for f in files], np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(_mix64(file_keys[fids]) + local)


def _position_basis(files: list[str], file_offsets) -> bytes:
    """What _position_keys is a function of: the file names and their document counts."""
    names = "\0".join(os.path.basename(f) for f in files).encode()
    return b"position\0" + names + b"\0" + np.asarray(file_offsets, np.int64).tobytes()


class _Source:
    """A sequence of documents with stable keys for the eval hash split."""
    name = "source"

    def __len__(self):
        raise NotImplementedError

    def __getitem__(self, i):
        raise NotImplementedError

    def keys(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Stable uint64 keys of documents [lo, hi) (all by default)."""
        raise NotImplementedError

    def key_basis(self) -> bytes | None:
        """Everything keys() depends on, when that is small (then the split
        it decides is cached on disk); None: recomputed at every start."""
        return None

    def _bad(self, where: str, why: str):
        SKIPS.add(UNREADABLE, where=f"{self.name}: {where}: {why}")
        return None

    def _cell(self, value, where: str):
        """A table cell as a document: null is empty, a non-string unreadable."""
        if value is None:
            return ""
        if not isinstance(value, str):
            return self._bad(where, f"column {self.text_field!r} is {type(value).__name__}, not a string")
        return value


# ------------------------------------------------------------------ files: local paths or fsspec URLs
def is_url(path: str) -> bool:
    """fsspec URLs (gs://, s3://, memory://) go through fsspec; plain paths keep
    the os calls, with no fsspec overhead."""
    return "://" in path


def _remote(url: str):
    """(filesystem, path inside it); fsspec caches the filesystem instances."""
    import fsspec
    return fsspec.core.url_to_fs(url)


# What each filesystem's info() calls a file's version, most specific first.
_MODIFIED_KEYS = ("etag", "ETag", "md5Hash", "md5", "generation", "mtime", "LastModified",
                  "last_modified", "updated", "created")
# info() of the remote files the latest glob matched, by URL: sizes and versions
# come from that one listing, not from a request per file (thousands on GCS).
_REMOTE_INFO: dict[str, dict] = {}


def _stat(path: str) -> tuple[int, str]:
    """(size, version) of a local file (mtime in ns) or a URL (its etag, md5,
    generation or modification time, whichever the filesystem reports)."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, str(st.st_mtime_ns)
    info = _REMOTE_INFO.get(path)
    if info is None:
        fs, inner = _remote(path)
        info = fs.info(inner)
    for k in _MODIFIED_KEYS:
        v = info.get(k)
        if v is not None:  # a listing and info() may give a time as a number or a datetime
            return int(info["size"]), f"{k} {v.timestamp() if isinstance(v, datetime.datetime) else v}"
    return int(info["size"]), ""


def file_identity(path: str) -> str:
    """'N bytes, modified X' for a data file's fingerprint (local: X is the mtime in ns)."""
    size, version = _stat(path)
    return f"{size} bytes, modified {version}" if version else f"{size} bytes"


def _open_binary(path: str):
    if not is_url(path):
        return open(path, "rb")
    fs, inner = _remote(path)
    return fs.open(inner, "rb")


def _read(path: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) of a file (all without them). A URL gets one ranged
    request: stateless, so safe from any thread, with no handle to keep."""
    if is_url(path):
        fs, inner = _remote(path)
        return fs.cat_file(inner, start, end)
    with open(path, "rb") as f:
        if start is None:
            return f.read()
        f.seek(start)
        return f.read(end - start)


class FileSource(_Source):
    """A document per file: the embedded corpus and text files with doc_per="file"."""

    def __init__(self, files: list[str], root: str = "", name: str = "text"):
        self.files, self.root, self.name = list(files), root, name

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.files[i])
        try:
            data = _read(path)
        except OSError as e:
            return self._bad(path, f"cannot read: {e.strerror or e}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(path, f"not UTF-8 at byte {e.start}")

    def keys(self, lo=0, hi=None):
        return np.array([_stable_hash(f) for f in self.files[lo:hi]], np.uint64)

    def key_basis(self):
        return b"files\0" + "\0".join(self.files).encode()


# Newline indexes are read in chunks of this many bytes: memory stays bounded
# whatever the file size.
INDEX_CHUNK = 16 << 20


def index_cache_dir() -> str:
    return os.environ.get("T5LAB_INDEX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "t5lab", "line-index")


class NpyReader:
    """Elements of an .npy file read with pread when asked for. Not a memory
    map on purpose: a map keeps every page it touched resident (with the
    kernel's fault-around, most of an index after a few thousand random
    documents), so a process's memory would grow with the corpus."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array, not one t5lab wrote")
        self.dtype = np.dtype(dtype)

    def __len__(self):
        return self.shape[0]

    def flat(self, i: int, n: int = 1) -> np.ndarray:
        """n elements from flat (C-order) position i."""
        size = self.dtype.itemsize
        return np.frombuffer(_pread(self.path, n * size, self.offset + i * size), self.dtype)


# Descriptors of index files kept open per process (an open costs 10x a read);
# a corpus of many files keeps at most this many.
OPEN_INDEX_FILES = 64
_fds: collections.OrderedDict = collections.OrderedDict()
_fds_pid, _fds_lock = None, threading.Lock()


def _pread(path: str, n: int, offset: int) -> bytes:
    global _fds_pid
    with _fds_lock:  # a descriptor is never closed under another thread's read
        if _fds_pid != os.getpid():  # a forked worker: the parent's descriptors are not its own
            _fds.clear()
            _fds_pid = os.getpid()
        fd = _fds.get(path)
        if fd is None:
            fd = _fds[path] = os.open(path, os.O_RDONLY)
            if len(_fds) > OPEN_INDEX_FILES:
                os.close(_fds.popitem(last=False)[1])
        else:
            _fds.move_to_end(path)
        return os.pread(fd, n, offset)


def line_index(path: str, stat: tuple[int, str] | None = None) -> np.ndarray:
    """[2, lines] int64 start and end offsets of the file's non-empty lines,
    memory-mapped from its cache file (`line_index_file`)."""
    return np.load(line_index_file(path, stat), mmap_mode="r")


def line_index_file(path: str, stat: tuple[int, str] | None = None) -> str:
    """The .npy of line_index: built in one streamed pass and cached locally
    (keyed by path or URL, size and mtime or version: `stat`, else
    `_stat(path)`): a restart reads no corpus byte to start."""
    size, version = stat or _stat(path)
    where = path if is_url(path) else os.path.abspath(path)
    key = hashlib.blake2b(f"{where}|{size}|{version}".encode(), digest_size=16).hexdigest()
    cached = os.path.join(index_cache_dir(), f"{key}.npy")
    if os.path.isfile(cached):
        return cached
    newlines, offset = [], 0
    with _open_binary(path) as f:
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
    return cached


class LineSource(_Source):
    """A document per non-blank line (text) or a JSON object per line (jsonl).
    Each file's line offsets come from its cached index (`line_index`); a URL's
    documents are then read by ranged requests."""

    def __init__(self, files: list[str], name: str, text_field: str | None = None):
        self.name, self.text_field = name, text_field
        self.files, self._index, counts = [], [], []
        # Remote files' (size, version) as indexed: workers find the cached
        # indexes without a request per file.
        self._stats = {p: _stat(p) for p in files if is_url(p)}
        for path in files:
            index = NpyReader(line_index_file(path, self._stats.get(path)))
            if index.shape[1] == 0:
                log.warning("%s: skipping empty file %s", name, path)
                continue
            self.files.append(path)
            self._index.append(index)
            counts.append(index.shape[1])
        if not self.files:
            raise ValueError(f"{name}: all files are empty: {files[:3]}")
        self.offsets = np.cumsum([0] + counts)

    def __getstate__(self):  # workers open the cached indexes themselves
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._index = [NpyReader(line_index_file(p, self._stats.get(p))) for p in self.files]

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        fid = int(np.searchsorted(self.offsets, i, side="right") - 1)
        index, j = self._index[fid], int(i - self.offsets[fid])
        start, end = int(index.flat(j)[0]), int(index.flat(index.shape[1] + j)[0])  # rows: starts, ends
        path = self.files[fid]
        where = f"{path} line at byte {start}"
        try:
            raw = _read(path, start, end)
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

    def keys(self, lo=0, hi=None):
        return _position_keys(self.files, self.offsets, lo, hi)

    def key_basis(self):
        return _position_basis(self.files, self.offsets)


def _parquet_file(path: str):
    import pyarrow.parquet as pq
    return pq.ParquetFile(_open_binary(path) if is_url(path) else path)


# Decoded row groups a Parquet source keeps by default; its locality order
# (RowGroupOrder) raises this to two of its windows.
PARQUET_CACHE_GROUPS = 4
# Open Parquet files kept per process: opening a remote one costs requests.
PARQUET_OPEN_FILES = 8


class ParquetSource(_Source):
    """A document per row of a string column. Reads whole row groups and keeps
    the latest `cache_groups` of them as Arrow arrays (compact: no Python string
    per row until asked for); `group_reads` counts the reads."""

    def __init__(self, files: list[str], text_field: str):
        self.files, self.text_field, self.name = files, text_field, "parquet"
        groups = []  # (file id, row group, rows)
        for fid, path in enumerate(files):
            try:
                meta = _parquet_file(path)
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
        self.cache_groups, self.group_reads = PARQUET_CACHE_GROUPS, 0
        self._cache, self._open = collections.OrderedDict(), collections.OrderedDict()

    def __getstate__(self):  # decoded groups and open files stay in their process
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_open")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache, self._open = collections.OrderedDict(), collections.OrderedDict()

    def __len__(self):
        return int(self.offsets[-1])

    @staticmethod
    def _lru(cache: collections.OrderedDict, key, size: int, load):
        value = cache.pop(key, None)
        if value is None:
            value = load(key)
        cache[key] = value
        while len(cache) > size:
            cache.popitem(last=False)
        return value

    def _read_group(self, k):
        fid, g, _ = self.groups[k]
        pf = self._lru(self._open, fid, PARQUET_OPEN_FILES, lambda f: _parquet_file(self.files[f]))
        self.group_reads += 1
        return pf.read_row_group(g, columns=[self.text_field]).column(0).combine_chunks()

    def _group(self, k):
        return self._lru(self._cache, k, self.cache_groups, self._read_group)

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        try:
            text = self._group(k)[int(i - self.offsets[k])].as_py()
        except OSError as e:
            return self._bad(f"{self.files[self.groups[k][0]]} row group {self.groups[k][1]}",
                             f"cannot read: {e}")
        return self._cell(text, f"{self.files[self.groups[k][0]]} row {i - self.offsets[k]}")

    def _file_offsets(self):
        rows = np.bincount([f for f, _, _ in self.groups], [n for _, _, n in self.groups], len(self.files))
        return np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def keys(self, lo=0, hi=None):
        return _position_keys(self.files, self._file_offsets(), lo, hi)

    def key_basis(self):
        return _position_basis(self.files, self._file_offsets())


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


def _saved_dataset_files(path: str, key: str) -> list[str]:
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        raise FileNotFoundError(
            f"{key}: {path!r} is not a datasets.save_to_disk directory (no state.json "
            f"or dataset_dict.json); name Arrow files with a glob instead, e.g. '{path}/*.arrow'")
    with open(state) as f:
        return [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]


def hf_arrow_files(arg: str, split: str, key: str = "config.data.paths") -> tuple[list[str], bool]:
    """The Arrow files of a Hugging Face dataset on disk, and whether they are
    `split` itself: a `save_to_disk` directory of a DatasetDict (`split`, i.e.
    config.data.train_split or eval_split, names its subdirectory) or of a
    Dataset (split later by hash), or globs of .arrow files (the hub cache's)."""
    path = os.path.expanduser(arg.strip())
    if os.path.isdir(path):
        splits_file = os.path.join(path, "dataset_dict.json")
        if not os.path.isfile(splits_file):
            return _saved_dataset_files(path, key), False
        with open(splits_file) as f:
            splits = json.load(f)["splits"]
        if split not in splits:
            raise FileNotFoundError(f"config.data.train_split/eval_split: the DatasetDict {path!r} "
                                    f"has no split {split!r} (splits: {splits})")
        return _saved_dataset_files(os.path.join(path, split), key), True
    return expand_globs(arg, key), False


def _arrow_table(path: str):
    """The file's table, memory-mapped (zero copy: the page cache holds it,
    shared by all processes), from the IPC stream format `datasets` writes or
    the IPC file format."""
    import pyarrow as pa
    if is_url(path):
        raise ValueError(f"hf: {path!r}: Arrow files are memory-mapped, so they must be local")
    try:
        mm = pa.memory_map(path)
        is_file_format = mm.read(6) == b"ARROW1"
        mm.seek(0)
        return (pa.ipc.open_file(mm) if is_file_format else pa.ipc.open_stream(mm)).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"hf: {path} is not a readable Arrow file: {str(e).splitlines()[0]}") from None


class ArrowSource(_Source):
    """A document per row of the config.data.text_field column of a Hugging
    Face dataset's Arrow files, read with pyarrow alone (no `datasets` at run time)."""
    name = "hf"

    def __init__(self, files: list[str], text_field: str):
        self.files, self.text_field = list(files), text_field
        self._columns = []
        for path in self.files:
            table = _arrow_table(path)
            if text_field not in table.column_names:
                raise KeyError(f"config.data.text_field: {path} has no column {text_field!r} "
                               f"(columns: {table.column_names})")
            self._columns.append(table.column(text_field))
        self.offsets = np.cumsum([0] + [len(c) for c in self._columns])
        if self.offsets[-1] == 0:
            raise ValueError(f"hf: all files are empty: {self.files[:3]}")

    def __getstate__(self):  # workers memory-map the files themselves
        return {"files": self.files, "text_field": self.text_field}

    def __setstate__(self, state):
        self.__init__(state["files"], state["text_field"])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        fid = int(np.searchsorted(self.offsets, i, side="right") - 1)
        row = int(i - self.offsets[fid])
        return self._cell(self._columns[fid][row].as_py(), f"{self.files[fid]} row {row}")

    def keys(self, lo=0, hi=None):
        return _position_keys(self.files, self.offsets, lo, hi)

    def key_basis(self):
        return _position_basis(self.files, self.offsets)


class Subset(_Source):
    """The documents of `source` at `indices`, or at those of the .npy file
    `path` (read an index at a time, NpyReader; workers get the path, not a copy)."""

    def __init__(self, source: _Source, indices: np.ndarray | None = None, path: str | None = None):
        self.source, self.name, self.path = source, source.name, path
        self._indices = indices
        self._reader = NpyReader(path) if path else None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not (k == "_indices" and self.path)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_indices", None)

    @property
    def indices(self) -> np.ndarray:
        """All of them (memory-mapped when from a file): for whole-split work."""
        if self._indices is None:
            self._indices = np.load(self.path, mmap_mode="r")
        return self._indices

    def __len__(self):
        return len(self._reader) if self._reader else len(self._indices)

    def __getitem__(self, i):
        return self.source[int(self._reader.flat(int(i))[0] if self._reader else self._indices[i])]


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


def _glob_url(pattern: str) -> list[str]:
    """The files an fsspec URL pattern matches, as URLs; remembers their info()."""
    fs, inner = _remote(pattern)
    found = {k: v for k, v in fs.glob(inner, detail=True).items() if v.get("type") == "file"}
    urls = {fs.unstrip_protocol(k): v for k, v in found.items()}
    _REMOTE_INFO.update(urls)
    return sorted(urls)


def expand_globs(paths: str, key: str = "config.data.paths") -> list[str]:
    """The files that comma-separated local globs or fsspec URL globs match."""
    patterns = [p.strip() for p in paths.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"{key}: no paths given")
    files = []
    for p in patterns:
        if is_url(p):
            hits = _glob_url(p)
        else:
            hits = sorted(f for f in glob.glob(os.path.expanduser(p), recursive=True) if os.path.isfile(f))
        if not hits:
            raise FileNotFoundError(f"{key}: {p!r} matches no file")
        files += hits
    return files


def open_source(kind: str, arg: str, data, split: str) -> tuple[_Source, bool]:
    """Opens one source; returns it and whether it has its own `split` (TFDS,
    prepared, a Hugging Face DatasetDict)."""
    if kind == "embedded":
        return embedded_documents(), False
    if kind == "tfds":
        return TfdsSource(arg, split, data.tfds_data_dir, data.text_field), True
    if kind == "prepared":  # token chunks written by `t5lab prepare`, split there
        from t5lab.data import prepared
        return prepared.PreparedSource(arg, "train" if split == data.train_split else "eval"), True
    key = "config.data.paths" if arg == data.paths else "config.data.mixture"
    if kind == "hf":
        files, has_split = hf_arrow_files(arg, split, key)
        return ArrowSource(files, data.text_field), has_split
    files = expand_globs(arg, key)
    if kind == "text":
        if data.doc_per == "file":
            sizes = {f: _stat(f)[0] for f in files}
            for f in files:
                if sizes[f] == 0:
                    log.warning("text: skipping empty file %s", f)
            return FileSource([f for f in files if sizes[f] > 0]), False
        return LineSource(files, "text"), False
    if kind == "jsonl":
        return LineSource(files, "jsonl", data.text_field), False
    if kind == "parquet":
        return ParquetSource(files, data.text_field), False
    raise ValueError(f"config.data.source: unknown kind {kind!r}; one of {SOURCES}")


# Eval-split keys are hashed this many documents at a time (bounded temporaries).
SPLIT_CHUNK = 1 << 20


def _split_indices(source: _Source, split: str, eval_fraction: float) -> np.ndarray:
    """Sorted indices of the split's documents, in the smallest integer type."""
    n = len(source)
    dtype = np.uint32 if n < 2**32 else np.int64
    parts = []
    for lo in range(0, n, SPLIT_CHUNK):
        held_out = is_eval(source.keys(lo, min(n, lo + SPLIT_CHUNK)), eval_fraction)
        parts.append((np.flatnonzero(held_out if split == "eval" else ~held_out) + lo).astype(dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def split_source(source: _Source, has_split: bool, split: str, eval_fraction: float) -> _Source:
    """The train or eval part of a source without its own split, by hash.
    Where the keys have a small basis (file names and document counts), the
    indices are cached beside the line indexes and read one at a time: a
    start holds none of them in memory, whatever the corpus size."""
    if has_split:
        return source
    basis = source.key_basis()
    path = None
    if basis is not None:
        key = hashlib.blake2b(basis + f"|{eval_fraction!r}|{split}".encode(), digest_size=16).hexdigest()
        path = os.path.join(index_cache_dir(), f"split-{key}.npy")
    idx = None
    if not (path and os.path.isfile(path)):
        idx = _split_indices(source, split, eval_fraction)
        if path and len(idx) >= SPLIT_CHUNK // 16:  # small splits cost less than a file
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, idx)
            os.replace(tmp, path)  # atomic, as line_index
            idx = None
        else:
            path = None
    subset = Subset(source, idx, path)
    if len(subset) == 0:
        raise ValueError(f"config.data.eval_fraction={eval_fraction}: the {split} split of "
                         f"{source.name} has no documents")
    return subset


# A window of the Parquet train order spans at least this many rows (fewer
# only when MAX_WINDOW_GROUPS, which bounds memory for tiny row groups, binds).
WINDOW_ROWS = 1 << 16
MAX_WINDOW_GROUPS = 64


class RowGroupOrder:
    """The train order of a Parquet source (or a Subset of one, with sorted
    indices as split_source makes), read in place with locality. Epoch
    e = position // len(source) permutes the row groups, cuts the permuted
    groups into windows of `window` groups (>= WINDOW_ROWS rows) and permutes
    the rows within each window: every document appears once per epoch, and
    position -> document is a pure function of (seed, position), random access
    with no buffer, so a resume needs only positions.

    The trade: consecutive positions, hence a batch, draw from the `window`
    groups of one window (two at its edge) rather than from the whole corpus;
    in exchange a row group is read about once per epoch instead of about once
    per document. The source keeps two windows of decoded groups, as lanes
    read on both sides of a window edge. Positions a process reads at once
    (its lanes' blocks, spread further as lanes drift apart) beyond two
    windows bring back a read per document."""

    def __init__(self, source, seed: int, epochs: int = 1):
        parquet = source.source if isinstance(source, Subset) else source
        rows = np.asarray(source.indices) if isinstance(source, Subset) else np.arange(len(source))
        sizes = np.bincount(np.searchsorted(parquet.offsets, rows, side="right") - 1,
                            minlength=len(parquet.groups))
        self.source, self.seed, self.n, self.epochs = source, seed, len(rows), epochs
        self.sizes = sizes
        self.group_start = np.concatenate([[0], np.cumsum(sizes)])  # each group's first position in `source`
        rows_per_group = len(rows) / max(1, np.count_nonzero(sizes))
        self.window = int(np.clip(math.ceil(WINDOW_ROWS / rows_per_group), 1, MAX_WINDOW_GROUPS))
        parquet.cache_groups = max(parquet.cache_groups, 2 * self.window)
        self._epochs = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_epochs"} | {"_epochs": {}}

    def __len__(self):
        return self.n * self.epochs

    def _epoch(self, epoch: int):
        """(group of each slot, first position of each slot, of each window)."""
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
            starts = np.concatenate([[0], np.cumsum(self.sizes[perm])])
            windows = starts[np.r_[0:len(perm):self.window, len(perm)]]
            if len(self._epochs) >= 4:  # lanes near an epoch's end read two epochs
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[epoch] = perm, starts, windows
        return self._epochs[epoch]

    def __getitem__(self, i):
        from grain.experimental import index_shuffle
        epoch, p = divmod(int(i), self.n)
        perm, starts, windows = self._epoch(epoch)
        w = int(np.searchsorted(windows, p, side="right")) - 1
        lo, hi = int(windows[w]), int(windows[w + 1])
        q = lo + index_shuffle(p - lo, max_index=hi - lo - 1,
                               seed=_stable_hash(f"{self.seed}/{epoch}/{w}") % 2**32, rounds=4)
        slot = int(np.searchsorted(starts, q, side="right")) - 1
        return self.source[int(self.group_start[perm[slot]] + q - starts[slot])]


def shuffled(source: _Source, seed: int, repeat: bool = True):
    """The train order of one source: a grain MapDataset over its documents, a
    permutation of the whole source per epoch drawn from `seed`, repeated
    forever unless repeat=False. Parquet sources keep read locality
    (RowGroupOrder); others get grain's global shuffle, reseeded each epoch."""
    import grain
    if isinstance(getattr(source, "source", source), ParquetSource):
        epochs = sys.maxsize // len(source) if repeat else 1  # grain takes index % len: epochs inside
        return grain.MapDataset.source(RowGroupOrder(source, seed, epochs))
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    return ds.repeat() if repeat else ds


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
    """'kind:arg=weight,...' -> [(kind, arg, weight)]; validated."""
    items = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        body, eq, w = item.rpartition("=")
        if not eq:
            raise ValueError(f"config.data.mixture: item {item!r} needs '=weight'")
        kind, _, arg = body.partition(":")
        if kind not in SOURCES[:-1]:
            raise ValueError(f"config.data.mixture: item {item!r}: kind {kind!r} is not one of {SOURCES[:-1]}")
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
