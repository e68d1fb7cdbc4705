"""Prepared data: token chunks written once by `t5lab prepare`, read by training.

A prepared directory (local or a URL such as gs://bucket/corpus) holds

    manifest.json                     what was read, with which tokenizer, counts
    tokenizer.model                   the SentencePiece model that made the ids
    train-00000-of-00016.arecord ...  ArrayRecord shards, one record per chunk
    eval-00000-of-00016.arecord  ...  the held-out documents, split by hash

A chunk holds about `chunk_tokens` consecutive tokens of the source's documents
in their source order, with the document boundaries: a short document lies
inside one chunk, a long one is cut across several. The unit of the global
shuffle is the chunk (a permutation of all chunks per epoch), so a record is
small and random reads are cheap, whatever the document lengths, and an index
holds one entry per chunk, not per document.

Record layout: uint32 [n, len_1 .. len_n] (the pieces of documents it holds),
then the pieces' token ids, concatenated, in the manifest's dtype.

`t5lab prepare` of a mixture writes one such directory per item
(DIR/item-0-text, DIR/item-1-jsonl, ...) and DIR/mixture.json, which holds the
override that trains on them (data.source=mixture, data.mixture of
`prepared:DIR/item-N-KIND=weight` items); DIR itself is not a prepared
directory, and reading it as one says so.

Start-up reads manifest.json only. ArrayRecord reads local files, so a shard of
a remote directory is copied to a local cache (T5LAB_DATA_CACHE, default
~/.cache/t5lab/prepared) the first time a process reads from it, and read
there from then on.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from t5lab import storage

FORMAT = "t5lab-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
MIXTURE = "mixture.json"  # a prepared mixture's directory: its items and the override
MIXTURE_FORMAT = "t5lab-prepared-mixture"
SPLITS = ("train", "eval")
# Random access: no read-ahead, no thread pool per reader.
_READ_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
# Token ids are stored in 2 bytes when the vocabulary fits.
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class Chunk(tuple):
    """The token arrays of one prepared record: pieces of consecutive documents."""

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self)


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_chunk(pieces: list[np.ndarray], dtype: str) -> bytes:
    header = np.array([len(pieces)] + [len(p) for p in pieces], np.uint32)
    body = np.concatenate(pieces).astype(_DTYPES[dtype]) if pieces else np.zeros(0, _DTYPES[dtype])
    return header.tobytes() + body.tobytes()


def decode_chunk(raw: bytes, dtype: str) -> Chunk:
    n = int(np.frombuffer(raw, np.uint32, 1)[0])
    lengths = np.frombuffer(raw, np.uint32, n, offset=4).astype(np.int64)
    tokens = np.frombuffer(raw, _DTYPES[dtype], int(lengths.sum()), offset=4 * (n + 1)).astype(np.int32)
    if n == 0:
        return Chunk((tokens,))  # what np.split gives: one empty piece
    # Slices at plain-int bounds: np.split's views, without its per-piece overhead.
    ends = np.cumsum(lengths).tolist()
    return Chunk(tokens[a:b] for a, b in zip([0] + ends[:-1], ends))


def shard_name(split: str, k: int, n: int) -> str:
    return f"{split}-{k:05d}-of-{n:05d}.arecord"


def read_manifest(path: str) -> dict:
    """The manifest of the prepared directory `path`; errors name the file."""
    mpath = storage.join(path, MANIFEST)
    if not storage.exists(mpath):
        hint = ""
        names = storage.listdir(path) if storage.exists(path) and storage.isdir(path) else []
        if MIXTURE in names:
            raise FileNotFoundError(f"config.data.paths: {path} is a prepared mixture, not one prepared "
                                    f"directory (no {MANIFEST}): train on it with {_mixture_override(path)}")
        if any(n.endswith(".done.json") for n in names):
            hint = " (preparation unfinished: rerun `t5lab prepare`, or `--merge` after every --shard)"
        raise FileNotFoundError(f"config.data.paths: {mpath} does not exist{hint}")
    try:
        manifest = json.loads(storage.read_text(mpath))
    except ValueError as e:
        raise ValueError(f"config.data.paths: {mpath} is not JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"config.data.paths: {mpath} is not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def _mixture_override(path: str) -> str:
    """The override a prepared mixture's mixture.json gives, naming the file."""
    mix = storage.join(path, MIXTURE)
    try:
        override = json.loads(storage.read_text(mix))["override"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"the data.source=mixture override in {mix} (unreadable)"
    return f"{override} (from {mix})".replace("\n", " ")


def manifest_digest(path: str) -> str:
    return hashlib.sha256(storage.read_text(storage.join(path, MANIFEST)).encode()).hexdigest()


def tokenizer_of(config) -> str | None:
    """A local path of the tokenizer the config's (first) prepared source was
    made with, or None when it reads no prepared data."""
    from t5lab.data import sources
    d = config.data
    items = sources.parse_mixture(d.mixture) if d.source == "mixture" else [(d.source, d.paths, 1.0)]
    for kind, arg, _ in items:
        if kind == "prepared":
            url = storage.join(storage.absolute(arg.strip()), TOKENIZER)
            if not storage.is_remote(url):
                if not os.path.isfile(url):
                    read_manifest(storage.absolute(arg.strip()))  # names what is wrong
                    raise FileNotFoundError(f"config.data.paths: {url} does not exist")
                return url
            return local_copy(url, None)
    return None


def cache_dir() -> str:
    return os.environ.get("T5LAB_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "t5lab", "prepared")


def local_copy(url: str, size: int | None) -> str:
    """A local copy of a remote file, downloaded once (atomically) and checked
    against the manifest's size (size None: always fetched anew)."""
    key = hashlib.blake2b(os.path.dirname(url).encode(), digest_size=12).hexdigest()
    local = os.path.join(cache_dir(), key, os.path.basename(url))
    if size is not None and os.path.isfile(local) and os.path.getsize(local) == size:
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.{os.getpid()}.tmp"
    storage.download(url, tmp)
    got = os.path.getsize(tmp)
    if size is not None and got != size:
        os.unlink(tmp)
        raise OSError(f"{url}: {got} bytes, the manifest says {size}")
    os.replace(tmp, local)
    return local


class PreparedSource:
    """The chunks of one split of a prepared directory, as a random-access
    sequence of Chunk (the documents a lane reads)."""

    def __init__(self, path: str, split: str):
        self.path, self.split = storage.absolute(path.strip()), split
        self.name = f"prepared {self.path}"
        self.manifest = read_manifest(self.path)
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = self.manifest["dtype"]
        self.offsets = np.cumsum([0] + [s["records"] for s in self.shards])
        if self.offsets[-1] == 0:
            raise ValueError(f"config.data.paths: {self.path} has no {split} chunks "
                             f"(manifest: {self.manifest['splits'][split]['documents']} documents)")
        self._readers = {}

    def __getstate__(self):  # workers open their own readers
        return {k: v for k, v in self.__dict__.items() if k != "_readers"} | {"_readers": {}}

    def __len__(self):
        return int(self.offsets[-1])

    def _reader(self, k: int):
        r = self._readers.get(k)
        if r is None:
            from array_record.python import array_record_module
            shard = self.shards[k]
            path = storage.join(self.path, shard["file"])
            if storage.is_remote(path):
                path = local_copy(path, shard["bytes"])
            r = self._readers[k] = array_record_module.ArrayRecordReader(path, _READ_OPTIONS)
        return r

    def __getitem__(self, i) -> Chunk:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = int(i - self.offsets[k])
        raw = self._reader(k).read(j, j + 1)[0]  # a range read: cheaper than read([j]) per call
        return decode_chunk(raw, self.dtype)
