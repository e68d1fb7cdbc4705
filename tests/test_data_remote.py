"""Raw sources read fsspec URLs (here fsspec's in-process memory:// filesystem)
exactly as they read local files."""
import json
import os
import pickle

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t5lab.config import schema
from t5lab.data import sources

LINES = ["first line", "", "second, ünïcödé", "third", "", "last without newline"]
ROWS = [{"text": f"row {i} " + "x" * (i % 7), "id": i} for i in range(50)] + [{"text": None, "id": 50}]


@pytest.fixture
def memfs(tmp_path, monkeypatch):
    """A fresh memory:// folder (the memory filesystem is global to the process)."""
    monkeypatch.setenv("T5LAB_INDEX_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/t5lab-test-{tmp_path.name}"
    yield fs, root
    fs.rm(root, recursive=True)
    sources._REMOTE_INFO.clear()


def _all(src):
    return [src[i] for i in range(len(src))]


def _data(kind, paths, **over):
    d = schema().data
    d.source, d.paths = kind, paths
    for k, v in over.items():
        setattr(d, k, v)
    return d


def _write_both(fs, root, tmp_path, name, data: bytes):
    (tmp_path / name).write_bytes(data)
    fs.pipe(f"{root}/{name}", data)


def test_text_lines_and_files_from_a_url_equal_the_local_copy(memfs, tmp_path):
    fs, root = memfs
    _write_both(fs, root, tmp_path, "a.txt", "\n".join(LINES).encode())
    _write_both(fs, root, tmp_path, "b.txt", b"b one\nb two\n")
    for doc_per, want in [("line", [l for l in LINES if l] + ["b one", "b two"]),
                          ("file", ["\n".join(LINES), "b one\nb two\n"])]:
        url = f"memory://{root}/*.txt"
        remote, _ = sources.open_source("text", url, _data("text", url, doc_per=doc_per), "train")
        local, _ = sources.open_source("text", str(tmp_path / "*.txt"),
                                       _data("text", str(tmp_path / "*.txt"), doc_per=doc_per), "train")
        assert _all(remote) == _all(local) == want
        assert all(f.startswith("memory://") for f in remote.files)
        # Workers get the source pickled; the copy reads the same documents.
        assert _all(pickle.loads(pickle.dumps(remote))) == want


def test_jsonl_from_a_url_equals_the_local_copy_and_keeps_the_split(memfs, tmp_path):
    fs, root = memfs
    _write_both(fs, root, tmp_path, "rows.jsonl", "\n".join(json.dumps(r) for r in ROWS).encode())
    url, local_path = f"memory://{root}/rows.jsonl", str(tmp_path / "rows.jsonl")
    remote, _ = sources.open_source("jsonl", url, _data("jsonl", url), "train")
    local, _ = sources.open_source("jsonl", local_path, _data("jsonl", local_path), "train")
    assert _all(remote) == _all(local) == [r["text"] or "" for r in ROWS]
    # Hash-split keys use the file's basename: the same documents are held out.
    assert (sources.is_eval(remote.keys(), 0.2) == sources.is_eval(local.keys(), 0.2)).all()


def test_parquet_from_a_url_equals_the_local_copy(memfs, tmp_path):
    fs, root = memfs
    table = pa.table({"text": [r["text"] for r in ROWS], "id": [r["id"] for r in ROWS]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=8)
    fs.pipe(f"{root}/pq/rows.parquet", (tmp_path / "rows.parquet").read_bytes())
    url = f"memory://{root}/pq/*.parquet"
    remote, _ = sources.open_source("parquet", url, _data("parquet", url), "train")
    local_path = str(tmp_path / "rows.parquet")
    local, _ = sources.open_source("parquet", local_path, _data("parquet", local_path), "train")
    assert _all(remote) == _all(local) == [r["text"] or "" for r in ROWS]
    assert remote.group_reads == 7  # 51 rows in groups of 8, each read once in order
    assert _all(pickle.loads(pickle.dumps(remote))) == _all(local)


def test_remote_line_index_is_built_once_cached_by_url_size_and_version(memfs, tmp_path):
    fs, root = memfs
    fs.pipe(f"{root}/c.txt", b"one\ntwo\n")
    url = f"memory://{root}/c.txt"
    cache = tmp_path / "cache"
    assert _all(sources.open_source("text", url, _data("text", url), "train")[0]) == ["one", "two"]
    assert len(os.listdir(cache)) == 1
    sources.open_source("text", url, _data("text", url), "train")
    assert len(os.listdir(cache)) == 1  # the cached index, not a second one
    fs.pipe(f"{root}/c.txt", b"one\ntwo\nthree\n")  # a new version: a new index
    assert _all(sources.open_source("text", url, _data("text", url), "train")[0]) == ["one", "two", "three"]
    assert len(os.listdir(cache)) == 2


def test_file_identity_names_size_and_version(memfs, tmp_path):
    fs, root = memfs
    local = tmp_path / "f.txt"
    local.write_bytes(b"12345")
    st = os.stat(local)
    assert sources.file_identity(str(local)) == f"5 bytes, modified {st.st_mtime_ns}"
    fs.pipe(f"{root}/f.txt", b"1234567")
    url = f"memory://{root}/f.txt"
    listed = sources.file_identity(sources.expand_globs(url)[0])  # from the glob's listing
    sources._REMOTE_INFO.clear()
    asked = sources.file_identity(url)  # from info()
    assert listed == asked and asked.startswith("7 bytes, modified created ")
    fs.rm(f"{root}/f.txt")
    fs.pipe(f"{root}/f.txt", b"7654321")  # same size, another version
    assert sources.file_identity(url) != asked


def test_url_that_matches_nothing_names_the_config_key(memfs):
    fs, root = memfs
    fs.pipe(f"{root}/only.txt", b"x\n")
    url = f"memory://{root}/*.jsonl"
    with pytest.raises(FileNotFoundError, match=r"config\.data\.paths: .*\*\.jsonl.* matches no file"):
        sources.open_source("jsonl", url, _data("jsonl", url), "train")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.mixture: "):
        sources.open_source("jsonl", url, _data("mixture", ""), "train")
    assert sources.parse_mixture(f"text:memory://{root}/*.txt=2") == [("text", f"memory://{root}/*.txt", 2.0)]
