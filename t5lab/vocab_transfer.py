"""Vocabulary transfer: a Hugging Face checkpoint re-based on another SentencePiece vocabulary.

    t5lab transfer-vocab --from-hf SRC --tokenizer NEW.model --out DIR
                         [--method fvt|overlap|random] [--extend] [--seed N]

Every tensor but the token rows is copied. The token rows, the input embeddings
(`shared.weight`) and an untied head (`lm_head.weight`, by the same rule; a
tied model has only the first), are built per piece of the new vocabulary, in
this order of precedence:

1. Roles (every method): pad, eos, unk (and bos) take the source's row of the
   same role, found by the SentencePiece models' ids; the sentinels
   <extra_id_N> and the UL2 mode tokens [NLU] [NLG] [S2S] the source's row of
   the same piece, whatever ids either vocabulary gives them.
2. fvt, overlap: a piece the source vocabulary also has (the same string; not a
   control or unknown piece, which have roles) keeps its source row.
3. The rest:
   fvt      the mean of the source rows of the piece's tokenization by the
            source tokenizer (FVT: Gee et al. 2022, "Fast Vocabulary Transfer for
            Language Model Compression", github.com/LeonidasY/fast-vocabulary-transfer,
            fvt/fvt.py tokens_mapping/embeddings_assignment). `_piece_text` says
            how a piece becomes text and where this departs from that code.
   overlap  drawn from N(mean, cov) of the source rows (seeded), as the
            "intersect + multivariate normal" baseline of Mundra et al. 2024
            (github.com/AI4Bharat/VocabAdaptation_LLM,
            InitializationWordEmbed/embed_matrix_init_save.py) and Hewitt's
            "Initializing new word embeddings" (nlp.stanford.edu/~johnhew/
            vocab-expansion.html): mean and covariance over the source's token
            rows, the covariance divided by n. Those scale the covariance by 1e-5
            (transformers' resize_token_embeddings(mean_resizing=True): 1e-9) to
            stay near the mean; here the full covariance is the default
            (cov_scale=1), so drawn rows spread like real ones, as WECHSEL's
            random fallback N(mean, std) does per dimension (github.com/CPJKU/
            wechsel, wechsel/__init__.py create_target_embeddings, which also
            copies the special tokens' rows by string, as step 1 does).
   random   t5lab's own initialiser for that row (layers.Embed: N(0, 1);
            layers.DenseHead: fan-in truncated normal), for every row but the
            roles of step 1: the no-transfer baseline.
   A piece with no text (a control piece without a role counterpart, a byte
   >= 0x80 the source has no byte piece for) is drawn as in overlap, under fvt too.

--extend keeps the source vocabulary (ids, pieces, scores, rows) and appends the
new vocabulary's normal pieces that the source tokenizer splits into more than
one piece, as one merged SentencePiece model (`merged_model`).

The output's vocabulary is the new SentencePiece model as hf.write_tokenizer
lays it out for transformers: its pieces, then T5's 100 sentinels when it has
none (not for a decoder-only model); model.vocab_size is exactly that many rows.
The directory is written by hf.save_pretrained: config.json (the model's t5lab
config in transformers' form, which `t5lab train --config.init.from_hf=DIR`
adopts), the weights, generation_config.json and the tokenizer files.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from t5lab import hf
from t5lab.config import ConfigError
from t5lab.data import tokenizer as tok_lib

METHODS = ("fvt", "overlap", "random")
WORD = "\u2581"  # SentencePiece's word boundary (an escaped space)
# sentencepiece_model.proto piece types and model types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1
ROLES = ("pad", "eos", "unk", "bos")
# An appended piece's score over the sum of its source segmentation's scores,
# per old piece it merges away: above float32 rounding of such sums (~1e-5),
# small against the gaps between competing segmentations (see merged_model).
EXTEND_MARGIN = 1e-3
USAGE_LINE = ("usage: t5lab transfer-vocab --from-hf SRC --tokenizer NEW.model --out DIR "
              "[--method fvt|overlap|random] [--extend] [--seed N]")


def _proto(path: str):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    proto = model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


@dataclass
class Vocab:
    """A vocabulary as transformers sees it (hf.write_tokenizer's layout)."""
    proto: object                # the SentencePiece ModelProto
    pieces: list[str]            # by id: the model's pieces (+ appended sentinels)
    types: list[int]
    roles: dict[str, int]        # pad/eos/unk/bos -> id, those the model has
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {p: i for i, p in enumerate(self.pieces)}

    def __len__(self):
        return len(self.pieces)


def read_vocab(spm_path: str, rows: int | None = None, llama: bool = False) -> Vocab:
    """The vocabulary of a SentencePiece model with T5's 100 sentinels appended
    (<extra_id_0> last) when it has none, exactly when hf.write_tokenizer
    appends them for a model of `rows` embedding rows (None: unchecked)."""
    import sentencepiece as spm
    proto = _proto(spm_path)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    pieces, types = [p.piece for p in proto.pieces], [p.type for p in proto.pieces]
    n = hf.T5_EXTRA_IDS
    if not llama and tok_lib.sentinel_piece(0) not in pieces and (rows is None or len(pieces) + n <= rows):
        pieces += [tok_lib.sentinel_piece(i) for i in reversed(range(n))]
        types += [USER_DEFINED] * n
    roles = {r: getattr(sp, f"{r}_id")() for r in ROLES}
    return Vocab(proto, pieces, types, {r: i for r, i in roles.items() if i >= 0})


def _special(piece: str) -> bool:
    """A piece matched by role whatever the method: a sentinel or a UL2 mode token."""
    return piece in tok_lib.MODE_TOKENS or (piece.startswith("<extra_id_") and piece.endswith(">"))


def _piece_text(piece: str, typ: int) -> str | None:
    """The text whose source tokenization gives an fvt row, or None.

    FVT's code strips a leading "▁" (or "##", "Ġ") and tokenizes the rest with
    the source tokenizer; for a SentencePiece tokenizer that tokenizes it as a
    word at the start of a text (its dummy prefix puts the "▁" back), for
    "▁foo" and "foo" alike. Here "▁" stays a space and the text is tokenized
    by `continuation_processor` (no dummy prefix): "▁foo" becomes " foo", which
    the source tokenizes exactly as the word "foo" at a word start (FVT's
    tokens); "foo" stays "foo", a word-internal continuation whose first piece
    has no "▁", as the piece itself has none: SentencePiece gives "▁foo" and
    "foo" different rows, and a continuation's row is then the mean of
    continuation rows (FVT's code would give it word-start ones). A "▁" inside
    a piece is a space there too. User-defined pieces are their literal text
    (SentencePiece emits them wherever the text occurs); a byte piece <0xNN>
    below 0x80 is that ASCII character; other bytes, control and unused pieces
    have no text."""
    if typ in (NORMAL, USER_DEFINED):
        return piece.replace(WORD, " ")
    if typ == BYTE:
        b = int(piece[3:-1], 16)
        return chr(b) if b < 0x80 else None
    return None


def continuation_processor(proto):
    """The source tokenizer without its dummy prefix and whitespace cleanup, so
    that text is tokenized exactly as written: a leading space is a "▁" word
    start, no leading space a continuation (see _piece_text)."""
    import sentencepiece as spm
    p = type(proto)()
    p.CopyFrom(proto)
    p.normalizer_spec.add_dummy_prefix = False
    p.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=p.SerializeToString())


