"""data.source=hf reads Hugging Face datasets on disk with pyarrow alone:
save_to_disk directories (Dataset and DatasetDict) and globs of .arrow files."""
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pytest

from t5lab.config import schema
from t5lab.data import pipeline, sources

TEXTS = [f"document {i} " + "word " * (i % 5) for i in range(40)] + [None, "", "the end"]


def _data(paths, **over):
    d = schema().data
    d.source, d.paths = "hf", paths
    for k, v in over.items():
        setattr(d, k, v)
    return d


def _all(src):
    return [src[i] for i in range(len(src))]


def _expected(texts):
    return ["" if t is None else t for t in texts]


def test_saved_dataset_gives_a_document_per_row_and_a_hash_split(tmp_path):
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    src, has_split = sources.open_source("hf", str(tmp_path / "ds"), _data(str(tmp_path / "ds")), "train")
    assert not has_split and len(src.files) == 3
    assert _all(src) == _expected(TEXTS)
    train = sources.split_source(src, has_split, "train", 0.25)
    held = sources.split_source(src, has_split, "eval", 0.25)
    assert 0 < len(held) < len(train)
    assert sorted(_all(train) + _all(held)) == sorted(_expected(TEXTS))
    assert _all(pickle.loads(pickle.dumps(src))) == _expected(TEXTS)  # workers reopen the files
    # The same Arrow files named by a glob: the same documents.
    globbed, has_split = sources.open_source("hf", str(tmp_path / "ds" / "*.arrow"),
                                             _data(str(tmp_path / "ds" / "*.arrow")), "train")
    assert not has_split and _all(globbed) == _expected(TEXTS)


def test_dataset_dict_splits_are_its_subdirectories(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:30]}),
                               "test": datasets.Dataset.from_dict({"text": TEXTS[30:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    d = _data(str(tmp_path / "dd"), eval_split="test")
    train, has_split = sources.open_source("hf", d.paths, d, d.train_split)
    assert has_split and _all(train) == _expected(TEXTS[:30])
    held, has_split = sources.open_source("hf", d.paths, d, d.eval_split)
    assert has_split and _all(held) == _expected(TEXTS[30:])
    d.eval_split = "validation"
    with pytest.raises(FileNotFoundError, match=r"no split 'validation' \(splits: \['train', 'test'\]\)"):
        sources.open_source("hf", d.paths, d, d.eval_split)


def test_pipeline_reads_a_dataset_dict_through_a_mixture_item(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:30]}),
                               "validation": datasets.Dataset.from_dict({"text": TEXTS[30:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    c = schema()
    c.data.source, c.data.mixture = "mixture", f"hf:{tmp_path}/dd=1"
    assert sources.parse_mixture(c.data.mixture) == [("hf", f"{tmp_path}/dd", 1.0)]
    docs = pipeline.documents(c, "train", repeat=False)
    assert sorted(docs[i] for i in range(len(docs))) == sorted(_expected(TEXTS[:30]))
    docs = pipeline.documents(c, "eval", repeat=False)
    assert [docs[i] for i in range(len(docs))] == _expected(TEXTS[30:])


def test_missing_column_and_non_string_values_are_named(tmp_path):
    datasets.Dataset.from_dict({"body": ["a", "b"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    d = _data(str(tmp_path / "ds"))
    with pytest.raises(KeyError, match=r"config\.data\.text_field: .* no column 'text' "
                                       r"\(columns: \['body', 'n'\]\)"):
        sources.open_source("hf", d.paths, d, "train")
    d.text_field = "n"
    src, _ = sources.open_source("hf", d.paths, d, "train")
    before = sources.SKIPS.counts[sources.UNREADABLE]
    assert _all(src) == [None, None]
    assert sources.SKIPS.counts[sources.UNREADABLE] == before + 2
    assert "column 'n' is int, not a string" in sources.SKIPS.latest


def test_a_directory_that_is_no_saved_dataset_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    d = _data(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError,
                       match=r"config\.data\.paths: .* not a datasets\.save_to_disk directory"):
        sources.open_source("hf", d.paths, d, "train")


def test_arrow_ipc_file_format_is_read_too(tmp_path):
    table = pa.table({"text": ["x", None, "zz"]})
    with pa.ipc.new_file(str(tmp_path / "t.arrow"), table.schema) as w:
        w.write_table(table)
    src, _ = sources.open_source("hf", str(tmp_path / "*.arrow"), _data(str(tmp_path / "*.arrow")), "train")
    assert _all(src) == ["x", "", "zz"]


def test_arrow_files_are_memory_mapped_not_copied(tmp_path):
    big = ["y" * 4000 + str(i) for i in range(8000)]  # ~32 MB of text
    datasets.Dataset.from_dict({"text": big}).save_to_disk(str(tmp_path / "big"))
    before = pa.total_allocated_bytes()
    src, _ = sources.open_source("hf", str(tmp_path / "big"), _data(str(tmp_path / "big")), "train")
    assert src[7999] == big[7999] and src[0] == big[0]
    # Zero copy: the table's buffers are the file's pages, not pyarrow allocations.
    assert pa.total_allocated_bytes() - before < 1 << 20
    assert len(src) == len(big) and np.diff(src.offsets).tolist() == [len(big)]
