"""`t5lab transfer-vocab`: a tiny T5 v1.1 (t5lab's shapes, exported by
hf.save_pretrained) on a SentencePiece model trained on Python code is re-based
on one trained on German-like text. Expected rows come from the source files
and the source SentencePiece model directly (its own encoder, or a Viterbi
search written here), never from t5lab.vocab_transfer."""
import json
import math
import os
import random

import jax
import numpy as np
import pytest
import sentencepiece as spm
from safetensors.numpy import load_file
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from t5lab import cli, config as config_lib, hf, models, vocab_transfer
from t5lab.data import sources, tokenizer as tok_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SRC_PIECES, NEW_PIECES, ROWS = 800, 900, 832  # 32 padding rows past the source tokenizer
D = 64  # configs/t5_1_1.py:tiny's d_model
W = "\u2581"


def german(n_lines=1500, seed=0):
    """Compound-heavy German-like text: pieces the code tokenizer splits."""
    roots = ["haus", "bahn", "hof", "wissen", "schaft", "kraft", "werk", "zeug", "stadt", "rat", "land",
             "wirt", "arbeit", "geber", "fahr", "rad", "weg", "berg", "see", "wasser", "licht", "schiff",
             "zeit", "geist", "kinder", "garten", "straße", "brücke", "bäcker", "mühle", "grün", "wald"]
    words = ["der", "die", "das", "und", "ist", "nicht", "mit", "für", "über", "unter", "wird", "wurde",
             "sehr", "auch", "noch", "schön", "groß", "klein", "heute", "morgen", "gestern", "möchte"]
    rng = random.Random(seed)

    def compound():
        w = "".join(rng.choice(roots) for _ in range(rng.randint(1, 3)))
        w += rng.choice(["", "", "ung", "en", "er", "lich", "heit", "keit", "s"])
        return w.capitalize() if rng.random() < 0.5 else w
    return "\n".join(" ".join(rng.choice(words) if rng.random() < 0.4 else compound()
                              for _ in range(rng.randint(5, 14))) + "." for _ in range(n_lines))


def code_docs(step=80):
    root = sources.embedded_root()
    out = []
    for rel in sources.embedded_files()[::step]:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            out.append(f.read())
    return out


def proto(path):
    p = model_pb2.ModelProto()
    with open(path, "rb") as f:
        p.ParseFromString(f.read())
    return p


def make_source(out, spm_model, tie=False):
    """A t5lab model's params with known row statistics, exported. Shapes from
    t5lab (eval_shape: no slow init); token rows N(mu, diag(sig^2)), the head's
    another distribution, padding rows far off (they must be left out of any
    statistic and never copied)."""
    import flax.linen as nn
    cfg = config_lib.load("configs/t5_1_1.py:tiny", [f"model.vocab_size={ROWS}", f"model.tie_embeddings={tie}"])
    init = models.build(cfg).init
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0), models.dummy_batch(cfg, 1))["params"])
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
    mu, sig = np.linspace(-2, 2, D), np.linspace(0.5, 1.5, D)
    emb = mu + sig * rng.normal(size=(ROWS, D))
    emb[SRC_PIECES:] = 100.0
    params["token_embedder"]["embedding"] = emb.astype(np.float32)
    if not tie:
        head = -0.5 * mu + 0.3 * rng.normal(size=(ROWS, D))
        head[SRC_PIECES:] = -100.0
        params["lm_head"]["kernel"] = np.ascontiguousarray(head.T.astype(np.float32))
    hf.save_pretrained(params, cfg, str(out), spm_model=spm_model)
    return str(out)


@pytest.fixture(scope="module")
def plain_spm(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("plain") / "plain")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(german(400, seed=3).splitlines()),
                                   model_prefix=prefix, vocab_size=300, minloglevel=2,
                                   user_defined_symbols=["[S2S]", "[NLU]", "[NLG]"])
    return prefix + ".model"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab_transfer")
    code = code_docs()
    src_spm = tok_lib.train(code, str(d / "src.model"), SRC_PIECES)
    new_spm = tok_lib.train([german(), code[0]], str(d / "new.model"), NEW_PIECES)
    src_dir = make_source(d / "src_hf", src_spm)
    state = load_file(os.path.join(src_dir, hf.WEIGHTS))
    outs = {}

    def out(method="fvt", extend=False, seed=0):
        key = (method, extend, seed)
        if key not in outs:
            path = str(d / f"out_{method}_{extend}_{seed}")
            vocab_transfer.transfer(src_dir, new_spm, path, method=method, extend=extend, seed=seed)
            outs[key] = (path, load_file(os.path.join(path, hf.WEIGHTS)))
        return outs[key]
    return dict(dir=d, src_spm=src_spm, new_spm=new_spm, src_dir=src_dir, out=out,
                emb=state["shared.weight"], head=state["lm_head.weight"],
                src_sp=spm.SentencePieceProcessor(model_file=src_spm), src_proto=proto(src_spm),
                new_proto=proto(new_spm))