def _tokenize(sp, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in sp.encode(texts)] if texts else []


def plan_rows(src: Vocab, new: Vocab, method: str, sp) -> list[tuple[str, object]]:
    """How each new id's row is made: ("role" | "same", source id), ("fvt",
    [source ids]), ("draw", None) or ("init", None); `sp` is the source's
    continuation_processor (used by fvt)."""
    plan: list[tuple[str, object]] = [None] * len(new)
    role_of = {i: r for r, i in new.roles.items()}
    text_rows, texts = [], []
    for j, (piece, typ) in enumerate(zip(new.pieces, new.types)):
        role = role_of.get(j)
        if role in src.roles:
            plan[j] = ("role", src.roles[role])
        elif role is None and _special(piece) and piece in src.index:
            plan[j] = ("role", src.index[piece])
        elif method != "random" and typ not in (CONTROL, UNKNOWN) and piece in src.index \
                and src.types[src.index[piece]] not in (CONTROL, UNKNOWN):
            plan[j] = ("same", src.index[piece])
        elif method == "random":
            plan[j] = ("init", None)
        elif method == "fvt" and _piece_text(piece, typ):
            text_rows.append(j)
            texts.append(_piece_text(piece, typ))
        else:
            plan[j] = ("draw", None)
    for j, ids in zip(text_rows, _tokenize(sp, texts)):
        plan[j] = ("fvt", ids) if ids else ("draw", None)  # text the normaliser deletes
    return plan


