"""`t5lab prepare` and the prepared source: tokens equal the raw documents',
resumable and splittable work, global shuffle, exact resume, buckets."""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from t5lab import cli
from t5lab import config as config_lib
from t5lab.config import schema
from t5lab.data import pipeline, prepare, prepared, sources, tokenizer

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    for f in range(3):
        rows = [json.dumps({"text": f"doc{f}_{i} " + " ".join(rng.choice(WORDS, rng.integers(3, 60)))})
                for i in range(150)]
        rows[7] = json.dumps({"text": " ".join(rng.choice(WORDS, 900))})  # longer than a chunk
        if f == 1:
            rows[3], rows[5] = json.dumps({"text": ""}), "{not json"
        (d / f"part{f}.jsonl").write_text("\n".join(rows) + "\n")
    model = tokenizer.train([(d / f"part{f}.jsonl").read_text() for f in range(3)], str(d / "tok.model"), 512)
    return d, model


def _config(corpus, **data):
    d, model = corpus
    c = schema()
    c.model.vocab_size = 512
    c.data.source, c.data.paths, c.data.tokenizer = "jsonl", str(d / "part*.jsonl"), model
    c.data.inputs_length, c.data.targets_length = 64, 32
    c.data.eval_fraction = 0.1
    c.train.batch_size = 4
    for k, v in data.items():
        c.data[k] = v
    return c


def _prepare(corpus, out, **kw):
    kw.setdefault("shards", 3)
    kw.setdefault("chunk_tokens", 64)
    return prepare.prepare(_config(corpus), str(out), tok_path=corpus[1], **kw)


@pytest.fixture(scope="module")
def prepared_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "p"
    _prepare(corpus, out)
    return out


def _all_tokens(src) -> np.ndarray:
    return np.concatenate([p for i in range(len(src)) for p in src[i]])


@pytest.mark.parametrize("split", ["train", "eval"])
def test_prepared_tokens_are_the_raw_split_tokenized(corpus, prepared_dir, split):
    c = _config(corpus)
    raw = pipeline.documents(c, split, repeat=False)  # the raw source's split, unshuffled order below
    subset = pipeline._open(c, split)[0][3]
    tok = tokenizer.Tokenizer(corpus[1])
    texts = [subset[i] for i in range(len(subset))]
    texts = [t for t in texts if t]  # the bad JSON line is None, the empty document ""
    want = np.concatenate([tok.encode(t) for t in texts])
    src = prepared.PreparedSource(str(prepared_dir), split)
    np.testing.assert_array_equal(_all_tokens(src), want)
    assert max(src[i].num_tokens for i in range(len(src))) == 64
    m = json.loads((prepared_dir / "manifest.json").read_text())
    assert m["splits"][split]["documents"] == len(texts) and m["splits"][split]["tokens"] == len(want)
    assert m["skipped"] == {sources.EMPTY: 1, sources.UNREADABLE: 1}
    assert m["tokenizer sha256"] == pipeline.file_digest(corpus[1])
    assert len(raw) == len(subset)


