"""Packing: round trip, row layout by the batch contract, fill fraction."""
import numpy as np
import pytest

from t5lab import batch as contract
from t5lab.data import packing
from t5lab.data.denoising import Example


def _examples(arch, rng, n=200):
    out = []
    for _ in range(n):
        if arch == "encoder_decoder":
            out.append(Example(rng.integers(3, 99, rng.integers(1, 33)).astype(np.int32),
                               rng.integers(3, 99, rng.integers(1, 17)).astype(np.int32), int(rng.integers(7))))
        elif arch == "decoder":
            li = int(rng.integers(0, 20))
            out.append(Example(rng.integers(3, 99, li).astype(np.int32),
                               rng.integers(3, 99, rng.integers(1, 20)).astype(np.int32), int(rng.integers(7))))
        else:
            x = rng.integers(3, 99, rng.integers(1, 33)).astype(np.int32)
            out.append(Example(x, x + 1, 0, (rng.random(len(x)) < 0.3).astype(np.int32)))
    return out


def _key(e):
    w = () if e.weights is None else tuple(e.weights)
    return tuple(e.inputs), tuple(e.targets), e.denoiser, w


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder", "encoder"])
def test_unpack_pack_round_trip(arch):
    ex = _examples(arch, np.random.default_rng(0))
    batch = packing.pack(ex, arch, 32, 16)
    assert all(v.dtype == np.int32 for v in batch.values())
    assert set(batch) == set(contract.features(arch))
    back = packing.unpack(batch, arch)
    # First-fit reorders examples across rows; the multiset must be identical.
    assert sorted(map(_key, back)) == sorted(map(_key, ex))
    assert len(batch[next(iter(batch))]) < 0.8 * len(ex)  # several examples share rows


def test_encoder_decoder_row_layout():
    a = Example(np.array([5, 6, 1], np.int32), np.array([7, 1], np.int32), 2)
    b = Example(np.array([8, 1], np.int32), np.array([9, 10, 1], np.int32), 4)
    r = packing.pack([a, b], "encoder_decoder", 6, 6)
    assert r["encoder_input_tokens"].tolist() == [[5, 6, 1, 8, 1, 0]]
    assert r["encoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0]]
    assert r["encoder_positions"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert r["decoder_target_tokens"].tolist() == [[7, 1, 9, 10, 1, 0]]
    assert r["decoder_input_tokens"].tolist() == [[0, 7, 0, 9, 10, 0]]  # shifted per segment
    assert r["decoder_segment_ids"].tolist() == [[1, 1, 2, 2, 2, 0]]
    assert r["decoder_positions"].tolist() == [[0, 1, 0, 1, 2, 0]]
    assert r["decoder_loss_weights"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert r["denoiser_ids"].tolist() == [[2, 2, 4, 4, 4, 0]]
    # Encoder full after 5 of 6: a third example with 2 inputs opens a new row.
    r = packing.pack([a, b, a], "encoder_decoder", 6, 6)
    assert r["encoder_segment_ids"].shape == (2, 6)


def test_decoder_prefix_layout_t5x_convention():
    a = Example(np.array([3, 5, 1], np.int32), np.array([7, 1], np.int32), 1)
    c = Example(np.zeros(0, np.int32), np.array([8, 9, 1], np.int32), 0)  # causal LM
    r = packing.pack([a, c], "decoder", 4, 4)
    assert r["decoder_target_tokens"].tolist() == [[3, 5, 1, 7, 1, 8, 9, 1]]
    assert r["decoder_input_tokens"].tolist() == [[0, 3, 5, 1, 7, 0, 8, 9]]
    assert r["decoder_loss_weights"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    # Bidirectional over the inputs plus one position (the last input fed as a token).
    assert r["decoder_causal_attention"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    assert r["denoiser_ids"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]]


def test_unpacked_rows_and_nonpadding_fraction():
    ex = _examples("encoder_decoder", np.random.default_rng(1), 10)
    r = packing.pack(ex, "encoder_decoder", 32, 16, packed=False)
    assert "encoder_segment_ids" not in r and len(r["encoder_input_tokens"]) == 10
    used = sum(len(e.inputs) + len(e.targets) for e in ex)
    assert packing.nonpadding_fraction(r) == pytest.approx(used / (10 * (32 + 16)))
