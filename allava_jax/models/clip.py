"""CLIP ViT vision tower (HF ``CLIPVisionModel``), returning one selected layer's patch features.

Only the blocks that the selected layer needs are run. The blocks after it, and the
post-LayerNorm that only CLIP's pooled output uses, still exist as parameters (created at init,
never applied) so the param tree holds the whole pretrained tower and exports back bit-identically.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.config import VisionConfig
from allava_jax.models.layers import (
    BATCH,
    EMBED,
    LENGTH,
    Attention,
    Mlp,
    constrain,
    layer_norm,
    partitioned,
    scan_blocks,
    unrolled_blocks,
)

Array = jax.Array


class ClipBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: VisionConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, None]:
        c = self.config
        h = layer_norm(c.layer_norm_eps, name="layer_norm1", dtype=self.dtype)(x)
        head_dim = c.hidden_size // c.num_heads
        attn = Attention(
            c.num_heads, c.num_heads, head_dim, dtype=self.dtype, causal=False, out_name="out_proj", name="self_attn"
        )
        x = x + attn(h)
        h = layer_norm(c.layer_norm_eps, name="layer_norm2", dtype=self.dtype)(x)
        x = x + Mlp(c.intermediate_size, c.hidden_act, dtype=self.dtype, name="mlp")(h)
        return constrain(x, (BATCH, LENGTH, EMBED)), None


class ClipVision(nn.Module):
    """images [N, H, W, 3] (CLIP-normalised) -> features [N, T, hidden] of ``config.feature_layer``."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True

    @nn.compact
    def __call__(self, images: Array) -> Array:
        c = self.config
        x = nn.Conv(
            c.hidden_size,
            kernel_size=(c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.normal(0.02), (None, None, None, "embed")),
            name="patch_embedding",
        )(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, c.hidden_size)
        cls = self.param("class_embedding", partitioned(nn.initializers.normal(0.02), ("embed",)), (c.hidden_size,))
        pos = self.param(
            "position_embedding",
            partitioned(nn.initializers.normal(0.02), (None, "embed")),
            (c.num_patches + 1, c.hidden_size),
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = layer_norm(c.layer_norm_eps, name="pre_layrnorm", dtype=self.dtype)(x)
        x = constrain(x, (BATCH, LENGTH, EMBED))

        n_run = c.num_blocks_to_run
        if n_run and (self.scan_layers or self.is_initializing()):
            x, _ = scan_blocks(ClipBlock, n_run, self.remat_policy, 0)(c, self.dtype, name="layers")(x)
        elif n_run:
            block = ClipBlock(c, self.dtype, parent=None)
            x = unrolled_blocks(block, self.variables["params"]["layers"], x, remat_policy=self.remat_policy)
        if self.is_initializing():
            self._create_unused_params(x)
        return x[:, 1:] if c.select_strategy == "default" else x

    def _create_unused_params(self, x: Array) -> None:
        """Blocks after the selected layer and the post-LayerNorm: held, never applied."""
        c = self.config
        n_unused = c.num_layers - c.num_blocks_to_run
        if n_unused:
            scan_blocks(ClipBlock, n_unused, "none", 0)(c, self.dtype, name="unused_layers")(x)
        layer_norm(c.layer_norm_eps, name="post_layernorm", dtype=self.dtype)(x[:, 0])
