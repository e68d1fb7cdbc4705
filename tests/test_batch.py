"""The batch contract names what ARCHITECTURE.md lists (t5x's feature-converter
names), with the row lengths each architecture gives its stacks."""
import numpy as np
import pytest

from t5lab import batch as contract

# Written out from ARCHITECTURE.md, "The batch contract".
DOCUMENTED = {
    "encoder_decoder": {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                        "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
                        "encoder_positions", "decoder_positions"},
    "decoder": {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                "decoder_causal_attention", "decoder_segment_ids", "decoder_positions"},
    "encoder": {"encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
                "encoder_segment_ids", "encoder_positions"},
}


@pytest.mark.parametrize("arch", list(DOCUMENTED))
def test_names_are_the_documented_ones(arch):
    assert set(contract.features(arch, denoiser_ids=False)) == DOCUMENTED[arch]
    assert set(contract.features(arch)) == DOCUMENTED[arch] | {"denoiser_ids"}


def test_unpacked_encoder_decoder_rows_have_no_segments():
    assert set(contract.features("encoder_decoder", packed=False, denoiser_ids=False)) == {
        "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"}


def test_lengths_per_architecture():
    # inputs 12, targets 5: a decoder-only row holds both, an encoder-only row the inputs.
    s = contract.shapes("encoder_decoder", 2, 12, 5)
    assert s["encoder_input_tokens"] == (2, 12) and s["decoder_target_tokens"] == (2, 5)
    assert s["denoiser_ids"] == (2, 5)
    assert set(contract.shapes("decoder", 2, 12, 5).values()) == {(2, 17)}
    assert set(contract.shapes("encoder", 2, 12, 5).values()) == {(2, 12)}
    assert [contract.row_tokens(a, 12, 5) for a in DOCUMENTED] == [17, 17, 12]
    assert contract.target_names("encoder") == ("encoder_target_tokens", "encoder_loss_weights")
    assert contract.target_names("decoder") == ("decoder_target_tokens", "decoder_loss_weights")


def test_placeholder_is_one_real_segment_per_row():
    b = contract.placeholder("decoder", 3, 4, 2)
    assert b["decoder_input_tokens"].dtype == np.int32
    assert (b["decoder_segment_ids"] == 1).all() and (b["decoder_positions"] == 0).all()
    assert (b["decoder_causal_attention"] == 0).all()


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="'encdec'"):
        contract.features("encdec")
