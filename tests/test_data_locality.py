"""The Parquet train order: a permutation per epoch, random access by position,
that reads each row group about once per epoch (sources.RowGroupOrder)."""
import collections
import pickle

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t5lab.config import schema
from t5lab.data import pipeline, sources

GROUPS, ROWS = 40, 100  # row groups of 100 rows in two files


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WINDOW_ROWS", 4 * ROWS)  # windows of 4 row groups
    for f in range(2):
        docs = [f"g{g} r{r}" for g in range(f * GROUPS // 2, (f + 1) * GROUPS // 2) for r in range(ROWS)]
        pq.write_table(pa.table({"text": docs}), tmp_path / f"part{f}.parquet", row_group_size=ROWS)
    return str(tmp_path / "*.parquet")


def _train(paths, eval_fraction=0.0):
    d = schema().data
    d.source, d.paths, d.eval_fraction = "parquet", paths, eval_fraction
    src, has_split = sources.open_source("parquet", paths, d, "train")
    return src, sources.split_source(src, has_split, "train", eval_fraction)


def _group(doc):
    return int(doc.split()[0][1:])


def test_each_train_document_appears_once_per_epoch(corpus):
    _, train = _train(corpus, eval_fraction=0.1)
    want = [train[i] for i in range(len(train))]
    assert 0 < len(want) < GROUPS * ROWS
    one = sources.shuffled(train, seed=3, repeat=False)
    assert len(one) == len(want)
    assert collections.Counter(one[i] for i in range(len(one))) == collections.Counter(want)
    forever = sources.shuffled(train, seed=3, repeat=True)
    n = len(want)
    epochs = [[forever[e * n + i] for i in range(n)] for e in range(3)]
    for docs in epochs:
        assert collections.Counter(docs) == collections.Counter(want)
    assert epochs[0] == [one[i] for i in range(n)]
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


def test_order_is_a_pure_function_of_seed_and_position(corpus):
    _, a = _train(corpus)
    _, b = _train(corpus)  # another instance, as after a restart
    da, db = sources.shuffled(a, seed=11), sources.shuffled(b, seed=11)
    copy = pickle.loads(pickle.dumps(da))  # as a spawned worker gets it
    positions = np.random.default_rng(0).integers(0, 50 * GROUPS * ROWS, 300)
    want = [da[int(i)] for i in positions]
    assert [db[int(i)] for i in positions[::-1]][::-1] == want  # read in another order: no state
    assert [copy[int(i)] for i in positions] == want
    other = sources.shuffled(a, seed=12)
    assert [da[i] for i in range(500)] != [other[i] for i in range(500)]


def test_windows_draw_from_few_row_groups_and_are_shuffled_inside(corpus):
    _, train = _train(corpus)
    ds = sources.shuffled(train, seed=5, repeat=False)
    docs = [ds[i] for i in range(len(ds))]
    window = 4 * ROWS
    for w in range(GROUPS // 4):
        groups = [_group(d) for d in docs[w * window:(w + 1) * window]]
        assert len(set(groups)) == 4  # one window: its 4 row groups, all of their rows
        changes = sum(a != b for a, b in zip(groups, groups[1:]))
        assert changes > window // 2  # rows of the window interleave, not one group after another
    firsts = [_group(docs[w * window]) for w in range(GROUPS // 4)]
    assert firsts != sorted(firsts)  # the row groups themselves are permuted


def test_an_epoch_reads_each_row_group_about_once(corpus):
    src, train = _train(corpus)
    ds = sources.shuffled(train, seed=1, repeat=True)
    n = len(train)
    src.group_reads = 0
    for i in range(n):
        ds[i]
    assert src.group_reads <= 2 * GROUPS
    # The plain global shuffle over the same source needs about a read per document.
    src2, train2 = _train(corpus)
    plain = grain.MapDataset.source(train2).shuffle(seed=1)
    src2.group_reads = 0
    for i in range(n):
        plain[i]
    assert src2.group_reads > n // 2


def test_pipeline_train_documents_of_parquet_are_one_permutation_per_epoch(corpus):
    c = schema()
    c.data.source, c.data.paths, c.data.eval_fraction = "parquet", corpus, 0.0
    docs = pipeline.documents(c, "train", repeat=False)
    got = [docs[i] for i in range(len(docs))]
    assert sorted(got) == sorted(f"g{g} r{r}" for g in range(GROUPS) for r in range(ROWS))
    assert got != sorted(got, key=lambda d: (_group(d), int(d.split()[1][1:])))
