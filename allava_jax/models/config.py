"""Model configuration: plain frozen dataclasses, presets, and dict round-trips.

The same three dataclasses describe our Flax model, are written next to every checkpoint
(``model_config.json``) and are mapped to and from Hugging Face configs by ``allava_jax.convert``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from allava_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (HF ``CLIPVisionConfig`` field meanings)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Index into HF's ``hidden_states`` tuple (0 = embeddings after pre-LayerNorm, -1 = last block).
    feature_layer: int = -2
    # "default" drops the CLS token (LLaVA); "full" keeps it.
    select_strategy: str = "default"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_blocks_to_run(self) -> int:
        """Blocks needed to produce ``hidden_states[feature_layer]``: later ones are skipped."""
        n = self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer
        if not 0 <= n <= self.num_layers:
            raise UserError(f"feature_layer={self.feature_layer} out of range for {self.num_layers} layers")
        return n

    @property
    def num_feature_tokens(self) -> int:
        """Tokens one image contributes to the decoder's sequence."""
        return self.num_patches + (0 if self.select_strategy == "default" else 1)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Phi decoder (HF ``PhiConfig`` field meanings)."""

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (Phi-2)
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    lm_head_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.kv_heads:
            raise UserError(f"hidden_size {self.hidden_size} / heads {self.num_heads} / kv heads {self.kv_heads} do not divide")
        if self.rotary_dim % 2:
            raise UserError(f"rotary dim int({self.head_dim} * {self.partial_rotary_factor}) = {self.rotary_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The whole VLM: vision tower + projector + decoder, and how images enter the sequence."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 50295
    # Compute dtype ("float32" / "bfloat16"); params are always stored in float32.
    dtype: str = "float32"
    # Activation checkpointing of each scanned block: none | full | dots | dots_no_batch.
    remat_policy: str = "none"
    # Run each tower's blocks as a scan (compiles once per tower: the default, and what TPUs
    # want) or as an unrolled loop over the same stacked params (faster training on CPU).
    scan_layers: bool = True

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_feature_tokens

    @property
    def projector_depth(self) -> int:
        if not (self.projector_type.startswith("mlp") and self.projector_type.endswith("x_gelu")):
            raise UserError(f"unsupported projector_type {self.projector_type!r} (expected mlp{{N}}x_gelu)")
        return int(self.projector_type[3:-6])

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "LlavaConfig":
        """Copy with top-level fields or ``vision``/``text`` dicts of field changes."""
        for part in ("vision", "text"):
            if isinstance(changes.get(part), dict):
                changes[part] = dataclasses.replace(getattr(self, part), **changes[part])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LlavaConfig":
        return cls.from_dict(json.loads(text))


def phi2_clip336() -> LlavaConfig:
    """The paper's model: CLIP ViT-L/14@336 + mlp2x_gelu + Phi-2 (ALLaVA-Phi2-2_7B)."""
    return LlavaConfig()


def tiny() -> LlavaConfig:
    """A few-KB model for unit tests: every code path, milliseconds per step."""
    return LlavaConfig(
        vision=VisionConfig(
            image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4
        ),
        text=TextConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=256,
        ),
        image_token_id=127,
    )


def demo() -> LlavaConfig:
    """A small model the CPU demo trains from scratch in minutes (vision tower included)."""
    return LlavaConfig(
        vision=VisionConfig(
            image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4
        ),
        text=TextConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=1024,
            num_layers=4,
            num_heads=8,
            max_position_embeddings=1024,
        ),
        image_token_id=1023,
    )


PRESETS = {"phi2_clip336": phi2_clip336, "tiny": tiny, "demo": demo}


def get_preset(name: str, **overrides: Any) -> LlavaConfig:
    """A preset by name, with optional overrides (see ``LlavaConfig.replace``)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