def test_a_killed_preparation_redoes_only_unfinished_shards(corpus, prepared_dir, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(prepared_dir, out)
    os.unlink(out / "manifest.json")
    os.unlink(out / "all-00001-of-00003.done.json")  # killed while writing shard 1
    (out / "train-00001-of-00003.arecord").write_bytes(b"half a shard")
    before = {n: os.stat(out / n).st_mtime_ns for n in ("train-00000-of-00003.arecord",
                                                          "train-00002-of-00003.arecord")}
    _prepare(corpus, out)
    assert {n: os.stat(out / n).st_mtime_ns for n in before} == before
    assert (out / "manifest.json").read_text() == (prepared_dir / "manifest.json").read_text()
    assert (out / "train-00001-of-00003.arecord").read_bytes() == \
        (prepared_dir / "train-00001-of-00003.arecord").read_bytes()


def test_work_split_over_machines_and_merged_equals_one_machine(corpus, prepared_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _prepare(corpus, a, shard=0, num_shards=2, workers=2) is None  # machine 0: tasks 0, 2
    assert not (a / "manifest.json").exists()
    _prepare(corpus, b, shard=1, num_shards=2)
    with pytest.raises(prepare.PrepareError, match="1 of 3 tasks are not done"):
        prepare.merge(str(a))
    for f in b.iterdir():
        if f.name.startswith(("train-00001", "eval-00001", "all-00001")):
            shutil.copy(f, a / f.name)
    prepare.merge(str(a))
    assert (a / "manifest.json").read_text() == (prepared_dir / "manifest.json").read_text()


def test_another_preparation_into_the_same_directory_is_refused(corpus, prepared_dir, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(prepared_dir, out)
    with pytest.raises(prepare.PrepareError, match="chunk_tokens: 64 -> 128"):
        _prepare(corpus, out, chunk_tokens=128)  # finished
    os.unlink(out / "manifest.json")
    with pytest.raises(prepare.PrepareError, match="chunk_tokens: 64 -> 128"):
        _prepare(corpus, out, chunk_tokens=128)  # unfinished


def _prepared_config(corpus, path, **data):
    c = _config(corpus, source="prepared", paths=str(path), **data)
    c.data.tokenizer = ""  # the prepared directory's own
    return c


def test_global_shuffle_is_a_permutation_of_all_chunks_per_epoch(corpus, prepared_dir):
    c = _prepared_config(corpus, prepared_dir)
    src = prepared.PreparedSource(str(prepared_dir), "train")
    key = {tuple(np.concatenate(src[i]).tolist()): i for i in range(len(src))}
    order = []
    for seed in (0, 1):
        c.data.seed = seed
        ds = pipeline.documents(c, "train")
        n = len(src)
        epochs = [[key[tuple(np.concatenate(ds[e * n + i]).tolist())] for i in range(n)] for e in range(2)]
        for e in epochs:
            assert sorted(e) == list(range(n))  # every chunk once per epoch
        assert epochs[0] != epochs[1]
        order.append(epochs[0])
        # The first batch's chunks come from all over the corpus, not one shard's run.
        first = np.array(epochs[0][:8])
        assert first.max() - first.min() > n // 2
    assert order[0] != order[1]


def test_training_reads_the_prepared_tokenizer_and_refuses_another(corpus, prepared_dir, tmp_path):
    c = _prepared_config(corpus, prepared_dir)
    path = tokenizer.resolve(c)
    assert path == str(prepared_dir / "tokenizer.model")
    other = tokenizer.train(["omega river stone " * 50, "alpha beta " * 80], str(tmp_path / "o.model"), 480)
    with pytest.raises(ValueError, match="config.data.tokenizer: .* is not the tokenizer"):
        pipeline.make_dataset(c, tokenizer_path=other, process_index=0, process_count=1)
    c.data.eval_fraction = 0.2
    with pytest.raises(ValueError, match="config.data.eval_fraction: 0.2 but .* prepared with 0.1"):
        pipeline.make_dataset(c, tokenizer_path=path, process_index=0, process_count=1)


def _batches(c, tok, n, state=None, pi=0, pc=1, workers=0):
    it = iter(pipeline.make_dataset(c, tokenizer_path=tok, process_index=pi, process_count=pc,
                                    num_workers=workers))
    if state:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    s = it.get_state()
    it.close()
    return out, s


def test_prepared_stream_resumes_exactly_on_other_process_and_worker_counts(corpus, prepared_dir):
    c = _prepared_config(corpus, prepared_dir)
    tok = tokenizer.resolve(c)
    full, _ = _batches(c, tok, 6)
    assert all(b["encoder_input_tokens"].shape == (4, 64) for b in full)
    head, state = _batches(c, tok, 3)
    halves = [_batches(c, tok, 3, state={"lanes": {k: v for k, v in state["lanes"].items()
                                                   if int(k) // 2 == p}}, pi=p, pc=2, workers=w)[0]
              for p, w in ((0, 0), (1, 2))]
    for i in range(3):
        for k, v in full[3 + i].items():
            np.testing.assert_array_equal(np.concatenate([halves[0][i][k], halves[1][i][k]]), v)


def test_remote_prepared_directory_reads_the_same(corpus, prepared_dir, tmp_path, monkeypatch):
    import fsspec
    monkeypatch.setenv("T5LAB_DATA_CACHE", str(tmp_path / "cache"))
    url = f"memory://t5lab-test-{os.getpid()}/p"
    _prepare(corpus, url)  # written locally, uploaded shard by shard
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(url.removeprefix("memory://") + "/manifest.json").decode() == \
        (prepared_dir / "manifest.json").read_text()
    remote, local = prepared.PreparedSource(url, "train"), prepared.PreparedSource(str(prepared_dir), "train")
    np.testing.assert_array_equal(_all_tokens(remote), _all_tokens(local))
    assert len(list((tmp_path / "cache").rglob("*.arecord"))) == 3  # each shard fetched once
    c = _prepared_config(corpus, url)
    tok = tokenizer.resolve(c)
    got, _ = _batches(c, tok, 2)
    want, _ = _batches(_prepared_config(corpus, prepared_dir), str(prepared_dir / "tokenizer.model"), 2)
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_cli_prepare_writes_a_manifest_and_refuses_bad_options(corpus, tmp_path, capsys):
    d, model = corpus
    base = ["prepare", "--config.data.source=jsonl", f"--config.data.paths={d}/part0.jsonl",
            f"--config.data.tokenizer={model}", "--config.model.vocab_size=512"]
    assert cli.main(base + ["--out", str(tmp_path / "p"), "--workers", "1", "--shards", "2"]) == 0
    out = capsys.readouterr()
    assert "train with --config.data.source=prepared" in out.out and "ETA" in out.err
    assert len(json.loads((tmp_path / "p" / "manifest.json").read_text())["splits"]["train"]["shards"]) == 2
    assert cli.main(base + ["--out", str(tmp_path / "q"), "--shards", "x"]) == 2
    assert "--shards: 'x' is not an integer" in capsys.readouterr().err
    # A prepared item is refused by name before a tokenizer is looked for (its manifest).
    assert cli.main(base[:1] + ["--config.data.source=mixture", "--config.data.mixture=embedded=1,prepared:/nowhere=1",
                                "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "item 1 'prepared:/nowhere' is prepared already" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    assert cli.main(["prepare", "--merge", "--out", str(tmp_path / "none")]) == 2
    assert "not a t5lab prepare output" in capsys.readouterr().err


# ------------------------------------------------------------------ a mixture
def _cli_args(corpus, *extra):
    return ["prepare", f"--config.data.tokenizer={corpus[1]}", "--config.model.vocab_size=512",
            "--config.data.eval_fraction=0.1", "--workers", "1", "--shards", "2", "--chunk_tokens", "64", *extra]


_TRAIN_ARGS = ["--config.model.vocab_size=512", "--config.data.eval_fraction=0.1",
               "--config.data.inputs_length=64", "--config.data.targets_length=32", "--config.train.batch_size=4"]


@pytest.fixture(scope="module")
def mixture(corpus, tmp_path_factory):
    """A 2-item mixture (text 0.9, jsonl 0.1) prepared by the CLI, and each
    item prepared alone: (out, the printed override, [alone dirs], items)."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(5)
    (root / "a").mkdir()
    for f in range(2):
        (root / "a" / f"t{f}.txt").write_text(
            "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 40))) for _ in range(60)) + "\n")
    items = [("text", str(root / "a" / "*.txt")), ("jsonl", str(corpus[0] / "part0.jsonl"))]
    out, stdout = root / "mix", io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(_cli_args(corpus, "--config.data.source=mixture", "--out", str(out),
                                  f"--config.data.mixture={items[0][0]}:{items[0][1]}=0.9,"
                                  f"{items[1][0]}:{items[1][1]}=0.1")) == 0
    last = stdout.getvalue().strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}/mixture.json; train with ")
    alone = [root / f"alone{n}" for n in range(2)]
    for (kind, paths), a in zip(items, alone):
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(_cli_args(corpus, f"--config.data.source={kind}", f"--config.data.paths={paths}",
                                      "--out", str(a))) == 0
    return out, last.split("train with ", 1)[1], alone, items


def test_a_mixture_is_prepared_item_by_item_and_its_override_trains(corpus, mixture):
    out, override, alone, _ = mixture
    want = (f"--config.data.source=mixture --config.data.mixture="
            f"'prepared:{out}/item-0-text=0.9,prepared:{out}/item-1-jsonl=0.1'")
    assert override == want
    assert json.loads((out / "mixture.json").read_text())["override"] == want
    for n, kind in enumerate(("text", "jsonl")):  # each item exactly as prepared alone
        assert (out / f"item-{n}-{kind}" / "manifest.json").read_text() == (alone[n] / "manifest.json").read_text()
    # Read back through data.source=mixture with the printed override, as `t5lab train` parses it.
    c, _ = config_lib.parse_args(shlex.split(override) + _TRAIN_ARGS)
    opened = pipeline._open(c, "train")
    assert [(kind, w) for kind, _, w, _ in opened] == [("prepared", 0.9), ("prepared", 0.1)]
    for (_, _, _, src), a in zip(opened, alone):
        np.testing.assert_array_equal(_all_tokens(src), _all_tokens(prepared.PreparedSource(str(a), "train")))
    # The mixed stream is the one of the items prepared alone, mixed by the same weights.
    c_alone, _ = config_lib.parse_args(["--config.data.source=mixture", "--config.data.mixture="
                                        f"prepared:{alone[0]}=0.9,prepared:{alone[1]}=0.1"] + _TRAIN_ARGS)
    got, ref = pipeline.documents(c, "train"), pipeline.documents(c_alone, "train")
    for i in range(40):
        np.testing.assert_array_equal(np.concatenate(got[i]), np.concatenate(ref[i]))
    tok = tokenizer.resolve(c)  # the items' own
    assert tok == str(out / "item-0-text" / "tokenizer.model")
    (batch,), _ = _batches(c, tok, 1)
    assert batch["encoder_input_tokens"].shape == (4, 64)


def test_a_killed_or_split_mixture_preparation_finishes_the_same(corpus, mixture, tmp_path, monkeypatch):
    out, override, _, items = mixture
    c = _config(corpus, source="mixture", mixture=f"text:{items[0][1]}=0.9,jsonl:{items[1][1]}=0.1")
    kw = {"tok_path": corpus[1], "shards": 2, "chunk_tokens": 64}
    # Killed in item 1: item 0 is not redone, item 1 only its unfinished task.
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    for name in ("item-1-jsonl/manifest.json", "item-1-jsonl/all-00001-of-00002.done.json", "mixture.json"):
        os.unlink(killed / name)
    before = {f: os.stat(f).st_mtime_ns for f in (killed / "item-0-text").iterdir()}
    before[killed / "item-1-jsonl" / "train-00000-of-00002.arecord"] = \
        os.stat(killed / "item-1-jsonl" / "train-00000-of-00002.arecord").st_mtime_ns
    m = prepare.prepare_mixture(c, str(killed), **kw)
    assert {f: os.stat(f).st_mtime_ns for f in before} == before
    assert m["override"] == override.replace(str(out), str(killed))
    # Two machines into one directory; machine 1 finishes item 0 while machine 0 is in item 1:
    # machine 0, finishing last, writes mixture.json.
    split = tmp_path / "split"
    (p0, item0, _), (p1, item1, _) = prepare.mixture_items(c, str(split))
    assert prepare.prepare(item1, p1, shard=1, num_shards=2, **kw) is None  # machine 1, item 1
    real = prepare.prepare

    def machine_0(item, path, **a):
        m = real(item, path, **a)
        if path == p0:
            assert m is None and not (split / "item-0-text" / "manifest.json").exists()
            real(item, path, **(a | {"shard": 1}))  # machine 1, item 0: writes its manifest
        return m
    monkeypatch.setattr(prepare, "prepare", machine_0)
    assert prepare.prepare_mixture(c, str(split), shard=0, num_shards=2, **kw)["override"] == \
        override.replace(str(out), str(split))
    for d in (killed, split):
        for item in ("item-0-text", "item-1-jsonl"):
            assert (d / item / "manifest.json").read_text() == (out / item / "manifest.json").read_text()
        assert json.loads((d / "mixture.json").read_text())["override"] == override.replace(str(out), str(d))
    with pytest.raises(prepare.PrepareError, match="a mixture's directory: merge with the same"):
        prepare.merge(str(split))
    assert prepare.merge_mixture(c, str(split))["override"] == override.replace(str(out), str(split))


def test_a_prepared_mixture_item_is_refused_naming_it(corpus, prepared_dir, tmp_path):
    c = _config(corpus, source="mixture", mixture=f"jsonl:{corpus[0]}/part0.jsonl=1,prepared:{prepared_dir}=2")
    with pytest.raises(prepare.PrepareError,
                       match=rf"^config.data.mixture: item 1 'prepared:{re.escape(str(prepared_dir))}' is prepared"):
        prepare.prepare_mixture(c, str(tmp_path / "m"), tok_path=corpus[1])
    assert not (tmp_path / "m").exists()


def test_the_mixture_directory_as_one_prepared_directory_names_the_override(corpus, mixture):
    out, override, _, _ = mixture
    c = _prepared_config(corpus, out)
    for read in (lambda: tokenizer.resolve(c), lambda: prepared.PreparedSource(str(out), "train")):
        with pytest.raises(FileNotFoundError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and f"train on it with {override} (from {out}/mixture.json)" in msg, msg


def test_a_50mb_document_is_prepared_in_bounded_memory(tmp_path, corpus):
    """One 50 MB line: encoded in parts, cut into chunks; the peak memory of
    the whole preparation stays far below the ~1.2 GB one encode call takes."""
    big = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    words = rng.choice(WORDS, 8_000_000)
    big.write_text(" ".join(words)[:50_000_000] + "\nsmall line one\n")
    script = f"""
import resource, sys
from t5lab.config import schema
from t5lab.data import prepare
c = schema(); c.model.vocab_size = 512
c.data.source, c.data.paths, c.data.tokenizer, c.data.eval_fraction = "text", {str(big)!r}, {corpus[1]!r}, 0.0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = prepare.prepare(c, {str(tmp_path / 'p')!r}, tok_path={corpus[1]!r}, shards=1)
print(m["splits"]["train"]["documents"], m["splits"]["train"]["tokens"],
      (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    docs, tokens, grown_mb = (int(x) for x in p.stdout.split())
    assert docs == 2 and tokens > 5_000_000
    assert grown_mb < 400, grown_mb


def test_long_documents_are_encoded_in_parts_with_the_ids_of_one_call(monkeypatch):
    c = schema()
    c.model.vocab_size = 2048
    tok = tokenizer.Tokenizer(tokenizer.resolve(c))
    emb = sources.embedded_documents()
    text = "".join(emb[i] for i in range(0, 200, 10))
    whole = np.asarray(tok._sp.encode(text))
    monkeypatch.setattr(tokenizer, "MAX_ENCODE_CHARS", 500)
    assert len(tokenizer.split_long(text, 500, True)) > 100
    parts = tok.encode(text)
    assert tok.decode(parts) == text and len(parts) == len(whole)
    # Only ties may differ: the same two pieces in the other order ("▁▁▁▁" "▁▁▁▁▁▁▁").
    diff = np.flatnonzero(parts != whole)
    assert len(diff) < len(whole) / 1000
    for i in diff:
        assert sorted(whole[i - 1:i + 2].tolist()) == sorted(parts[i - 1:i + 2].tolist())


def test_a_long_raw_document_is_read_in_parts_that_resume_exactly(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_PART_CHARS", 2000)
    rng = np.random.default_rng(3)
    long = " ".join(rng.choice(WORDS, 4000))
    lines = [" ".join(rng.choice(WORDS, 20)) for _ in range(5)] + [long]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    c = _config(corpus, source="text", paths=str(tmp_path / "t.txt"), eval_fraction=0.0)
    c.train.batch_size = 1
    stream = pipeline.make_dataset(c, tokenizer_path=corpus[1], process_index=0, process_count=1)
    order = [stream.blocks.phases[0][i] for i in range(6)]
    start = order.index(long)
    parts = tokenizer.split_long(long, 2000, True)
    assert len(parts) > 5
    for p in range(len(parts)):
        blk = stream.blocks(0, start, p)
        assert blk.num_rows and (blk.next_start, blk.next_part) == ((start, p + 1) if p + 1 < len(parts)
                                                                   else (start + 1, 0))
    tok = tokenizer.Tokenizer(corpus[1])
    full, _ = _batches(c, corpus[1], 60)
    for n in (7, 25):
        _, state = _batches(c, corpus[1], n)
        rest, _ = _batches(c, corpus[1], 60 - n, state=state)
        for a, b in zip(rest, full[n:]):
            np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
    assert any(st[2] > 0 for st in [_batches(c, corpus[1], n)[1]["lanes"]["0"] for n in (7, 25)])
    assert tok.vocab_size == 512


def test_a_50mb_raw_document_trains_in_bounded_memory(tmp_path, corpus):
    big = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    big.write_text("small line one\n" + " ".join(rng.choice(WORDS, 8_000_000))[:50_000_000] + "\n")
    script = f"""
import resource
from t5lab.config import schema
from t5lab.data import pipeline
c = schema(); c.model.vocab_size = 512; c.train.batch_size = 2
c.data.inputs_length, c.data.targets_length = 64, 32
c.data.source, c.data.paths, c.data.eval_fraction = "text", {str(big)!r}, 0.0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
it = iter(pipeline.make_dataset(c, tokenizer_path={corpus[1]!r}, process_index=0, process_count=1))
rows = sum(len(next(it)["encoder_input_tokens"]) for _ in range(200))
print(rows, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows, grown_mb = (int(x) for x in p.stdout.split())
    assert rows == 400
    assert grown_mb < 500, grown_mb  # one call on the whole document: ~1.2 GB for its ids alone
