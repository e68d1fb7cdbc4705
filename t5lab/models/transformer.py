"""The three T5-family architectures built from layers.py: encoder-decoder,
decoder-only (causal or prefix LM) and encoder-only (MLM head).

Param tree (unscanned; scanned stacks hold one `layers` module whose params
have a leading 'layers' axis):
  token_embedder/embedding                       [vocab, embed]
  {encoder,decoder}/relpos/rel_embedding         [heads, relpos_buckets]  (per stack)
  {encoder,decoder}/layers_i/relpos/...          (per layer when relpos_per_layer)
  .../layers_i/pre_attention_norm/scale          [embed]
  .../layers_i/self_attention/{query,key,value}/kernel  [embed, heads, kv]
  .../layers_i/self_attention/out/kernel         [heads, kv, embed]
  decoder/layers_i/pre_cross_attention_norm, cross_attention/...  (encoder-decoder)
  .../layers_i/pre_mlp_norm/scale, mlp/{wi_0,wi_1|wi} [embed, mlp], mlp/wo [mlp, embed]
  {encoder,decoder}/final_norm/scale
  lm_head/kernel                                 [embed, vocab]  (untied)
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from t5lab.models import attention as attn
from t5lab.models.layers import (F32, Attention, DenseHead, Embed, Mlp, RelativePositionBias, RMSNorm,
                                 additive_mask)

# Names for jax.checkpoint_policies; "minimal" keeps only the tagged block outputs.
REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "minimal": jax.checkpoint_policies.save_only_these_names("attention_out", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A hashable copy of config.model (flax lifts need hashable attributes)."""
    arch: str
    vocab_size: int
    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    activation: str
    gated_mlp: bool
    position: str
    relpos_buckets: int
    relpos_max_distance: int
    relpos_per_layer: bool
    rope_theta: float
    tie_embeddings: bool
    dropout_rate: float
    norm_eps: float
    dtype: str
    scan_layers: bool
    scan_unroll: int
    remat_policy: str
    attention: str = "auto"

    @classmethod
    def from_config(cls, config) -> "ModelConfig":
        m = config.model if "model" in config else config
        values = {f.name: m[f.name] for f in dataclasses.fields(cls)
                  if f.name in m or f.default is dataclasses.MISSING}
        if values["num_decoder_layers"] == -1:
            values["num_decoder_layers"] = values["num_layers"]
        return cls(**values)

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else F32

    @property
    def cpu_vjp(self) -> bool:
        """Whether layers may use cpu_kernels' hand-written VJPs: not under a
        remat policy that saves dots, which those VJPs would hide."""
        return self.remat_policy not in ("dots", "dots_no_batch")


def constrain(x):
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Layer(nn.Module):
    """One pre-norm block: self-attention, optional cross-attention, MLP."""
    cfg: ModelConfig
    causal: bool
    cross: bool
    deterministic: bool
    decode: bool
    implementation: str = "xla"   # resolved by the stack (models/attention.py)

    @nn.compact
    def __call__(self, x, mask, rel_bias, q_pos, k_pos, encoded, cross_mask, cache_index):
        cfg, dt, impl = self.cfg, self.cfg.compute_dtype, self.implementation
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
        rope = cfg.position == "rope"
        relpos = (not self.causal, cfg.relpos_buckets, cfg.relpos_max_distance)
        # mask: for `xla` the additive self-attention mask, else what the
        # implementation takes; rel_bias: the stack's shared relative bias
        # [1, H, Q, K] (the table [H, buckets] for `flash`) or None. For `xla`
        # they meet here, per layer, so each layer reduces its own logits gradient
        # over the batch for rel_bias, instead of every layer's [B, H, Q, K]
        # gradient being summed and held until after the stack.
        if cfg.relpos_per_layer:
            rel_bias = RelativePositionBias(cfg.num_heads, cfg.relpos_buckets, cfg.relpos_max_distance,
                                            not self.causal, name="relpos")(q_pos, k_pos, impl == "flash")
        bias = rel_bias
        if impl == "xla":
            mask, bias = None, mask if rel_bias is None else mask + rel_bias
        attention = lambda name, cross=False: Attention(
            cfg.num_heads, cfg.head_dim, dt, cfg.dropout_rate,
            scale_logits=rope and not cross, rope_theta=cfg.rope_theta if rope and not cross else None,
            implementation=impl, relpos=None if cross else relpos, cpu_vjp=cfg.cpu_vjp, name=name)
        h = RMSNorm(cfg.norm_eps, dt, name="pre_attention_norm")(x)
        h = attention("self_attention")(h, h, mask, bias, q_pos, k_pos, self.deterministic,
                                        self.decode, cache_index)
        x = constrain(x + drop(checkpoint_name(h, "attention_out")))
        if self.cross:
            h = RMSNorm(cfg.norm_eps, dt, name="pre_cross_attention_norm")(x)
            cross_args = (None, cross_mask) if impl == "xla" else (cross_mask, None)
            h = attention("cross_attention", cross=True)(h, encoded, *cross_args,
                                                         deterministic=self.deterministic)
            x = constrain(x + drop(checkpoint_name(h, "attention_out")))
        h = RMSNorm(cfg.norm_eps, dt, name="pre_mlp_norm")(x)
        h = Mlp(cfg.d_ff, cfg.activation, cfg.gated_mlp, dt, cfg.dropout_rate, cfg.cpu_vjp, name="mlp")(
            h, deterministic=self.deterministic)
        x = constrain(x + drop(checkpoint_name(h, "mlp_out")))
        return x, None