# ------------------------------------------------ the source's tokenization
NORMAL, USER_DEFINED, BYTE, CONTROL, UNKNOWN = 1, 4, 6, 3, 2


def viterbi(p, text):
    """The source model's unigram segmentation of `text` (spaces already as "▁",
    no dummy prefix): the best sum of normal pieces' scores; a character no
    piece covers is SentencePiece's unk node (min score - 10) emitted as its
    UTF-8 byte pieces (byte fallback)."""
    score = {x.piece: (i, x.score) for i, x in enumerate(p.pieces) if x.type == NORMAL}
    byte = {x.piece: i for i, x in enumerate(p.pieces) if x.type == BYTE}
    unk = min(s for _, s in score.values()) - 10.0
    longest = max(map(len, score))
    best, back = [0.0] + [-math.inf] * len(text), [None] * (len(text) + 1)
    for i in range(len(text)):
        if best[i] == -math.inf:
            continue
        for j in range(i + 1, min(len(text), i + longest) + 1):
            if text[i:j] in score and best[i] + score[text[i:j]][1] > best[j]:
                best[j], back[j] = best[i] + score[text[i:j]][1], (i, [score[text[i:j]][0]])
        if text[i] not in score and best[i] + unk > best[i + 1]:
            ids = [byte[f"<0x{b:02X}>"] for b in text[i].encode("utf-8")]
            best[i + 1], back[i + 1] = best[i] + unk, (i, ids)
    ids, j = [], len(text)
    while j:
        i, seg = back[j]
        ids, j = seg + ids, i
    return ids


def source_tokens(world, piece):
    """The source tokenization of a new piece, as the brief defines it: "▁foo"
    is the word "foo" at a word start (the source's own encoder, whose dummy
    prefix makes it one), "foo" a continuation (no "▁" before its first piece)."""
    if piece.startswith(W):
        return world["src_sp"].encode(piece[1:].replace(W, " "))
    return viterbi(world["src_proto"], piece)


def expected_rows(world, rows):
    """{new id: expected row} for fvt: roles, same pieces, the mean of the
    source tokenization's rows; plus the ids of each kind."""
    src = {x.piece: i for i, x in enumerate(world["src_proto"].pieces) if x.type not in (CONTROL, UNKNOWN)}
    want, kinds = {}, {"role": [], "same": [], "start": [], "cont": []}
    for j, x in enumerate(world["new_proto"].pieces):
        if j < 3:  # pad 0, eos 1, unk 2 in both (t5lab's layout)
            want[j], kind = rows[j], "role"
        elif x.piece in tok_lib.MODE_TOKENS:
            want[j], kind = rows[src[x.piece]], "role"
        elif x.piece.startswith("<extra_id_"):  # <extra_id_i> is NEW_PIECES-1-i here, SRC_PIECES-1-i there
            i = int(x.piece[10:-1])
            assert j == NEW_PIECES - 1 - i
            want[j], kind = rows[SRC_PIECES - 1 - i], "role"
        elif x.piece in src:
            want[j], kind = rows[src[x.piece]], "same"
        elif x.type == NORMAL:
            want[j] = rows[source_tokens(world, x.piece)].astype(np.float64).mean(0)
            kind = "start" if x.piece.startswith(W) else "cont"
        else:
            continue
        kinds[kind].append(j)
    return want, kinds


def test_viterbi_here_is_sentencepiece(world):
    """The test's own segmentation agrees with SentencePiece where both apply
    (word starts), so the continuation expectations below are trustworthy."""
    have = {x.piece for x in world["src_proto"].pieces}
    pieces = [x.piece for x in world["new_proto"].pieces
              if x.type == NORMAL and x.piece.startswith(W) and x.piece not in have]
    assert len(pieces) > 100
    for piece in pieces:
        assert viterbi(world["src_proto"], piece) == world["src_sp"].encode(piece[1:].replace(W, " ")), piece


