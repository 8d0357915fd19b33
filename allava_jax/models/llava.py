"""The VLM: encode each row's images, project, write them over the image placeholders, decode.

A native-resolution (rice) tower takes a packed vision batch per row instead of ``images``
(``models.rice``). Otherwise inputs follow the batch contract in DESIGN.md: ``tokens`` [B, L] where every image occupies
``num_image_tokens`` consecutive ``image_token_id`` placeholders, ``images`` [B, M, H, W, 3] in
placeholder order and ``image_mask`` [B, M]. Placeholder k of a row takes feature k of the row's
images flattened in slot order, so several images per packed row work and unused slots are never
read.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.clip import ClipVision
from allava_jax.models.config import LlavaConfig
from allava_jax.models.decoder import Decoder, default_segments
from allava_jax.models.projector import Merger, Projector
from allava_jax.models.rice import RiceVision, example_pack

Array = jax.Array


class Llava(nn.Module):
    """Param tree: ``{"vision": ..., "projector": ..., "llm": ...}``. KV-cache inference runs its
    pieces (``embed``, the decoder's blocks, ``head``) through ``models.cached``."""

    config: LlavaConfig

    def setup(self) -> None:
        c = self.config
        dtype = c.compute_dtype
        if c.vision.kind == "rice":
            self.vision = RiceVision(c.vision, dtype=dtype, remat_policy=c.remat_policy, scan_layers=c.scan_layers,
                                     attention=c.attention)
            self.projector = Merger(c.text.hidden_size, c.vision.spatial_merge_size**2, c.vision.layer_norm_eps, dtype)
        else:
            self.vision = ClipVision(c.vision, dtype=dtype, remat_policy=c.remat_policy, scan_layers=c.scan_layers)
            self.projector = Projector(c.text.hidden_size, depth=c.projector_depth, dtype=dtype)
        self.llm = Decoder(c.text, dtype=dtype, remat_policy=c.remat_policy, scan_layers=c.scan_layers,
                           attention=c.attention)

    def __call__(
        self,
        tokens: Array,
        images: Array | None = None,
        image_mask: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        """Logits [B, L, vocab] in float32."""
        return self.head(self.hidden(tokens, images, image_mask, segment_ids, positions))

    def hidden(
        self,
        tokens: Array,
        images: Array | None = None,
        image_mask: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        """The decoder's last hidden states [B, L, D], before the final LayerNorm and LM head."""
        segment_ids, positions = default_segments(tokens, segment_ids, positions)
        return self.llm.hidden(self.embed(tokens, images, image_mask), segment_ids, positions)

    def head(self, hidden: Array) -> Array:
        """Logits of ``hidden`` (the training loss gathers the positions it scores first)."""
        return self.llm.head(hidden)

    def embed(self, tokens: Array, images: Array | None = None, image_mask: Array | None = None) -> Array:
        """Token embeddings with image features written over the placeholders."""
        is_image = tokens == self.config.image_token_id
        # The placeholder id may lie outside the vocabulary: never look it up.
        embeddings = self.llm.embed(jnp.where(is_image, 0, tokens))
        if images is None:
            if self.is_initializing():
                raise ValueError("init needs example images to create the vision and projector params")
            return embeddings
        features = self.encode_images(images, image_mask)  # [B, M * T, D]
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        gathered = jnp.take_along_axis(features, slot[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered.astype(embeddings.dtype), embeddings)

    def encode_images(self, images: Array | dict[str, Array], image_mask: Array | None = None) -> Array:
        """images [B, M, H, W, 3] -> projected features [B, M * T, D] (masked slots zeroed). A
        rice tower takes a packed vision batch instead (``models.rice.pack_images``: row b holds
        row b's images in placeholder order) -> [B, P / 4, D], image k's grid_h * grid_w / 4
        tokens after those of images 1..k-1 (``image_mask`` unused: padding is segment 0)."""
        if self.config.vision.kind == "rice":
            return self.projector(self.vision(images))
        b, m = images.shape[:2]
        features = self.vision(images.reshape(b * m, *images.shape[2:]))
        features = self.projector(features).reshape(b, m, -1, self.config.text.hidden_size)
        if image_mask is not None:
            features = jnp.where(image_mask[:, :, None, None], features, 0)
        return features.reshape(b, -1, features.shape[-1])


def example_inputs(config: LlavaConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict[str, Array]:
    """Zero inputs of the right shapes, for ``init`` and ``jax.eval_shape``."""
    if config.vision.kind == "rice":
        return {"tokens": jnp.zeros((batch, seq_len), jnp.int32), "images": example_pack(config.vision, batch),
                "image_mask": jnp.ones((batch, 1), bool)}
    size = config.vision.image_size
    return {
        "tokens": jnp.zeros((batch, seq_len), jnp.int32),
        "images": jnp.zeros((batch, num_images, size, size, 3), jnp.float32),
        "image_mask": jnp.ones((batch, num_images), bool),
    }


def init_params(config: LlavaConfig, rng: Array) -> dict:
    """Random params (with logical-axis metadata boxes stripped)."""
    init = jax.jit(lambda key: Llava(config).init(key, **example_inputs(config))["params"])
    return nn.unbox(init(rng))


def abstract_params(config: LlavaConfig) -> dict:
    """Param shapes and dtypes (``nn.Partitioned`` boxes kept) without allocating anything."""
    return jax.eval_shape(lambda: Llava(config).init(jax.random.key(0), **example_inputs(config))["params"])
