"""Model FLOPs per train step (for MFU) and the peak FLOP/s of the devices."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from allava_jax.models.config import LlavaConfig, VisionConfig

# Dense bf16 peak per chip, FLOP/s (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def _linear_params_per_layer(hidden: int, mlp: int, heads: int, kv_heads: int, head_dim: int, mlp_mats: int = 2) -> int:
    """Matmul weights of one block; ``mlp_mats``: 2 (fc1, fc2) or 3 (gate, up, down)."""
    return hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden + mlp_mats * hidden * mlp


def train_step_flops(
    config: LlavaConfig, n_tokens: int, n_images: int, seq_len: int, vision_trained: bool, n_scored: int | None = None,
    image_patches: np.ndarray | None = None,
) -> float:
    """Model FLOPs of a train step: 6 N per LLM token plus attention (12 layers*hidden*seq_len per
    token, PaLM's estimate), the LM head (6 hidden*vocab) on the ``n_scored`` tokens the loss needs
    (default all), the projector on every image token, and the vision tower forward (x3 if it is
    trained). A native-resolution (rice) tower costs per image by its ``image_patches`` (each
    image's patch count, plus its class token; attention within the image), the merger per
    merged token."""
    t, v = config.text, config.vision
    mlp_mats = 3 if t.mlp == "gated" else 2
    llm = t.num_layers * _linear_params_per_layer(t.hidden_size, t.intermediate_size, t.num_heads, t.kv_heads, t.head_dim,
                                                  mlp_mats)
    flops = n_tokens * (6 * llm + 12 * t.num_layers * t.hidden_size * seq_len)
    flops += (n_tokens if n_scored is None else n_scored) * 6 * t.hidden_size * t.vocab_size
    vis_layer = _linear_params_per_layer(v.hidden_size, v.intermediate_size, v.num_heads, v.num_heads, v.hidden_size // v.num_heads)
    if v.kind == "rice":
        patches = np.asarray(image_patches if image_patches is not None else [], np.float64)
        m = v.spatial_merge_size**2
        merger = (m * v.hidden_size) ** 2 + m * v.hidden_size * t.hidden_size
        vis_fwd = vision_forward_flops(v, patches)
        return float(flops + (3 if vision_trained else 1) * vis_fwd + 6 * merger * float(np.sum(patches)) / m)
    vis_tokens = v.num_patches + 1
    vis_fwd = v.num_blocks_to_run * (2 * vis_layer * vis_tokens + 4 * v.hidden_size * vis_tokens**2)
    proj = v.hidden_size * t.hidden_size + (config.projector_depth - 1) * t.hidden_size**2
    flops += n_images * ((3 if vision_trained else 1) * vis_fwd + 6 * proj * config.num_image_tokens)
    return float(flops)


def vision_forward_flops(vision: VisionConfig, image_patches: Sequence[int] | np.ndarray) -> float:
    """A native-resolution (rice) tower's forward FLOPs over images of ``image_patches`` patches
    each (plus its class token): the blocks' matmuls and attention within each image."""
    v = vision
    layer = _linear_params_per_layer(v.hidden_size, v.intermediate_size, v.num_heads, v.num_heads, v.hidden_size // v.num_heads)
    n = np.asarray(image_patches, np.float64) + 1
    return v.num_blocks_to_run * float(np.sum(2 * layer * n + 4 * v.hidden_size * n**2))


def peak_flops_per_device(override: float = 0.0) -> float:
    """The config's value, else the vendor peak for known accelerators, else a measured fp32
    matmul rate (CPU)."""
    if override:
        return override
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    return measure_matmul_flops()


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def image_patch_counts(patch_segments: np.ndarray) -> np.ndarray:
    """Each image's patch count from a native batch's ``patch_segments`` [B, P] (0 = padding)."""
    counts = [np.bincount(row[row > 0]) for row in np.asarray(patch_segments)]
    return np.concatenate([c[1:] for c in counts]) if counts else np.zeros(0, np.int64)
