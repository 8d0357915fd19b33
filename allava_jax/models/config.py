"""Model configuration: plain frozen dataclasses, presets, and dict round-trips.

The same three dataclasses describe our Flax model, are written next to every checkpoint
(``model_config.json``) and are mapped to and from Hugging Face configs by ``allava_jax.convert``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

from allava_jax.data.templates import CHAT_TEMPLATES
from allava_jax.errors import UserError


VISION_KINDS = ("clip", "rice")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (HF ``CLIPVisionConfig`` field meanings). ``kind`` picks the family:
    "clip" (fixed ``image_size``, learned position embeddings, one image per row) or "rice"
    (RICE-ViT / MLCD: native resolution, 2-D rotary, several images packed in one row)."""

    kind: str = "clip"
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
    # rice: the 2-D rotary's base; patches per merged LLM token along each side (the processor
    # emits patches in these blocks); the processor's pixel budget per image (released 4B values).
    rope_theta: float = 10000.0
    spatial_merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 2560000

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise UserError(f"vision.kind={self.kind!r}; choose from {VISION_KINDS}")
        if self.kind == "rice" and (self.hidden_size // self.num_heads) % 4:
            raise UserError(f"rice: head_dim {self.hidden_size // self.num_heads} must be a multiple of 4 (2-D rotary)")

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
        """Tokens one image contributes to the decoder's sequence (CLIP: fixed; rice: per image,
        ``grid_h * grid_w / merge**2``, see ``models.rice``)."""
        if self.kind == "rice":
            raise UserError("a native-resolution (rice) tower gives each image its own token count: grid_h * grid_w / 4")
        return self.num_patches + (0 if self.select_strategy == "default" else 1)


NORMS = ("layernorm", "rmsnorm")
MLPS = ("fc", "gated")
ROPE_SCALINGS = ("none", "longrope")
FAMILIES = ("phi", "stablelm", "phi3", "qwen2", "qwen3")
# The decoder's causal attention without a KV cache (training, scoring): see models/kernels.py.
ATTENTION_KINDS = ("xla", "splash", "flash", "auto")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The decoder (HF ``PhiConfig`` / ``StableLmConfig`` / ``Phi3Config`` / ``Qwen2Config`` /
    ``Qwen3Config`` field meanings). One decoder family: the variants are fields, their defaults
    Phi-2's."""

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (Phi-2)
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5  # the eps of either norm
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    lm_head_bias: bool = True
    tie_word_embeddings: bool = False
    # "layernorm" (with bias: Phi-2, StableLM-2) or "rmsnorm" (computed in float32: Phi-3, Qwen2).
    norm: str = "layernorm"
    # x + attn(norm(x)) + mlp(norm(x)) (Phi-2), or pre-norm sequential: x += attn(norm1(x));
    # x += mlp(norm2(x)).
    parallel_residual: bool = True
    # "fc": fc2(act(fc1(x))) with biases (Phi-2); "gated": down(act(gate(x)) * up(x)), no biases.
    mlp: str = "fc"
    qkv_bias: bool = True  # q/k/v projection biases (Phi-2, StableLM-2-1.6B, Qwen2)
    out_bias: bool = True  # attention output projection bias (Phi-2 only)
    # "longrope" (Phi-3-128k): per-frequency factors, the long set once a call's largest position
    # reaches original_max_position_embeddings, and cos/sin scaled by attention_factor.
    rope_scaling: str = "none"
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    original_max_position_embeddings: int = 0
    # Which HF architecture the weights and config map to (tensor names, fused projections).
    family: str = "phi"
    # Qwen3: the per-head width when it is not hidden_size / num_heads (0: it is), and an RMSNorm
    # over each head's q and k (``q_norm`` / ``k_norm``, eps ``layer_norm_eps``) before RoPE.
    explicit_head_dim: int = 0
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("rope_short_factor", "rope_long_factor"):  # JSON gives lists; keep it hashable
            object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
        for name, value, allowed in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                     ("rope_scaling", self.rope_scaling, ROPE_SCALINGS), ("family", self.family, FAMILIES)):
            if value not in allowed:
                raise UserError(f"text.{name}={value!r}; choose from {allowed}")
        if (not self.explicit_head_dim and self.hidden_size % self.num_heads) or self.num_heads % self.kv_heads:
            raise UserError(f"hidden_size {self.hidden_size} / heads {self.num_heads} / kv heads {self.kv_heads} do not divide")
        if self.rotary_dim % 2:
            raise UserError(f"rotary dim int({self.head_dim} * {self.partial_rotary_factor}) = {self.rotary_dim} must be even")
        if self.rope_scaling == "longrope":
            n = self.rotary_dim // 2
            if len(self.rope_short_factor) != n or len(self.rope_long_factor) != n or self.original_max_position_embeddings <= 0:
                raise UserError(f"longrope needs {n} short and {n} long factors and original_max_position_embeddings > 0")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_attention_factor(self) -> float:
        """LongRoPE's cos/sin scale, as transformers derives it: sqrt(1 + ln(f) / ln(original))
        with f = max_position_embeddings / original_max_position_embeddings (1 when f <= 1)."""
        if self.rope_scaling != "longrope":
            return 1.0
        factor = self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The whole VLM: vision tower + projector + decoder, and how images enter the sequence."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    # "mlp{N}x_gelu" (LLaVA) or "merger" (LLaVA-OneVision-1.5 / Qwen2-VL: LayerNorm, each
    # merge x merge block of patches concatenated, Linear, GELU, Linear; needs a rice tower).
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = 50295
    # Compute dtype ("float32" / "bfloat16"); params are always stored in float32.
    dtype: str = "float32"
    # Activation checkpointing of each scanned block: none | full | dots | dots_no_batch.
    remat_policy: str = "none"
    # Run each tower's blocks as a scan (compiles once per tower: the default, and what TPUs
    # want) or as an unrolled loop over the same stacked params (faster training on CPU).
    scan_layers: bool = True
    # The decoder's causal attention without a KV cache: "xla" (masked softmax), "splash" (TPU
    # Pallas kernel), "flash" (GPU Pallas kernel) or "auto" (splash on TPU for lengths of whole
    # 128-token tiles, else XLA), resolved from the mesh's devices at trace time
    # (models/kernels.py). Decoding and the vision tower always use XLA.
    attention: str = "auto"
    # The conversation template of training ("chat" sources), generation and exports: a name in
    # ``allava_jax.data.templates.CHAT_FORMATS``; "" takes the decoder family's
    # (``FAMILY_CHAT_TEMPLATE``).
    chat_template: str = ""

    def __post_init__(self) -> None:
        if not self.chat_template:
            object.__setattr__(self, "chat_template", FAMILY_CHAT_TEMPLATE[self.text.family])
        if self.chat_template not in CHAT_TEMPLATES:
            raise UserError(f"chat_template={self.chat_template!r}; choose from {CHAT_TEMPLATES}")
        if self.attention not in ATTENTION_KINDS:
            raise UserError(f"attention={self.attention!r}; choose from {ATTENTION_KINDS}")
        if (self.projector_type == "merger") != (self.vision.kind == "rice"):
            raise UserError(f"projector_type={self.projector_type!r} with vision.kind={self.vision.kind!r}: "
                            "the 2 x 2 merger goes with the native-resolution (rice) tower, and only with it")
        if self.projector_type != "merger":
            self.projector_depth  # noqa: B018 (validates the name)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_feature_tokens

    @property
    def projector_depth(self) -> int:
        """Linear layers of the projector (the merger has 2)."""
        if self.projector_type == "merger":
            return 2
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
        if d.pop("kind", "llava") == "clip":
            raise UserError("this is a CLIP scorer checkpoint (convert import --clip), not a VLM one")
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LlavaConfig":
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """CLIP's text tower (HF ``CLIPTextConfig`` field meanings): causal, pooled at the first EOS."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # transformers pools at the first ``eos_token_id``; checkpoints saved before its PR #24773
    # carry eos_token_id=2 and are pooled at the largest token id instead (as transformers does).
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A whole HF ``CLIPModel`` (both towers and projections), the scorer of ``allava_jax.curate``.

    Its vision tower runs every block and pools the CLS token through ``post_layernorm``, so
    ``vision.feature_layer`` is -1 and ``select_strategy`` "full" here.
    """

    vision: VisionConfig = dataclasses.field(
        default_factory=lambda: VisionConfig(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                                             num_layers=12, num_heads=12, feature_layer=-1, select_strategy="full"))
    text: ClipTextConfig = dataclasses.field(default_factory=ClipTextConfig)
    projection_dim: int = 512
    kind: str = "clip"  # tells a scorer checkpoint from a VLM one in model_config.json

    def __post_init__(self) -> None:
        if self.vision.feature_layer != -1 or self.vision.select_strategy != "full":
            object.__setattr__(self, "vision", dataclasses.replace(self.vision, feature_layer=-1, select_strategy="full"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipConfig":
        d = dict(d)
        if d.pop("kind", "clip") != "clip":
            raise UserError("not a CLIP scorer config")
        return cls(vision=VisionConfig(**d.pop("vision", {})), text=ClipTextConfig(**d.pop("text", {})), **d)


def tiny_clip() -> ClipConfig:
    """A few-KB CLIP for tests: both towers, every code path."""
    return ClipConfig(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                          num_layers=2, num_heads=4),
                      text=ClipTextConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, eos_token_id=599),
                      projection_dim=16)


