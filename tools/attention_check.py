r"""Attention implementations against `xla` in float32, on tiny T5 models.

    python tools/attention_check.py --impl dpa --cases all          # any machine
    python tools/attention_check.py --impl cudnn --cases encoder_decoder:scanned:unpacked

Per case (architecture, scanned or not, packed or unpacked rows): a tiny
model's logits and the gradients of its parameters with `--impl` in bf16
compute and with `xla` in bf16, each against `xla` in float32 (max |a - ref|
/ max |ref|, worst parameter leaf for the gradients). Equal where the
implementation's error is at most twice bf16 `xla`'s + 1e-3. Prints one
Markdown table; exits 1 if a case is not equal. tools/gpu_bench.py runs it
as its part 2 (cudnn on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a checkout without an installed t5lab (the lent GPU machine)
    sys.path.insert(0, ROOT)

# The models: T5 v1.1 blocks small enough to compile in seconds, with
# head_dim and lengths that cuDNN's fused kernel takes (multiples of 8).
ARCHS = {
    "encoder_decoder": dict(arch="encoder_decoder"),
    "decoder": dict(arch="decoder", position="rope", activation="silu"),
    "encoder": dict(arch="encoder", tie_embeddings=True, relpos_per_layer=True),
}
MODEL = dict(d_model=128, num_heads=4, head_dim=32, d_ff=256, vocab_size=512, num_layers=2,
             relpos_buckets=32, relpos_max_distance=128, dropout_rate=0.0)


# The attention call does not change with scanning (the suite checks dpa both
# ways), so `all` is every architecture packed and unpacked, unscanned.
ALL = ("encoder_decoder:unscanned:packed,decoder:unscanned:packed,encoder:unscanned:packed,"
       "encoder_decoder:unscanned:unpacked,decoder:unscanned:unpacked,encoder:unscanned:unpacked")


def parse_cases(spec: str) -> list[tuple[str, bool, bool]]:
    """(arch, scanned, packed) per ARCH:scanned|unscanned[:packed|unpacked] item."""
    cases = []
    for item in (ALL if spec == "all" else spec).split(","):
        arch, scan, packing = (item.strip().split(":") + ["packed"])[:3]
        if arch not in ARCHS or scan not in ("scanned", "unscanned") or packing not in ("packed", "unpacked"):
            raise ValueError(f"{item!r} is not ARCH:scanned|unscanned[:packed|unpacked] "
                             f"with ARCH one of {', '.join(ARCHS)}")
        cases.append((arch, scan == "scanned", packing == "packed"))
    return cases


def batch(arch: str, enc: int, dec: int, packed: bool, rows: int = 4, seed: int = 0) -> dict:
    """Packed: per row two or three segments and trailing padding, decoder-only
    rows with a prefix-LM prefix (the UL2 batch's features); an
    encoder-decoder row has the same segments in both streams, as packing
    makes them (a target with no inputs would be a query that sees no key).
    Unpacked: one example per row and no segment features."""
    import numpy as np
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 4, rows)

    def fill(width):
        toks, seg, pos = (np.zeros((rows, width), np.int32) for _ in range(3))
        for r, count in enumerate(counts):
            # count segments of at least one token over 60-90% of the row
            cuts = np.sort(rng.choice(np.arange(2, int(width * 0.9) - 1), count - 1, replace=False))
            bounds = [0, *cuts, int(width * rng.uniform(0.6, 0.9))]
            bounds[-1] = max(bounds[-1], bounds[-2] + 2)
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                toks[r, a:b] = rng.integers(2, MODEL["vocab_size"], b - a)
                seg[r, a:b], pos[r, a:b] = i + 1, np.arange(b - a)
        return toks, seg, pos

    if not packed:  # one example per row, padded at the end
        counts[:] = 1
    if arch == "encoder_decoder":
        (et, es, ep), (dt, ds, dp) = fill(enc), fill(dec)
        if not packed:
            return dict(encoder_input_tokens=et, decoder_input_tokens=dt)
        return dict(encoder_input_tokens=et, encoder_segment_ids=es, encoder_positions=ep,
                    decoder_input_tokens=dt, decoder_segment_ids=ds, decoder_positions=dp)
    key = "encoder" if arch == "encoder" else "decoder"
    t, s, p = fill(enc)
    if not packed:
        return {f"{key}_input_tokens": t}
    out = {f"{key}_input_tokens": t, f"{key}_segment_ids": s, f"{key}_positions": p}
    if arch == "decoder":
        out["decoder_causal_attention"] = ((p < enc // 8) & (s > 0)).astype(np.int32)
    return out


def run(impl: str, cases, enc: int = 128, dec: int = 64, on_case=None) -> dict:
    """`impl` against `xla` on every case: logits and the gradients of a loss
    on the valid positions, both in bf16 compute, each measured against
    `xla` in float32 (max |a - ref| / max |ref|, per leaf, worst leaf). `impl`
    passes where its error is at most twice bf16 `xla`'s own plus 1e-3.
    `on_case(result so far)` after each case (a caller with a timeout keeps
    the cases done)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from t5lab import models
    from t5lab.config import schema, validate


    def config(arch, scan, attention, dtype):
        c = schema()
        c.model.update(dict(MODEL, **ARCHS[arch], scan_layers=scan, attention=attention,
                            dtype=dtype))
        c.data.inputs_length, c.data.targets_length = enc, dec
        return validate(c)

    def forward(cfg, params, data, valid):
        model = models.build(cfg)

        def loss(p):
            logits = model.apply({"params": p}, data)
            return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) / valid.sum(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits, np.float32)[valid], [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]

    def err(a, ref):
        return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))

    rows = []
    for arch, scan, packed in cases:
        row = dict(arch=arch, scanned=scan, packed=packed, impl=impl)
        try:
            ref_cfg = config(arch, scan, "xla", "float32")
            model = models.build(ref_cfg)
            from flax import linen as nn
            params = nn.unbox(jax.jit(model.init)(jax.random.key(0), models.dummy_batch(ref_cfg, 1))["params"])
            data = batch(arch, enc, dec, packed)
            valid = data["encoder_input_tokens" if arch == "encoder" else "decoder_input_tokens"] > 0
            ref_l, ref_g = forward(ref_cfg, params, data, valid)
            for name, attention in (("xla", "xla"), ("impl", impl)):
                l, g = forward(config(arch, scan, attention, "bfloat16"), params, data, valid)
                row[f"{name}_logits"] = err(l, ref_l)
                row[f"{name}_grads"] = max(err(a, r) for a, r in zip(g, ref_g))
            row["ok"] = all(row[f"impl_{k}"] <= 2 * row[f"xla_{k}"] + 1e-3 for k in ("logits", "grads"))
        except Exception as e:  # noqa: BLE001  one case's failure is a row
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        rows.append(row)
        res = {"cases": rows, "lengths": [enc, dec], "device_kind": jax.devices()[0].device_kind}
        if on_case:
            on_case(res)
    return res