def merged_model(src: Vocab, new: Vocab, sp):
    """(ModelProto, [(piece, source segmentation ids)]): the source model with
    the new vocabulary's normal pieces that the source tokenizer (`sp`, its
    continuation_processor) splits into more than one piece appended, in the
    new vocabulary's order. Old ids keep their pieces, types and scores; a
    source whose sentinels transformers appends gets them as pieces at those
    same ids, so that the merged model carries them below the appended pieces.

    Scores (the new model's own are on another scale and would re-segment
    at will): an appended piece of k source pieces scores the sum of their
    scores plus EXTEND_MARGIN * (k - 1). Unigram segmentation maximises the
    sum of scores, and that sum is the best any run of old pieces spelling the
    piece can score, so the piece beats exactly that run, and beats a chain of
    shorter appended pieces spelling the same (each earns the margin only for
    the pieces it merges): the new best path is the old one with runs merged
    into as few appended pieces as possible. The old pieces' segmentation is
    kept: text containing no appended piece is segmented exactly as before,
    other text as before up to those merges, except where the old best path
    was within a few margins of another."""
    proto = type(src.proto)()
    proto.CopyFrom(src.proto)
    for piece in src.pieces[len(proto.pieces):]:  # transformers' appended sentinels
        proto.pieces.add(piece=piece, score=0.0, type=USER_DEFINED)
    scores = np.array([p.score for p in src.proto.pieces], np.float64)
    cands = [p for p, t in zip(new.pieces, new.types) if t == NORMAL and p not in src.index]
    appended = []
    for piece, ids in zip(cands, _tokenize(sp, [p.replace(WORD, " ") for p in cands])):
        if len(ids) > 1:
            score = scores[ids].sum() + EXTEND_MARGIN * (len(ids) - 1)
            proto.pieces.add(piece=piece, score=float(score), type=NORMAL)
            appended.append((piece, ids))
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto, appended


def draw(rows: np.ndarray, n: int, rng, cov_scale: float = 1.0) -> np.ndarray:
    """n rows from N(mean, cov_scale * cov) of `rows` (cov divided by len(rows),
    as Hewitt and transformers compute it); eigh accepts a singular cov."""
    x = np.asarray(rows, np.float64)
    mean = x.mean(0)
    c = x - mean
    cov = c.T @ c / len(x)
    return rng.multivariate_normal(mean, cov_scale * cov, size=n, method="eigh")


def t5lab_init(n: int, d: int, seed: int, head: bool) -> np.ndarray:
    """[n, d] rows as t5lab initialises them: layers.Embed's embedding, or
    layers.DenseHead's kernel (transposed to rows)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from t5lab.models import layers
    key = jax.random.fold_in(jax.random.key(seed), int(head))
    if head:
        v = layers.DenseHead(n).init(key, jnp.zeros((1, d), jnp.float32))
        return np.asarray(nn.unbox(v["params"])["kernel"]).T
    v = layers.Embed(n, d).init(key, jnp.zeros((1,), jnp.int32))
    return np.asarray(nn.unbox(v["params"])["embedding"])


def build_rows(src_rows: np.ndarray, plan, rng, init_rows=None, cov_scale: float = 1.0) -> np.ndarray:
    """The new [len(plan), d] float32 rows from the source's token rows."""
    out = np.empty((len(plan), src_rows.shape[1]), np.float32)
    drawn = []
    for j, (kind, x) in enumerate(plan):
        if kind in ("role", "same", "keep"):
            out[j] = src_rows[x]
        elif kind == "fvt":
            out[j] = src_rows[x].astype(np.float64).mean(0)
        elif kind == "init":
            out[j] = init_rows[j]
        else:
            drawn.append(j)
    if drawn:
        out[drawn] = draw(src_rows, len(drawn), rng, cov_scale)
    return out


