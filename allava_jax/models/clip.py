"""CLIP in Flax: the ViT vision tower (HF ``CLIPVisionModel``), and for scoring the text tower and
both projections (HF ``CLIPModel``).

In the VLM the vision tower returns one selected layer's patch features: only the blocks that
layer needs are run. The blocks after it, and the post-LayerNorm that only CLIP's pooled output
uses, still exist as parameters (created at init, never applied) so the param tree holds the whole
pretrained tower and exports back bit-identically. In ``ClipModel`` (``pooled=True``) the tower
runs every block and pools the CLS token through that post-LayerNorm, as ``CLIPModel`` does.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.config import ClipConfig, ClipTextConfig, VisionConfig
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
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). Bidirectional in
    the vision tower; causal within ``segment_ids`` (the attention mask) in the text tower. The
    native-resolution tower (``kind == "rice"``, ``models.rice``) passes per-image segment ids and
    rotary angles [B, L, head_dim / 2] and attends on ``attention``'s kernel."""

    config: VisionConfig | ClipTextConfig
    dtype: jnp.dtype
    causal: bool = False
    attention: str = "xla"  # LlavaConfig.attention (rice)
    n_windowed: int = 0  # rice: the packed patches, attended in windows (``Attention._attend_windows``)

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None = None, angles: Array | None = None,
                 kv_windows: Array | None = None) -> tuple[Array, None]:
        c = self.config
        h = layer_norm(c.layer_norm_eps, name="layer_norm1", dtype=self.dtype)(x)
        head_dim = c.hidden_size // c.num_heads
        attn = Attention(
            c.num_heads, c.num_heads, head_dim, dtype=self.dtype, causal=self.causal, out_name="out_proj",
            angles=angles is not None, attention=self.attention, n_windowed=self.n_windowed, name="self_attn",
        )
        x = x + attn(h, segment_ids, angles, kv_windows)
        h = layer_norm(c.layer_norm_eps, name="layer_norm2", dtype=self.dtype)(x)
        x = x + Mlp(c.intermediate_size, c.hidden_act, dtype=self.dtype, name="mlp")(h)
        return constrain(x, (BATCH, LENGTH, EMBED)), None


class PatchEmbed(nn.Module):
    """CLIP's stride-``p`` ``p`` x ``p`` patch convolution (no bias), computed as what it is: one
    matmul over flattened non-overlapping patches (XLA's CPU convolution was 2.5x slower for
    ViT-B/32's 32 x 32 kernel). The kernel keeps ``nn.Conv``'s [p, p, C, D] layout."""

    patch_size: int
    features: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, images: Array) -> Array:
        p = self.patch_size
        n, h, w, ch = images.shape
        kernel = self.param("kernel", partitioned(nn.initializers.normal(0.02), (None, None, None, "embed")),
                            (p, p, ch, self.features))
        gh, gw = h // p, w // p
        x = images[:, : gh * p, : gw * p].astype(self.dtype)
        x = x.reshape(n, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, p * p * ch)
        return x @ kernel.astype(self.dtype).reshape(p * p * ch, self.features)


class CausalClipBlock(ClipBlock):
    """The text tower's block (a class, since ``nn.scan`` lifts classes)."""

    causal: bool = True


