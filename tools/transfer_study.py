r"""Vocabulary-transfer study (issue 19.5): is `t5lab transfer-vocab` worth it?

    python tools/transfer_study.py [--workdir runs/transfer_study] [--json study.json] [--smoke]

1. Corpus A: t5lab's embedded corpus (the running Python's standard library:
   code and English docstrings). Corpus B (--corpus_b): man:LANG renders the
   man pages under /usr/share/man/LANG with groff (default man:de: German man
   pages, another language and another domain), one document per page;
   text:GLOB takes files, a document per file. Both are split into train and
   eval documents by t5lab's own hash split (data.eval_fraction).
2. A SentencePiece tokenizer on A's train split, a source T5 (v1.1 shape)
   pretrained on A with it, exported to a Hugging Face directory
   (`t5lab export`).
3. A tokenizer on B's train split (t5lab.data.tokenizer.train: T5's
   sentinels and the UL2 mode tokens), and `t5lab transfer-vocab` from the
   source directory with --method random, overlap, fvt, and --extend fvt.
4. Arms, each continued on B from its directory for the same --steps with the
   same schedule (configs/continue.py's recipe: re-warm over 1% of the steps,
   cosine to 10% of the peak, Adafactor; via train.run and
   --config.init.from_hf): (i) the source tokenizer, (ii) random,
   (iii) overlap, (iv) fvt, (v) --extend + fvt, and (iv) again with
   --replay of A in the mixture (data.mixture).

The measure: bits per UTF-8 byte of held-out text,
    bpb = sum over eval documents of -log2 p(tokens of the document) / bytes,
which compares models with different tokenizers. Every eval document (a
prefix of at most --eval_doc_bytes) is cut into chunks at lone spaces (the
dummy prefix puts the space back, as t5lab.data.tokenizer.split_long does),
with boundaries common to every tokenizer of the study, each chunk short
enough to be one decoder row for all of them. Chunk k is predicted
teacher-forced by the decoder (all of its tokens, no EOS) with the encoder
holding the document's preceding tokens (the last inputs_length - 1, then
EOS: the prefix-LM example the models trained on; chunk 0 has only EOS).
So each token of each document is predicted exactly once and each byte is
counted once (the cut spaces included). Training uses --objective prefix_lm
(the eval's own task) or ul2 (then the eval is its S denoiser: [S2S] first).
Span-corruption loss is not per-byte comparable (it predicts only the noise
spans, and sentinels), so it is not offered.

Evals (bpb on B, and on A for the arm (iv) runs: forgetting) are written to
each arm's metrics.jsonl: step 0 from the arm's Hugging Face directory
before training, then every --eval_every steps by train.run (its eval hook
is replaced with this one for the run). The table printed last gives bpb at
step 0 and after --steps, the first logged step at which each arm reaches
arm (ii)'s final bpb, and A's bpb for (iv) with and without replay.

Takes ~25 minutes on 2 CPU cores with the defaults; --smoke (tiny corpora,
model and step counts) well under a minute.

example:
  python tools/transfer_study.py --workdir runs/ts --json runs/ts/study.json
  python tools/transfer_study.py --smoke --workdir /tmp/ts --json /tmp/ts.json
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "transfer_study.marker"  # --overwrite removes only a directory holding it
ARMS = (  # name, label, transfer method (None: the source directory), extend, replay
    ("i", "(i) source tokenizer", None, False, False),
    ("ii", "(ii) new tokenizer, random", "random", False, False),
    ("iii", "(iii) new tokenizer, overlap", "overlap", False, False),
    ("iv", "(iv) new tokenizer, fvt", "fvt", False, False),
    ("v", "(v) --extend + fvt", "fvt", True, False),
    ("iv_replay", "(iv) fvt + replay of A", "fvt", False, True),
)
SMOKE = dict(vocab_a=512, vocab_b=512, tok_chars=150_000, source_steps=6, steps=4, eval_every=2,
             d_model=32, d_ff=64, num_layers=1, num_heads=2, head_dim=16, batch_size=4, length=32,
             eval_bytes_b=2500, eval_bytes_a=1500, eval_doc_bytes=800, max_docs_b=40,
             eval_fraction=0.25)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--workdir", default="runs/transfer_study", help="everything is written here (default %(default)s)")
    a("--json", default="", help="also write the results as JSON to this file")
    a("--smoke", action="store_true", help="tiny corpora, model and step counts (tests): "
      + ", ".join(f"{k}={v}" for k, v in SMOKE.items()) + "; explicit options still win")
    a("--overwrite", action="store_true", help="remove an earlier study's --workdir first")
    a("--corpus_b", default="man:de", help="man:LANG (groff-rendered /usr/share/man/LANG) or text:GLOB "
      "(a document per file); default %(default)s")
    a("--max_docs_b", type=int, default=None, help="at most this many B documents (default all)")
    a("--objective", default="prefix_lm", choices=("prefix_lm", "ul2"), help="training objective of "
      "every run (default %(default)s); the eval is prefix-LM either way")
    a("--vocab_a", type=int, default=None, help="pieces of the source tokenizer (default 2048)")
    a("--vocab_b", type=int, default=None, help="pieces of the new tokenizer (default 2048)")
    a("--tok_chars", type=int, default=None, help="characters each tokenizer trains on (default 3000000)")
    a("--source_steps", type=int, default=None, help="source pretraining steps on A (default 600)")
    a("--steps", type=int, default=None, help="steps of every arm on B (default 240)")
    a("--eval_every", type=int, default=None, help="eval interval, dividing both step counts (default 20)")
    a("--d_model", type=int, default=None, help="default 128")
    a("--d_ff", type=int, default=None, help="default 384 (gated-gelu)")
    a("--num_layers", type=int, default=None, help="encoder and decoder layers each (default 2)")
    a("--num_heads", type=int, default=None, help="default 4")
    a("--head_dim", type=int, default=None, help="default 32")
    a("--batch_size", type=int, default=None, help="rows per step (default 16)")
    a("--length", type=int, default=None, help="inputs_length = targets_length (default 128)")
    a("--source_lr", type=float, default=1e-2, help="source pretraining peak (Adafactor, cosine; "
      "T5's 1e-2; default %(default)s)")
    a("--lr", type=float, default=1e-2, help="the arms' re-warmed peak (default %(default)s: the "
      "source's peak, as Gupta et al. re-warm; configs/continue.py's 1e-3 is for 20k-step runs)")
    a("--replay", type=float, default=0.05, help="A's expected share of the bytes in the replay arm's "
      "mixture (data.mixture's document weights are set from the mean document sizes; default %(default)s)")
    a("--eval_fraction", type=float, default=None, help="held-out share of A and B documents "
      "(data.eval_fraction; default 0.1)")
    a("--eval_bytes_b", type=int, default=None, help="bytes of B eval text (default 48000)")
    a("--eval_bytes_a", type=int, default=None, help="bytes of A eval text (default 24000)")
    a("--eval_doc_bytes", type=int, default=None, help="at most this prefix of an eval document (default 3000)")
    a("--seed", type=int, default=0)
    a("--compile_cache", default="", help="JAX persistent compilation cache (arms of one vocabulary "
      "size share compiled steps); default $JAX_COMPILATION_CACHE_DIR or WORKDIR/jax_cache")
    args = ap.parse_args(argv)
    defaults = dict(vocab_a=2048, vocab_b=2048, tok_chars=3_000_000, source_steps=600, steps=240,
                    eval_every=20, d_model=128, d_ff=384, num_layers=2, num_heads=4, head_dim=32,
                    batch_size=16, length=128, eval_bytes_b=48_000, eval_bytes_a=24_000,
                    eval_doc_bytes=3000, max_docs_b=0, eval_fraction=0.1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, SMOKE[k] if args.smoke else v)
    for k in ("steps", "source_steps"):
        if getattr(args, k) % args.eval_every:
            ap.error(f"--eval_every {args.eval_every} must divide --{k} {getattr(args, k)}")
    if not 0 < args.replay < 1:
        ap.error("--replay must be in (0, 1)")
    return args


# ------------------------------------------------------------------ corpora
def _page_text(rendered: str) -> str:
    """groff's output without the page header and footer lines, the 7-column
    body indent, trailing blanks and runs of blank lines."""
    lines = [ln.rstrip() for ln in rendered.splitlines()]
    body = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(body) >= 2:
        lines = lines[body[0] + 1:body[-1]]
    out, blank = [], True
    for ln in lines:
        if not ln:
            if not blank:
                out.append("")
            blank = True
            continue
        out.append(ln[7:] if ln.startswith(" " * 7) else ln.lstrip())
        blank = False
    return "\n".join(out).strip() + "\n"


def render_man_pages(lang: str, out_dir: str, max_docs: int = 0) -> list[str]:
    """/usr/share/man/LANG/man*/*.gz rendered to plain UTF-8 text files (one
    per page): groff -man -Tutf8, no overstriking or colour, one very long
    line per paragraph (no filling breaks or hyphenation to undo). A page
    whose text an earlier page already gave is left out."""
    if not shutil.which("groff"):
        raise SystemExit("--corpus_b man:...: groff is not installed (Debian: groff-base); "
                         "use --corpus_b text:GLOB")
    pages = sorted(glob.glob(f"/usr/share/man/{lang}/man*/*.gz"))
    if not pages:
        raise SystemExit(f"--corpus_b man:{lang}: no man pages under /usr/share/man/{lang}")
    os.makedirs(out_dir, exist_ok=True)
    files, seen = [], set()
    for page in pages:
        if max_docs and len(files) >= max_docs:
            break
        with gzip.open(page, "rb") as f:
            src = f.read()
        p = subprocess.run(["groff", "-k", "-Kutf8", "-man", "-Tutf8", "-P-cbou", "-rLL=5000n",
                            "-rHY=0", "-rcR=1"], input=src, capture_output=True)
        text = _page_text(p.stdout.decode("utf-8", "replace"))
        if p.returncode or len(text) < 200 or text in seen:  # a failed page, or another
            continue  # name of one (a symlink, a .so link): the split must not see it twice
        seen.add(text)
        name = f"{os.path.basename(os.path.dirname(page))}_{os.path.basename(page)[:-3]}.txt"
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        files.append(path)
    return files


