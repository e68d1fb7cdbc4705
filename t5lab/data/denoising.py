"""Pretraining objectives as pure numpy functions of (tokens, rng).

Span corruption follows T5 (t5/data/preprocessors.py) exactly:
random_spans_noise_mask, sentinels counting down from <extra_id_0>, EOS appended
to inputs and targets, and random_spans_helper as `span_lengths`. UL2 (Tay et
al. 2022) mixes seven denoisers; its mode token takes one input position.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Denoiser:
    name: str
    mode: str               # UL2 paradigm token prepended to the inputs
    mean_span: float = 0.0  # mean noise span length (t5x: mean_noise_span_length)
    density: float = 0.0    # noise density
    prefix_lm: bool = False


# UL2's seven denoisers (Tay et al. 2022, arXiv 2205.05131, Sec. 3.1.2): R (mu, r) =
# (3, 15%), (8, 15%); X = (3, 50%), (8, 50%), (64, 15%), (64, 50%); S = prefix LM.
# Mode tokens as the released 20B model uses them ([NLU] R, [NLG] X, [S2S] S; the
# google/ul2 model card). The same table is in the ports of the paper's appendix
# code (Finnish-NLP/ul2-*-finnish tasks.py, levanter ul2r.py ul2_configs).
UL2_DENOISERS = (
    Denoiser("R3", "[NLU]", 3, 0.15),
    Denoiser("R8", "[NLU]", 8, 0.15),
    Denoiser("X3", "[NLG]", 3, 0.5),
    Denoiser("X8", "[NLG]", 8, 0.5),
    Denoiser("X64_15", "[NLG]", 64, 0.15),
    Denoiser("X64_50", "[NLG]", 64, 0.5),
    Denoiser("S", "[S2S]", prefix_lm=True),
)
DENOISER_NAMES = tuple(d.name for d in UL2_DENOISERS)
# Sampling rates in DENOISER_NAMES order: S 20%, R and X 40% each, split evenly
# within R (2 x 20%) and X (4 x 10%). Source: Finnish-NLP's UL2 models ("20% for
# S-denoising (suggested at the paper chapter 4.5) and the rest divided equally
# between R and X"); the paper's text itself could not be read here. The paper's
# appendix ul2_objective samples uniformly when rates=None: UL2_UNIFORM_RATES.
UL2_PAPER_RATES = (0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.2)
UL2_UNIFORM_RATES = (1.0,) * 7
# Shortest document (or document tail) turned into an example; shorter ones are
# counted and skipped: T5's mask needs 2 tokens to have a noise and a clean part.
MIN_TOKENS = 2


# ------------------------------------------------------------ T5 span corruption
def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) as random_spans_noise_mask computes
    them: float32 products, round-half-to-even, clamped to [1, length-1] and >= 1."""
    length = max(length, 2)
    n = int(np.round(np.float32(length) * np.float32(noise_density)))
    n = min(max(n, 1), length - 1)
    s = max(int(np.round(np.float32(n) / np.float32(mean_span_length))), 1)
    return n, s


def _random_segmentation(num_items: int, num_segments: int, rng, batch: int) -> np.ndarray:
    """[batch, num_segments] positive lengths summing to num_items, every
    segmentation equally likely (T5: shuffle of num_segments-1 boundary markers)."""
    if num_segments == 1:
        return np.full((batch, 1), num_items, np.int64)
    keys = rng.random((batch, num_items - 1))
    cuts = np.sort(np.argpartition(keys, num_segments - 2, axis=1)[:, :num_segments - 1], axis=1) + 1
    bounds = np.concatenate([np.zeros((batch, 1), np.int64), cuts, np.full((batch, 1), num_items)], axis=1)
    return np.diff(bounds, axis=1)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float, rng,
                            batch: int | None = None) -> np.ndarray:
    """Bool noise mask [length] (or [batch, length]): alternating clean and noise
    spans, starting clean, with T5's counts (see noise_counts)."""
    b = 1 if batch is None else batch
    orig, length = length, max(length, 2)
    n, s = noise_counts(length, noise_density, mean_span_length)
    noise = _random_segmentation(n, s, rng, b)
    clean = _random_segmentation(length - n, s, rng, b)
    starts = np.cumsum(np.stack([clean, noise], axis=2).reshape(b, 2 * s), axis=1)[:, :-1]
    indicator = np.zeros((b, length), np.int32)
    np.put_along_axis(indicator, starts, 1, axis=1)
    mask = (np.cumsum(indicator, axis=1) % 2 == 1)[:, :orig]
    return mask if batch is not None else mask[0]


