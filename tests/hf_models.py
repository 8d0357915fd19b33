"""Tiny random transformers models for parity tests, and their weights as our param trees."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from allava_jax.convert import configs as conf
from allava_jax.convert import hf
from allava_jax.models import abstract_params
from allava_jax.models.config import LlavaConfig
import flax.linen as nn

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14)
TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    partial_rotary_factor=0.4,
)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (HF init zeroes biases and sets LayerNorms to 1: too easy to match)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def clip_vision(**overrides) -> transformers.CLIPVisionModel:
    cfg = transformers.CLIPVisionConfig(**{**VISION, **overrides})
    return randomize(transformers.CLIPVisionModel(cfg))


def phi(**overrides) -> transformers.PhiForCausalLM:
    cfg = transformers.PhiConfig(**{**TEXT, **overrides})
    return randomize(transformers.PhiForCausalLM(cfg), seed=1)


def llava(image_token_id: int = 127) -> transformers.LlavaForConditionalGeneration:
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.PhiConfig(**TEXT),
        image_token_index=image_token_id,
    )
    return randomize(transformers.LlavaForConditionalGeneration(cfg), seed=2, scale=0.1)


def state_reader(model: torch.nn.Module):
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return state.__getitem__


def params_from_torch(model: torch.nn.Module, config: LlavaConfig, layout: hf.Layout, part: str | None = None) -> dict:
    """Our params from a torch model; ``part`` ("vision" / "llm") loads one tower alone."""
    shapes = nn.unbox(abstract_params(config))
    skip = (lambda path: path[0] != part) if part else (lambda path: False)
    params = hf.load_params(state_reader(model), config, layout, shapes, skip=skip)
    return params[part] if part else params


def llava_config_from(model: transformers.LlavaForConditionalGeneration) -> LlavaConfig:
    return conf.llava_from_hf(model.config.to_dict(), lm_head_bias=False)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def hf_text_config(text) -> transformers.PretrainedConfig:
    """The transformers config of our ``TextConfig``'s family (phi, stablelm, phi3, qwen2)."""
    d = conf.text_to_hf(text)
    return transformers.CONFIG_MAPPING[d.pop("model_type")](**d)


def causal_lm(text, seed: int = 1) -> torch.nn.Module:
    """A random ``*ForCausalLM`` of the family, every parameter drawn."""
    return randomize(transformers.AutoModelForCausalLM.from_config(hf_text_config(text)), seed=seed)


def llava_with(text, seed: int = 2, image_token_id: int = 127) -> transformers.LlavaForConditionalGeneration:
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=hf_text_config(text),
        image_token_index=image_token_id,
    )
    return randomize(transformers.LlavaForConditionalGeneration(cfg), seed=seed, scale=0.1)


def mlcd_vision(vision, seed: int = 4) -> torch.nn.Module:
    """A random ``MLCDVisionModel`` of our rice ``VisionConfig``'s shape, every parameter drawn."""
    cfg = transformers.MLCDVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads, patch_size=vision.patch_size, hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps, rope_parameters={"rope_type": "axial", "rope_theta": vision.rope_theta},
    )
    return randomize(transformers.MLCDVisionModel(cfg), seed=seed, scale=0.2)
