"""Inference: KV-cache generation, continuous batching, the OpenAI-compatible server.

Entry points: ``python -m allava_jax.generate`` and ``python -m allava_jax.serve`` (``cli.py``).
"""

from allava_jax.infer.engine import Completion, Engine, Prompt
from allava_jax.infer.loading import load_engine, load_tokenizer
from allava_jax.infer.prompts import encode_generation_prompt, single_turn
from allava_jax.infer.sampling import SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "Prompt",
    "SamplingParams",
    "encode_generation_prompt",
    "load_engine",
    "load_tokenizer",
    "single_turn",
]
