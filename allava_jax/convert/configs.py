"""Our ``LlavaConfig`` <-> Hugging Face config dicts (CLIP vision, the decoder families, Llava)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from allava_jax.models.config import FAMILY_FIELDS, ClipConfig, ClipTextConfig, LlavaConfig, TextConfig, VisionConfig


class UnsupportedConfig(ValueError):
    """A checkpoint's config asks for something our model does not implement."""


def vision_from_hf(d: Mapping[str, Any], feature_layer: int = -2, select_strategy: str = "default") -> VisionConfig:
    """From a ``CLIPVisionConfig`` dict (or a ``CLIPConfig`` dict's ``vision_config``)."""
    if "vision_config" in d:
        d = d["vision_config"]
    if d.get("num_channels", 3) != 3:
        raise UnsupportedConfig(f"vision tower with num_channels={d['num_channels']} (expected 3)")
    return VisionConfig(
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 32),
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        hidden_act=d.get("hidden_act", "quick_gelu"),
        feature_layer=feature_layer,
        select_strategy=select_strategy,
    )


def clip_from_hf(d: Mapping[str, Any]) -> ClipConfig:
    """From a ``CLIPConfig`` dict (both towers); missing keys take transformers' defaults."""
    if "text_config" not in d or "vision_config" not in d:
        raise UnsupportedConfig("not a CLIPModel config (needs text_config and vision_config; a "
                                "CLIPVisionModel has no text tower to score with)")
    t = d["text_config"]
    text = ClipTextConfig(
        vocab_size=t.get("vocab_size", 49408),
        hidden_size=t.get("hidden_size", 512),
        intermediate_size=t.get("intermediate_size", 2048),
        num_layers=t.get("num_hidden_layers", 12),
        num_heads=t.get("num_attention_heads", 8),
        max_position_embeddings=t.get("max_position_embeddings", 77),
        layer_norm_eps=t.get("layer_norm_eps", 1e-5),
        hidden_act=t.get("hidden_act", "quick_gelu"),
        eos_token_id=t.get("eos_token_id", 49407),
    )
    return ClipConfig(vision=vision_from_hf(d, feature_layer=-1, select_strategy="full"), text=text,
                      projection_dim=d.get("projection_dim", 512))


def text_from_hf(d: Mapping[str, Any], lm_head_bias: bool = True) -> TextConfig:
    """From a ``PhiConfig`` / ``StableLmConfig`` / ``Phi3Config`` / ``Qwen2Config`` / ``Qwen3Config`` dict
    (transformers 4 flat rope keys or 5 ``rope_parameters``)."""
    family = d.get("model_type", "phi")
    if family not in FAMILY_FIELDS:
        raise UnsupportedConfig(f"decoder model_type {family!r}; supported: {sorted(FAMILY_FIELDS)}")
    if d.get("qk_layernorm"):
        raise UnsupportedConfig(f"{family} with qk_layernorm=True is not supported")
    if d.get("use_sliding_window"):
        raise UnsupportedConfig(f"{family} with use_sliding_window=True is not supported")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = "longrope" if rope_type in ("su", "longrope") else rope_type
    fields = dict(FAMILY_FIELDS[family])
    if rope_type == "longrope" and family == "phi3":
        if rope.get("factor") is not None or rope.get("attention_factor") is not None:
            raise UnsupportedConfig("longrope with an explicit factor / attention_factor is not supported")
        fields.update(
            rope_scaling="longrope",
            rope_short_factor=tuple(rope["short_factor"]),
            rope_long_factor=tuple(rope["long_factor"]),
            # transformers prefers the top-level key (Phi-3 writes it there)
            original_max_position_embeddings=d.get("original_max_position_embeddings",
                                                   rope.get("original_max_position_embeddings")),
        )
    elif rope_type != "default":
        raise UnsupportedConfig(f"rope scaling {rope} is not supported for {family}")
    if family == "stablelm":
        fields.update(qkv_bias=d.get("use_qkv_bias", False), parallel_residual=d.get("use_parallel_residual", False))
    if family == "qwen3":
        if d.get("attention_bias"):
            raise UnsupportedConfig("qwen3 with attention_bias=True is not supported")
        head_dim = d.get("head_dim") or d.get("hidden_size", 2048) // d.get("num_attention_heads", 32)
        fields["explicit_head_dim"] = 0 if head_dim * d.get("num_attention_heads", 32) == d.get("hidden_size", 2048) else head_dim
    num_heads = d.get("num_attention_heads", 32)
    num_kv_heads = d.get("num_key_value_heads")
    if family == "phi":
        rotary = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    else:
        rotary = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rope_pct", fields["partial_rotary_factor"])))
    eps = d.get("rms_norm_eps") if fields.get("norm") == "rmsnorm" else d.get("layer_norm_eps", d.get("norm_eps"))
    return TextConfig(**{
        **fields,
        "vocab_size": d.get("vocab_size", 51200),
        "hidden_size": d.get("hidden_size", 2048),
        "intermediate_size": d.get("intermediate_size", 8192),
        "num_layers": d.get("num_hidden_layers", 24),
        "num_heads": num_heads,
        "num_kv_heads": None if num_kv_heads in (None, num_heads) else num_kv_heads,
        "partial_rotary_factor": rotary,
        "rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        "layer_norm_eps": eps if eps is not None else 1e-5,
        "hidden_act": d.get("hidden_act", "gelu_new" if family == "phi" else "silu"),
        "max_position_embeddings": d.get("max_position_embeddings", 2048),
        "lm_head_bias": lm_head_bias,
        "tie_word_embeddings": d.get("tie_word_embeddings", False),
    })