# The chat template each family's released ALLaVA model is prompted with: ALLaVA's [INST] one for
# Phi-2 and StableLM-2 (its repository's inference code), Phi-3's own format for Phi-3 (Phi-3's
# model card; the released ALLaVA-Phi3 checkpoint's remote code, which holds the one it was
# trained with, cannot be read offline: set chat_template="allava" if it is ALLaVA's), ALLaVA's
# for Qwen2 (no released model).
FAMILY_CHAT_TEMPLATE = {"phi": "allava", "stablelm": "allava", "phi3": "phi3", "qwen2": "allava", "qwen3": "allava"}

# What each family fixes, on top of TextConfig's (Phi-2) defaults; sizes come from the preset or
# the HF config.
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "phi": {},
    "stablelm": dict(family="stablelm", parallel_residual=False, mlp="gated", hidden_act="silu", out_bias=False,
                     partial_rotary_factor=0.25, lm_head_bias=False),
    "phi3": dict(family="phi3", norm="rmsnorm", parallel_residual=False, mlp="gated", hidden_act="silu",
                 qkv_bias=False, out_bias=False, partial_rotary_factor=1.0, lm_head_bias=False),
    "qwen2": dict(family="qwen2", norm="rmsnorm", parallel_residual=False, mlp="gated", hidden_act="silu",
                  out_bias=False, partial_rotary_factor=1.0, lm_head_bias=False, layer_norm_eps=1e-6),
    "qwen3": dict(family="qwen3", norm="rmsnorm", parallel_residual=False, mlp="gated", hidden_act="silu",
                  qkv_bias=False, out_bias=False, partial_rotary_factor=1.0, lm_head_bias=False, layer_norm_eps=1e-6,
                  qk_norm=True),
}


