"""KV-cache inference: the VLM's forward pass over a cache, the decoder's layers run one by one.

Params are the checkpoint's with the decoder's stacked layers split into one tree per layer, and
each layer's q/k/v (and gate/up) weights fused into one matmul (``split_layers``); the cache holds
one tree per layer too (``key`` / ``value`` [B, kv_heads, T, head_dim], ``segment_ids`` [B, T],
``index``), written at the shared index by every call: a prefill of any length, then single steps.

Why not the training model's ``nn.scan`` over stacked layers: a decode step reads each weight once,
and the scan also copied every layer's weights (a slice of the stacked params, inside the decode
loop) and its cache (scanned in and out) on every step. On CPU that made a batch-16 decode step
2.2x slower. Here every weight and every layer's cache is a buffer of its own, read and updated in
place.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.models.config import LlavaConfig
from allava_jax.models.decoder import DecoderBlock, default_segments
from allava_jax.models.llava import Llava

Array = jax.Array
Cache = tuple[dict, ...]  # one tree per decoder layer
SLOT_AXIS = {"key": 2, "value": 2, "segment_ids": 1}  # a cache leaf's slot (position) axis; rows are axis 0


def _block(config: LlavaConfig) -> DecoderBlock:
    return DecoderBlock(config.text, config.compute_dtype, decode=True, attention=config.attention, fused=True)


def _fuse(layer: dict) -> dict:
    """One layer's params in the fused layout: ``qkv_proj`` = q, k, v concatenated on the heads
    axis; ``gate_up_proj`` = gate, up concatenated on the output axis (gated MLPs)."""
    attn = dict(layer["self_attn"])
    parts = [attn.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
    attn["qkv_proj"] = {key: jnp.concatenate([p[key] for p in parts], axis=-2) for key in parts[0]}
    mlp = dict(layer["mlp"])
    if "gate_proj" in mlp:
        gate, up = mlp.pop("gate_proj"), mlp.pop("up_proj")
        mlp["gate_up_proj"] = {"kernel": jnp.concatenate([gate["kernel"], up["kernel"]], axis=-1)}
    return {**layer, "self_attn": attn, "mlp": mlp}


def split_layers(params: Any) -> Any:
    """``params`` with ``llm.layers`` (stacked on a leading axis) as a tuple of per-layer trees in
    the fused layout (``_fuse``); params split already come back as they are."""
    stacked = params["llm"]["layers"]
    if isinstance(stacked, tuple):
        return params
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = tuple(_fuse(jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(n))
    return {**params, "llm": {**params["llm"], "layers": layers}}


def _without_layers(params: Any) -> Any:
    """What ``Llava.embed`` and ``Llava.head`` read: everything but the decoder's layers."""
    return {**params, "llm": {k: v for k, v in params["llm"].items() if k != "layers"}}


def init_cache(config: LlavaConfig, batch: int, max_len: int) -> Cache:
    """An empty cache of ``max_len`` slots for ``batch`` rows: zeros, index 0."""
    x = jnp.zeros((batch, max_len, config.text.hidden_size), config.compute_dtype)
    ids = jnp.zeros((batch, max_len), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(lambda: _block(config).init(jax.random.key(0), x, ids, ids)["cache"]))
    return tuple(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes) for _ in range(config.text.num_layers))


def move_cache(cache: Cache, d: Array, capacity: int) -> Cache:
    """Every row's entries ``d`` slots left (negative: right), in a cache of ``capacity`` slots
    (grown or shrunk); vacated slots become padding. Valid for ``-capacity <= d <= old length``.
    The server compacts and resizes its shared cache with it; ``generate`` grows its cache (d=0)."""

    def leaf(path, x):
        if path[-1].key == "index":
            return x - d
        axis = SLOT_AXIS[path[-1].key]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (capacity, capacity)
        return jax.lax.dynamic_slice_in_dim(jnp.pad(x, pad), capacity + d, capacity, axis=axis)

    return jax.tree_util.tree_map_with_path(leaf, cache)


def hidden(
    config: LlavaConfig, params: Any, cache: Cache, tokens: Array, images: Array | None = None,
    image_mask: Array | None = None, segment_ids: Array | None = None, positions: Array | None = None,
) -> tuple[Array, Cache]:
    """``tokens`` (images written over their placeholders) run into the cache: the last layer's
    hidden states [B, L, D] (before the final norm) and the updated cache. ``params``: ``split_layers``'s."""
    segment_ids, positions = default_segments(tokens, segment_ids, positions)
    x = Llava(config).apply({"params": _without_layers(params)}, tokens, images, image_mask, method=Llava.embed)
    block, new_cache = _block(config), []
    for layer_params, layer_cache in zip(params["llm"]["layers"], cache, strict=True):
        (x, _), state = block.apply({"params": layer_params, "cache": layer_cache}, x, segment_ids, positions,
                                    mutable=["cache"])
        new_cache.append(state["cache"])
    return x, tuple(new_cache)


def head(config: LlavaConfig, params: Any, x: Array) -> Array:
    """Final norm + LM head: float32 logits [B, L, vocab] of hidden states [B, L, D]."""
    return Llava(config).apply({"params": _without_layers(params)}, x, method=Llava.head)


def forward(
    config: LlavaConfig, params: Any, cache: Cache, tokens: Array, images: Array | None = None,
    image_mask: Array | None = None, segment_ids: Array | None = None, positions: Array | None = None,
) -> tuple[Array, Cache]:
    """Logits [B, L, vocab] of every position of ``tokens``, and the updated cache."""
    x, cache = hidden(config, params, cache, tokens, images, image_mask, segment_ids, positions)
    return head(config, params, x), cache
