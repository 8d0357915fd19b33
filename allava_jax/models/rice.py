"""RICE-ViT at native resolution (LLaVA-OneVision-1.5's tower; HF ``MLCDVisionModel``'s blocks).

Several images of different sizes run as one packed row: each image's patches (in 2 x 2-block
order, the processor's) one after another, then one class-token slot per image, then nothing:
padding is only the tail of each part, so rows bucket to static lengths. A token attends to the
tokens of its own image (``segment_ids``, 0 = padding), bidirectionally, through the decoder's
attention choice (``kernels``). Positions are 2-D rotary angles: a patch's are
``concat(freqs(row), freqs(col))``, a class token's the learned ``class_pos_emb``. Since attention
within an image is permutation-equivariant given those angles, where the class token sits in the
row does not matter; putting all of them after the patches keeps every image's patches 4-aligned
for the 2 x 2 merger. The blocks are CLIP's (``ClipBlock``): pre-LayerNorm, fused-qkv attention
(split into q/k/v by the converter), exact GELU MLP; no post-LayerNorm; class tokens dropped.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.data.native import Buckets, block_coords, block_order, pack_images  # noqa: F401 (the numpy side)
from allava_jax.models.clip import ClipBlock
from allava_jax.models.config import VisionConfig
from allava_jax.models.layers import BATCH, EMBED, LENGTH, constrain, layer_norm, partitioned, scan_blocks, unrolled_blocks

Array = jax.Array

# The keys of a packed vision batch (one row per decoder row; all leading dims [B]).
PACK_KEYS = ("patches", "patch_segments", "coords", "cls_segments", "kv_windows")


class RiceVision(nn.Module):
    """A packed vision batch (``pack_images``) -> patch features [B, P, hidden] (class tokens
    dropped, padding patches included: the caller reads only real ones)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    attention: str = "xla"  # LlavaConfig.attention

    @nn.compact
    def __call__(self, pack: dict[str, Array]) -> Array:
        c = self.config
        p, d = c.patch_size, c.hidden_size
        head_dim = d // c.num_heads
        kernel = self.param("patch_embedding", partitioned(nn.initializers.normal(0.02), (None, None, None, "embed")),
                            (p, p, 3, d))
        # Patches come as (channel, row, col) rows of 3 * p * p floats (the conv's input order).
        flat = kernel.astype(self.dtype).transpose(2, 0, 1, 3).reshape(3 * p * p, d)
        patches = pack["patches"].astype(self.dtype) @ flat
        cls = self.param("class_embedding", partitioned(nn.initializers.normal(0.02), ("embed",)), (d,))
        # HF's shape [1, head_dim / 2]: one angle per rotated dim pair.
        cls_angles = self.param("class_pos_emb", nn.initializers.normal(1.0), (1, head_dim // 2))
        b, n_cls = pack["cls_segments"].shape
        x = jnp.concatenate([patches, jnp.broadcast_to(cls.astype(self.dtype), (b, n_cls, d))], axis=1)
        segments = jnp.concatenate([pack["patch_segments"], pack["cls_segments"]], axis=1).astype(jnp.int32)
        angles = jnp.concatenate([patch_angles(pack["coords"], head_dim, c.rope_theta),
                                  jnp.broadcast_to(cls_angles.astype(jnp.float32), (b, n_cls, head_dim // 2))], axis=1)
        x = layer_norm(c.layer_norm_eps, name="pre_layrnorm", dtype=self.dtype)(x)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        windows = pack.get("kv_windows")
        n_windowed = patches.shape[1] if windows is not None else 0
        if self.scan_layers or self.is_initializing():
            stack = scan_blocks(ClipBlock, c.num_layers, self.remat_policy, 3)
            x, _ = stack(c, self.dtype, attention=self.attention, n_windowed=n_windowed, name="layers")(
                x, segments, angles, windows)
        else:
            block = ClipBlock(c, self.dtype, attention=self.attention, n_windowed=n_windowed, parent=None)
            x = unrolled_blocks(block, self.variables["params"]["layers"], x, segments, angles, windows,
                                remat_policy=self.remat_policy)
        return x[:, : patches.shape[1]]


def patch_angles(coords: Array, head_dim: int, theta: float) -> Array:
    """Rotary angles [B, P, head_dim / 2] of patches at (row, col) ``coords`` [B, P, 2]: the
    head_dim / 4 frequencies ``1 / theta^(arange(0, head_dim/2, 2) / (head_dim/2))`` times the row,
    then the same times the column (MLCD's axial rotary / RICE-ViT's ``rot_pos_emb``)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    c = coords.astype(jnp.float32)
    return jnp.concatenate([c[..., 0:1] * inv_freq, c[..., 1:2] * inv_freq], axis=-1)


def example_pack(config: VisionConfig, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct | Array]:
    """A zero packed batch of one 2 x 2 image per row (for ``init``)."""
    m = config.spatial_merge_size
    width = 3 * config.patch_size**2
    return {"patches": jnp.zeros((batch, m * m, width), jnp.float32),
            "patch_segments": jnp.ones((batch, m * m), jnp.int32),
            "coords": jnp.zeros((batch, m * m, 2), jnp.int32),
            "cls_segments": jnp.ones((batch, 1), jnp.int32)}