# ------------------------------------------------------------------ checks
def _source_spm(src_dir: str) -> str | None:
    return next((os.path.join(src_dir, n) for n in hf.SPM_FILES
                 if os.path.isfile(os.path.join(src_dir, n))), None)


def _check_t5_ids(new_spm: str) -> None:
    """The checkpoint hf.save_pretrained writes declares pad 0 and eos 1 (config.json)
    and the pieces <pad> </s> <unk> (tokenizer_config.json), and t5lab pads with 0:
    a vocabulary without them at those ids would be written inconsistent. (The
    rows follow the roles whatever the ids: plan_rows.)"""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=new_spm)
    got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    for role, piece, want in (("pad", "<pad>", 0), ("eos", "</s>", 1), ("unk", "<unk>", None)):
        i = got[role]
        if i < 0 or (want is not None and i != want) or sp.id_to_piece(i) != piece:
            raise ConfigError(f"--tokenizer: {new_spm} has {role} {sp.id_to_piece(i) if i >= 0 else 'none'!s} "
                              f"at id {i}; a T5 checkpoint needs {piece} at id "
                              f"{want if want is not None else 'any'} (pad 0, eos 1: "
                              f"tools/train_tokenizer.py's layout)")


def check_inputs(src_dir: str, new_spm: str, out_dir: str, method: str, extend: bool) -> tuple[str, dict]:
    """(source SentencePiece model, source config.json) or ConfigError naming
    the argument and file; reads no weights, writes nothing."""
    if method not in METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    cfg = os.path.join(src_dir, "config.json")
    if not os.path.isdir(src_dir):
        raise ConfigError(f"--from-hf: {src_dir} is not a directory")
    if not os.path.isfile(cfg):
        raise ConfigError(f"--from-hf: {src_dir} has no config.json (not a Hugging Face checkpoint)")
    try:
        with open(cfg) as f:
            hf_json = json.load(f)
        hf.hf_config(hf.config_from_hf(hf_json, has_lm_head=True))  # a model t5lab reads and writes
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"--from-hf: {cfg}: {str(e).strip(chr(39))}") from None
    if not any(os.path.isfile(os.path.join(src_dir, n)) for n in (hf.WEIGHTS, hf.INDEX)):
        raise ConfigError(f"--from-hf: {src_dir} has no {hf.WEIGHTS} (or its index)")
    src_spm = _source_spm(src_dir)
    if src_spm is None:
        raise ConfigError(f"--from-hf: {src_dir} holds no SentencePiece model ({' or '.join(hf.SPM_FILES)}); "
                          f"the source vocabulary is needed")
    for flag, path in (("--from-hf", src_spm), ("--tokenizer", new_spm)):
        try:
            tok_lib.Tokenizer(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{flag}: {e}") from None
    if not extend:  # the merged model of --extend has the source's special pieces
        _check_t5_ids(new_spm)
    src_size = len(_proto(src_spm).pieces)
    if src_size > hf_json.get("vocab_size", src_size):
        raise ConfigError(f"--from-hf: {src_spm} has {src_size} pieces, more than the model's "
                          f"{hf_json['vocab_size']} embedding rows")
    if extend and _proto(src_spm).trainer_spec.model_type != UNIGRAM:
        raise ConfigError(f"--extend: {src_spm} is not a unigram model; only a unigram model's "
                          f"scores can place appended pieces")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out: {out_dir} is a file")
    if os.path.realpath(out_dir) == os.path.realpath(src_dir):
        raise ConfigError(f"--out: {out_dir} is the source directory; write the new checkpoint elsewhere")
    return src_spm, hf_json


# ---------------------------------------------------------------- transfer
def transfer(src_dir: str, new_spm: str, out_dir: str, method: str = "fvt", extend: bool = False,
             seed: int = 0, cov_scale: float = 1.0) -> dict:
    """Writes the re-based checkpoint to out_dir; returns a summary (rows per
    kind, appended pieces). Bad input raises ConfigError before any work."""
    src_spm, hf_json = check_inputs(src_dir, new_spm, out_dir, method, extend)
    params, config = hf.load_pretrained(src_dir)
    m = config.model
    llama = m.arch == "decoder"
    emb = np.asarray(params["token_embedder"]["embedding"])
    head = params.get("lm_head", {}).get("kernel")  # [d_model, vocab]: untied only
    src = read_vocab(src_spm, rows=emb.shape[0], llama=llama)
    sp = continuation_processor(src.proto)
    with tempfile.TemporaryDirectory() as tmp:
        appended = []
        if extend:
            proto, appended = merged_model(src, read_vocab(new_spm, llama=llama), sp)
            spm_out = os.path.join(tmp, os.path.basename(src_spm))
            with open(spm_out, "wb") as f:
                f.write(proto.SerializeToString())
            new = read_vocab(spm_out, rows=len(proto.pieces), llama=llama)  # nothing appended twice
            plan = [("keep", i) for i in range(len(src))]
            for _, ids in appended:
                plan.append({"fvt": ("fvt", ids), "overlap": ("draw", None), "random": ("init", None)}[method])
        else:
            spm_out = new_spm
            new = read_vocab(new_spm, llama=llama)
            plan = plan_rows(src, new, method, sp)
        rng = np.random.default_rng(seed)
        need_init = any(k == "init" for k, _ in plan)
        tensors = [("token_embedder", "embedding", emb, False)]
        if head is not None:
            tensors.append(("lm_head", "kernel", np.asarray(head).T, True))
        for module, name, rows, is_head in tensors:
            init = t5lab_init(len(new), rows.shape[1], seed, is_head) if need_init else None
            new_rows = build_rows(rows[:len(src)], plan, rng, init, cov_scale)
            params[module][name] = np.ascontiguousarray(new_rows.T if is_head else new_rows)
        m.vocab_size = len(new)
        if llama and "max_position_embeddings" in hf_json:  # hf_config writes the data lengths' sum
            mpe = int(hf_json["max_position_embeddings"])
            config.data.inputs_length, config.data.targets_length = mpe - mpe // 2, mpe // 2
        hf.save_pretrained(params, config, out_dir, spm_model=spm_out)
    counts = {}
    for kind, _ in plan:
        counts[kind] = counts.get(kind, 0) + 1
    return {"vocab_size": len(new), "rows": counts, "appended": [p for p, _ in appended], "method": method}


# --------------------------------------------------------------------- cli
_VALUED = ("from_hf", "tokenizer", "out", "method", "seed")


def parse_args(argv: list[str]) -> dict:
    """`--name value` / `--name=value` options (- or _ in names), --extend a switch."""
    args, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; {USAGE_LINE}")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key == "extend":
            if eq:
                raise ConfigError("--extend: takes no value")
            args[key] = True
        elif key in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{name}: needs a value")
                i += 1
                value = argv[i]
            args[key] = value
        else:
            raise ConfigError(f"--{name}: unknown option")
        i += 1
    for key in ("from_hf", "tokenizer", "out"):
        if key not in args:
            raise ConfigError(f"--{key.replace('_', '-')}: missing; {USAGE_LINE}")
    try:
        args["seed"] = int(args.get("seed", 0))
    except ValueError:
        raise ConfigError(f"--seed: {args['seed']!r} is not an integer") from None
    args.setdefault("method", "fvt")
    args.setdefault("extend", False)
    return args


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    s = transfer(a["from_hf"], a["tokenizer"], a["out"], a["method"], a["extend"], a["seed"])
    rows = ", ".join(f"{k} {v}" for k, v in sorted(s["rows"].items()))
    extra = f"; appended {len(s['appended'])} pieces to the source vocabulary" if a["extend"] else ""
    print(f"wrote {a['out']}: {s['vocab_size']} rows ({rows}) by {s['method']}{extra}; "
          f"train from it with t5lab train --config.init.from_hf={a['out']}")
