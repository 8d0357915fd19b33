"""Flax models: CLIP vision tower, projector, the decoder family (Phi-2, StableLM-2, Phi-3, Qwen2, Qwen3), and\ntheir LLaVA composition."""

from allava_jax.models.config import LlavaConfig, TextConfig, VisionConfig, get_preset
from allava_jax.models.cached import init_cache
from allava_jax.models.llava import Llava, abstract_params, example_inputs, init_params

__all__ = [
    "Llava",
    "LlavaConfig",
    "TextConfig",
    "VisionConfig",
    "abstract_params",
    "example_inputs",
    "get_preset",
    "init_cache",
    "init_params",
]