# ------------------------------------------------------------ bits per byte
def lone_space(text: str, j: int) -> bool:
    return 0 < j < len(text) - 1 and text[j] == " " and not text[j - 1].isspace() \
        and not text[j + 1].isspace()


def cut_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of at most max_bytes UTF-8 bytes ending before a lone
    space (or anywhere, if it has none)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    end = len(text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore"))
    j = end - 1
    while j > 0 and not lone_space(text, j):
        j -= 1
    return text[:j] if j > 0 else text[:end]


def _split(text: str) -> list[tuple[str, bool]]:
    """Two chunks at the lone space nearest the middle (the second cut after
    it: True), or at the middle character."""
    mid = len(text) // 2
    for d in range(mid):
        for j in (mid - d, mid + d):
            if lone_space(text, j):
                return [(text[:j], False), (text[j + 1:], True)]
    return [(text[:mid], False), (text[mid:], False)]


def chunk_document(text: str, tokenizers, max_tokens: int) -> list[tuple[str, bool]]:
    """[(chunk, follows a cut space)]: text cut at lone spaces (halving a chunk
    without one at a character) until every tokenizer encodes every chunk in
    at most max_tokens tokens. The chunks, with one space before each True
    one, are the text again."""
    todo, out = [(text, False)], []
    while todo:
        chunk, after_space = todo.pop(0)
        if len(chunk) > 1 and any(len(_encode(t, chunk, after_space)) > max_tokens for t in tokenizers):
            (a, _), (b, sb) = _split(chunk)
            todo[:0] = [(a, after_space), (b, sb)]
        else:
            out.append((chunk, after_space))
    assert "".join((" " if s else "") + c for c, s in out) == text
    return out


def _encode(tok, chunk: str, after_space: bool):
    # A dummy prefix is the cut space; without one the space is written out.
    return tok.encode(chunk if tok.dummy_prefix or not after_space else " " + chunk)


class EvalSet:
    """Eval documents cut into chunks common to every tokenizer of the study."""

    def __init__(self, name: str, docs: list[str], tokenizers, max_tokens: int):
        self.name = name
        self.docs = [chunk_document(d, tokenizers, max_tokens) for d in docs]
        self.bytes = sum(len(d.encode("utf-8")) for d in docs)
        assert self.bytes == sum(len(c.encode("utf-8")) + s for doc in self.docs for c, s in doc)
        self._batches = {}

    def to_json(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "docs": self.docs}

    def examples(self, tok, inputs_length: int, mode_id=None, denoiser: int = 0):
        """The prefix-LM examples: (encoder [mode] + preceding tokens + EOS,
        decoder the chunk's tokens)."""
        import numpy as np

        from t5lab.data.denoising import Example
        keep = inputs_length - 1 - (mode_id is not None)
        head = [] if mode_id is None else [mode_id]
        out = []
        for doc in self.docs:
            prev = np.zeros(0, np.int32)
            for chunk, after_space in doc:
                ids = np.asarray(_encode(tok, chunk, after_space), np.int32)
                ctx = prev[len(prev) - keep:] if len(prev) > keep else prev
                out.append(Example(np.concatenate([head, ctx, [tok.eos_id]]).astype(np.int32), ids, denoiser))
                prev = np.concatenate([prev, ids])
        return out

    def batches(self, config, tok_path: str) -> list[dict]:
        """Packed rows of the batch contract in batches of train.batch_size rows."""
        key = (tok_path, config.data.objective, config.data.inputs_length, config.train.batch_size)
        if key not in self._batches:
            import numpy as np

            from t5lab.data import packing, tokenizer as tok_lib
            from t5lab.data.denoising import DENOISER_NAMES
            from t5lab.train_step import batch_spec
            tok = tok_lib.Tokenizer(tok_path)
            ul2 = config.data.objective == "ul2"
            exs = self.examples(tok, config.data.inputs_length, tok.mode_ids["[S2S]"] if ul2 else None,
                                DENOISER_NAMES.index("S") if ul2 else 0)
            rows = packing.pack(exs, config.model.arch, config.data.inputs_length,
                                config.data.targets_length, packed=config.data.pack)
            spec, b = batch_spec(config), config.train.batch_size
            n = -(-len(rows["decoder_target_tokens"]) // b) * b
            full = {k: np.zeros((n, rows[k].shape[1]), np.int32) for k in spec}
            for k in spec:
                full[k][:len(rows[k])] = rows[k]
            self._batches[key] = ([{k: v[i:i + b] for k, v in full.items()} for i in range(0, n, b)],
                                  sum(len(e.targets) for e in exs))
        return self._batches[key]

    def measure(self, config, program, params, tok_path: str) -> dict:
        import jax
        import numpy as np

        from t5lab.train_step import global_batch
        batches, tokens = self.batches(config, tok_path)
        ce = weight = 0.0
        for batch in batches:
            sums = jax.device_get(program.eval_step(params, global_batch(batch, program.batch_sharding)))
            ce, weight = ce + float(sums["ce"]), weight + float(sums["weight"])
        assert int(round(weight)) == tokens, (weight, tokens)
        return {"bpb": ce / math.log(2) / self.bytes, "nats": ce, "tokens": tokens, "bytes": self.bytes,
                "tokens_per_byte": tokens / self.bytes}


def eval_row(evals, config, program, params, tok_path) -> dict:
    out = {}
    for ev in evals:
        m = ev.measure(config, program, params, tok_path)
        out[f"eval/{ev.name}_bpb"] = m["bpb"]
        out[f"eval/{ev.name}_tokens_per_byte"] = m["tokens_per_byte"]
    return out


class train_evals:
    """While open, train.run's eval hook measures `evals` instead of its own
    eval split (the loop writes the result to metrics.jsonl at eval steps)."""

    def __init__(self, evals):
        self.evals = evals

    def __enter__(self):
        from t5lab import train
        self._old = train.evaluate
        train.evaluate = lambda config, program, params, tok_path, names: eval_row(
            self.evals, config, program, params, tok_path)

    def __exit__(self, *exc):
        from t5lab import train
        train.evaluate = self._old


# ------------------------------------------------------------------ the runs
def overrides(args, **extra) -> list[str]:
    d = {"data.objective": args.objective, "data.inputs_length": args.length,
         "data.targets_length": args.length, "data.eval_fraction": args.eval_fraction,
         "data.seed": args.seed, "train.batch_size": args.batch_size, "train.seed": args.seed,
         "train.eval_every": args.eval_every, "train.log_every": args.eval_every,
         "checkpoint.every": 0, "checkpoint.keep": 1}
    d.update(extra)
    return [f"{k}={v}" for k, v in d.items()]


def load_config(spec: str, items: list[str], from_hf: str = ""):
    from t5lab import config as config_lib, hf
    cfg = config_lib.load(spec, items)
    if from_hf:  # what `t5lab train --config.init.from_hf=DIR` does
        cfg = config_lib.validate(hf.adopt_model(cfg, {i.partition("=")[0] for i in items}))
    return cfg


def hf_params(hf_dir: str, program):
    import jax

    from t5lab import hf
    params, _ = hf.load_pretrained(hf_dir)
    return jax.tree_util.tree_map(jax.device_put, params, program.state_shardings["params"])


def step0(cfg, workdir: str, evals) -> dict:
    """Evals of the arm's starting point (its Hugging Face directory), logged
    as step 0 of its metrics.jsonl (train.run keeps rows up to its start)."""
    from t5lab import sharding
    from t5lab.train_step import build_program
    program = build_program(cfg, sharding.make_mesh(cfg.mesh))
    row = eval_row(evals, cfg, program, hf_params(cfg.init.from_hf, program), cfg.data.tokenizer)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, **row}) + "\n")
    return row


