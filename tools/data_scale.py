"""The data pipeline at corpus scale: prepare throughput, start-up time and
peak memory against corpus size, packed tokens/s from prepared data.

    python tools/data_scale.py [--sizes 0.2,1,4] [--dir /tmp/t5lab-data-scale]
        [--workers N] [--vocab_size 2048] [--seconds 20]

For each size (GB) it writes a JSONL corpus made from the embedded corpus
(its paragraphs, shuffled with a fixed seed, repeated and reshuffled until
the size is reached; kept in --dir for the next run), prepares it with
`t5lab prepare` on --workers processes, and measures, each in a fresh process,
the time from launch to the first train batch and the peak RSS: raw JSONL
with an empty line-index cache (cold: the index is built), raw again (warm:
the cached index), and prepared. Then packed UL2 tokens/s on one core from
the largest prepared corpus (tools/data_throughput.py). A table is printed
last. Goals: start-up and RSS flat in corpus size (the largest within 1.3x of
the smallest), prepare >= 1M tokens/s/core, >= 1M packed tokens/s/core.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STARTUP = """
import sys, time
t0 = time.perf_counter()
from t5lab.config import schema
from t5lab.data import pipeline, tokenizer
c = schema()
c.model.vocab_size = {vocab}
c.data.source, c.data.paths = {source!r}, {paths!r}
c.data.inputs_length, c.data.targets_length, c.train.batch_size = 512, 512, 32
tok = tokenizer.resolve(c)
stream = pipeline.make_dataset(c, tokenizer_path=tok, process_index=0, process_count=1)
it = iter(stream)
next(it)
# VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork and exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(time.perf_counter() - t0, int(hwm) / 1024)
it.close()
"""


def _corpus(path: str, gb: float, seed: int = 0) -> int:
    """Writes (once) a JSONL corpus of about `gb` GB; returns its documents."""
    marker = path + ".done"
    if os.path.isfile(marker):
        return int(open(marker).read())
    from t5lab.data import sources
    emb = sources.embedded_documents()
    paragraphs = [p.strip() for i in range(len(emb)) for p in (emb[i] or "").split("\n\n")
                  if len(p.strip()) >= 200]
    rng, target, written, docs = random.Random(seed), int(gb * 1e9), 0, 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        while written < target:
            rng.shuffle(paragraphs)
            for p in paragraphs:
                line = json.dumps({"text": p}) + "\n"
                f.write(line)
                written += len(line)
                docs += 1
                if written >= target:
                    break
    with open(marker, "w") as f:
        f.write(str(docs))
    return docs


def _startup(source: str, paths: str, vocab: int, env: dict) -> tuple[float, float]:
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _STARTUP.format(source=source, paths=paths, vocab=vocab)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if p.returncode:
        raise SystemExit(f"start-up of {source} {paths} failed:\n{p.stderr[-2000:]}")
    _, rss = (float(x) for x in p.stdout.split()[-2:])
    return wall, rss


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/data_scale.py --sizes 0.05,0.2 --seconds 5")
    ap.add_argument("--sizes", default="0.2,1,4", help="corpus sizes in GB (default 0.2,1,4)")
    ap.add_argument("--dir", default="/tmp/t5lab-data-scale", help="where corpora are kept")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0))
                    if hasattr(os, "sched_getaffinity") else os.cpu_count(), help="prepare processes")
    ap.add_argument("--vocab_size", type=int, default=2048, help="the default tokenizer's size (default 2048)")
    ap.add_argument("--seconds", type=float, default=20.0, help="packed-throughput measurement time")
    ap.add_argument("--reuse", action="store_true",
                    help="keep prepared corpora already in --dir (no prepare figures)")
    args = ap.parse_args()
    from t5lab.config import schema
    from t5lab.data import prepare, tokenizer
    sizes = [float(s) for s in args.sizes.split(",")]
    c = schema()
    c.model.vocab_size = args.vocab_size
    tok = tokenizer.resolve(c)
    rows = []
    for gb in sizes:
        name = f"corpus-{gb:g}gb"
        path = os.path.join(args.dir, name + ".jsonl")
        docs = _corpus(path, gb)
        out = os.path.join(args.dir, name + ".prepared")
        reuse = args.reuse and os.path.isfile(os.path.join(out, "manifest.json"))
        if not reuse:
            shutil.rmtree(out, ignore_errors=True)
        cfg = schema()
        cfg.model.vocab_size = args.vocab_size
        cfg.data.source, cfg.data.paths, cfg.data.tokenizer = "jsonl", path, tok
        t0 = time.perf_counter()
        m = prepare.prepare(cfg, out, workers=args.workers, tok_path=tok)
        prep_s = time.perf_counter() - t0
        tokens = sum(s["tokens"] for s in m["splits"].values())
        env = dict(os.environ, T5LAB_INDEX_CACHE=os.path.join(args.dir, f"index-{name}"))
        shutil.rmtree(env["T5LAB_INDEX_CACHE"], ignore_errors=True)
        cold = _startup("jsonl", path, args.vocab_size, env)
        warm = _startup("jsonl", path, args.vocab_size, env)
        ready = _startup("prepared", out, args.vocab_size, env)
        rows.append((gb, docs, tokens, prep_s, None if reuse else tokens / prep_s / args.workers, cold, warm, ready))
        print(f"{gb:g} GB: {docs:,} documents, {tokens:,} tokens; prepare {prep_s:.0f} s; start-up "
              f"raw cold {cold[0]:.1f} s / {cold[1]:.0f} MB, warm {warm[0]:.1f} s / {warm[1]:.0f} MB, "
              f"prepared {ready[0]:.1f} s / {ready[1]:.0f} MB", flush=True)
    largest = os.path.join(args.dir, f"corpus-{sizes[-1]:g}gb.prepared")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "data_throughput.py"), "--source", "prepared",
                        "--paths", largest, "--vocab_size", str(args.vocab_size), "--cores", "1",
                        "--seconds", str(args.seconds)], capture_output=True, text=True, cwd=ROOT)
    packed = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else p.stderr[-500:]
    print(f"\npacked, prepared {sizes[-1]:g} GB corpus: {packed}\n")
    print(f"| corpus | documents | tokens | prepare tok/s/core ({args.workers} workers) | "
          f"start-up raw cold | raw warm | prepared | peak RSS raw cold | raw warm | prepared |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for gb, docs, tokens, _, rate, cold, warm, ready in rows:
        print(f"| {gb:g} GB | {docs:,} | {tokens:,} | {'-' if rate is None else f'{rate:,.0f}'} | {cold[0]:.1f} s | {warm[0]:.1f} s | "
              f"{ready[0]:.1f} s | {cold[1]:.0f} MB | {warm[1]:.0f} MB | {ready[1]:.0f} MB |")


if __name__ == "__main__":
    main()
