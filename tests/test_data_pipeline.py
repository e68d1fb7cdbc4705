"""Tokenizer, sources and the grain pipeline on small corpora made here."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from t5lab.config import schema
from t5lab.data import pipeline, sources, tokenizer
from t5lab.data.denoising import DENOISER_NAMES

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for f in range(3):
        lines = [f"doc{f}_{i} " + " ".join(rng.choice(WORDS, rng.integers(5, 120))) for i in range(300)]
        (d / f"part{f}.txt").write_text("\n".join(lines) + "\n")
    emb = sources.embedded_documents()
    model = tokenizer.train([emb[i] for i in range(0, len(emb), 40)] + [(d / "part0.txt").read_text()],
                            str(d / "tok.model"), 512)
    return d, model


def _config(corpus, **data):
    d, _ = corpus
    c = schema()
    c.model.vocab_size = 512
    c.data.source, c.data.paths = "text", str(d / "part*.txt")
    c.data.inputs_length, c.data.targets_length = 64, 32
    c.data.eval_fraction = 0.1
    c.train.batch_size = 4
    for k, v in data.items():
        c.data[k] = v
    return c


def _ds(c, corpus, split="train", pi=0, pc=1):
    return pipeline.make_dataset(c, split, tokenizer_path=corpus[1], process_index=pi, process_count=pc)


def test_tokenizer_t5_conventions(corpus):
    tok = tokenizer.Tokenizer(corpus[1])
    assert tok.vocab_size == 512
    assert [tok.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    for i in (0, 1, 57, 99):
        assert tok.sentinel_id(i) == 511 - i and tok.id_to_piece(511 - i) == f"<extra_id_{i}>"
    assert sorted(tok.id_to_piece(i) for i in tok.mode_ids.values()) == ["[NLG]", "[NLU]", "[S2S]"]
    text = "def f(x):\n    return x  # naïve ünïcode ✓"
    ids = tok.encode_batch([text, "[NLU] alpha"])
    assert ids[0].dtype == np.int32 and tok.decode(ids[0]) == text
    assert tok.mode_ids["[NLU]"] in ids[1]  # one piece, after the dummy-prefix space


def test_resolve_explicit_missing_and_cached(corpus, tmp_path):
    c = _config(corpus, tokenizer=str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="config.data.tokenizer"):
        tokenizer.resolve(c)
    c.data.tokenizer = ""
    cached = tokenizer.default_cache_path(512, str(tmp_path))
    import os, shutil
    os.makedirs(os.path.dirname(cached))
    shutil.copy(corpus[1], cached)
    assert tokenizer.resolve(c, cache_dir=str(tmp_path)) == cached  # no retraining


@pytest.mark.parametrize("arch,objective", [("encoder_decoder", "ul2"), ("decoder", "ul2"),
                                            ("decoder", "causal_lm"), ("encoder", "mlm"),
                                            ("encoder_decoder", "span_corruption")])
def test_batch_contract(corpus, arch, objective):
    c = _config(corpus, objective=objective)
    c.model.arch = arch
    b = next(iter(_ds(c, corpus)))
    length = {"encoder_decoder": None, "decoder": 96, "encoder": 64}[arch]
    for k, v in b.items():
        assert v.dtype == np.int32 and v.shape[0] == 4, k
        if length:
            assert v.shape[1] == length, k
    if arch == "encoder_decoder":
        assert b["encoder_input_tokens"].shape == (4, 64) and b["decoder_target_tokens"].shape == (4, 32)
    tgt = "encoder" if arch == "encoder" else "decoder"
    assert b["denoiser_ids"].shape == b[f"{tgt}_target_tokens"].shape
    assert 0 <= b["denoiser_ids"].min() and b["denoiser_ids"].max() < len(DENOISER_NAMES)
    if objective != "ul2":
        assert not b["denoiser_ids"].any()
    if tgt == "decoder":  # inputs are the targets shifted right within each segment
        seg, t, x = b["decoder_segment_ids"], b["decoder_target_tokens"], b["decoder_input_tokens"]
        first = b["decoder_positions"] == 0
        assert (x[first & (seg > 0)] == 0).all()
        assert (x[:, 1:][~first[:, 1:]] == t[:, :-1][~first[:, 1:]]).all()


def test_resume_yields_identical_next_50_batches(corpus):
    c = _config(corpus)
    it = iter(_ds(c, corpus))
    for _ in range(23):
        next(it)
    state = it.get_state()
    json.dumps(state)  # small and serialisable: what the checkpoint's data item holds
    expected = [next(it) for _ in range(50)]
    resumed = iter(_ds(c, corpus))
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(50))):
        assert _equal(a, b)


def test_stream_is_a_function_of_the_seed(corpus):
    first = [next(iter(_ds(_config(corpus, seed=s), corpus)))["encoder_input_tokens"] for s in (3, 3, 4)]
    assert np.array_equal(first[0], first[1]) and not np.array_equal(first[0], first[2])


def _docs(c, split):
    ds = pipeline.documents(c, split, repeat=False)
    return [ds[i] for i in range(len(ds))]


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_processes_build_their_rows_of_one_global_stream(corpus):
    """Process p of P yields rows [p*B/P, (p+1)*B/P) of the 1-process batches."""
    c = _config(corpus)
    one = iter(_ds(c, corpus))
    halves = [iter(_ds(c, corpus, pi=i, pc=2)) for i in range(2)]
    quarters = [iter(_ds(c, corpus, pi=i, pc=4)) for i in range(4)]
    for step in range(12):
        full = next(one)
        assert full["encoder_input_tokens"].shape == (4, 64)
        for parts in (halves, quarters):
            got = [next(it) for it in parts]
            n = 4 // len(parts)
            for i, b in enumerate(got):
                assert _equal(b, {k: v[i * n:(i + 1) * n] for k, v in full.items()}), (step, len(parts), i)


def test_a_two_process_position_resumes_on_one_process(corpus):
    c = _config(corpus)
    full = iter(_ds(c, corpus))
    expected = [next(full) for _ in range(20)]
    halves = [iter(_ds(c, corpus, pi=i, pc=2)) for i in range(2)]
    for _ in range(7):
        for it in halves:
            next(it)
    lanes = {k: v for it in halves for k, v in it.get_state()["lanes"].items()}
    resumed = iter(_ds(c, corpus))
    resumed.set_state({"lanes": lanes})
    for n in range(7, 20):
        assert _equal(next(resumed), expected[n]), n


def test_eval_held_out(corpus):
    c = _config(corpus)
    all_lines = [l for f in sorted(corpus[0].glob("part*.txt")) for l in f.read_text().splitlines()]
    train, evl = _docs(c, "train"), _docs(c, "eval")
    assert not set(train) & set(evl) and sorted(train + evl) == sorted(all_lines)
    assert 0.05 < len(evl) / len(all_lines) < 0.15  # eval_fraction 0.1 by hash


def test_train_reshuffles_each_epoch(corpus):
    c = _config(corpus)
    ds = pipeline.documents(c, "train")
    n = len(_docs(c, "train"))
    e0, e1 = [ds[i] for i in range(n)], [ds[i] for i in range(n, 2 * n)]
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_eval_repeats_for_any_number_of_steps(corpus):
    it = iter(_ds(_config(corpus), corpus, "eval"))
    assert len([next(it) for _ in range(40)]) == 40  # ~90 short documents: several passes


def test_missing_paths_and_bad_keys_name_the_culprit(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _ds(_config(corpus, paths=str(tmp_path / "nowhere/*.txt")), corpus)
    with pytest.raises(ValueError, match="config.data.ul2_rates"):
        _ds(_config(corpus, ul2_rates="1,2,3"), corpus)
    with pytest.raises(ValueError, match="config.data.mixture"):
        _ds(_config(corpus, source="mixture", mixture=f"text:{corpus[0]}/part0.txt=0"), corpus)
    with pytest.raises(ValueError, match="config.data.mixture"):
        _ds(_config(corpus, source="mixture", mixture="embedded=-1,embedded=2"), corpus)
    with pytest.raises(ValueError, match="config.data.objective"):
        _ds(_config(corpus, objective="mlm"), corpus)
    with pytest.raises(ValueError, match="config.train.batch_size"):
        _ds(_config(corpus), corpus, pi=0, pc=3)


def test_empty_and_non_utf8_files(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        _ds(_config(corpus, paths=str(tmp_path / "empty.txt")), corpus)
    (tmp_path / "mixed.txt").write_bytes(b"good line one\n\xff\xfe bad bytes\ngood line two\n")
    src, _ = sources.open_source("text", str(tmp_path / "*.txt"), _config(corpus).data, "train")
    assert [src[i] for i in range(len(src))] == ["good line one", None, "good line two"]
    c = _config(corpus, paths=str(tmp_path / "*.txt"), eval_fraction=0.0, objective="span_corruption")
    b = next(iter(_ds(c, corpus)))  # the bad line is skipped, the rest trains
    assert b["encoder_input_tokens"].any()


def test_tokenizer_without_sentinels_is_rejected(corpus, tmp_path):
    spm.SentencePieceTrainer.train(input=str(corpus[0] / "part0.txt"), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=60, minloglevel=2)
    path = str(tmp_path / "plain.model")
    with pytest.raises(ValueError, match="sentinels"):
        pipeline.make_dataset(_config(corpus), tokenizer_path=path, process_index=0, process_count=1)


def test_jsonl_parquet_and_weighted_mixture(corpus, tmp_path):
    rows = [{"text": f"jsonl{i} alpha beta", "id": i} for i in range(200)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.table({"body": [f"parquet{i} gamma" for i in range(300)]}), tmp_path / "b.parquet",
                   row_group_size=64)
    c = _config(corpus, source="jsonl", paths=str(tmp_path / "a.jsonl"))
    assert sorted(_docs(c, "train") + _docs(c, "eval")) == sorted(r["text"] for r in rows)
    c = _config(corpus, source="parquet", paths=str(tmp_path / "b.parquet"), text_field="body")
    assert len(_docs(c, "train") + _docs(c, "eval")) == 300
    c.data.text_field = "text"
    with pytest.raises(KeyError, match="config.data.text_field"):
        _docs(c, "train")
    c = _config(corpus, source="mixture",
                mixture=f"jsonl:{tmp_path}/a.jsonl=3,parquet:{tmp_path}/b.parquet=1", text_field="body")
    docs = _docs(c, "train")  # jsonl rows have no "body": skipped and counted, parquet rows train
    assert any(d is None for d in docs) and all(d.startswith("parquet") for d in docs if d is not None)
    assert "no field 'body'" in sources.SKIPS.latest or any(d is None for d in docs)
    c.data.mixture = f"jsonl:{tmp_path}/a.jsonl=3,text:{corpus[0]}/part1.txt=1"
    c.data.text_field = "text"
    ds = pipeline.documents(c, "train")
    draws = [ds[i] for i in range(2000)]
    share = np.mean([d.startswith("jsonl") for d in draws])
    assert abs(share - 0.75) < 0.03


def test_mixture_schedule_switches_weights_at_a_fraction_and_resumes_exactly(corpus, tmp_path):
    """data.mixture_schedule: source A alone for the first half of the run,
    then source B alone; a resume before, at and after the switch continues
    the uninterrupted stream exactly."""
    (tmp_path / "a.txt").write_text("\n".join(f"alpha beta gamma {i} alpha" for i in range(400)) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"river stone omega {i} river" for i in range(400)) + "\n")
    c = _config(corpus, source="mixture", mixture=f"text:{tmp_path}/a.txt=1,text:{tmp_path}/b.txt=0",
                mixture_schedule="0.5=0,1")
    c.train.steps = 8
    tok = tokenizer.Tokenizer(corpus[1])

    def words(batch):
        return set(tok.decode([int(t) for t in batch["encoder_input_tokens"].ravel() if 2 < t < 400]).split())

    it = iter(_ds(c, corpus))
    ref = [next(it) for _ in range(8)]
    for b in ref[:4]:
        assert "alpha" in words(b) and "river" not in words(b)
    for b in ref[4:]:
        assert "river" in words(b) and "alpha" not in words(b)
    for cut in (3, 4, 6):
        it = iter(_ds(c, corpus))
        for _ in range(cut):
            next(it)
        state = it.get_state()
        resumed = iter(_ds(c, corpus))
        resumed.set_state(state)
        for want in ref[cut:]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
    bad = [("0.5=1", "needs 2 weights"), ("0.6=1,1;0.4=1,0", "must increase"), ("1.5=1,1", "must increase"),
           ("0.5=0,0", "positive sum")]
    for spec, why in bad:
        c.data.mixture_schedule = spec
        with pytest.raises(ValueError, match=f"config.data.mixture_schedule: .*{why}"):
            _ds(c, corpus)