def read_evals(workdir: str) -> dict[int, dict]:
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if any(k.endswith("_bpb") for k in r):
                rows.setdefault(r["step"], {}).update(r)
    return dict(sorted(rows.items()))


def train_tokenizer(cfg, out: str, vocab: int, max_chars: int) -> str:
    """tools/train_tokenizer.py's recipe on cfg's train split."""
    from t5lab.data import pipeline, tokenizer as tok_lib
    docs = pipeline.documents(cfg, "train", repeat=False)

    def texts():
        total = 0
        for i in range(len(docs)):
            t = docs[i]
            if t:
                total += len(t)
                yield t
            if total >= max_chars:
                return
    return tok_lib.train(texts(), out, vocab)


def eval_docs(cfg, max_bytes: int, doc_bytes: int) -> list[str]:
    """The first documents of cfg's eval split (t5lab's hash split), each cut
    to at most doc_bytes, until max_bytes."""
    from t5lab.data import pipeline
    docs, total = [], 0
    src = pipeline.documents(cfg, "eval", repeat=False)
    for i in range(len(src)):
        text = src[i]
        if not text or not text.strip():
            continue
        cap = min(doc_bytes, max_bytes - total)
        if cap < 64:
            break
        docs.append(cut_prefix(text, cap))
        total += len(docs[-1].encode("utf-8"))
    if not docs:
        raise SystemExit(f"transfer_study: the eval split of {cfg.data.source} has only empty documents")
    return docs