def span_lengths(inputs_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """T5's random_spans_helper: (raw_tokens_length, targets_length) such that
    span-corrupting raw_tokens_length tokens fills inputs_length (with EOS)."""
    def lengths(tokens_length):
        noise = int(round(tokens_length * noise_density))
        spans = int(round(noise / mean_span_length))
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    if noise_density == 0.5 and targets > inputs:  # T5's hack to keep targets <= inputs
        tokens_length -= 1
        targets -= 1
    return tokens_length, targets


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinel0: int) -> np.ndarray:
    """T5 noise_span_to_unique_sentinel on [B, L]: each masked span becomes one
    sentinel, <extra_id_0> first, counting down."""
    prev = np.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    first = mask & ~prev
    out = np.where(first, sentinel0 + 1 - np.cumsum(first, axis=1), tokens)
    keep = ~(mask & prev)
    return out[keep].reshape(len(tokens), -1)  # same count per row: counts depend on L only


def span_corruption(tokens: np.ndarray, rng, noise_density: float, mean_span_length: float,
                    sentinel0: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, L] raw tokens -> (inputs [B, Li], targets [B, Lt]), each ending in EOS."""
    b, length = tokens.shape
    mask = random_spans_noise_mask(length, noise_density, mean_span_length, rng, batch=b)
    eos = np.full((b, 1), eos_id, tokens.dtype)
    inputs = _spans_to_sentinels(tokens, mask, sentinel0)
    targets = _spans_to_sentinels(tokens, ~mask, sentinel0)
    return np.concatenate([inputs, eos], 1), np.concatenate([targets, eos], 1)


def bert_mask(tokens: np.ndarray, rng, probability: float, mask_id: int, random_low: int,
              random_high: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT MLM on [B, L]: exactly max(1, round(L * p)) positions per row are
    selected; of those 80% -> mask_id, 10% -> a random ordinary token, 10% kept.
    Returns (inputs, selected)."""
    b, length = tokens.shape
    k = max(1, int(round(length * probability)))
    pos = np.argpartition(rng.random((b, length)), k - 1, axis=1)[:, :k]
    selected = np.zeros((b, length), bool)
    np.put_along_axis(selected, pos, True, axis=1)
    u = rng.random((b, length))
    random_tokens = rng.integers(random_low, random_high, (b, length), dtype=tokens.dtype)
    inputs = np.where(selected & (u < 0.8), mask_id, tokens)
    inputs = np.where(selected & (u >= 0.8) & (u < 0.9), random_tokens, inputs)
    return inputs, selected


# ------------------------------------------------------------------ objectives
@dataclasses.dataclass
class Example:
    """One example before packing. decoder arch: sequence = inputs ++ targets
    with loss on targets; encoder arch: weights marks the MLM positions."""
    inputs: np.ndarray
    targets: np.ndarray
    denoiser: int = 0
    weights: np.ndarray | None = None


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Offsets of consecutive pieces of these lengths in their concatenation."""
    return np.cumsum(lengths) - lengths


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """[0 .. l0-1, 0 .. l1-1, ...]: each element's index within its piece."""
    return np.arange(int(lengths.sum())) - np.repeat(_starts(lengths), lengths)


