r"""Train a T5-style SentencePiece tokenizer on any configured source.

    python tools/train_tokenizer.py --config configs/ul2.py:small --out spm.model \
        [--vocab_size 32128] [--max_docs 200000] [--max_chars 200000000] [--keep_newlines] \
        [--config.KEY=VALUE ...]

Unigram with byte fallback; pad 0, eos 1, unk 2, [NLU] [NLG] [S2S] as
user-defined pieces and <extra_id_0..99> at the top (<extra_id_0> highest).
Whitespace is kept as written; "\n" encodes as the byte piece <0x0A>, or with
--keep_newlines as a piece "\n" of its own (id 6). See docs/data.md.
Reads documents of config.data's train split in a seeded random order.
"""
from __future__ import annotations

import argparse


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--config.KEY=VALUE overrides one config key (schema: t5lab/config.py).\n\n"
               "example:\n  python tools/train_tokenizer.py --config configs/ul2.py:tiny --out /tmp/spm.model "
               "--max_docs 200")
    ap.add_argument("--config", default=None, help="path.py[:arg]; default: the schema")
    ap.add_argument("--out", required=True, help="output .model path")
    ap.add_argument("--vocab_size", type=int, default=0, help="default: config.model.vocab_size")
    ap.add_argument("--max_docs", type=int, default=200_000, help="documents to read at most (default 200000)")
    ap.add_argument("--max_chars", type=int, default=200_000_000,
                    help="characters to read at most (default 200000000)")
    ap.add_argument("--keep_newlines", action="store_true",
                    help='make "\n" a piece of its own (id 6) instead of the byte piece <0x0A>')
    args, rest = ap.parse_known_args()
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)} (config overrides are --config.KEY=VALUE)")
    from t5lab import config as config_lib  # after the arguments: --help needs no JAX
    from t5lab.data import pipeline, tokenizer
    cfg = config_lib.load(args.config, [a[len("--config."):] for a in rest])
    pipeline.validate(cfg)
    docs = pipeline.documents(cfg, "train", repeat=False)  # one epoch, shuffled from the seed
    n = min(args.max_docs, len(docs))

    def texts():
        total = 0
        for i in range(n):
            t = docs[i]
            if t:
                total += len(t)
                yield t
            if total >= args.max_chars:
                return

    vocab = args.vocab_size or cfg.model.vocab_size
    tokenizer.train(texts(), args.out, vocab, keep_newlines=args.keep_newlines)
    tok = tokenizer.Tokenizer(args.out)
    print(f"wrote {args.out}: {tok.vocab_size} pieces, <extra_id_0>={tok.sentinel_id(0)}, "
          f"modes={tok.mode_ids}, 'a\\nb' -> {[tok.id_to_piece(i) for i in tok.encode('a' + chr(10) + 'b')]}")


if __name__ == "__main__":
    main()
