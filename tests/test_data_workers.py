"""Worker processes (config.data.num_workers > 0) and counted skips of bad input."""
import logging
import re

import numpy as np

from t5lab.data import sources
from test_data_pipeline import _config, _ds, corpus  # noqa: F401  (module fixture)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_workers_give_the_same_batches_and_resume_exactly(corpus):
    # Short rows: blocks of a few rows, so 12 batches need several blocks per lane
    # from both workers.
    c = _config(corpus, inputs_length=16, targets_length=8)
    c.train.batch_size = 8
    serial = iter(_ds(c, corpus))
    expected = [next(serial) for _ in range(12)]
    c.data.num_workers = 2
    it = iter(_ds(c, corpus))
    try:
        got = [next(it) for _ in range(5)]
        state = it.get_state()
        got += [next(it) for _ in range(7)]
    finally:
        it.close() if hasattr(it, "close") else None
    for n, (a, b) in enumerate(zip(expected, got)):
        assert _equal(a, b), f"batch {n} differs with 2 workers"
    resumed = iter(_ds(c, corpus))
    try:
        resumed.set_state(state)
        for n in range(5, 12):
            assert _equal(expected[n], next(resumed)), f"batch {n} differs after resuming with 2 workers"
    finally:
        resumed.close() if hasattr(resumed, "close") else None


def test_undecodable_and_blank_lines_are_counted_and_reported(corpus, tmp_path, caplog, monkeypatch):
    good = (corpus[0] / "part0.txt").read_bytes().splitlines()[:60]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\n".join(good[:30] + [b"\xff\xfe not utf-8", b"", b"   ", b"\xc3("] + good[30:]) + b"\n")
    c = _config(corpus, paths=str(bad), eval_fraction=0.0, objective="span_corruption")
    monkeypatch.setattr(sources, "SKIPS", sources.SkipCounter())  # this test's counts only
    with caplog.at_level(logging.WARNING, logger="t5lab.data"):
        it = iter(_ds(c, corpus))
        batches = [next(it) for _ in range(40)]  # passes over 61 documents with 3 bad ones: no hang
        it.close()
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    counts = dict(sources.SKIPS.counts)  # read after the messages: a prefetch thread may still add
    assert all(b["encoder_input_tokens"].any() for b in batches)
    # Per pass: two undecodable lines and one blank line (the empty line is no document).
    assert counts["unreadable documents"] >= 2 and counts["empty documents"] >= 1, counts
    assert set(counts) <= {"unreadable documents", "empty documents", "pieces too short for the objective"}
    unreadable = [m for m in msgs if "unreadable documents" in m]
    assert unreadable[0].startswith("skipped 1 unreadable documents"), msgs
    assert str(bad) in unreadable[0] and "not UTF-8 at byte 0" in unreadable[0], msgs
    assert any(re.match(r"skipped \d+ empty documents .*lane \d+ document \d+", m) for m in msgs), msgs
    # Reported once per reason, naming the metric that counts the rest.
    assert len(unreadable) == 1 and "skipped_unreadable" in unreadable[0], (msgs, counts)
    assert counts["unreadable documents"] > 2  # several passes: the later skips were not shown
    assert len([m for m in msgs if "empty documents" in m]) == 1, msgs
