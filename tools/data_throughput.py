"""Packed-token throughput of the input pipeline, per CPU core.

    python tools/data_throughput.py [--arch encoder_decoder] [--objective ul2]
        [--inputs_length 512] [--targets_length 512] [--seconds 20] [--cores 1]
        [--source prepared --paths DIR]

Pins the process to --cores CPUs (Linux) and counts the real (non-padding)
tokens of the batches make_dataset yields (the embedded corpus unless --source
and --paths say otherwise), encoder and decoder together. Targets: >= 250,000
tokens/s per core from raw text, >= 1M from prepared data.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/data_throughput.py --objective span_corruption --seconds 5 --cores 2")
    ap.add_argument("--arch", default="encoder_decoder", help="config.model.arch (default encoder_decoder)")
    ap.add_argument("--objective", default="ul2", help="config.data.objective (default ul2)")
    ap.add_argument("--inputs_length", type=int, default=512, help="config.data.inputs_length (default 512)")
    ap.add_argument("--targets_length", type=int, default=512, help="config.data.targets_length (default 512)")
    ap.add_argument("--batch_size", type=int, default=32, help="config.train.batch_size (default 32)")
    ap.add_argument("--vocab_size", type=int, default=2048, help="config.model.vocab_size (default 2048)")
    ap.add_argument("--source", default="embedded", help="config.data.source (default embedded)")
    ap.add_argument("--paths", default="", help="config.data.paths (a prepared DIR, files for text/jsonl)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to count (default 20)")
    ap.add_argument("--cores", type=int, default=1, help="CPUs to pin the process to (default 1)")
    args = ap.parse_args()
    from t5lab.config import schema  # after the arguments: --help needs no JAX
    from t5lab.data import packing, pipeline, tokenizer
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    c = schema()
    c.model.arch, c.model.vocab_size = args.arch, args.vocab_size
    c.data.objective = args.objective
    c.data.source, c.data.paths = args.source, args.paths
    c.data.inputs_length, c.data.targets_length = args.inputs_length, args.targets_length
    c.train.batch_size = args.batch_size
    path = tokenizer.resolve(c)
    it = iter(pipeline.make_dataset(c, "train", tokenizer_path=path, process_index=0, process_count=1))
    next(it)  # warm-up: first block, thread start
    tokens, fills, batches, start = 0, [], 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        b = next(it)
        tokens += sum(int(np.count_nonzero(b[k])) for k in ("encoder_input_tokens", "decoder_target_tokens") if k in b)
        fills.append(packing.nonpadding_fraction(b))
        batches += 1
    dt = time.perf_counter() - start
    print(f"{args.source} {args.arch} {args.objective} {args.inputs_length}/{args.targets_length}: {batches} batches, "
          f"{tokens} packed tokens in {dt:.1f}s on {cores} core(s): "
          f"{tokens / dt / cores:,.0f} tokens/s/core; non-padding fraction {np.mean(fills):.3f}")


if __name__ == "__main__":
    main()