def _text(family: str, **sizes: Any) -> TextConfig:
    return TextConfig(**{**FAMILY_FIELDS[family], **sizes})


def phi2_clip336() -> LlavaConfig:
    """The paper's model: CLIP ViT-L/14@336 + mlp2x_gelu + Phi-2 (ALLaVA-Phi2-2_7B)."""
    return LlavaConfig()


def stablelm2_clip336() -> LlavaConfig:
    """ALLaVA-StableLM2-1_6B: CLIP ViT-L/14@336 + mlp2x_gelu + StableLM-2-1.6B."""
    text = _text("stablelm", vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=32,
                 max_position_embeddings=4096)
    return LlavaConfig(text=text, image_token_id=100351)


def phi3mini_clip336() -> LlavaConfig:
    """ALLaVA-Phi3-mini-128k: CLIP ViT-L/14@336 + mlp2x_gelu + Phi-3-mini-128k (LongRoPE).

    The released model's 48 short and 48 long factors live in its config.json, which `convert
    import` reads; this preset's are 1.0 (plain RoPE below and above 4096) and only fix the shapes.
    """
    text = _text("phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32,
                 max_position_embeddings=131072, rope_scaling="longrope", rope_short_factor=(1.0,) * 48,
                 rope_long_factor=(1.0,) * 48, original_max_position_embeddings=4096)
    return LlavaConfig(text=text, image_token_id=32063)


def qwen2_clip336() -> LlavaConfig:
    """CLIP ViT-L/14@336 + mlp2x_gelu + Qwen1.5-1.8B (Qwen2 architecture; the paper's Qwen-1.8B
    backbone needs custom code and is not supported)."""
    text = _text("qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_layers=24, num_heads=16,
                 max_position_embeddings=32768, rope_theta=1e6)
    return LlavaConfig(text=text, image_token_id=151935)


TINY_VISION = dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 max_position_embeddings=256)
# Tiny variants' extras: grouped-query heads, and LongRoPE switching at position 64.
TINY_EXTRA: dict[str, dict[str, Any]] = {
    "phi": {},
    "stablelm": dict(num_kv_heads=2),
    "phi3": dict(num_kv_heads=2, rope_scaling="longrope", original_max_position_embeddings=64,
                 rope_short_factor=tuple(1.0 + 0.1 * i for i in range(8)),
                 rope_long_factor=tuple(1.5 + 0.5 * i for i in range(8))),
    "qwen2": dict(num_kv_heads=2, rope_theta=1e6),
    # head_dim 24 != 64 / 4: the q/o projections are not square, as in Qwen3-4B.
    "qwen3": dict(num_kv_heads=2, rope_theta=5e6, explicit_head_dim=24),
}