def llava_from_hf(d: Mapping[str, Any], lm_head_bias: bool = False) -> LlavaConfig:
    """From a ``LlavaConfig`` dict with a Phi text config (HF Llava has no lm_head bias)."""
    layer = d.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise UnsupportedConfig(f"vision_feature_layer={layer!r}: only a single layer is supported")
    if d.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedConfig(f"projector_hidden_act={d['projector_hidden_act']!r} (expected 'gelu')")
    if not d.get("multimodal_projector_bias", True):
        raise UnsupportedConfig("a projector without biases is not supported")
    return LlavaConfig(
        vision=vision_from_hf(d["vision_config"], layer, d.get("vision_feature_select_strategy", "default")),
        text=text_from_hf(d["text_config"], lm_head_bias=lm_head_bias),
        projector_type="mlp2x_gelu",
        image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
    )


def vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
        "num_channels": 3,
    }


def text_to_hf(t: TextConfig) -> dict[str, Any]:
    """The HF config dict of ``t``'s family (loads in transformers with no custom code)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta,
                            "partial_rotary_factor": t.partial_rotary_factor}
    d: dict[str, Any] = {
        "model_type": t.family,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.kv_heads,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": t.tie_word_embeddings,
        # Phi-3's default (32000) is an embedding padding_idx outside a small vocabulary; the
        # tokenizer and generation_config carry the special ids.
        "pad_token_id": None,
    }
    if t.norm == "rmsnorm":
        d["rms_norm_eps"] = t.layer_norm_eps
    else:
        d["layer_norm_eps"] = t.layer_norm_eps
    if t.family in ("phi", "stablelm"):
        d["qk_layernorm"] = False
    if t.family == "stablelm":
        d.update(use_qkv_bias=t.qkv_bias, use_parallel_residual=t.parallel_residual)
    if t.rope_scaling == "longrope":
        rope.update(rope_type="longrope", short_factor=list(t.rope_short_factor), long_factor=list(t.rope_long_factor),
                    original_max_position_embeddings=t.original_max_position_embeddings)
        d["original_max_position_embeddings"] = t.original_max_position_embeddings
    if t.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = False
    if t.family == "qwen3":
        d.update(head_dim=t.head_dim, attention_bias=False)
    return d


def llava_to_hf(c: LlavaConfig) -> dict[str, Any]:
    if c.projector_depth != 2:
        raise UnsupportedConfig(f"HF Llava has a 2-layer projector; this model has {c.projector_type}")
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision_to_hf(c.vision),
        "text_config": text_to_hf(c.text),
        "image_token_index": c.image_token_id,
        "image_seq_length": c.num_image_tokens,
        "vision_feature_layer": c.vision.feature_layer,
        "vision_feature_select_strategy": c.vision.select_strategy,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": c.text.tie_word_embeddings,
    }


# Original LLaVA's ``mm_vision_select_feature`` -> our ``select_strategy``.
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def is_original_llava(d: Mapping[str, Any]) -> bool:
    """A config.json written by the original LLaVA / ALLaVA code (``mm_*`` keys on the LM config)."""
    return any(k.startswith("mm_") for k in d) or str(d.get("model_type", "")).startswith("llava_")


def original_family(d: Mapping[str, Any]) -> str:
    """The decoder family of an original LLaVA/ALLaVA config (``LlavaPhiForCausalLM``,
    ``LlavaStableLM_1_6bForCausalLM`` with StableLM "epoch" keys, ``LlavaPhi3ForCausalLM``)."""
    name = (" ".join(d.get("architectures") or []) + " " + str(d.get("model_type", ""))).lower()
    for key, family in (("phi3", "phi3"), ("stablelm", "stablelm"), ("qwen2", "qwen2"), ("phi", "phi")):
        if key in name:
            return family
    raise UnsupportedConfig(
        f"original LLaVA checkpoint with architectures={d.get('architectures')} model_type={d.get('model_type')!r}: "
        "supported decoders are Phi-2, StableLM-2, Phi-3 and Qwen2"
    )


def original_from_hf(d: Mapping[str, Any], vision: VisionConfig, lm_head_bias: bool) -> LlavaConfig:
    """From an original LLaVA/ALLaVA config.json (Phi keys + ``mm_*`` keys) and the tower's config.

    The vision tower's own config is not in such a checkpoint (``mm_vision_tower`` names a hub
    model): pass it in, from ``--vision DIR`` or ``vision_from_tensors``.
    """
    family = original_family(d)
    projector = d.get("mm_projector_type", "linear")
    if not (projector.startswith("mlp") and projector.endswith("x_gelu")):
        raise UnsupportedConfig(f"mm_projector_type={projector!r} (only mlp{{N}}x_gelu is supported)")
    feature = d.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise UnsupportedConfig(f"mm_vision_select_feature={feature!r} (expected 'patch' or 'cls_patch')")
    for key, allowed in (("mm_use_im_start_end", (False, None)), ("mm_patch_merge_type", ("flat", None)),
                         ("image_aspect_ratio", ("pad", "square", None))):
        if d.get(key) not in allowed:
            raise UnsupportedConfig(f"{key}={d.get(key)!r} is not supported (expected one of {allowed})")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise UnsupportedConfig(
            f"mm_hidden_size={d['mm_hidden_size']} but the vision tower has hidden_size={vision.hidden_size}"
        )
    vision = dataclasses.replace(
        vision, feature_layer=d.get("mm_vision_select_layer", -2), select_strategy=_SELECT_FEATURE[feature]
    )
    text = text_from_hf({**d, "model_type": family}, lm_head_bias=lm_head_bias)
    return LlavaConfig(vision=vision, text=text, projector_type=projector)


def vision_from_tensors(shape: Any, prefix: str, num_layers: int) -> VisionConfig:
    """A CLIP tower's config inferred from its tensor shapes (``shape(name)``).

    Assumptions tensors cannot show (true of every OpenAI CLIP): head_dim 64, quick_gelu,
    LayerNorm eps 1e-5. The caller says so in its output.
    """
    hidden, channels, patch, _ = shape(prefix + "embeddings.patch_embedding.weight")
    positions = shape(prefix + "embeddings.position_embedding.weight")[0] - 1
    side = int(round(positions**0.5))
    if side * side != positions or channels != 3:
        raise UnsupportedConfig(f"cannot infer the vision config from tensors ({positions} patches, {channels} channels)")
    return VisionConfig(
        image_size=side * patch,
        patch_size=patch,
        hidden_size=hidden,
        intermediate_size=shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=num_layers,
        num_heads=max(1, hidden // 64),
    )


# LLaVA-OneVision-1.5's released config.json (the authors' remote code: Llavaonevision1_5Config
# with a RiceConfig vision config and an LLaVAOneVision1_5_TextConfig, Qwen3's keys).
OV15_MODEL_TYPE = "llavaonevision1_5"
OV15_ARCHITECTURE = "LLaVAOneVision1_5_ForConditionalGeneration"
OV15_TEXT_MODEL_TYPE = "LLaVAOneVision1_5_text"
RICE_MODEL_TYPE = "rice_vit"


def is_ov15(d: Mapping[str, Any]) -> bool:
    """A LLaVA-OneVision-1.5 release config.json."""
    return d.get("model_type") == OV15_MODEL_TYPE


def ov15_from_hf(d: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> LlavaConfig:
    """From the release's config.json (and its preprocessor_config.json's pixel budget)."""
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    if v.get("model_type", RICE_MODEL_TYPE) != RICE_MODEL_TYPE:
        raise UnsupportedConfig(f"vision_config.model_type={v.get('model_type')!r} (expected {RICE_MODEL_TYPE!r})")
    if v.get("temporal_patch_size", 1) != 1 or v.get("in_channels", 3) != 3:
        raise UnsupportedConfig("a rice tower with temporal_patch_size != 1 or in_channels != 3 is not supported")
    if t.get("rope_scaling") or t.get("use_sliding_window"):
        raise UnsupportedConfig("text_config with rope_scaling or a sliding window is not supported")
    pixels = dict(preprocessor or {})
    size = pixels.get("size") or {}
    text = text_from_hf({**t, "model_type": "qwen3", "rope_scaling": None}, lm_head_bias=False)
    vision = VisionConfig(
        kind="rice", patch_size=v.get("patch_size", 14), hidden_size=v.get("hidden_size", 1024),
        intermediate_size=v.get("intermediate_size", 4096), num_layers=v.get("depth", 24), num_heads=v.get("num_heads", 16),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "gelu"), feature_layer=-1,
        spatial_merge_size=v.get("spatial_merge_size", 2),
        min_pixels=pixels.get("min_pixels", size.get("shortest_edge", VisionConfig.min_pixels)),
        max_pixels=pixels.get("max_pixels", size.get("longest_edge", VisionConfig.max_pixels)),
    )
    if v.get("text_hidden_size", text.hidden_size) != text.hidden_size:
        raise UnsupportedConfig(f"vision_config.text_hidden_size={v['text_hidden_size']} != text hidden_size {text.hidden_size}")
    return LlavaConfig(vision=vision, text=text, projector_type="merger", image_token_id=d.get("image_token_id", 151655),
                       chat_template="qwen2vl")


def ov15_to_hf(c: LlavaConfig) -> dict[str, Any]:
    """The release's config.json keys for ``c`` (a rice tower + merger + Qwen3)."""
    if c.vision.kind != "rice" or c.projector_type != "merger" or c.text.family != "qwen3":
        raise UnsupportedConfig("llava-ov-1.5 export needs a rice tower, the merger and a Qwen3 decoder")
    v, t = c.vision, c.text
    text = {k: val for k, val in text_to_hf(t).items() if k not in ("rope_parameters", "pad_token_id")}
    text.update(model_type=OV15_TEXT_MODEL_TYPE, rope_theta=t.rope_theta, rope_scaling=None, sliding_window=None,
                max_window_layers=t.num_layers, attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    return {
        "architectures": [OV15_ARCHITECTURE],
        "model_type": OV15_MODEL_TYPE,
        "image_token_id": c.image_token_id,
        "video_token_id": c.image_token_id + 1,
        "vocab_size": t.vocab_size,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": RICE_MODEL_TYPE, "depth": v.num_layers, "embed_dim": v.hidden_size, "hidden_size": v.hidden_size,
            "hidden_act": v.hidden_act, "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
            "in_channels": 3, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": 1, "layer_norm_eps": v.layer_norm_eps, "text_hidden_size": t.hidden_size,
            "initializer_range": 0.02,
        },
        "text_config": text,
    }