# ------------------------------------------------------------------ methods
def test_fvt_rows_are_the_mean_of_the_source_tokenization(world):
    out, state = world["out"]("fvt")
    for name, src_rows in (("shared.weight", world["emb"]), ("lm_head.weight", world["head"])):
        got = state[name]
        assert got.shape == (NEW_PIECES, D)
        want, kinds = expected_rows(world, src_rows)
        assert len(kinds["start"]) > 100 and len(kinds["cont"]) > 100 and len(kinds["same"]) > 200
        for j, row in want.items():
            np.testing.assert_allclose(got[j], row, rtol=1e-6, atol=1e-6, err_msg=f"{name} {j}")
        # A continuation is not FVT code's word-start reading of the piece (a "▁" first piece).
        differs = [j for j in kinds["cont"] if not np.allclose(
            got[j], src_rows[world["src_sp"].encode(world["new_proto"].pieces[j].piece)].mean(0), atol=1e-5)]
        assert len(differs) > 0.9 * len(kinds["cont"])
    # every byte piece is in both: kept
    assert sum(world["new_proto"].pieces[j].type == BYTE for j in kinds["same"]) == 256
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vocab_size"] == NEW_PIECES and cfg["tie_word_embeddings"] is False


def test_overlap_keeps_shared_rows_and_draws_the_rest_from_the_source_distribution(world):
    _, state = world["out"]("overlap")
    _, again = world["out"]("overlap", seed=1)
    for name, src_rows in (("shared.weight", world["emb"]), ("lm_head.weight", world["head"])):
        want, kinds = expected_rows(world, src_rows)
        for j in kinds["role"] + kinds["same"]:
            np.testing.assert_array_equal(state[name][j], want[j])
            np.testing.assert_array_equal(again[name][j], want[j])
        drawn = kinds["start"] + kinds["cont"]
        assert len(drawn) > 300
        new = state[name][drawn].astype(np.float64)
        real = src_rows[:SRC_PIECES].astype(np.float64)  # not the padding rows
        mean, std = real.mean(0), real.std(0)
        # each dimension's mean within 4.5 standard errors, its spread within 20%
        assert np.all(np.abs(new.mean(0) - mean) < 4.5 * std / np.sqrt(len(drawn))), name
        assert np.all(np.abs(new.std(0) / std - 1) < 0.2), name
        # correlations follow the source's covariance (here diagonal: near 0)
        corr = np.corrcoef(new.T) - np.eye(D)
        assert np.abs(corr).max() < 0.3
        assert not np.any(np.all(new[:, None, :] == real[None, :, :], axis=-1))  # drawn, not copied
        assert not np.allclose(again[name][drawn], state[name][drawn])  # the seed matters


def test_random_is_t5lab_initialiser_except_the_roles(world):
    _, state = world["out"]("random")
    emb, head = state["shared.weight"].astype(np.float64), state["lm_head.weight"].astype(np.float64)
    want, kinds = expected_rows(world, world["emb"])
    assert len(kinds["role"]) == 3 + 3 + 100
    for j in kinds["role"]:
        np.testing.assert_array_equal(state["shared.weight"][j], want[j])
    rest = kinds["same"] + kinds["start"] + kinds["cont"]
    # layers.Embed: N(0, 1); layers.DenseHead: fan-in variance scaling, variance 1/d_model
    assert abs(emb[rest].mean()) < 0.02 and abs(emb[rest].std() - 1) < 0.03
    assert abs(head[rest].mean()) < 0.02 / 8 and abs(head[rest].std() * np.sqrt(D) - 1) < 0.03
    assert np.abs(head[rest]).max() <= 2 / 0.87962566 / np.sqrt(D) + 1e-6  # truncated at 2 sigma
    for j in kinds["same"]:  # shared pieces are re-initialised too: the no-transfer baseline
        assert not np.array_equal(state["shared.weight"][j], world["emb"][j])


