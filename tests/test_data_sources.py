"""Line sources index their files in a streamed pass, cached and memory-mapped."""
import os

import numpy as np

from t5lab.config import schema
from t5lab.data import sources


def test_streamed_index_finds_every_line_across_chunk_edges(tmp_path, monkeypatch):
    monkeypatch.setenv("T5LAB_INDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "INDEX_CHUNK", 7)  # lines and newlines straddle chunks
    lines = ["short", "", "a much longer line of text here", "", "", "x", "ünïcödé line", "last, no newline"]
    path = tmp_path / "a.txt"
    path.write_text("\n".join(lines))
    src, _ = sources.open_source("text", str(path), schema().data, "train")
    assert [src[i] for i in range(len(src))] == [l for l in lines if l]


def test_index_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("T5LAB_INDEX_CACHE", str(cache))
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n")
    first = sources.line_index(str(path))
    assert isinstance(first, np.memmap) and len(os.listdir(cache)) == 1
    reads = []
    real_open = open

    def spy(p, *a, **kw):
        reads.append(str(p))
        return real_open(p, *a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    again = sources.line_index(str(path))
    assert str(path) not in reads  # the cached index, not the corpus
    np.testing.assert_array_equal(again, first)
    monkeypatch.setattr("builtins.open", real_open)
    path.write_text("one\ntwo\nthree and more\n")
    assert sources.line_index(str(path)).shape == (2, 3) and len(os.listdir(cache)) == 2


def test_hash_split_is_computed_in_chunks_cached_and_mapped(tmp_path, monkeypatch):
    """The split's indices equal one unchunked pass over every key; the second
    start maps them from the cache; a worker's copy carries the path, not them."""
    import pickle
    cache = tmp_path / "cache"
    monkeypatch.setenv("T5LAB_INDEX_CACHE", str(cache))
    monkeypatch.setattr(sources, "SPLIT_CHUNK", 64)  # several chunks, and worth a cache file
    for f in range(3):
        (tmp_path / f"part{f}.txt").write_text("".join(f"doc {f} {i}\n" for i in range(150 + 40 * f)))
    src, _ = sources.open_source("text", str(tmp_path / "part*.txt"), schema().data, "train")
    held_out = sources.is_eval(src.keys(), 0.1)  # all keys at once: the reference
    train, evals = (sources.split_source(src, False, s, 0.1) for s in ("train", "eval"))
    # Documents are read without mapping the cached line index or split files:
    # a process's memory does not grow with the documents it has read.
    docs = [train[i] for i in range(len(train))]
    assert str(cache) not in open("/proc/self/maps").read()
    assert docs == [src[int(i)] for i in np.flatnonzero(~held_out)]
    np.testing.assert_array_equal(train.indices, np.flatnonzero(~held_out))
    np.testing.assert_array_equal(evals.indices, np.flatnonzero(held_out))
    assert 0 < len(evals) < len(train) and len(train) + len(evals) == len(src)
    assert len([p for p in os.listdir(cache) if p.startswith("split-")]) == 2

    again = sources.split_source(src, False, "train", 0.1)
    assert isinstance(again.indices, np.memmap)
    np.testing.assert_array_equal(again.indices, train.indices)
    blob = pickle.dumps(again)
    assert len(blob) < again.indices.nbytes  # the path travels, not the indices
    np.testing.assert_array_equal(pickle.loads(blob).indices, train.indices)
    assert [pickle.loads(blob)[i] for i in (0, 5)] == [src[int(train.indices[i])] for i in (0, 5)]

    # Another eval fraction is another split, not the cached one.
    other = sources.split_source(src, False, "train", 0.3)
    np.testing.assert_array_equal(other.indices, np.flatnonzero(~sources.is_eval(src.keys(), 0.3)))