def ov15_preprocessor(c: LlavaConfig) -> dict[str, Any]:
    """preprocessor_config.json: transformers' Qwen2VLImageProcessor as the release configures it."""
    from allava_jax.data.images import CLIP_MEAN, CLIP_STD

    v = c.vision
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3, "patch_size": v.patch_size, "temporal_patch_size": 1,
        "merge_size": v.spatial_merge_size, "min_pixels": v.min_pixels, "max_pixels": v.max_pixels,
        "size": {"shortest_edge": v.min_pixels, "longest_edge": v.max_pixels},
    }


def rice_from_mlcd(d: Mapping[str, Any]) -> VisionConfig:
    """A rice tower from an ``MLCDVisionConfig`` dict (or a config holding one as ``vision_config``):
    RICE-ViT / MLCD checkpoints the stage-0 merge takes its tower from."""
    if "vision_config" in d:
        d = d["vision_config"]
    if d.get("num_channels", 3) != 3 or d.get("num_key_value_groups", 1) != 1:
        raise UnsupportedConfig("an MLCD tower with num_channels != 3 or grouped kv heads is not supported")
    rope = d.get("rope_parameters") or {}
    return VisionConfig(
        kind="rice", patch_size=d.get("patch_size", 14), hidden_size=d.get("hidden_size", 1664),
        intermediate_size=d.get("intermediate_size", 8192), num_layers=d.get("num_hidden_layers", 48),
        num_heads=d.get("num_attention_heads", 16), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        hidden_act=d.get("hidden_act", "gelu"), feature_layer=-1, rope_theta=rope.get("rope_theta", 10000.0),
    )
