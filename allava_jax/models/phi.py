"""Phi decoder (HF ``PhiForCausalLM``): partial rotary, parallel attention + MLP residual."""

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
    Mlp,
    constrain,
    dense,
    layer_norm,
    partitioned,
    scan_blocks,
    unrolled_blocks,
)

Array = jax.Array


class PhiBlock(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)): one LayerNorm feeds both branches (Phi's parallel residual)."""

    config: TextConfig
    dtype: jnp.dtype
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> tuple[Array, None]:
        c = self.config
        h = layer_norm(c.layer_norm_eps, name="input_layernorm", dtype=self.dtype)(x)
        attn = Attention(
            c.num_heads,
            c.kv_heads,
            c.head_dim,
            dtype=self.dtype,
            causal=True,
            rotary_dim=c.rotary_dim,
            rope_theta=c.rope_theta,
            decode=self.decode,
            name="self_attn",
        )
        mlp = Mlp(c.intermediate_size, c.hidden_act, dtype=self.dtype, name="mlp")
        x = x + attn(h, segment_ids, positions) + mlp(h)
        return constrain(x, (BATCH, LENGTH, EMBED)), None


class PhiDecoder(nn.Module):
    """Token embedding, scanned blocks, final LayerNorm and LM head.

    Split into ``embed``, ``hidden`` and ``head`` so the VLM can write image features into the
    embeddings in between, and the loss can score a subset of positions. Logits come back in
    float32 whatever the compute dtype.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    decode: bool = False

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        stack = scan_blocks(PhiBlock, c.num_layers, self.remat_policy, 2)
        self.layers = stack(c, self.dtype, self.decode)
        self.final_layernorm = layer_norm(c.layer_norm_eps, name="final_layernorm", dtype=self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=self.dtype, use_bias=c.lm_head_bias, name="lm_head")
        elif c.lm_head_bias:
            self.lm_head_bias = self.param("lm_head_bias", partitioned(nn.initializers.zeros_init(), ("vocab",)), (c.vocab_size,))

    def embed(self, tokens: Array) -> Array:
        return constrain(self.embed_tokens(tokens), (BATCH, LENGTH, EMBED))

    def __call__(self, embeddings: Array, segment_ids: Array, positions: Array) -> Array:
        return self.head(self.hidden(embeddings, segment_ids, positions))

    def hidden(self, embeddings: Array, segment_ids: Array, positions: Array) -> Array:
        """The last block's output [B, L, D] (before the final LayerNorm). Decoding always scans
        (the KV cache is stacked per layer); so does init, which creates the stacked params."""
        if self.scan_layers or self.decode or self.is_initializing():
            x, _ = self.layers(embeddings, segment_ids, positions)
            return x
        block = PhiBlock(self.config, self.dtype, parent=None)
        stacked = self.variables["params"]["layers"]
        return unrolled_blocks(block, stacked, embeddings, segment_ids, positions, remat_policy=self.remat_policy)

    def head(self, x: Array, score_positions: Array | None = None) -> Array:
        """Final LayerNorm + LM head: logits [B, L, vocab], or [B, T, vocab] at ``score_positions``
        [B, T] only (the training loss needs logits at its target positions alone)."""
        if score_positions is not None:
            x = jnp.take_along_axis(x, score_positions[..., None], axis=1)
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