def tiny(family: str = "phi") -> LlavaConfig:
    """A few-KB model for unit tests: every code path, milliseconds per step."""
    text = _text(family, **TINY_TEXT, **TINY_EXTRA[family])
    return LlavaConfig(vision=VisionConfig(**TINY_VISION), text=text, image_token_id=127)


# RICE-ViT's shape in small: head_dim 16 (4 rotary frequencies per axis), all blocks, exact GELU.
TINY_RICE = dict(kind="rice", patch_size=14, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 hidden_act="gelu", feature_layer=-1, min_pixels=28 * 28, max_pixels=112 * 112)


def tiny_ov15() -> LlavaConfig:
    """LLaVA-OneVision-1.5 in a few KB: a rice tower, the 2 x 2 merger and a Qwen3 decoder."""
    text = _text("qwen3", **TINY_TEXT, **TINY_EXTRA["qwen3"])
    return LlavaConfig(vision=VisionConfig(**TINY_RICE), text=text, projector_type="merger", image_token_id=127,
                       chat_template="qwen2vl")


# RICE-ViT-L/14 as LLaVA-OneVision-1.5 runs it (the authors' vision-model.json / RiceConfig).
RICE_VIT_L14 = dict(kind="rice", patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                    hidden_act="gelu", feature_layer=-1)


def _ov15(**text: Any) -> LlavaConfig:
    return LlavaConfig(vision=VisionConfig(**RICE_VIT_L14), text=_text("qwen3", vocab_size=151936, **text),
                       projector_type="merger", image_token_id=151655, chat_template="qwen2vl")


def llava_ov15_4b() -> LlavaConfig:
    """LLaVA-OneVision-1.5-4B: RICE-ViT-L/14 + 2 x 2 merger + Qwen3-4B-Instruct-2507 (32 heads of
    128 != hidden 2560, rope theta 5e6), untied LM head."""
    return _ov15(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
                 explicit_head_dim=128, rope_theta=5e6, max_position_embeddings=262144)


def llava_ov15_8b() -> LlavaConfig:
    """LLaVA-OneVision-1.5-8B: RICE-ViT-L/14 + 2 x 2 merger + Qwen3-8B-Base (rope theta 1e6),
    untied LM head."""
    return _ov15(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                 rope_theta=1e6, max_position_embeddings=40960)


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


def demo_ov15() -> LlavaConfig:
    """The demo's LLaVA-OneVision-1.5 in small (``configs/demo_ov15.py``): a 3-block RICE-ViT at
    native resolution (images up to 168 x 168 px keep their size), the 2 x 2 merger and a 4-layer
    Qwen3-style decoder (q/k norms, grouped-query heads, untied head), trained from scratch on a CPU.
    The gated MLP is 704 wide (about 2/3 of the ``demo`` decoder's 1024-wide two-matrix MLP: its
    three matrices then cost the same), so the two demos' decoders train at about the same speed."""
    vision = VisionConfig(kind="rice", patch_size=14, hidden_size=128, intermediate_size=256, num_layers=3,
                          num_heads=4, hidden_act="gelu", feature_layer=-1, min_pixels=28 * 28, max_pixels=168 * 168)
    text = _text("qwen3", vocab_size=1024, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                 num_kv_heads=4, rope_theta=1e4, max_position_embeddings=1024)
    return LlavaConfig(vision=vision, text=text, projector_type="merger", image_token_id=1023, chat_template="qwen2vl")


PRESETS = {
    "phi2_clip336": phi2_clip336,
    "stablelm2_clip336": stablelm2_clip336,
    "phi3mini_clip336": phi3mini_clip336,
    "qwen2_clip336": qwen2_clip336,
    "tiny": tiny,
    "tiny_stablelm": lambda: tiny("stablelm"),
    "tiny_phi3": lambda: tiny("phi3"),
    "tiny_qwen2": lambda: tiny("qwen2"),
    "tiny_qwen3": lambda: tiny("qwen3"),
    "tiny_ov15": tiny_ov15,
    "llava_ov15_4b": llava_ov15_4b,
    "llava_ov15_8b": llava_ov15_8b,
    "demo": demo,
    "demo_ov15": demo_ov15,
}


def get_preset(name: str, **overrides: Any) -> LlavaConfig:
    """A preset by name, with optional overrides (see ``LlavaConfig.replace``)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
