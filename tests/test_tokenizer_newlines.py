"""train(keep_newlines=True) and tools/train_tokenizer.py --keep_newlines: "\n"
is one piece of its own, multi-line text round-trips exactly and T5's ids hold;
without the option "\n" is no piece and encodes as the byte piece <0x0A>."""
import os
import subprocess
import sys

import pytest

from t5lab.data import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the model reads text and code from files while every line keeps its layout".split()
TEXT = "def f(x):\n    return x + 1\n\n\nclass A:\n\tpass\nThe model reads text.\n  indented line \nend"


def corpus(n=60):
    """Multi-line documents: prose lines, indented code, blank lines."""
    docs = []
    for i in range(n):
        prose = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 5))
        docs.append(f"{prose}.\ndef f{i}(x):\n    return x + {i}\n\n{prose.capitalize()}\n")
    return docs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {keep: tokenizer.Tokenizer(tokenizer.train(corpus(), str(d / f"{keep}.model"), 512,
                                                      keep_newlines=keep))
            for keep in (False, True)}


def pieces(tok, text):
    return [tok.id_to_piece(i) for i in tok.encode(text)]


@pytest.mark.parametrize("keep", [False, True])
def test_t5_ids_hold(models, keep):
    tok = models[keep]
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 512)
    assert tok.mode_ids == {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5} and tok.has_mode_tokens
    assert tok.sentinels_ordered and tok.sentinel_id(0) == 511 and tok.sentinel_id(99) == 412


def test_keep_newlines_makes_newline_one_piece(models):
    tok = models[True]
    assert tok.keeps_newlines
    p = pieces(tok, TEXT)
    assert p.count("\n") == TEXT.count("\n") and "<0x0A>" not in p
    assert all("\n" not in x for x in p if x != "\n")  # never merged with a neighbour
    assert tok.id_to_piece(6) == "\n" and 6 in tok.encode("a\nb")  # right after the mode tokens
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert [tok.decode(x) for x in tok.encode_batch([TEXT, "\n\n", "x\n"])] == [TEXT, "\n\n", "x\n"]


def test_without_the_option_newline_is_a_byte_piece(models):
    tok = models[False]
    assert not tok.keeps_newlines
    p = pieces(tok, TEXT)
    assert "\n" not in p and p.count("<0x0A>") == TEXT.count("\n")
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte fallback still round-trips


def test_tool_option(tmp_path):
    src = tmp_path / "doc.txt"
    src.write_text("".join(corpus(30)))
    out = tmp_path / "nl.model"
    r = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--out", str(out), "--vocab_size", "512",
                        "--keep_newlines", "--config.data.source=text", f"--config.data.paths={src}",
                        "--config.data.doc_per=file", "--config.data.eval_fraction=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'\\n'" in r.stdout.split("->")[-1] and "<0x0A>" not in r.stdout  # the summary's 'a\nb'
    tok = tokenizer.Tokenizer(str(out))
    assert tok.keeps_newlines and tok.decode(tok.encode(TEXT)) == TEXT
