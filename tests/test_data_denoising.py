"""Objectives against T5's and UL2's definitions (no tokenizer needed)."""
import numpy as np
import pytest

from t5lab.data import denoising
from t5lab.data.denoising import Objective, UL2_DENOISERS

SENTINEL0, EOS, VOCAB = 511, 1, 512
MODES = {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}


def _helper_by_search(inputs_length, density, mean_span):
    """random_spans_helper by exhaustive search over raw lengths, from its definition:
    the longest raw length whose corrupted inputs (+EOS) fit, Python rounding."""
    def lengths(n):
        noise = int(round(n * density))
        spans = int(round(noise / mean_span))
        return n - noise + spans + 1, noise + spans + 1
    best = max(n for n in range(inputs_length, 4 * inputs_length) if lengths(n)[0] <= inputs_length)
    inputs, targets = lengths(best)
    if density == 0.5 and targets > inputs:
        return best - 1, targets - 1
    return best, targets


def test_span_lengths_t5_value():
    assert denoising.span_lengths(512, 0.15, 3.0) == (568, 114)  # T5 paper / random_spans_helper


# Worked by hand from the helper's formulas (see _helper_by_search for the rule).
# e.g. X8: 908 -> 454 noise, round(56.75) = 57 spans, 908-454+57+1 = 512 inputs,
# 454+57+1 = 512 targets; 909 -> round(454.5) = 454 noise, 513 inputs: too long.
UL2_SPAN_LENGTHS_512 = {"R3": (568, 114), "R8": (588, 100), "X3": (766, 512), "X8": (908, 512),
                        "X64_15": (600, 92), "X64_50": (1006, 512)}


@pytest.mark.parametrize("d", [d for d in UL2_DENOISERS if not d.prefix_lm], ids=lambda d: d.name)
def test_span_lengths_ul2_settings(d):
    got = denoising.span_lengths(512, d.density, d.mean_span)
    assert got == _helper_by_search(512, d.density, d.mean_span)
    assert got == UL2_SPAN_LENGTHS_512[d.name]


def test_s_denoiser_raw_lengths_512():
    ed = _objective("ul2", "encoder_decoder", 512, 512)
    dec = _objective("ul2", "decoder", 512, 512)
    # Every split point of L tokens must fit: [S2S] + prefix + EOS <= 512, suffix + EOS <= 512.
    assert ed.raw_lengths[6] == 511
    assert dec.raw_lengths[6] == 1024 - 3  # [S2S] prefix EOS suffix EOS in 1024


@pytest.mark.parametrize("d", [d for d in UL2_DENOISERS if not d.prefix_lm], ids=lambda d: d.name)
def test_noise_statistics_10k_examples(d):
    # 2560 tokens: density * 2560 is a multiple of every mean span, so T5's
    # rounded counts can express each setting; measured over 10,000 masks.
    rng = np.random.default_rng(0)
    mask = denoising.random_spans_noise_mask(2560, d.density, d.mean_span, rng, batch=10_000)
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    assert abs(mask.mean() - d.density) <= 0.02 * d.density
    assert abs(mask.sum() / starts.sum() - d.mean_span) <= 0.02 * d.mean_span
    assert not mask[:, 0].any() and mask[:, -1].all()  # T5: clean first, noise last
    # Span placement is random, not a fixed pattern.
    assert len({r.tobytes() for r in mask[:50]}) == 50


def test_noise_mask_short_lengths_t5_counts():
    rng = np.random.default_rng(1)
    m = denoising.random_spans_noise_mask(1, 0.15, 3, rng)
    assert m.shape == (1,) and not m[0]  # length 1 is computed as 2 and cut
    m = denoising.random_spans_noise_mask(10, 0.15, 3, rng, batch=100)
    assert (m.sum(1) == 2).all()  # round(1.5) == 2 (half to even)