def mean_doc_bytes(cfg) -> float:
    from t5lab.data import pipeline
    src = pipeline.documents(cfg, "train", repeat=False)
    return sum(len((src[i] or "").encode("utf-8")) for i in range(len(src))) / max(1, len(src))


def steps_to(curve: dict[int, float], target: float):
    return next((s for s, v in curve.items() if v <= target), None)


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def table(res: dict) -> str:
    n = res["settings"]["steps"]
    lines = [f"| arm | vocab | B tokens/byte | B bpb step 0 | B bpb step {n} | steps to (ii)'s final "
             f"{fmt(res['target_bpb'])} | A bpb step 0 | A bpb step {n} |",
             "|---|---|---|---|---|---|---|---|"]
    s = res["source"]
    lines.append(f"| source (A-pretrained) | {s['vocab']} | {fmt(s['B_tokens_per_byte'])} | "
                 f"{fmt(s['B_bpb'])} | - | - | {fmt(s['A_bpb'])} | - |")
    for a in res["arms"].values():
        reach = a["steps_to_target"]
        reach = f"> {n}" if reach is None else str(reach)
        lines.append(f"| {a['label']} | {a['vocab']} | {fmt(a['B_tokens_per_byte'])} | {fmt(a['B_bpb_0'])} | "
                     f"{fmt(a['B_bpb_final'])} | {reach} | {fmt(a.get('A_bpb_0'))} | "
                     f"{fmt(a.get('A_bpb_final'))} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    import jax  # noqa: F401  (after --help)

    from t5lab import cli, train, vocab_transfer
    from t5lab.data import tokenizer as tok_lib

    wd = os.path.abspath(args.workdir)
    if os.path.exists(wd) and os.listdir(wd):
        if not (args.overwrite and os.path.isfile(os.path.join(wd, MARKER))):
            raise SystemExit(f"--workdir {wd}: not empty" + ("" if args.overwrite else
                             "; pass --overwrite to replace an earlier study there"))
        shutil.rmtree(wd)
    os.makedirs(wd)
    open(os.path.join(wd, MARKER), "w").close()
    jax.config.update("jax_compilation_cache_dir", args.compile_cache or
                      os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(wd, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    times = {}

    def phase(name, t0):
        times[name] = round(time.time() - t0, 1)
        print(f"transfer_study: {name} took {times[name]} s", flush=True)

    # ---- corpora and tokenizers
    t0 = time.time()
    kind, _, arg = args.corpus_b.partition(":")
    if kind == "man":
        files = render_man_pages(arg, os.path.join(wd, "corpus_b"), args.max_docs_b)
    elif kind == "text":
        files, seen = [], set()
        for f in sorted(glob.glob(arg)):
            with open(f, "rb") as fh:
                body = fh.read()
            if body not in seen and len(files) < (args.max_docs_b or sys.maxsize):
                seen.add(body)  # a document once: copies would straddle the split
                files.append(f)
    else:
        raise SystemExit(f"--corpus_b: {args.corpus_b!r} is not man:LANG or text:GLOB")
    if len(files) < 4:
        raise SystemExit(f"--corpus_b {args.corpus_b}: {len(files)} documents; need a few more")
    if kind == "text":  # the study's documents as its own files (the hash split goes by name)
        os.makedirs(os.path.join(wd, "corpus_b"))
        for i, f in enumerate(files):
            shutil.copy(f, os.path.join(wd, "corpus_b", f"{i:05d}_{os.path.splitext(os.path.basename(f))[0]}.txt"))
    b_glob = os.path.join(wd, "corpus_b", "*.txt")
    data_a = {"data.source": "embedded"}
    data_b = {"data.source": "text", "data.paths": b_glob, "data.doc_per": "file"}
    cfg_a = load_config("configs/t5_1_1.py:small", overrides(args, **data_a))
    cfg_b = load_config("configs/t5_1_1.py:small", overrides(args, **data_b))
    tok_a = train_tokenizer(cfg_a, os.path.join(wd, "tok_a.model"), args.vocab_a, args.tok_chars)
    tok_b = train_tokenizer(cfg_b, os.path.join(wd, "tok_b.model"), args.vocab_b, args.tok_chars)
    # The eval documents now: a split without any stops the study before training.
    eval_text_b = eval_docs(cfg_b, args.eval_bytes_b, args.eval_doc_bytes)
    eval_text_a = eval_docs(cfg_a, args.eval_bytes_a, args.eval_doc_bytes)
    phase("corpora and tokenizers", t0)

    # ---- the source model on A, exported
    t0 = time.time()
    src_wd, src_hf = os.path.join(wd, "source"), os.path.join(wd, "source_hf")
    warm = max(1, args.source_steps // 20)
    cfg_src = load_config("configs/t5_1_1.py:small", overrides(
        args, **data_a, **{"data.tokenizer": tok_a, "model.vocab_size": tok_lib.Tokenizer(tok_a).vocab_size,
                           "model.d_model": args.d_model, "model.d_ff": args.d_ff,
                           "model.num_layers": args.num_layers, "model.num_heads": args.num_heads,
                           "model.head_dim": args.head_dim, "train.steps": args.source_steps,
                           "optim.name": "adafactor", "optim.schedule": "cosine",
                           "optim.learning_rate": args.source_lr, "optim.warmup_steps": warm,
                           "optim.end_lr_fraction": 0.1}))
    cfg_src.train.eval_every = 0  # measured once exported, on the eval sets built below
    train.run(cfg_src, src_wd, progress=False)
    if cli.main(["export", "--workdir", src_wd, "--out", src_hf]) != 0:
        raise SystemExit("export of the source model failed")
    phase("source pretraining on A + export", t0)

    # ---- transfers
    t0 = time.time()
    dirs, transfers = {}, {}
    for name, _, method, extend, replay in ARMS:
        if method is None:
            dirs[name] = src_hf
        elif replay:
            dirs[name] = dirs["iv"]
        else:
            dirs[name] = os.path.join(wd, f"hf_{name}")
            s = vocab_transfer.transfer(src_hf, tok_b, dirs[name], method=method, extend=extend, seed=args.seed)
            transfers[name] = {"rows": s["rows"], "vocab_size": s["vocab_size"], "appended": len(s["appended"])}
    phase("transfer-vocab", t0)

    # ---- eval sets: chunks common to every tokenizer
    t0 = time.time()
    spm_of = {n: next(os.path.join(d, f) for f in ("spiece.model", "tokenizer.model")
                      if os.path.isfile(os.path.join(d, f))) for n, d in dirs.items()}
    toks = [tok_lib.Tokenizer(p) for p in sorted(set(spm_of.values()))]
    max_tokens = args.length - 1  # the decoder rows the models trained on end with EOS
    ev_b = EvalSet("B", eval_text_b, toks, max_tokens)
    ev_a = EvalSet("A", eval_text_a, toks, max_tokens)
    with open(os.path.join(wd, "eval_sets.json"), "w") as f:
        json.dump({"inputs_length": args.length, "objective": args.objective,
                   "sets": [ev_b.to_json(), ev_a.to_json()]}, f)
    phase("eval sets", t0)

    # ---- source model's own numbers (the HF export: what every arm starts from)
    t0 = time.time()
    cfg_src_hf = load_config("configs/t5_1_1.py:small", overrides(args, **data_a, **{"init.from_hf": src_hf}),
                             from_hf=src_hf)
    src_row = step0(cfg_src_hf, os.path.join(wd, "source_eval"), [ev_b, ev_a])
    phase("source evals", t0)

    # ---- the arms. Replay: --replay of the bytes, not of the documents (the
    # mixture draws documents, and A's are longer than B's on average).
    a_mean, b_mean = mean_doc_bytes(cfg_a), mean_doc_bytes(cfg_b)
    w_a = args.replay / a_mean / (args.replay / a_mean + (1 - args.replay) / b_mean)
    arms = {}
    for name, label, method, extend, replay in ARMS:
        t0 = time.time()
        data = dict(data_b)
        if replay:
            data = {"data.source": "mixture", "data.doc_per": "file",
                    "data.mixture": f"text:{b_glob}={1 - w_a:.6g},embedded={w_a:.6g}"}
        items = overrides(args, **data, **{
            "init.from_hf": dirs[name], "train.steps": args.steps,
            "optim.warmup_steps": max(1, args.steps // 100),  # configs/continue.py: 1% re-warm
            "optim.learning_rate": args.lr})
        cfg = load_config("configs/continue.py:small", items, from_hf=dirs[name])
        evals = [ev_b, ev_a] if name.startswith("iv") else [ev_b]
        arm_wd = os.path.join(wd, "arms", name)
        step0(cfg, arm_wd, evals)
        with train_evals(evals):
            train.run(cfg, arm_wd, progress=False)
        rows = read_evals(arm_wd)
        curve = {s: r["eval/B_bpb"] for s, r in rows.items()}
        last = rows[max(rows)]
        arms[name] = {"label": label, "dir": dirs[name], "vocab": cfg.model.vocab_size,
                      "transfer": transfers.get(name), "B_bpb_0": rows[0]["eval/B_bpb"],
                      "B_bpb_final": last["eval/B_bpb"], "B_tokens_per_byte": rows[0]["eval/B_tokens_per_byte"],
                      "B_curve": curve, "seconds": 0.0}
        if "eval/A_bpb" in rows[0]:
            arms[name].update(A_bpb_0=rows[0]["eval/A_bpb"], A_bpb_final=last["eval/A_bpb"],
                              A_curve={s: r["eval/A_bpb"] for s, r in rows.items()})
        phase(f"arm {name}", t0)
        arms[name]["seconds"] = times[f"arm {name}"]
    target = arms["ii"]["B_bpb_final"]
    for a in arms.values():
        a["steps_to_target"] = steps_to(a["B_curve"], target)

    iv, ii = arms["iv"], arms["ii"]
    useful = iv["B_bpb_0"] < ii["B_bpb_0"] and iv["B_bpb_final"] < ii["B_bpb_final"]
    res = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t_start)),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if argv is None else "tools/transfer_study.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpus": os.cpu_count(), "jax_devices": [d.device_kind for d in jax.devices()]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "overwrite", "compile_cache")},
        "corpora": {"A": f"embedded: {len(sources_files())} .py files of {sources_root()}",
                    "B": f"{args.corpus_b}: {len(files)} documents ({b_glob})",
                    "eval_B": {"docs": len(ev_b.docs), "bytes": ev_b.bytes},
                    "eval_A": {"docs": len(ev_a.docs), "bytes": ev_a.bytes},
                    "mean_train_doc_bytes": {"A": a_mean, "B": b_mean},
                    "replay_document_weight": w_a,
                    "replay_byte_share": w_a * a_mean / (w_a * a_mean + (1 - w_a) * b_mean)},
        "bpb": "bits per UTF-8 byte: sum of -log2 p(token) over every token of the eval documents "
               "(prefix-LM chunks, see the tool's docstring) / their bytes",
        "source": {"dir": src_hf, "vocab": cfg_src_hf.model.vocab_size, "B_bpb": src_row["eval/B_bpb"],
                   "A_bpb": src_row["eval/A_bpb"], "B_tokens_per_byte": src_row["eval/B_tokens_per_byte"],
                   "A_tokens_per_byte": src_row["eval/A_tokens_per_byte"]},
        "target_bpb": target, "arms": arms,
        "fvt_useful": useful, "seconds": times, "total_seconds": round(time.time() - t_start, 1),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    with open(os.path.join(wd, "study.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\ntransfer_study: {res['total_seconds']} s in all; fvt (iv) "
          f"{'starts and ends below' if useful else 'does NOT start and end below'} random (ii)\n")
    print(table(res), flush=True)
    return res


def sources_files():
    from t5lab.data import sources
    return sources.embedded_files()


def sources_root():
    from t5lab.data import sources
    return sources.embedded_root()


if __name__ == "__main__":
    main()