class ClipVision(nn.Module):
    """images [N, H, W, 3] (CLIP-normalised) -> features [N, T, hidden] of ``config.feature_layer``."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    pooled: bool = False  # CLIPModel: every block, then post_layernorm(CLS) -> [N, hidden]

    @nn.compact
    def __call__(self, images: Array) -> Array:
        c = self.config
        x = PatchEmbed(c.patch_size, c.hidden_size, self.dtype, name="patch_embedding")(images)
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
        if self.pooled:
            if n_run != c.num_layers:
                raise ValueError("a pooled CLIP vision tower runs every block (feature_layer=-1)")
            return layer_norm(c.layer_norm_eps, name="post_layernorm", dtype=self.dtype)(x[:, 0])
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


class ClipText(nn.Module):
    """token ids [N, T] + attention mask [N, T] -> pooled text features [N, hidden].

    Causal attention; padding (mask 0) is a segment of its own, so right-padded rows give the
    same result as unpadded ones. Pooled at the first ``eos_token_id``, or at the largest token id
    for configs with the pre-#24773 ``eos_token_id == 2``, exactly as transformers does.
    """

    config: ClipTextConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array) -> Array:
        c = self.config
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"text of {input_ids.shape[1]} tokens > max_position_embeddings {c.max_position_embeddings}")
        embed = self.param("token_embedding", partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                           (c.vocab_size, c.hidden_size))
        pos = self.param("position_embedding", partitioned(nn.initializers.normal(0.01), (None, "embed")),
                         (c.max_position_embeddings, c.hidden_size))
        x = (jnp.take(embed, input_ids, axis=0) + pos[: input_ids.shape[1]]).astype(self.dtype)
        x = constrain(x, (BATCH, LENGTH, EMBED))
        segments = attention_mask.astype(jnp.int32)
        if self.scan_layers or self.is_initializing():
            x, _ = scan_blocks(CausalClipBlock, c.num_layers, "none", 1)(c, self.dtype, name="layers")(x, segments)
        else:
            block = CausalClipBlock(c, self.dtype, parent=None)
            x = unrolled_blocks(block, self.variables["params"]["layers"], x, segments, remat_policy="none")
        x = layer_norm(c.layer_norm_eps, name="final_layer_norm", dtype=self.dtype)(x)
        if c.eos_token_id == 2:
            eos_at = jnp.argmax(input_ids, axis=-1)
        else:
            eos_at = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, eos_at[:, None, None], axis=1)[:, 0]


class ClipModel(nn.Module):
    """HF ``CLIPModel``: L2-normalised image and text embeddings in one space, and their
    similarity logits scaled by ``exp(logit_scale)``."""

    config: ClipConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True  # False: unrolled blocks over the same params (faster on CPU)

    def setup(self) -> None:
        c = self.config
        self.vision = ClipVision(c.vision, self.dtype, scan_layers=self.scan_layers, pooled=True)
        self.text = ClipText(c.text, self.dtype, scan_layers=self.scan_layers)
        init = partitioned(nn.initializers.normal(0.02), ("embed", "mlp"))
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=init)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=init)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

    def image_embeds(self, images: Array) -> Array:
        """CLIP-normalised images [N, H, W, 3] -> unit embeddings [N, projection_dim] (fp32)."""
        return _unit(self.visual_projection(self.vision(images)))

    def text_embeds(self, input_ids: Array, attention_mask: Array) -> Array:
        """Tokenised texts -> unit embeddings [N, projection_dim] (fp32)."""
        return _unit(self.text_projection(self.text(input_ids, attention_mask)))

    def __call__(self, input_ids: Array, attention_mask: Array, images: Array) -> dict[str, Array]:
        image, text = self.image_embeds(images), self.text_embeds(input_ids, attention_mask)
        logits_per_image = jnp.exp(self.logit_scale) * image @ text.T
        return {"image_embeds": image, "text_embeds": text, "logits_per_image": logits_per_image}


def _unit(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_example_inputs(config: ClipConfig, batch: int = 1) -> tuple[Array, Array, Array]:
    """(input_ids, attention_mask, images) of the shapes ``ClipModel`` is initialised with."""
    n, size = config.text.max_position_embeddings, config.vision.image_size
    return (jnp.zeros((batch, n), jnp.int32), jnp.ones((batch, n), jnp.int32),
            jnp.zeros((batch, size, size, 3), jnp.float32))


def abstract_clip_params(config: ClipConfig) -> dict:
    """The boxed param tree of ``ClipModel(config)`` as shapes (nothing is allocated)."""
    model = ClipModel(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *clip_example_inputs(config))["params"])