def _reconstruct(inputs, targets):
    """Undo span corruption by the sentinel contract: sentinel k in the inputs
    stands for the tokens after sentinel k in the targets."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t > SENTINEL0 - 100:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[t] if t > SENTINEL0 - 100 else [t]
    return out


def test_span_corruption_sentinels_count_down_and_reconstruct():
    rng = np.random.default_rng(2)
    tokens = rng.integers(6, 400, (64, 200)).astype(np.int32)
    inputs, targets = denoising.span_corruption(tokens, rng, 0.15, 3.0, SENTINEL0, EOS)
    n, s = 30, 10  # round(200*0.15), round(30/3)
    assert inputs.shape == (64, 200 - n + s + 1) and targets.shape == (64, n + s + 1)
    for x, y, t in zip(inputs, targets, tokens):
        assert x[-1] == EOS and y[-1] == EOS
        sx, sy = x[x > SENTINEL0 - 100], y[y > SENTINEL0 - 100]
        assert list(sx) == list(range(SENTINEL0, SENTINEL0 - s, -1)) == list(sy)
        assert y[0] == SENTINEL0  # targets start with <extra_id_0>
        assert _reconstruct(x, y) == list(t)


def _objective(kind, arch, i, t, **kw):
    return Objective(kind, arch, i, t, eos_id=EOS, vocab_size=VOCAB, sentinel0=SENTINEL0,
                     num_sentinels=100, mode_ids=MODES, **kw)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder"])
def test_ul2_examples_fit_and_record_denoiser(arch):
    obj = _objective("ul2", arch, 128, 64)
    rng = np.random.default_rng(3)
    docs = [rng.integers(6, 400, rng.integers(1, 3000)).astype(np.int32) for _ in range(60)]
    examples, skipped = obj(docs, rng)
    counts = np.bincount([e.denoiser for e in examples], minlength=7)
    assert (counts > 0.08 * len(examples)).all()  # uniform default rates, 1/7 each
    for e in examples:
        d = UL2_DENOISERS[e.denoiser]
        assert e.inputs[0] == MODES[d.mode]  # the mode token takes the first input position
        if arch == "decoder":
            assert len(e.inputs) + len(e.targets) <= 192
        else:
            assert len(e.inputs) <= 128 and len(e.targets) <= 64
        assert e.inputs[-1] == EOS and e.targets[-1] == EOS
    assert skipped >= sum(1 for d in docs if len(d) < denoising.MIN_TOKENS)


def test_ul2_rates_and_prefix_split_uniform():
    rates = [0, 0, 0, 0, 0, 1, 3]
    obj = _objective("ul2", "encoder_decoder", 128, 128, rates=rates)
    rng = np.random.default_rng(4)
    docs = [rng.integers(6, 400, 5000).astype(np.int32) for _ in range(40)]
    examples, _ = obj(docs, rng)
    ids = np.array([e.denoiser for e in examples])
    assert set(ids) == {5, 6}
    s = [e for e in examples if e.denoiser == 6 and len(e.inputs) + len(e.targets) == 127 + 3]
    prefix = np.array([len(e.inputs) - 2 for e in s])  # minus [S2S] and EOS
    # Split uniform on 1..126: mean 63.5, sd ~36.
    assert abs(prefix.mean() - 63.5) < 4 and prefix.min() <= 5 and prefix.max() >= 122


def test_short_documents_are_counted_and_skipped():
    obj = _objective("span_corruption", "encoder_decoder", 64, 32)
    docs = [np.array([7], np.int32), np.zeros(0, np.int32), np.arange(6, 40, dtype=np.int32)]
    examples, skipped = obj(docs, np.random.default_rng(0))
    assert skipped == 2 and len(examples) == 1
    assert _reconstruct(examples[0].inputs, examples[0].targets) == list(range(6, 40))


def test_mlm_80_10_10():
    rng = np.random.default_rng(5)
    tokens = rng.integers(6, 400, (2000, 100)).astype(np.int32)
    inputs, selected = denoising.bert_mask(tokens, rng, 0.15, SENTINEL0, 6, 412)
    assert (selected.sum(1) == 15).all()
    sel_in, sel_tok = inputs[selected], tokens[selected]
    masked = (sel_in == SENTINEL0).mean()
    kept = (sel_in == sel_tok).mean()
    assert abs(masked - 0.8) < 0.01 and 0.09 < kept < 0.115  # 10% kept (+ random hits)
    assert (inputs[~selected] == tokens[~selected]).all()


def test_too_many_spans_for_sentinels_shortens_chunks():
    obj = _objective("ul2", "encoder_decoder", 1024, 1024)
    for i, d in enumerate(UL2_DENOISERS[:6]):
        assert denoising.noise_counts(obj.raw_lengths[i], d.density, d.mean_span)[1] <= 100


# UL2 (Tay et al. 2022, arXiv 2205.05131) Sec. 3.1.2: the seven denoisers as
# (mode token, mean span mu, corruption rate r); mode tokens of the released 20B
# model (google/ul2 model card: [NLU] R, [NLG] X, [S2S] S).
PAPER_DENOISERS = {"R3": ("[NLU]", 3, 0.15), "R8": ("[NLU]", 8, 0.15), "X3": ("[NLG]", 3, 0.5),
                   "X8": ("[NLG]", 8, 0.5), "X64_15": ("[NLG]", 64, 0.15), "X64_50": ("[NLG]", 64, 0.5)}
# S 20%, R 40%, X 40%, even within R and X (Finnish-NLP's UL2 recipe citing the
# paper's Sec. 4.5; see t5lab/data/denoising.py for the caveat).
PAPER_RATES = {"R3": 0.2, "R8": 0.2, "X3": 0.1, "X8": 0.1, "X64_15": 0.1, "X64_50": 0.1, "S": 0.2}


def test_ul2_denoisers_are_the_papers():
    assert [d.name for d in UL2_DENOISERS] == list(PAPER_RATES)
    for d in UL2_DENOISERS:
        if d.prefix_lm:
            assert d.name == "S" and d.mode == "[S2S]"
        else:
            assert (d.mode, d.mean_span, d.density) == PAPER_DENOISERS[d.name] and not d.prefix_lm


@pytest.mark.parametrize("size", ["tiny", "small", "20b"])
def test_ul2_preset_rates_are_the_papers(size):
    from t5lab import config as config_lib
    rates = [float(x) for x in config_lib.load(f"configs/ul2.py:{size}").data.ul2_rates.split(",")]
    assert rates == pytest.approx(list(PAPER_RATES.values()))
    by_mode = {}
    for d, r in zip(UL2_DENOISERS, rates):
        by_mode[d.mode] = by_mode.get(d.mode, 0) + r
    assert by_mode == pytest.approx({"[NLU]": 0.4, "[NLG]": 0.4, "[S2S]": 0.2})
    # the uniform mixture stays one word away: "" is data.ul2_rates' uniform
    assert config_lib.load(f"configs/ul2.py:{size},uniform").data.ul2_rates == ""
    with pytest.raises(config_lib.ConfigError, match="mixture"):
        config_lib.load(f"configs/ul2.py:{size},zipf")


def test_sampled_denoiser_frequencies_match_the_preset_rates():
    from t5lab import config as config_lib
    c = config_lib.load("configs/ul2.py:tiny")
    rates = [float(x) for x in c.data.ul2_rates.split(",")]
    obj = _objective("ul2", "encoder_decoder", c.data.inputs_length, c.data.targets_length, rates=rates)
    rng = np.random.default_rng(6)
    docs = [rng.integers(6, 400, rng.integers(2, 200)).astype(np.int32) for _ in range(4000)]
    examples, _ = obj(docs, rng)
    n = len(examples)
    freq = np.bincount([e.denoiser for e in examples], minlength=7) / n
    # each chunk draws its denoiser independently: multinomial, sd <= sqrt(.25 / n)
    assert n > 4000 and np.abs(freq - list(PAPER_RATES.values())).max() < 5 * np.sqrt(0.25 / n)
    for e in examples:
        assert e.inputs[0] == MODES[UL2_DENOISERS[e.denoiser].mode]