@dataclasses.dataclass
class Examples:
    """Examples in ragged form, in order: example j's inputs are the next
    input_lengths[j] values of `inputs` (likewise targets and weights). One
    array per field, not one per example, so a block's examples are made and
    packed by whole-array numpy operations instead of a Python loop each."""
    inputs: np.ndarray          # int32, all examples' inputs concatenated
    input_lengths: np.ndarray   # int64 [n]
    targets: np.ndarray
    target_lengths: np.ndarray
    denoisers: np.ndarray       # int64 [n]
    weights: np.ndarray | None = None  # like targets (MLM), or None

    def __len__(self) -> int:
        return len(self.input_lengths)

    @classmethod
    def from_list(cls, examples: list[Example]) -> "Examples":
        cat = lambda xs, dtype: np.concatenate([np.asarray(x, dtype) for x in xs]) if xs else np.zeros(0, dtype)
        weights = None
        if all(e.weights is not None for e in examples):
            weights = cat([e.weights for e in examples], np.int32)
        return cls(cat([e.inputs for e in examples], np.int32),
                   np.array([len(e.inputs) for e in examples], np.int64),
                   cat([e.targets for e in examples], np.int32),
                   np.array([len(e.targets) for e in examples], np.int64),
                   np.array([e.denoiser for e in examples], np.int64), weights)

    def to_list(self) -> list[Example]:
        cut = lambda x, lengths: np.split(x, np.cumsum(lengths)[:-1]) if len(lengths) else []
        weights = cut(self.weights, self.target_lengths) if self.weights is not None else [None] * len(self)
        return [Example(x, y, int(d), w) for x, y, d, w in zip(
            cut(self.inputs, self.input_lengths), cut(self.targets, self.target_lengths),
            self.denoisers, weights)]


def _segment_cuts(keys: np.ndarray, key_starts: np.ndarray, items: np.ndarray,
                  segments: np.ndarray) -> np.ndarray:
    """_random_segmentation for many problems at once, from the same keys: problem
    p splits items[p] items into segments[p] segments, reading items[p] - 1 keys
    from key_starts[p] when segments[p] > 1. Returns a bool [sum(items)] (the
    problems' items concatenated), True at the first item of every segment but
    the first. The segments - 1 smallest keys of a problem mark its cuts, as in
    the argpartition of _random_segmentation; one sort for all problems (keys
    sorted, then stably by problem) replaces a numpy call or two per problem."""
    num_keys = np.where(segments > 1, items - 1, 0)
    local = _ragged_arange(num_keys)
    k = keys[np.repeat(key_starts, num_keys) + local]
    problem = np.repeat(np.arange(len(items)), num_keys)
    order = np.argsort(k)
    order = order[np.argsort(problem[order], kind="stable")]  # problem p's keys, ascending
    chosen = order[local < np.repeat(segments - 1, num_keys)]  # `local` is also the rank here
    cuts = np.zeros(int(items.sum()), bool)
    cuts[(np.repeat(_starts(items), num_keys) + local + 1)[chosen]] = True  # key q cuts before item q + 1
    return cuts


