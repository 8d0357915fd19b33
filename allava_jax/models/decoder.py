"""The decoder family: Phi-2, StableLM-2, Phi-3, Qwen2 and Qwen3 as config fields of one model.

The variants (``TextConfig``): LayerNorm or float32 RMSNorm; parallel (Phi-2) or sequential
pre-norm residual; ``fc1 -> act -> fc2`` or gated ``down(act(gate) * up)`` MLP; per-projection
biases; partial rotary with optional LongRoPE; grouped-query heads; tied or untied embeddings; Qwen3's
per-head q/k RMSNorm and a head width independent of ``hidden / heads``.
Param names inside the tree are Phi-2's where the families share a piece (``self_attn.dense``,
``final_layernorm``); the converter maps each family's HF names onto them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.config import TextConfig
from allava_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    Attention,
    GatedMlp,
    Mlp,
    Rope,
    constrain,
    dense,
    norm,
    partitioned,
    scan_blocks,
    unrolled_blocks,
)

Array = jax.Array


def rope_of(c: TextConfig) -> Rope:
    return Rope(
        c.rotary_dim,
        c.rope_theta,
        c.rope_short_factor,
        c.rope_long_factor,
        c.original_max_position_embeddings,
        c.rope_attention_factor,
    )


class DecoderBlock(nn.Module):
    """Parallel: ``x + attn(n(x)) + mlp(n(x))`` (one norm feeds both branches, Phi-2); sequential:
    ``h = x + attn(n1(x)); h + mlp(n2(h))``."""

    config: TextConfig
    dtype: jnp.dtype
    decode: bool = False
    attention: str = "auto"  # LlavaConfig.attention
    fused: bool = False  # fused q/k/v (and gate/up) weights: models.cached's layout

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> tuple[Array, None]:
        c = self.config
        attn = Attention(
            c.num_heads,
            c.kv_heads,
            c.head_dim,
            dtype=self.dtype,
            causal=True,
            rope=rope_of(c),
            decode=self.decode,
            attention=self.attention,
            qkv_bias=c.qkv_bias,
            out_bias=c.out_bias,
            fused_qkv=self.fused,
            qk_norm_eps=c.layer_norm_eps if c.qk_norm else None,
            name="self_attn",
        )
        if c.mlp == "gated":
            mlp = GatedMlp(c.intermediate_size, c.hidden_act, dtype=self.dtype, fused_gate_up=self.fused, name="mlp")
        else:
            mlp = Mlp(c.intermediate_size, c.hidden_act, dtype=self.dtype, name="mlp")
        h = norm(c.norm, c.layer_norm_eps, name="input_layernorm", dtype=self.dtype)(x)
        if c.parallel_residual:
            x = x + attn(h, segment_ids, positions) + mlp(h)
        else:
            x = x + attn(h, segment_ids, positions)
            x = x + mlp(norm(c.norm, c.layer_norm_eps, name="post_attention_layernorm", dtype=self.dtype)(x))
        return constrain(x, (BATCH, LENGTH, EMBED)), None


class Decoder(nn.Module):
    """Token embedding, scanned blocks, final norm and LM head.

    Split into ``embed``, ``hidden`` and ``head`` so the VLM can write image features into the
    embeddings in between, and the loss can score a subset of positions. Logits come back in
    float32 whatever the compute dtype.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    attention: str = "auto"  # LlavaConfig.attention

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        stack = scan_blocks(DecoderBlock, c.num_layers, self.remat_policy, 2)
        self.layers = stack(c, self.dtype, attention=self.attention)
        self.final_layernorm = norm(c.norm, c.layer_norm_eps, name="final_layernorm", dtype=self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, use_bias=c.lm_head_bias, name="lm_head")
        elif c.lm_head_bias:
            self.lm_head_bias = self.param("lm_head_bias", partitioned(nn.initializers.zeros_init(), ("vocab",)), (c.vocab_size,))

    def embed(self, tokens: Array) -> Array:
        return constrain(self.embed_tokens(tokens), (BATCH, LENGTH, EMBED))

    def __call__(self, embeddings: Array, segment_ids: Array, positions: Array) -> Array:
        return self.head(self.hidden(embeddings, segment_ids, positions))

    def hidden(self, embeddings: Array, segment_ids: Array, positions: Array) -> Array:
        """The last block's output [B, L, D] (before the final norm). Init always scans: it creates
        the stacked params. (KV-cache decoding runs the blocks itself: ``models.cached``.)"""
        if self.scan_layers or self.is_initializing():
            x, _ = self.layers(embeddings, segment_ids, positions)
            return x
        block = DecoderBlock(self.config, self.dtype, attention=self.attention, parent=None)
        stacked = self.variables["params"]["layers"]
        return unrolled_blocks(block, stacked, embeddings, segment_ids, positions, remat_policy=self.remat_policy)

    def head(self, x: Array) -> Array:
        """Final norm + LM head: logits [B, L, vocab]."""
        x = self.final_layernorm(x)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
            if self.config.lm_head_bias:
                logits = logits + self.lm_head_bias.astype(logits.dtype)
        else:
            logits = self.lm_head(x)
        return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, "act_vocab"))

    def logits(self, tokens: Array, segment_ids: Array | None = None, positions: Array | None = None) -> Array:
        """Text-only forward: tokens [B, L] -> logits [B, L, vocab]."""
        segment_ids, positions = default_segments(tokens, segment_ids, positions)
        return self(self.embed(tokens), segment_ids, positions)


def default_segments(tokens: Array, segment_ids: Array | None, positions: Array | None) -> tuple[Array, Array]:
    """One segment per row and positions 0..L-1 when the caller gives none."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return segment_ids, positions
