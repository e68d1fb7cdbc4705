"""SentencePiece tokenizer with T5's id conventions, and the default one.

Ids: pad 0, eos 1, unk 2, the UL2 mode tokens [NLU] [NLG] [S2S] as user-defined
pieces, and 100 sentinels with <extra_id_0> the highest id of the vocabulary
(counting down), exactly where T5 and seqio put them.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
NUM_SENTINELS = 100
# Bump when the training recipe changes so cached default tokenizers are retrained.
_RECIPE_VERSION = 1
# Text fed to the trainer for the default tokenizer: enough for a stable
# unigram model, small enough to train in well under a minute on one core.
_DEFAULT_TRAIN_CHARS = 3_000_000
NEWLINE = "\n"  # a piece of its own with train(keep_newlines=True)


# SentencePiece returns a Python int per id of one encode call (~70 bytes
# each): a long document is encoded in parts of at most this many characters.
MAX_ENCODE_CHARS = 1 << 20


def split_long(text: str, limit: int, dummy_prefix: bool) -> list[str]:
    """`text` in parts of at most `limit` characters whose encodings, joined,
    are the encoding of `text` up to ties between equally scored segmentations
    (their Viterbi sums start elsewhere): each cut is at a lone space between
    two words, where no piece can span it (pieces carry their `▁` in front);
    with a dummy prefix the space is dropped, since encoding a part puts it back."""
    if len(text) <= limit:
        return [text]
    out, start = [], 0
    while len(text) - start > limit:
        j = start + limit - 1
        while j > start and not (text[j] == " " and not text[j - 1].isspace() and not text[j + 1].isspace()):
            j -= 1
        if j <= start:
            return out + [text[start:]]  # no lone space to cut at: one part
        out.append(text[start:j])
        start = j + 1 if dummy_prefix else j
    out.append(text[start:])
    return out


def sentinel_piece(i: int) -> str:
    return f"<extra_id_{i}>"


class Tokenizer:
    """A loaded SentencePiece model; encoding is batched in C++."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer {path!r} is not a SentencePiece model: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.eos_id, self.unk_id = self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()
        ids = [self._sp.piece_to_id(sentinel_piece(i)) for i in range(NUM_SENTINELS)]
        # piece_to_id returns unk for an unknown piece.
        self.num_sentinels = next((i for i, t in enumerate(ids) if t == self.unk_id), NUM_SENTINELS)
        self._sentinel0 = ids[0] if self.num_sentinels else -1
        self.mode_ids = {p: self._sp.piece_to_id(p) for p in MODE_TOKENS}
        self.has_mode_tokens = all(t != self.unk_id for t in self.mode_ids.values())
        # Trained with keep_newlines: "\n" is a piece; otherwise it encodes as <0x0A>.
        self.keeps_newlines = self._sp.piece_to_id(NEWLINE) != self.unk_id
        self.dummy_prefix = self._sp.encode_as_pieces("a")[0].startswith("\u2581")

    def sentinel_id(self, i: int) -> int:
        """Id of <extra_id_i>; ids count down from the top as in T5."""
        if i >= self.num_sentinels:
            raise ValueError(f"tokenizer {self.path!r} has {self.num_sentinels} sentinels, "
                             f"<extra_id_{i}> is needed (train one with tools/train_tokenizer.py)")
        return self._sentinel0 - i

    @property
    def sentinels_ordered(self) -> bool:
        """True when <extra_id_i> == <extra_id_0> - i for all i (T5's layout)."""
        return self.num_sentinels == NUM_SENTINELS and all(
            self._sp.piece_to_id(sentinel_piece(i)) == self._sentinel0 - i for i in range(NUM_SENTINELS))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        texts = list(texts)
        if max(map(len, texts), default=0) <= MAX_ENCODE_CHARS:
            return [np.asarray(x, np.int32) for x in self._sp.encode(texts)]
        return [self.encode(t) for t in texts]

    def encode(self, text: str) -> np.ndarray:
        parts = split_long(text, MAX_ENCODE_CHARS, self.dummy_prefix)
        if len(parts) == 1:
            return np.asarray(self._sp.encode(text), np.int32)
        return np.concatenate([np.asarray(x, np.int32) for x in self._sp.encode(parts)])

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):  # grain worker processes pickle the pipeline
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def train(texts, model_path: str, vocab_size: int, *, max_sentences: int = 500_000,
          keep_newlines: bool = False) -> str:
    """Trains a unigram model with byte fallback and T5's special ids.

    `texts` is an iterable of strings (each split into lines for the trainer).
    "\n" then encodes as the byte piece <0x0A>; with keep_newlines it is a
    user-defined piece (id 6, after the mode tokens) that never merges with its
    neighbours. Both round-trip exactly and cost one token (docs/data.md).
    The sentinels are appended after training so that <extra_id_0> is the top id;
    SentencePiece itself would place user-defined pieces at the bottom.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    specials = 3 + len(MODE_TOKENS) + 256 + NUM_SENTINELS  # pad/eos/unk, modes, bytes, sentinels
    if vocab_size < specials + 32:
        raise ValueError(f"vocab_size {vocab_size} is too small: {specials} ids are special pieces "
                         f"(byte fallback, sentinels, mode tokens); use at least {specials + 32}")

    def lines():
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line

    d = os.path.dirname(os.path.abspath(model_path)) or "."
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab_size - NUM_SENTINELS,
            model_type="unigram", byte_fallback=True, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            bos_id=-1, user_defined_symbols=list(MODE_TOKENS) + [NEWLINE] * keep_newlines,
            character_coverage=0.9995,
            # Keep whitespace as written: code and layout must round-trip.
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=1, minloglevel=2, train_extremely_large_corpus=False)
        proto = model_pb2.ModelProto()
        with open(prefix + ".model", "rb") as f:
            proto.ParseFromString(f.read())
        # hard_vocab_limit=False may leave the model slightly smaller; pad with
        # unused user-defined pieces so the size is exactly vocab_size.
        base = vocab_size - NUM_SENTINELS
        for i in range(len(proto.pieces), base):
            p = proto.pieces.add(piece=f"<unused_{i}>", score=0.0)
            p.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
        for i in reversed(range(NUM_SENTINELS)):
            p = proto.pieces.add(piece=sentinel_piece(i), score=0.0)
            p.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
        out = prefix + ".final"
        with open(out, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(out, model_path)  # atomic: concurrent processes never see half a file
    return model_path


def default_cache_path(vocab_size: int, cache_dir: str | None = None) -> str:
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "t5lab")
    # The embedded corpus is the interpreter's standard library: key by its minor version
    # (a micro upgrade must not retrain it; a run uses WORKDIR/tokenizer.model anyway).
    ver = f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(cache_dir, "tokenizers", f"embedded-{ver}-v{vocab_size}-r{_RECIPE_VERSION}.model")


def resolve(config, cache_dir: str | None = None) -> str:
    """Path of the SentencePiece model for `config`; trains the default once."""
    path = config.data.tokenizer
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.data.tokenizer: no file {path!r}")
        return path
    from t5lab.data import prepared
    path = prepared.tokenizer_of(config)
    if path:
        return path
    vocab = int(config.model.vocab_size)
    out = default_cache_path(vocab, cache_dir)
    if os.path.isfile(out):
        return out
    from t5lab.data import sources
    docs = sources.embedded_documents()
    # A fixed, seed-independent sample spread over the whole corpus.
    order = sorted(range(len(docs)), key=lambda i: hashlib.md5(str(i).encode()).digest())
    sample, n = [], 0
    for i in order:
        if n >= _DEFAULT_TRAIN_CHARS:
            break
        sample.append(docs[i])
        n += len(sample[-1])
    try:
        return train(sample, out, vocab)
    except ValueError as e:
        raise ValueError(f"config.model.vocab_size: {e}") from None