def _segmented_cumsum(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.cumsum of x restarted at each piece of these lengths."""
    cs = np.cumsum(x)
    starts = _starts(lengths)
    return cs - np.repeat(cs[starts] - x[starts], lengths)


def _ragged_span_corruption(raw: np.ndarray, lengths: np.ndarray, noise: np.ndarray, spans: np.ndarray,
                            keys: np.ndarray, noise_keys: np.ndarray, clean_keys: np.ndarray,
                            sentinel0: int):
    """span_corruption's inputs and targets (without EOS) for pieces of different
    lengths, concatenated in `raw`: piece e has lengths[e] tokens, noise[e] noise
    tokens in spans[e] spans, and its noise and clean segmentations read their
    keys at noise_keys[e] and clean_keys[e]. The same values as
    random_spans_noise_mask then _spans_to_sentinels row by row."""
    clean = lengths - noise
    noise_cuts = _segment_cuts(keys, noise_keys, noise, spans)
    clean_cuts = _segment_cuts(keys, clean_keys, clean, spans)
    # End of each clean segment within its piece's clean tokens: its cuts, then the total.
    ends = np.empty(int(spans.sum()), np.int64)
    last = np.zeros(len(ends), bool)
    last[_starts(spans) + spans - 1] = True
    ends[~last] = _ragged_arange(clean)[clean_cuts]
    ends[last] = clean
    # Noise token k of span t sits after k noise tokens and clean segments 0..t.
    noise_span = _segmented_cumsum(noise_cuts, noise)
    at = (np.repeat(_starts(lengths), noise) + _ragged_arange(noise)
          + ends[np.repeat(_starts(spans), noise) + noise_span])
    mask = np.zeros(len(raw), bool)
    mask[at] = True
    first_token = np.zeros(len(raw), bool)
    first_token[_starts(lengths)] = True

    def sentinels(m):  # _spans_to_sentinels over the concatenation, restarting per piece
        prev = np.empty_like(m)
        prev[0], prev[1:] = False, m[:-1]
        prev &= ~first_token
        first = m & ~prev
        out = np.where(first, sentinel0 + 1 - _segmented_cumsum(first, lengths), raw)
        return out[~(m & prev)]

    return sentinels(mask), clean + spans, sentinels(~mask), noise + spans


class Objective:
    """Turns tokenized documents into examples that fit one packed row.

    Documents are cut into chunks whose raw length is the longest the chosen
    denoiser can turn into an example fitting the row (inputs_length and
    targets_length for encoder-decoder, their sum for decoder-only).
    """

    def __init__(self, kind: str, arch: str, inputs_length: int, targets_length: int, *,
                 eos_id: int, vocab_size: int, sentinel0: int = -1, num_sentinels: int = 0,
                 mode_ids: dict | None = None, rates=None, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, mlm_probability: float = 0.15,
                 first_ordinary_id: int = 6):
        self.kind, self.arch = kind, arch
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.eos_id, self.sentinel0, self.num_sentinels = eos_id, sentinel0, num_sentinels
        self.mlm_probability = mlm_probability
        self.random_range = (first_ordinary_id, vocab_size - num_sentinels)
        if kind == "ul2":
            self.denoisers = UL2_DENOISERS
            self.mode_ids = [mode_ids[d.mode] for d in UL2_DENOISERS]
            rates = np.asarray(rates if rates is not None else [1.0] * 7, np.float64)
            self.rates = rates / rates.sum()
        elif kind in ("span_corruption", "prefix_lm"):
            self.denoisers = (Denoiser(kind, "", mean_span_length, noise_density, kind == "prefix_lm"),)
            self.mode_ids, self.rates = [None], np.ones(1)
        else:
            self.denoisers, self.mode_ids, self.rates = (), [None], np.ones(1)
        self.raw_lengths = [self._raw_length(i) for i in range(max(1, len(self.denoisers)))]
        self._noise_counts: dict = {}

    # Lengths --------------------------------------------------------------
    def _fits(self, i: int, length: int) -> bool:
        d, mode = self.denoisers[i], int(self.mode_ids[i] is not None)
        n, s = noise_counts(length, d.density, d.mean_span)
        inputs, targets = mode + length - n + s + 1, n + s + 1
        if s > self.num_sentinels:
            return False
        if self.arch == "decoder":
            return inputs + targets <= self.inputs_length + self.targets_length
        return inputs <= self.inputs_length and targets <= self.targets_length

    def _raw_length(self, i: int) -> int:
        total = self.inputs_length + self.targets_length
        if self.kind == "causal_lm":
            return total
        if self.kind == "mlm":
            return self.inputs_length - 1
        d, mode = self.denoisers[i], int(self.mode_ids[i] is not None)
        if d.prefix_lm:  # every split point in [1, L-1] must fit: inputs m+p+1, targets L-p+1
            length = total - 2 - mode if self.arch == "decoder" else min(self.inputs_length - mode,
                                                                         self.targets_length)
        else:
            length = 2
            if not self._fits(i, length):
                length = 0
            # Fits is monotone up to rounding; step up while the next length fits.
            while self._fits(i, length + 1) or self._fits(i, length + 2):
                length += 1 if self._fits(i, length + 1) else 2
        if length < MIN_TOKENS:
            raise ValueError(f"config.data.inputs_length/targets_length "
                             f"({self.inputs_length}/{self.targets_length}) leave no room for "
                             f"{self.kind} {d.name} examples")
        return length

    # Examples -------------------------------------------------------------
    def __call__(self, docs: list[np.ndarray], rng) -> tuple[list[Example], int]:
        """Examples for a list of token arrays; returns (examples, skipped pieces)."""
        examples, skipped = self.ragged(docs, rng)
        return examples.to_list(), skipped

    def ragged(self, docs: list[np.ndarray], rng) -> tuple[Examples, int]:
        """__call__'s examples in ragged form (the same values and rng draws)."""
        if self.kind == "causal_lm":
            eos = np.array([self.eos_id], np.int32)
            docs = [np.concatenate([d, eos]) for d in docs]
        doc_lengths = [len(d) for d in docs]
        flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        # Every chunk but a document's last has >= MIN_TOKENS tokens: enough draws.
        n = sum(doc_lengths) // MIN_TOKENS + len(docs) + 1
        choices = iter(rng.choice(len(self.rates), size=n, p=self.rates).tolist())
        starts, lengths, denoisers, skipped, offset = [], [], [], 0, 0
        for length in doc_lengths:  # plain ints: a piece is (start in flat, length, denoiser)
            if length < MIN_TOKENS:
                skipped += 1
            else:
                pos = 0
                while pos < length:
                    i = next(choices)
                    take = min(self.raw_lengths[i], length - pos)
                    if take < MIN_TOKENS:
                        skipped += 1
                    else:
                        starts.append(offset + pos)
                        lengths.append(take)
                        denoisers.append(i)
                    pos += take
            offset += length
        # One set of draws per (denoiser, length), in order of first appearance.
        groups: dict = {}
        for j, key in enumerate(zip(denoisers, lengths)):
            groups.setdefault(key, []).append(j)
        if self.kind in ("causal_lm", "mlm"):
            out: list = [None] * len(starts)
            for (i, length), idx in groups.items():
                batch = np.stack([flat[starts[j]:starts[j] + length] for j in idx])
                for j, ex in zip(idx, self._examples(i, batch, rng)):
                    out[j] = ex
            return Examples.from_list(out), skipped
        return self._denoise(flat, starts, lengths, denoisers, groups, rng), skipped

    def _counts(self, i: int, length: int) -> tuple[int, int]:
        """noise_counts of denoiser i for pieces of this length, memoised: pieces
        of a few lengths recur in every block."""
        key = (i, length)
        c = self._noise_counts.get(key)
        if c is None:
            d = self.denoisers[i]
            c = self._noise_counts[key] = noise_counts(length, d.density, d.mean_span)
            if c[1] > min(c[0], length - c[0]):
                raise ValueError(f"{d.name}: {c[1]} noise spans do not fit {length} tokens "
                                 f"({c[0]} of them noise)")
        return c

    def _denoise(self, flat, starts, lengths, denoisers, groups, rng) -> Examples:
        """Span corruption and prefix-LM examples for all pieces of a block at once.

        The rng is read exactly as _examples reads it group by group: a span
        group's keys are rng.random((b, n - 1)) then rng.random((b, L - n - 1)),
        consecutive float64 draws, so the keys of consecutive span groups come
        from one rng.random call; a prefix-LM group's rng.integers(1, L, b) is
        a call of its own between them (bounded integers are not a plain
        concatenation of draws)."""
        span = {k: [] for k in ("piece", "noise", "spans", "noise_keys", "clean_keys")}
        prefix_pieces, prefix_splits, key_parts = [], [], []
        num_keys = pending = 0  # keys assigned so far / of those, not drawn yet
        for (i, length), idx in groups.items():
            b = len(idx)
            if self.denoisers[i].prefix_lm:
                if pending:
                    key_parts.append(rng.random(pending))
                    pending = 0
                prefix_pieces += idx
                prefix_splits.append(rng.integers(1, length, b))  # uniform over split points 1..L-1
                continue
            noise, spans = self._counts(i, length)
            span["piece"] += idx
            span["noise"] += [noise] * b
            span["spans"] += [spans] * b
            span["noise_keys"] += range(num_keys, num_keys + b * (noise - 1), noise - 1) if spans > 1 else [0] * b
            span["clean_keys"] += range(num_keys + b * (noise - 1), num_keys + b * (length - 2),
                                        length - noise - 1) if spans > 1 else [0] * b
            if spans > 1:
                num_keys += b * (length - 2)
                pending += b * (length - 2)
        if pending:
            key_parts.append(rng.random(pending))
        lengths, starts = np.asarray(lengths, np.int64), np.asarray(starts, np.int64)
        n = len(lengths)
        body_in, body_tg = np.zeros(n, np.int64), np.zeros(n, np.int64)  # lengths before mode/EOS
        parts = []  # (pieces, inputs, input lengths, targets, target lengths), each in its own order
        if span["piece"]:
            piece = np.asarray(span["piece"], np.int64)
            raw = flat[np.repeat(starts[piece], lengths[piece]) + _ragged_arange(lengths[piece])]
            keys = np.concatenate(key_parts) if key_parts else np.zeros(0)
            parts.append((piece, *_ragged_span_corruption(
                raw, lengths[piece], np.asarray(span["noise"], np.int64), np.asarray(span["spans"], np.int64),
                keys, np.asarray(span["noise_keys"], np.int64), np.asarray(span["clean_keys"], np.int64),
                self.sentinel0)))
        if prefix_pieces:
            piece = np.asarray(prefix_pieces, np.int64)
            split = np.concatenate(prefix_splits)
            local = _ragged_arange(lengths[piece])
            raw = flat[np.repeat(starts[piece], lengths[piece]) + local]
            is_input = local < np.repeat(split, lengths[piece])
            parts.append((piece, raw[is_input], split, raw[~is_input], lengths[piece] - split))
        for piece, _, li, _, lt in parts:
            body_in[piece], body_tg[piece] = li, lt
        # Assemble in piece order: [mode] inputs EOS, targets EOS.
        mode = np.array([-1 if m is None else m for m in self.mode_ids], np.int64)[np.asarray(denoisers, np.int64)] \
            if n else np.zeros(0, np.int64)
        has_mode = (mode >= 0).astype(np.int64)
        in_len, tg_len = has_mode + body_in + 1, body_tg + 1
        in_at, tg_at = _starts(in_len), _starts(tg_len)
        inputs = np.empty(int(in_len.sum()), np.int32)
        targets = np.empty(int(tg_len.sum()), np.int32)
        inputs[(in_at + in_len - 1)] = self.eos_id
        targets[(tg_at + tg_len - 1)] = self.eos_id
        inputs[in_at[has_mode == 1]] = mode[has_mode == 1]
        for piece, x, li, y, lt in parts:
            inputs[np.repeat(in_at[piece] + has_mode[piece], li) + _ragged_arange(li)] = x
            targets[np.repeat(tg_at[piece], lt) + _ragged_arange(lt)] = y
        did = np.asarray(denoisers, np.int64) if self.kind == "ul2" else np.zeros(n, np.int64)
        return Examples(inputs, in_len, targets, tg_len, did)

    def _examples(self, i: int, tokens: np.ndarray, rng) -> list[Example]:
        b, length = tokens.shape
        eos = np.full((b, 1), self.eos_id, np.int32)
        if self.kind == "causal_lm":
            return [Example(np.zeros(0, np.int32), t) for t in tokens]
        if self.kind == "mlm":
            inputs, selected = bert_mask(tokens, rng, self.mlm_probability, self.sentinel0,
                                         *self.random_range)
            inputs, targets = np.concatenate([inputs, eos], 1), np.concatenate([tokens, eos], 1)
            weights = np.concatenate([selected, np.zeros((b, 1), bool)], 1).astype(np.int32)
            return [Example(x, y, 0, w) for x, y, w in zip(inputs, targets, weights)]
        d = self.denoisers[i]
        if d.prefix_lm:
            split = rng.integers(1, length, b)  # uniform over split points 1..L-1
            pairs = [(np.concatenate([t[:p], [self.eos_id]]), np.concatenate([t[p:], [self.eos_id]]))
                     for t, p in zip(tokens, split)]
        else:
            inputs, targets = span_corruption(tokens, rng, d.density, d.mean_span,
                                              self.sentinel0, self.eos_id)
            pairs = list(zip(inputs, targets))
        mode = self.mode_ids[i]
        if mode is not None:
            pairs = [(np.concatenate([[mode], x]), y) for x, y in pairs]
        did = i if self.kind == "ul2" else 0
        return [Example(x.astype(np.int32), y.astype(np.int32), did) for x, y in pairs]