def test_roles_map_by_role_whatever_their_ids(world, plain_spm):
    """A plain SentencePiece model: unk 0, bos 1, eos 2, no pad, the mode tokens
    in another order, no sentinels (transformers appends 100, <extra_id_0> last).
    The rows follow the roles (the command refuses this model: a T5 checkpoint
    declares pad 0 and eos 1, see the bad-input test)."""
    vt = vocab_transfer
    src, new = vt.read_vocab(world["src_spm"], rows=ROWS), vt.read_vocab(plain_spm)
    assert len(new) == 300 + 100
    plan = vt.plan_rows(src, new, "overlap", vt.continuation_processor(src.proto))
    got = vt.build_rows(world["emb"][:SRC_PIECES], plan, np.random.default_rng(0))
    emb = world["emb"]
    for new_id, src_id in [(0, 2), (2, 1), (3, 5), (4, 3), (5, 4)]:  # unk, eos, [S2S], [NLU], [NLG]
        np.testing.assert_array_equal(got[new_id], emb[src_id])
    assert not np.any(np.all(got[1] == emb, axis=-1))  # bos: the source has none, drawn
    for i in range(100):
        np.testing.assert_array_equal(got[399 - i], emb[SRC_PIECES - 1 - i])


def test_a_tied_model_transfers_its_shared_matrix_only(world, tmp_path):
    src_dir = make_source(tmp_path / "tied", world["src_spm"], tie=True)
    out = str(tmp_path / "tied_out")
    vocab_transfer.transfer(src_dir, world["new_spm"], out)
    state = load_file(os.path.join(out, hf.WEIGHTS))
    assert "lm_head.weight" not in state
    want, _ = expected_rows(world, load_file(os.path.join(src_dir, hf.WEIGHTS))["shared.weight"])
    for j, row in want.items():
        np.testing.assert_allclose(state["shared.weight"][j], row, rtol=1e-6, atol=1e-6)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True


# ------------------------------------------------------------------- extend
def test_extend_keeps_the_source_and_appends_the_pieces_it_splits(world):
    out, state = world["out"]("fvt", extend=True)
    merged = proto(os.path.join(out, "spiece.model"))
    src = world["src_proto"]
    old = [(x.piece, x.type, x.score) for x in src.pieces]
    assert [(x.piece, x.type, x.score) for x in merged.pieces[:SRC_PIECES]] == old
    have = {x.piece for x in src.pieces}
    want = [x.piece for x in world["new_proto"].pieces
            if x.type == NORMAL and x.piece not in have and len(source_tokens(world, x.piece)) > 1]
    appended = [x.piece for x in merged.pieces[SRC_PIECES:]]
    assert appended == want and len(want) > 200
    n = SRC_PIECES + len(want)
    for name, src_rows in (("shared.weight", world["emb"]), ("lm_head.weight", world["head"])):
        got = state[name]
        assert got.shape == (n, D)  # the source's padding rows are not carried over
        np.testing.assert_array_equal(got[:SRC_PIECES], src_rows[:SRC_PIECES])
        for j, piece in enumerate(want, SRC_PIECES):
            np.testing.assert_allclose(got[j], src_rows[source_tokens(world, piece)].mean(0), rtol=1e-6, atol=1e-6)
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == n
    # t5lab reads it with the source's special ids
    old_tok, new_tok = tok_lib.Tokenizer(world["src_spm"]), tok_lib.Tokenizer(os.path.join(out, "spiece.model"))
    assert new_tok.sentinel_id(0) == old_tok.sentinel_id(0) == SRC_PIECES - 1 and new_tok.sentinels_ordered
    assert new_tok.mode_ids == old_tok.mode_ids
    # An appended word start wins over the run of old pieces it replaces ...
    sp_new, sp_old = spm.SentencePieceProcessor(model_file=os.path.join(out, "spiece.model")), world["src_sp"]
    starts = [p for p in want if p.startswith(W)]
    assert all(sp_new.encode(p[1:]) == [SRC_PIECES + want.index(p)] for p in starts)
    # ... and elsewhere the old segmentation stays: expanding each appended piece into
    # its source tokenization gives back the source's encoding.
    expand = {SRC_PIECES + i: source_tokens(world, p) for i, p in enumerate(want)}
    lines = [line for doc in code_docs(step=97)[:20] for line in doc.splitlines() if line.strip()]
    lines += german(200, seed=5).splitlines()
    same = sum([t for i in sp_new.encode(line) for t in expand.get(i, [i])] == sp_old.encode(line)
               for line in lines)
    assert same > 0.97 * len(lines), (same, len(lines))  # measured: 1314 of 1320
    # the tokenizer files are the merged model's
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = german(3, seed=9)
    assert hf_tok(text).input_ids == sp_new.encode(text) + [1]


