"""Projectors from vision features to decoder embeddings: LLaVA-1.5's ``mlp{N}x_gelu`` and
LLaVA-OneVision-1.5's 2 x 2 ``merger``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.layers import dense, layer_norm

Array = jax.Array


class Projector(nn.Module):
    """Linear(vision, text), then (depth - 1) x [exact GELU, Linear(text, text)], all with biases.

    Layers are named ``linear_1 .. linear_N`` as in HF ``LlavaMultiModalProjector``.
    """

    out_features: int
    depth: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(1, self.depth + 1):
            if i > 1:
                x = jax.nn.gelu(x, approximate=False)
            axes = ("embed", "mlp") if i == 1 else ("mlp", "embed")
            x = dense(self.out_features, axes, name=f"linear_{i}", dtype=self.dtype)(x)
        return x


class Merger(nn.Module):
    """LayerNorm (``ln_q``) -> each ``merge`` consecutive patches (one 2 x 2 block: the rice
    tower's patch order) concatenated -> Linear(merge * D, merge * D) -> exact GELU ->
    Linear(merge * D, out), with biases (RICE-ViT's ``PatchMerger``). [B, P, D] -> [B, P / merge, out]."""

    out_features: int
    merge: int = 4
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = layer_norm(self.eps, name="ln_q", dtype=self.dtype)(x)
        b, p, d = x.shape
        x = x.reshape(b, p // self.merge, self.merge * d)
        x = dense(self.merge * d, ("embed", "mlp"), name="linear_1", dtype=self.dtype)(x)
        x = jax.nn.gelu(x, approximate=False)
        return dense(self.out_features, ("mlp", "embed"), name="linear_2", dtype=self.dtype)(x)
