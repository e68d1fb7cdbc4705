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
