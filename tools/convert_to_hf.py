r"""Export a t5lab model as a Hugging Face transformers directory, from a
checkpoint with a config file of your choice (`t5lab export` reads a workdir's
own config; both go through t5lab/export.py), or an untrained one.

    python tools/convert_to_hf.py --config configs/t5_1_1.py:small --checkpoint runs/small --out hf/small \
        [--spm tokenizer.model] [--config.model.vocab_size=32128 ...]
    python tools/convert_to_hf.py --config configs/decoder.py:tiny --random-init --seed 0 --out hf/tiny

Encoder-decoder -> T5ForConditionalGeneration (UMT5 when model.relpos_per_layer),
encoder -> T5EncoderModel (+ mlm_head.safetensors), rope decoder -> LlamaForCausalLM.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--config.KEY=VALUE overrides one config key (schema: t5lab/config.py).\n\n"
               "example:\n  python tools/convert_to_hf.py --config configs/t5_1_1.py:tiny --random-init --out hf/tiny")
    ap.add_argument("--config", required=True, help="configs/x.py[:preset]")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="t5lab checkpoint (workdir or step folder)")
    src.add_argument("--random-init", action="store_true", help="export an untrained model")
    ap.add_argument("--seed", type=int, default=0, help="init seed for --random-init")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--spm", default=None, help="SentencePiece .model to ship as the tokenizer")
    ap.add_argument("--step", type=int, default=None, help="with --checkpoint: the step (default the newest)")
    ap.add_argument("--max_shard_size", default="50GB", help="largest safetensors file (default 50GB)")
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)} (config overrides are --config.KEY=VALUE)")

    from t5lab import hf
    from t5lab.config import load
    config = load(args.config, [a[len("--config."):] for a in rest])
    hf.hf_config(config)  # fail on configs without an HF equivalent before any heavy work
    if args.checkpoint:
        from t5lab import export  # lazily: only this branch needs orbax
        export.export_checkpoint(args.checkpoint, config, args.out, step=args.step, spm_model=args.spm,
                                 max_shard_size=args.max_shard_size)
    else:
        import flax.linen as nn
        import jax

        from t5lab import models
        model = models.build(config)
        params = nn.unbox(jax.jit(model.init)(jax.random.key(args.seed), models.dummy_batch(config, 1))["params"])
        hf.save_pretrained(params, config, args.out, spm_model=args.spm, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