# ------------------------------------------------ transformers and training
def test_output_loads_in_transformers_and_trains_two_steps(world, tmp_path):
    out, _ = world["out"]("fvt")
    model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = german(2, seed=7)
    ids = spm.SentencePieceProcessor(model_file=world["new_spm"]).encode(text) + [1]
    assert hf_tok(text).input_ids == ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[0] + ids[:5]])).logits
    assert logits.shape == (1, 6, NEW_PIECES) and torch.isfinite(logits).all()

    wd = str(tmp_path / "run")
    assert cli.main(["train", "--config", "configs/t5_1_1.py:tiny", f"--config.init.from_hf={out}",
                     "--workdir", wd, "--config.train.steps=2", "--config.train.eval_every=0",
                     "--config.train.log_every=1", "--config.optim.warmup_steps=0"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] < 1.5 * math.log(NEW_PIECES)
    assert json.load(open(os.path.join(wd, "config.json")))["model"]["vocab_size"] == NEW_PIECES
    assert open(os.path.join(wd, "tokenizer.model"), "rb").read() == open(world["new_spm"], "rb").read()


# ---------------------------------------------------------------------- cli
def test_cli_writes_and_reports(world, tmp_path, capsys):
    out = str(tmp_path / "cli_out")
    assert cli.main(["transfer-vocab", "--from-hf", world["src_dir"], "--tokenizer", world["new_spm"],
                     "--out", out, "--method=overlap", "--seed", "3"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: {NEW_PIECES} rows") and f"--config.init.from_hf={out}" in said
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<extra_id_0>") == NEW_PIECES - 1


@pytest.mark.parametrize("case,named", [
    ("no_src", "--from-hf"), ("not_spm", "--tokenizer"), ("no_tokenizer", "--tokenizer"),
    ("bad_method", "--method"), ("no_out", "--out"), ("bad_seed", "--seed"), ("unknown", "--frm-hf"),
    ("src_without_spm", "--from-hf"), ("not_t5_ids", "--tokenizer")])
def test_bad_input_is_refused_in_one_line_before_any_work(world, plain_spm, tmp_path, capsys, case, named):
    bad = tmp_path / "not_a_model.model"
    bad.write_text("this is not a SentencePiece model\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", hf.WEIGHTS):
        (bare / name).write_bytes(open(os.path.join(world["src_dir"], name), "rb").read())
    out = tmp_path / "never"
    args = {"--from-hf": world["src_dir"], "--tokenizer": world["new_spm"], "--out": str(out)}
    extra, missing_file = [], None
    if case == "no_src":
        args["--from-hf"] = missing_file = str(tmp_path / "nosuchdir")
    elif case == "not_spm":
        args["--tokenizer"] = missing_file = str(bad)
    elif case == "no_tokenizer":
        args["--tokenizer"] = missing_file = str(tmp_path / "nosuch.model")
    elif case == "bad_method":
        extra = ["--method", "wechsel"]
    elif case == "no_out":
        del args["--out"]
    elif case == "bad_seed":
        extra = ["--seed", "x"]
    elif case == "unknown":
        extra = ["--frm-hf", "x"]
    elif case == "src_without_spm":
        args["--from-hf"] = missing_file = str(bare)
    elif case == "not_t5_ids":
        args["--tokenizer"] = missing_file = plain_spm
    argv = ["transfer-vocab"] + [a for kv in args.items() for a in kv] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"t5lab: error: {named}") and err.count("\n") == 1, err
    if missing_file:
        assert missing_file in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(flag):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "t5lab.cli", "transfer-vocab", flag], capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert p.stdout == cli.TRANSFER_VOCAB_USAGE
    for word in ("usage: t5lab transfer-vocab", "--from-hf SRC", "--extend", "fvt", "overlap", "random",
                 "example"):
        assert word in p.stdout
    assert "transfer-vocab" in subprocess.run([sys.executable, "-m", "t5lab.cli", "--help"], capture_output=True,
                                              text=True, timeout=120).stdout
