"""Incremental decoding with a fixed-size KV cache (flax 'cache' collection).

    ids = generate(model, params, {"encoder_input_tokens": enc}, max_new_tokens=16)  # enc-dec
    ids = generate(model, params, prompt_ids, max_new_tokens=16)                    # decoder-only

Encoder-decoder: encode once, then one cached decoder step per token, starting
from token 0 (T5's decoder start). Decoder-only: prefill the prompt (all rows
the same length, no padding) in one call, then one cached step per token.
The whole loop is one jit: cache shapes never change, so the step compiles once.
Returns int32 [batch, max_new_tokens]; after a row emits eos_id it emits 0 (pad),
as transformers' generate pads finished rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from t5lab.models.transformer import ARCH_CLASSES, ModelConfig


def generate(model, params, inputs, max_new_tokens: int, temperature: float = 0.0, rng=None,
             eos_id: int = 1, bidirectional_prompt: bool = False):
    """Greedy (temperature 0) or temperature sampling.

    inputs: encoder-decoder: dict with encoder_input_tokens (or that array);
            decoder-only: prompt ids [batch, prompt_len] (or a dict with decoder_input_tokens).
    bidirectional_prompt: decoder-only prefix LM, the prompt attends both ways."""
    cfg: ModelConfig = model.cfg
    if cfg.arch == "encoder":
        raise ValueError("config.model.arch: an encoder-only model does not generate")
    if isinstance(inputs, dict):
        inputs = inputs["encoder_input_tokens" if cfg.arch == "encoder_decoder" else "decoder_input_tokens"]
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 needs an rng")
    rng = jax.random.key(0) if rng is None else rng
    fn = _compiled(cfg, int(max_new_tokens), float(temperature), int(eos_id), bool(bidirectional_prompt))
    return fn(params, jnp.asarray(inputs, jnp.int32), rng)


def _pick(logits, temperature, key):
    if temperature > 0:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _empty_cache(model, *init_args, **init_kwargs):
    """Zeros shaped like the cache a full-length decode=True init creates."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_args, decode=True, **init_kwargs))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


@functools.lru_cache(maxsize=32)
def _compiled(cfg, max_new, temperature, eos_id, bidirectional_prompt):
    model = ARCH_CLASSES[cfg.arch](cfg)

    def loop(params, cache, first_logits, step_fn, rng):
        """Token 1 from first_logits, then max_new - 1 cached steps."""
        b = first_logits.shape[0]
        token = _pick(first_logits, temperature, jax.random.fold_in(rng, 0))
        done = token == eos_id

        def body(carry, i):
            cache, token, done = carry
            logits, cache = step_fn(params, cache, token[:, None])
            nxt = _pick(logits[:, -1], temperature, jax.random.fold_in(rng, i))
            nxt = jnp.where(done, 0, nxt)
            return (cache, nxt, done | (nxt == eos_id)), nxt

        _, rest = jax.lax.scan(body, (cache, token, done), jnp.arange(1, max_new))
        return jnp.concatenate([token[:, None], rest.T.reshape(b, max_new - 1)], axis=1)

    if cfg.arch == "encoder_decoder":
        def run(params, enc, rng):
            encoded = model.apply({"params": params}, enc, method="encode")
            start = jnp.zeros((enc.shape[0], 1), jnp.int32)
            cache = _empty_cache(model, encoded, enc, jnp.zeros((enc.shape[0], max_new), jnp.int32),
                                 method="decode")

            def step(params, cache, token):
                logits, v = model.apply({"params": params, "cache": cache}, encoded, enc, token,
                                        decode=True, method="decode", mutable=["cache"])
                return logits, v["cache"]

            first, cache = step(params, cache, start)
            return loop(params, cache, first[:, -1], step, rng)
    else:
        def run(params, prompt, rng):
            b, p = prompt.shape
            cache = _empty_cache(model, {"decoder_input_tokens": jnp.zeros((b, p + max_new), jnp.int32)})
            prefill = {"decoder_input_tokens": prompt}
            if bidirectional_prompt:
                prefill["decoder_causal_attention"] = jnp.ones_like(prompt)

            def step(params, cache, tokens, extra=None):
                batch = {"decoder_input_tokens": tokens, **(extra or {})}
                logits, v = model.apply({"params": params, "cache": cache}, batch, decode=True,
                                        mutable=["cache"])
                return logits, v["cache"]

            first, cache = step(params, cache, prompt, {k: v for k, v in prefill.items()
                                                        if k != "decoder_input_tokens"})
            return loop(params, cache, first[:, -1], step, rng)

    return jax.jit(run)
