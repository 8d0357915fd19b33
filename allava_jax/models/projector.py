"""The ``mlp{N}x_gelu`` projector from vision features to decoder embeddings (LLaVA-1.5)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.layers import dense

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
