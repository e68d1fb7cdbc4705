"""Packing examples into rows of the batch contract (t5x feature-converter names).

Several examples share a row, told apart by segment ids (1, 2, ...; 0 is
padding) with positions restarting at 0 per example. For encoder-decoder the
encoder and decoder rows are packed in step: example k of a row is segment k in
both. Placement is first-fit over a few open rows, deterministic in input order.
"""
from __future__ import annotations

import numpy as np

from t5lab import batch as contract
from t5lab.data.denoising import Example

# Open rows searched by first-fit; beyond this the oldest row is closed.
# A few rows recover most of the fill a full first-fit would give, cheaply.
OPEN_ROWS = 8


def _sizes(ex: Example, arch: str) -> tuple[int, int]:
    if arch == "encoder_decoder":
        return len(ex.inputs), len(ex.targets)
    if arch == "decoder":
        return 0, len(ex.inputs) + len(ex.targets)
    return len(ex.inputs), 0


def _place(examples: list[Example], arch: str, enc_len: int, dec_len: int, pack: bool):
    """Row index lists, each in input order."""
    rows, open_rows = [], []  # open_rows: [row index, enc used, dec used]
    for j, ex in enumerate(examples):
        e, d = _sizes(ex, arch)
        if e > enc_len or d > dec_len:
            raise ValueError(f"example of lengths {(e, d)} does not fit a row of {(enc_len, dec_len)}")
        slot = None
        if pack:
            slot = next((r for r in open_rows if r[1] + e <= enc_len and r[2] + d <= dec_len), None)
        if slot is None:
            rows.append([])
            slot = [len(rows) - 1, 0, 0]
            open_rows.append(slot)
            if len(open_rows) > OPEN_ROWS:
                open_rows.pop(0)
        rows[slot[0]].append(j)
        slot[1] += e
        slot[2] += d
    return rows


def pack(examples: list[Example], arch: str, inputs_length: int, targets_length: int,
         packed: bool = True) -> dict[str, np.ndarray]:
    """Examples -> dict of int32 [rows, length] arrays (one example per row if not packed)."""
    lengths = contract.stack_lengths(arch, inputs_length, targets_length)
    rows = _place(examples, arch, lengths["encoder"], lengths["decoder"], packed)
    n = len(rows)
    out = {k: np.zeros((n, shape[1]), np.int32)
           for k, shape in contract.shapes(arch, 1, inputs_length, targets_length).items()}
    for r, members in enumerate(rows):
        e = d = 0
        for seg, j in enumerate(members, start=1):
            ex = examples[j]
            if arch == "encoder_decoder":
                li, lt = len(ex.inputs), len(ex.targets)
                _segment(out, "encoder", r, e, ex.inputs, seg)
                _segment(out, "decoder", r, d, ex.targets, seg)
                out["decoder_input_tokens"][r, d + 1:d + lt] = ex.targets[:-1]
                out["decoder_loss_weights"][r, d:d + lt] = 1
                out["denoiser_ids"][r, d:d + lt] = ex.denoiser
                e, d = e + li, d + lt
            elif arch == "decoder":
                seq = np.concatenate([ex.inputs, ex.targets])
                li, ls = len(ex.inputs), len(seq)
                _segment(out, "decoder", r, d, seq, seg)
                out["decoder_input_tokens"][r, d + 1:d + ls] = seq[:-1]
                out["decoder_loss_weights"][r, d + li:d + ls] = 1
                if li:  # t5x PrefixLM: bidirectional over the inputs plus one position
                    out["decoder_causal_attention"][r, d:d + li + 1] = 1
                out["denoiser_ids"][r, d + li:d + ls] = ex.denoiser
                d += ls
            else:
                li = len(ex.inputs)
                _segment(out, "encoder", r, e, ex.inputs, seg)
                out["encoder_target_tokens"][r, e:e + li] = ex.targets
                out["encoder_loss_weights"][r, e:e + li] = ex.weights
                e += li
    if not packed and arch == "encoder_decoder":
        out = {k: out[k] for k in contract.features(arch, packed=False)}
    return out


def _segment(out, stack: str, r: int, start: int, tokens: np.ndarray, seg: int):
    n = len(tokens)
    key = "decoder_target_tokens" if stack == "decoder" else "encoder_input_tokens"
    out[key][r, start:start + n] = tokens
    out[f"{stack}_segment_ids"][r, start:start + n] = seg
    out[f"{stack}_positions"][r, start:start + n] = np.arange(n)


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
