"""tools/transfer_study.py --smoke end to end in a subprocess: every arm in the
table and the JSON with finite bits per byte, the eval chunks cover the eval
text exactly and fit every tokenizer, and arm (i)'s step-0 value is the
source export's bits per byte computed here independently (transformers'
T5 on the tool's eval chunks, tokenized by SentencePiece)."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import xla_flags

# One worker runs this file's tests: they share one (module-scoped) study run.
pytestmark = pytest.mark.xdist_group("transfer_study")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("i", "ii", "iii", "iv", "v", "iv_replay")
LABELS = ("(i) source tokenizer", "(ii) new tokenizer, random", "(iii) new tokenizer, overlap",
          "(iv) new tokenizer, fvt", "(v) --extend + fvt", "(iv) fvt + replay of A")


def german_pages(d, n=40, seed=0):
    """Man-page-like German documents, where no German man pages are installed."""
    words = ("der die das und ist nicht mit für über wird Datei Option Befehl Verzeichnis Benutzer "
             "Einstellung angegeben werden Programm Ausgabe Eingabe Zeile Standard").split()
    rng = random.Random(seed)
    for i in range(n):
        paras = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(6)]
        (d / f"page{i:02d}.txt").write_text(f"NAME\n  prog{i} - " + "\n\n".join(paras) + "\n", encoding="utf-8")
    return str(d / "*.txt")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("transfer_study")
    if shutil.which("groff") and os.path.isdir("/usr/share/man/de"):
        corpus = "man:de"
    else:
        pages = d / "pages"
        pages.mkdir()
        corpus = "text:" + german_pages(pages)
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(None)
    env["JAX_PLATFORMS"] = "cpu"
    out = d / "study.json"
    t0 = time.time()
    p = subprocess.run([sys.executable, "tools/transfer_study.py", "--smoke", "--workdir", str(d / "wd"),
                        "--json", str(out), "--corpus_b", corpus], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return dict(stdout=p.stdout, res=json.loads(out.read_text()), wd=d / "wd", seconds=time.time() - t0)


def test_table_and_json_have_every_arm_with_finite_bits_per_byte(study):
    res, lines = study["res"], study["stdout"].rstrip().splitlines()
    table = lines[-(len(ARMS) + 3):]  # header, rule, source, arms: printed last
    assert table[0].startswith("| arm |") and table[1].startswith("|---")
    assert table[2].startswith("| source (A-pretrained) |")
    for row, label in zip(table[3:], LABELS):
        assert row.startswith(f"| {label} |"), row
    assert set(res["arms"]) == set(ARMS)
    for name, arm in res["arms"].items():
        for key in ("B_bpb_0", "B_bpb_final", "B_tokens_per_byte"):
            assert math.isfinite(arm[key]) and arm[key] > 0, (name, key, arm[key])
        steps = sorted(int(s) for s in arm["B_curve"])
        assert steps[0] == 0 and steps[-1] == res["settings"]["steps"], steps
    for name in ("iv", "iv_replay"):
        assert math.isfinite(res["arms"][name]["A_bpb_0"]) and math.isfinite(res["arms"][name]["A_bpb_final"])
    arms = res["arms"]
    assert arms["ii"]["B_bpb_0"] != arms["iv"]["B_bpb_0"]  # random and fvt rows differ
    assert arms["iv"]["B_bpb_0"] == arms["iv_replay"]["B_bpb_0"]  # one starting point
    assert arms["ii"]["B_tokens_per_byte"] == arms["iv"]["B_tokens_per_byte"]  # one tokenizer
    assert arms["v"]["vocab"] > arms["iv"]["vocab"]  # --extend appends pieces
    assert arms["i"]["B_bpb_0"] == res["source"]["B_bpb"]
    assert res["target_bpb"] == arms["ii"]["B_bpb_final"]
    assert arms["ii"]["steps_to_target"] <= res["settings"]["steps"]


def test_eval_chunks_cover_the_text_and_fit_every_tokenizer(study):
    import sentencepiece as spm
    sets = json.loads((study["wd"] / "eval_sets.json").read_text())
    models = sorted(study["wd"].glob("*hf*/*.model"))  # the source's and each transfer's
    sps = [spm.SentencePieceProcessor(model_file=str(m)) for m in models]
    assert len({sp.get_piece_size() for sp in sps}) >= 2
    for s in sets["sets"]:
        total = 0
        for doc in s["docs"]:
            for chunk, after_space in doc:
                total += len(chunk.encode("utf-8")) + after_space
                for sp in sps:
                    assert 1 <= len(sp.encode(chunk)) <= sets["inputs_length"] - 1
        assert total == s["bytes"] > 0


def test_arm_i_step0_is_the_source_exports_bits_per_byte_computed_independently(study):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm
    src = study["res"]["source"]["dir"]
    sp = spm.SentencePieceProcessor(model_file=os.path.join(src, "spiece.model"))
    model = transformers.T5ForConditionalGeneration.from_pretrained(src).eval()
    sets = json.loads((study["wd"] / "eval_sets.json").read_text())
    keep = sets["inputs_length"] - 1
    b = next(s for s in sets["sets"] if s["name"] == "B")
    nats = 0.0
    with torch.no_grad():
        for doc in b["docs"]:
            prev = []
            for chunk, _ in doc:  # the dummy prefix is the cut space
                ids = sp.encode(chunk)
                enc = prev[-keep:] + [sp.eos_id()]
                out = model(input_ids=torch.tensor([enc]), labels=torch.tensor([ids]))
                nats += float(out.loss) * len(ids)  # the mean over the labels
                prev += ids
    bpb = nats / math.log(2) / b["bytes"]
    assert bpb == pytest.approx(study["res"]["arms"]["i"]["B_bpb_0"], rel=1e-4)
