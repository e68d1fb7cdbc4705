"""Packing examples into rows of the batch contract (t5x feature-converter names).

Several examples share a row, told apart by segment ids (1, 2, ...; 0 is
padding) with positions restarting at 0 per example. For encoder-decoder the
encoder and decoder rows are packed in step: example k of a row is segment k in
both. Placement is first-fit over a few open rows, deterministic in input order.
"""
from __future__ import annotations

import numpy as np

from t5lab import batch as contract
from t5lab.data.denoising import Example, Examples, _ragged_arange, _starts

# Open rows searched by first-fit; beyond this the oldest row is closed.
# A few rows recover most of the fill a full first-fit would give, cheaply.
OPEN_ROWS = 8


def _place(enc_sizes: list[int], dec_sizes: list[int], enc_len: int, dec_len: int, pack: bool):
    """First-fit placement in input order: per example (row, segment id from 1,
    encoder offset, decoder offset) as int64 arrays, and the number of rows."""
    n = len(enc_sizes)
    row, seg, enc_at, dec_at = [0] * n, [0] * n, [0] * n, [0] * n
    rows, open_rows = 0, []  # open_rows: [row index, enc used, dec used, examples]
    for j, (e, d) in enumerate(zip(enc_sizes, dec_sizes)):
        if e > enc_len or d > dec_len:
            raise ValueError(f"example of lengths {(e, d)} does not fit a row of {(enc_len, dec_len)}")
        slot = None
        if pack:
            slot = next((r for r in open_rows if r[1] + e <= enc_len and r[2] + d <= dec_len), None)
        if slot is None:
            slot = [rows, 0, 0, 0]
            rows += 1
            open_rows.append(slot)
            if len(open_rows) > OPEN_ROWS:
                open_rows.pop(0)
        slot[3] += 1
        row[j], seg[j], enc_at[j], dec_at[j] = slot[0], slot[3], slot[1], slot[2]
        slot[1] += e
        slot[2] += d
    return tuple(np.array(x, np.int64) for x in (row, seg, enc_at, dec_at)) + (rows,)


def pack(examples: list[Example] | Examples, arch: str, inputs_length: int, targets_length: int,
         packed: bool = True) -> dict[str, np.ndarray]:
    """Examples -> dict of int32 [rows, length] arrays (one example per row if not packed)."""
    if not isinstance(examples, Examples):
        examples = Examples.from_list(examples)
    lengths = contract.stack_lengths(arch, inputs_length, targets_length)
    enc_len, dec_len = lengths["encoder"], lengths["decoder"]
    li, lt = examples.input_lengths, examples.target_lengths
    zero = np.zeros_like(li)
    enc_sizes, dec_sizes = {"encoder_decoder": (li, lt), "decoder": (zero, li + lt)}.get(arch, (li, zero))
    row, seg, enc_at, dec_at, n = _place(enc_sizes.tolist(), dec_sizes.tolist(), enc_len, dec_len, packed)
    out = {k: np.zeros((n, shape[1]), np.int32)
           for k, shape in contract.shapes(arch, 1, inputs_length, targets_length).items()}
    flat = {k: v.reshape(-1) for k, v in out.items()}  # views: writes land in `out`
    # All examples written at once, by flat index into [rows, length]: example j's
    # element k goes to row[j], column offset[j] + k.
    if arch == "encoder_decoder":
        _segments(flat, "encoder", row * enc_len + enc_at, seg, li, examples.inputs)
        dest, local, j = _segments(flat, "decoder", row * dec_len + dec_at, seg, lt, examples.targets)
        shifted = local < lt[j] - 1
        flat["decoder_input_tokens"][dest[shifted] + 1] = examples.targets[shifted]
        flat["decoder_loss_weights"][dest] = 1
        flat["denoiser_ids"][dest] = examples.denoisers[j]
    elif arch == "decoder":
        # seq = inputs ++ targets, laid out per example
        ls = li + lt
        seq = np.empty(int(ls.sum()), np.int32)
        at = _starts(ls)
        seq[np.repeat(at, li) + _ragged_arange(li)] = examples.inputs
        seq[np.repeat(at + li, lt) + _ragged_arange(lt)] = examples.targets
        dest, local, j = _segments(flat, "decoder", row * dec_len + dec_at, seg, ls, seq)
        shifted = local < ls[j] - 1
        flat["decoder_input_tokens"][dest[shifted] + 1] = seq[shifted]
        is_target = local >= li[j]
        flat["decoder_loss_weights"][dest[is_target]] = 1
        flat["denoiser_ids"][dest[is_target]] = examples.denoisers[j[is_target]]
        # t5x PrefixLM: bidirectional over the inputs plus one position (when there are inputs)
        causal = np.where(li > 0, np.minimum(li + 1, dec_len - dec_at), 0)
        flat["decoder_causal_attention"][np.repeat(row * dec_len + dec_at, causal) + _ragged_arange(causal)] = 1
    else:
        dest, _, _ = _segments(flat, "encoder", row * enc_len + enc_at, seg, li, examples.inputs)
        flat["encoder_target_tokens"][dest] = examples.targets
        flat["encoder_loss_weights"][dest] = examples.weights
    if not packed and arch == "encoder_decoder":
        out = {k: out[k] for k in contract.features(arch, packed=False)}
    return out


def _segments(flat, stack: str, at: np.ndarray, seg: np.ndarray, lengths: np.ndarray, tokens: np.ndarray):
    """Writes the examples' tokens, segment ids and positions of one stack at
    flat offsets `at`; returns each element's (flat index, index in its example,
    example)."""
    j = np.repeat(np.arange(len(lengths)), lengths)
    local = _ragged_arange(lengths)
    dest = at[j] + local
    key = "decoder_target_tokens" if stack == "decoder" else "encoder_input_tokens"
    flat[key][dest] = tokens
    flat[f"{stack}_segment_ids"][dest] = seg[j]
    flat[f"{stack}_positions"][dest] = local
    return dest, local, j


def unpack(batch: dict[str, np.ndarray], arch: str) -> list[Example]:
    """Inverse of pack for packed batches: the examples of each row, in row order."""
    out = []
    prefix = "decoder" if arch == "decoder" else "encoder"
    for r in range(len(batch[f"{prefix}_segment_ids"])):
        segs = batch[f"{prefix}_segment_ids"][r]
        for seg in range(1, int(segs.max(initial=0)) + 1):
            if arch == "encoder_decoder":
                ei = batch["encoder_segment_ids"][r] == seg
                di = batch["decoder_segment_ids"][r] == seg
                out.append(Example(batch["encoder_input_tokens"][r][ei],
                                   batch["decoder_target_tokens"][r][di],
                                   int(batch["denoiser_ids"][r][di][0])))
            elif arch == "decoder":
                di = segs == seg
                seq = batch["decoder_target_tokens"][r][di]
                li = int((batch["decoder_loss_weights"][r][di] == 0).sum())
                out.append(Example(seq[:li], seq[li:], int(batch["denoiser_ids"][r][di][-1])))
            else:
                ei = segs == seg
                out.append(Example(batch["encoder_input_tokens"][r][ei],
                                   batch["encoder_target_tokens"][r][ei], 0,
                                   batch["encoder_loss_weights"][r][ei]))
    return out


def nonpadding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Fraction of token slots (encoder and decoder together) holding a real token."""
    used = total = 0
    for key in ("encoder_input_tokens", "decoder_target_tokens"):
        if key in batch:
            used += int(np.count_nonzero(batch[key]))
            total += batch[key].size
    return used / max(total, 1)