def table(res) -> str:
    out = [f"attention check ({res['device_kind']}, inputs {res['lengths'][0]}, targets {res['lengths'][1]}; "
           "error against xla float32, max |a - ref| / max |ref|, worst leaf for the gradients)",
           "| arch | layers | rows | implementation | logits: bf16 xla | logits: impl | grads: bf16 xla "
           "| grads: impl | equal |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["cases"]:
        cells = ["-" if r.get(k) is None else format(r[k], ".2e") for k in ("xla_logits", "impl_logits", "xla_grads", "impl_grads")]
        verdict = "yes" if r["ok"] else ("no" if "error" not in r else f"failed: {r['error']}")
        out.append(f"| {r['arch']} | {'scanned' if r['scanned'] else 'unscanned'} | "
                   f"{'packed' if r['packed'] else 'unpacked'} | {r['impl']} | "
                   + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python tools/attention_check.py --impl dpa --cases decoder:unscanned:packed --json")
    p.add_argument("--impl", default="dpa", help="the model.attention value checked against xla [dpa]")
    p.add_argument("--cases", default="all", help="ARCH:scanned|unscanned[:packed|unpacked], comma separated, "
                                                  f"or all ({ALL}) [all]")
    p.add_argument("--inputs", type=int, default=128, help="encoder (or decoder-only) tokens per row [128]")
    p.add_argument("--targets", type=int, default=64, help="decoder tokens per row [64]")
    p.add_argument("--json", action="store_true", help="print the result as JSON after the table")
    args = p.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        p.error(f"--cases: {e}")
    res = run(args.impl, cases, args.inputs, args.targets)
    print(table(res))
    if args.json:
        print(json.dumps(res))
    return 0 if all(c["ok"] for c in res["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