class Stack(nn.Module):
    """Embedded tokens -> layers -> final norm. Builds the self-attention mask
    (padding, segments, causal / prefix) and the shared relative bias once.

    In decode mode the stack keeps the cache write position ('cache'/'index')
    and which cached keys belong to a bidirectional prefix."""
    cfg: ModelConfig
    causal: bool
    cross: bool
    num_layers: int

    @nn.compact
    def __call__(self, x, key_valid=None, segment_ids=None, positions=None, prefix=None,
                 encoded=None, cross: attn.Masking | None = None, deterministic=True, decode=False):
        cfg = self.cfg
        b, t = x.shape[:2]
        cache_index = None
        impl = attn.resolve(cfg.attention, cfg.compute_dtype, decode, cfg.dropout_rate)
        if decode:
            initialized = self.has_variable("cache", "index")
            index_var = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            # The cache length is fixed by the init call (t == full length then).
            key_prefix = self.variable("cache", "key_prefix", jnp.zeros, (b, t), jnp.bool_)
            cache_index = index_var.value
            length = key_prefix.value.shape[1]
            q_index = cache_index + jnp.arange(t)[None]
            k_index = jnp.arange(length)[None]
            q_prefix = jnp.zeros((b, t), jnp.bool_) if prefix is None else prefix.astype(jnp.bool_)
            if initialized:
                index_var.value = cache_index + t
                key_prefix.value = jax.lax.dynamic_update_slice(key_prefix.value, q_prefix, (0, cache_index))
            mask = (k_index[:, None, :] <= q_index[:, :, None])
            mask = (mask | (q_prefix[:, :, None] & key_prefix.value[:, None, :]))[:, None]
            q_pos = q_index if positions is None else positions
            k_pos = k_index
        else:
            q_pos = k_pos = jnp.arange(t)[None] if positions is None else positions
            if cfg.position == "relative":
                # Inside a packed segment positions run contiguously, so k_pos - q_pos
                # equals the index difference wherever the mask lets attention through:
                # one [1, H, T, T] bias serves every row, and its gradient needs no
                # per-row work.
                q_pos = k_pos = jnp.arange(t)[None]
            mask = attn.Masking(segment_ids, segment_ids, key_valid, prefix, self.causal)
        cross_mask = cross
        if impl in ("dpa", "cudnn"):  # never in decode mode (attn.resolve)
            mask = attn.for_dot_product(mask, t, t)
            if cross is not None:
                cross_mask = attn.for_dot_product(cross, t, encoded.shape[1])
        elif impl != "flash":
            if not decode:
                mask = attn.dense_mask(mask, t, t)
            if cross is not None:
                cross_mask = attn.dense_mask(cross, t, encoded.shape[1])

        rel_bias = None
        if cfg.position == "relative" and not cfg.relpos_per_layer:
            rel_bias = RelativePositionBias(cfg.num_heads, cfg.relpos_buckets, cfg.relpos_max_distance,
                                            not self.causal, name="relpos")(q_pos, k_pos, impl == "flash")
        if impl == "xla":
            # The mask becomes an additive bias once per stack: layers add it (no
            # select forward, none backward).
            mask = additive_mask(mask)
            if cross_mask is not None:
                cross_mask = additive_mask(cross_mask)

        x = constrain(nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic))
        layer = Layer
        if cfg.remat_policy != "none" and not decode:
            layer = nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        args = (mask, rel_bias, q_pos, k_pos, encoded, cross_mask, cache_index)
        if cfg.scan_layers:
            scanned = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                              unroll=cfg.scan_unroll,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, self.causal, self.cross, deterministic, decode, impl, name="layers")(x, *args)
        else:
            for i in range(self.num_layers):
                x, _ = layer(cfg, self.causal, self.cross, deterministic, decode, impl,
                             name=f"layers_{i}")(x, *args)
        x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)
        return constrain(nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic))


