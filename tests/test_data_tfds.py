"""data.source=tfds on a real TFDS dataset built here in ArrayRecord format, without TensorFlow."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from t5lab.data import pipeline, tokenizer
from test_data_pipeline import WORDS, _config, corpus  # noqa: F401  (module fixture)

NAME = "t5lab_tiny_text"
TRAIN_WORDS, EVAL_WORDS = WORDS[:7], WORDS[7:]


def _texts(split, n, words):
    rng = np.random.default_rng(len(split))
    return [f"{split}{i} " + " ".join(rng.choice(words, rng.integers(8, 40))) for i in range(n)]


TEXTS = {"train": _texts("train", 90, TRAIN_WORDS), "validation": _texts("validation", 30, EVAL_WORDS)}

# Not registered: t5lab must read the prepared files alone, as with a dataset
# copied from elsewhere (and as grain worker processes do).
with tfds.core.registered.skip_registration():
    class T5labTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "title": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in TEXTS}

        def _generate_examples(self, split):
            for i, t in enumerate(TEXTS[split]):
                yield f"{split}{i}", {"text": t, "title": f"title of {split}{i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    T5labTinyText(data_dir=d).download_and_prepare(file_format="array_record")
    return d


def _tfds_config(corpus, tfds_dir, **data):
    return _config(corpus, source="tfds", paths="", tfds_name=f"{NAME}:1.0.0", tfds_data_dir=tfds_dir, **data)


def _docs(c, split):
    ds = pipeline.documents(c, split, repeat=False)
    return [ds[i] for i in range(len(ds))]


def test_tfds_splits_fields_and_names(corpus, tfds_dir):
    c = _tfds_config(corpus, tfds_dir)
    train, evl = _docs(c, "train"), _docs(c, "eval")
    assert sorted(train) == sorted(TEXTS["train"]) and sorted(evl) == sorted(TEXTS["validation"])
    c.data.tfds_name = NAME  # no version: the one on disk
    assert sorted(_docs(c, "eval")) == sorted(TEXTS["validation"])
    c.data.text_field = "title"
    assert sorted(_docs(c, "train")) == sorted(f"title of train{i}" for i in range(90))
    c.data.text_field = "body"
    with pytest.raises(KeyError, match="config.data.text_field.*'body'"):
        _docs(c, "train")
    c.data.text_field, c.data.tfds_name = "text", f"{NAME}:9.9.9"
    with pytest.raises(FileNotFoundError, match="config.data.tfds_name"):
        _docs(c, "train")
    c.data.tfds_name, c.data.eval_split = NAME, "test"
    with pytest.raises(FileNotFoundError, match="config.data.tfds_name.*'test'"):
        _docs(c, "eval")
    c.data.tfds_data_dir = tfds_dir + "/nowhere"
    with pytest.raises(FileNotFoundError, match="config.data.tfds_data_dir"):
        _docs(c, "train")


def test_tfds_batches_come_from_their_split(corpus, tfds_dir):
    tok = tokenizer.Tokenizer(corpus[1])
    ids = {s: set(np.concatenate(tok.encode_batch(t)).tolist()) for s, t in TEXTS.items()}
    assert ids["train"] - ids["validation"] and ids["validation"] - ids["train"]
    c = _tfds_config(corpus, tfds_dir, objective="causal_lm", inputs_length=16, targets_length=16)
    c.model.arch = "decoder"
    special = {tok.pad_id, tok.eos_id} | set(tok.mode_ids.values())
    for split, tfds_split in (("train", "train"), ("eval", "validation")):
        it = iter(pipeline.make_dataset(c, split, tokenizer_path=corpus[1], process_index=0, process_count=1))
        for _ in range(3):
            b = next(it)
            assert b["decoder_target_tokens"].shape == (4, 32)
            seen = set(b["decoder_target_tokens"].ravel().tolist()) - special
            assert seen and seen <= ids[tfds_split], (split, seen - ids[tfds_split])
    c.data.source, c.data.mixture = "mixture", f"tfds:{NAME}:1.0.0=1,text:{corpus[0]}/part0.txt=1"
    c.data.tfds_name = ""
    docs = pipeline.documents(c, "eval")
    draws = [docs[i] for i in range(200)]
    assert {d for d in draws if d.startswith("validation")} <= set(TEXTS["validation"])
    assert 60 < sum(d.startswith("validation") for d in draws) < 140


def test_prepare_keeps_the_tfds_splits(corpus, tfds_dir, tmp_path):
    from t5lab.data import prepare, prepared
    c = _tfds_config(corpus, tfds_dir)
    m = prepare.prepare(c, str(tmp_path / "p"), tok_path=corpus[1], shards=2, chunk_tokens=32)
    tok = tokenizer.Tokenizer(corpus[1])
    for split, name in (("train", "train"), ("eval", "validation")):
        src = prepared.PreparedSource(str(tmp_path / "p"), split)
        got = np.concatenate([p for i in range(len(src)) for p in src[i]])
        # TFDS's own order within the split, tokenized
        raw = pipeline.sources.TfdsSource(f"{NAME}:1.0.0", name, tfds_dir, "text")
        want = np.concatenate([tok.encode(raw[i]) for i in range(len(raw))])
        np.testing.assert_array_equal(got, want)
        assert m["splits"][split]["documents"] == len(TEXTS[name])
    assert m["eval_fraction"] is None