class _WithHead(nn.Module):
    """Shared embedding + output head. Tied heads scale hidden by d_model**-0.5
    (T5/mesh-tensorflow); `hidden` returned by return_hidden already includes it,
    so logits == hidden @ head_matrix(params, config) in every case."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = DenseHead(cfg.vocab_size, cfg.compute_dtype)
        self.build_stacks()

    def build_stacks(self):
        raise NotImplementedError

    def scale_hidden(self, x):
        return x * jnp.asarray(self.cfg.d_model ** -0.5, x.dtype) if self.cfg.tie_embeddings else x

    def logits(self, hidden):
        """float32 [B, T, vocab] from (already scaled) hidden states."""
        out = self.token_embedder.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(F32), ("batch", "length", "vocab"))

    def finish(self, x, return_hidden):
        x = self.scale_hidden(x)
        return x if return_hidden else self.logits(x)


class EncoderDecoder(_WithHead):
    def build_stacks(self):
        cfg = self.cfg
        self.encoder = Stack(cfg, causal=False, cross=False, num_layers=cfg.num_layers)
        self.decoder = Stack(cfg, causal=True, cross=True, num_layers=cfg.num_decoder_layers)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
               deterministic=True):
        x = self.token_embedder(encoder_input_tokens)
        return self.encoder(x, encoder_input_tokens > 0, encoder_segment_ids, encoder_positions,
                            deterministic=deterministic)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, decoder_positions=None, deterministic=True, decode=False,
               return_hidden=False):
        """Decoder logits given encoder output. Padding in decoder inputs needs no
        key mask: it only ever follows real tokens, which causality already hides."""
        packed = decoder_segment_ids is not None and encoder_segment_ids is not None
        cross = attn.Masking(decoder_segment_ids if packed else None,
                             encoder_segment_ids if packed else None, encoder_input_tokens > 0)
        x = self.token_embedder(decoder_input_tokens)
        x = self.decoder(x, None, decoder_segment_ids, decoder_positions, None, encoded, cross,
                         deterministic, decode)
        return self.finish(x, return_hidden)

    def __call__(self, batch, deterministic=True, decode=False, return_hidden=False):
        encoded = self.encode(batch["encoder_input_tokens"], batch.get("encoder_segment_ids"),
                              batch.get("encoder_positions"), deterministic)
        return self.decode(encoded, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                           batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"),
                           batch.get("decoder_positions"), deterministic, decode, return_hidden)


class DecoderOnly(_WithHead):
    def build_stacks(self):
        self.decoder = Stack(self.cfg, causal=True, cross=False, num_layers=self.cfg.num_layers)

    def __call__(self, batch, deterministic=True, decode=False, return_hidden=False):
        tokens = batch["decoder_input_tokens"]
        x = self.token_embedder(tokens)
        # decoder_causal_attention == 1 marks the bidirectional prefix (t5x prefix LM).
        x = self.decoder(x, None, batch.get("decoder_segment_ids"), batch.get("decoder_positions"),
                         batch.get("decoder_causal_attention"), deterministic=deterministic, decode=decode)
        return self.finish(x, return_hidden)


class EncoderOnly(_WithHead):
    def build_stacks(self):
        self.encoder = Stack(self.cfg, causal=False, cross=False, num_layers=self.cfg.num_layers)

    def __call__(self, batch, deterministic=True, decode=False, return_hidden=False):
        del decode  # an encoder has nothing to cache
        tokens = batch["encoder_input_tokens"]
        x = self.token_embedder(tokens)
        x = self.encoder(x, tokens > 0, batch.get("encoder_segment_ids"), batch.get("encoder_positions"),
                         deterministic=deterministic)
        return self.finish(x, return_hidden)


ARCH_CLASSES = {"encoder_decoder": EncoderDecoder, "decoder": DecoderOnly, "encoder": EncoderOnly}
