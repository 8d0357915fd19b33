"""Building blocks shared by both towers: logical-axis params, attention, rotary, MLP, scan.

Every parameter is created through ``nn.with_logical_partitioning`` so a rule table (in the
training config) maps it to mesh axes; activations at block boundaries carry logical names too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from allava_jax.errors import UserError
from allava_jax.models import kernels

Array = jax.Array
Axes = Sequence[str | None]

# Logical axis names used in this package (mapped to mesh axes by train/sharding.py rules).
BATCH, LENGTH, EMBED = "act_batch", "act_len", "act_embed"
ACT_HEADS = "act_heads"

_DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def partitioned(init: Callable, axes: Axes) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: Array, axes: Axes) -> Array:
    """Shard an activation by logical names (a no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # HF NewGELUActivation / "gelu_pytorch_tanh": the tanh approximation.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise UserError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Linear(nn.Module):
    """Dense layer over the last ``n_in`` input dims to ``features`` output dims.

    Unlike ``nn.DenseGeneral`` the kernel is created in its final shape, so its logical-axis box
    is valid under a mesh from the start (DenseGeneral initialises flat, then reshapes).
    """

    features: tuple[int, ...]
    n_in: int
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param("kernel", partitioned(_DEFAULT_KERNEL_INIT, self.kernel_axes), in_shape + self.features)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            n_out = len(self.features)
            bias = self.param("bias", partitioned(nn.initializers.zeros_init(), self.kernel_axes[-n_out:]), self.features)
            y = y + bias.astype(self.dtype)
        return y


def dense(
    features: int | tuple[int, ...],
    kernel_axes: Axes,
    *,
    name: str,
    dtype: Any,
    axis: int | tuple[int, ...] = -1,
    use_bias: bool = True,
) -> Linear:
    """A Linear whose kernel and bias carry logical axis names (bias: the output axes)."""
    features = (features,) if isinstance(features, int) else tuple(features)
    n_in = 1 if isinstance(axis, int) else len(axis)
    return Linear(features, n_in, tuple(kernel_axes), use_bias=use_bias, dtype=dtype, name=name)


def layer_norm(eps: float, *, name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """``scale * x / rms(x)``, the statistics and normalisation in float32 whatever the compute
    dtype, then cast back before the scale (HF ``Phi3RMSNorm`` / ``Qwen2RMSNorm``)."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def norm(kind: str, eps: float, *, name: str, dtype: Any) -> nn.Module:
    """``"layernorm"`` (scale and bias) or ``"rmsnorm"`` (scale only)."""
    return RMSNorm(eps, dtype=dtype, name=name) if kind == "rmsnorm" else layer_norm(eps, name=name, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding settings: the rotated dims of each head, the base, and LongRoPE's
    per-frequency factors (empty: plain RoPE)."""

    dim: int
    theta: float = 10000.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max: int = 0
    attention_factor: float = 1.0

    def inv_freq(self, positions: Array) -> Array:
        """[dim/2] inverse frequencies. LongRoPE divides them by the short factors, or by the long
        ones when the call's largest position + 1 exceeds ``original_max`` (one choice for the
        whole call, as transformers' ``longrope_frequency_update`` makes it)."""
        inv_freq = 1.0 / (self.theta ** (jnp.arange(0, self.dim, 2, dtype=jnp.float32) / self.dim))
        if not self.short_factor:
            return inv_freq
        long = jnp.max(positions) + 1 > self.original_max
        factors = jnp.where(long, jnp.asarray(self.long_factor, jnp.float32), jnp.asarray(self.short_factor, jnp.float32))
        return inv_freq / factors


def rotary(x: Array, positions: Array, rope: Rope) -> Array:
    """GPT-NeoX-style rotary on the first ``rope.dim`` dims of each head (rotate-half layout).

    x: [B, L, H, D]; positions: [B, L]. Matches HF ``apply_rotary_pos_emb`` with partial rotary.
    """
    if rope.dim == 0:
        return x
    freqs = positions.astype(jnp.float32)[..., None] * rope.inv_freq(positions)  # [B, L, rd/2]
    return rotate(x, freqs, rope.attention_factor)


def rotate(x: Array, angles: Array, factor: float = 1.0, in_float32: bool = False) -> Array:
    """Rotate-half rotary by explicit ``angles`` [B, L, r/2] on the first r dims of each head of x
    [B, L, H, D] (each angle serves dims i and i + r/2). The decoder derives the angles from
    positions (``rotary``); the vision tower passes 2-D ones (row, column, class token).
    ``in_float32``: rotate in float32 and cast back (MLCD / RICE-ViT do), else in x's dtype."""
    rotary_dim = 2 * angles.shape[-1]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, rd]
    dtype = jnp.float32 if in_float32 else x.dtype
    cos, sin = (jnp.cos(emb) * factor).astype(dtype), (jnp.sin(emb) * factor).astype(dtype)
    x_rot, x_pass = x[..., :rotary_dim].astype(dtype), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return jnp.concatenate([(x_rot * cos + rotated * sin).astype(x.dtype), x_pass], axis=-1)


class Attention(nn.Module):
    """Multi-head attention for both towers.

    ``causal=True`` (decoder): a query attends to earlier keys of its own packed segment
    (segment ids equal; 0 is padding, which only sees padding). With ``decode=True`` keys and
    values go to a KV cache in the ``cache`` collection: the first call (prefill) and every later
    one (one token at a time, or any chunk) write at the cache index and attend to all filled
    slots of the same segment, so left-padded rows of different prompt lengths share one cache.
    Without a cache, causal attention runs on ``attention``'s kernel (``kernels.resolve``); init
    always takes the XLA path: it only creates params, and its example rows are shorter than any
    kernel's tile.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    causal: bool = True
    rope: Rope | None = None
    decode: bool = False
    out_name: str = "dense"
    qkv_bias: bool = True
    out_bias: bool = True
    q_block: int = 128  # causal, no cache: queries per block of _attend_causal_blocks
    attention: str = "auto"  # causal, no cache: "xla" | "splash" | "flash" | "auto"
    # One ``qkv_proj`` matmul for q, k and v (KV-cache inference; ``models.cached.split_layers``
    # fuses the checkpoint's three weights): at a few rows per decode step, one matmul is faster.
    fused_qkv: bool = False
    # Qwen3: RMSNorm (this eps) over each head's q and k before the rotary; None: no norm.
    qk_norm_eps: float | None = None
    # The native-resolution vision tower: ``positions`` are rotary angles [B, L, head_dim / 2]
    # (``rotate``, in float32), and non-causal attention stays within ``segment_ids`` (images).
    angles: bool = False
    # With ``kv_windows`` [B, n_blocks, W] (XLA path): the first ``n_windowed`` tokens, in blocks
    # of n_windowed / n_blocks queries, score only the W keys their window indexes plus the
    # tokens after n_windowed (the class tokens); those score every key. See ``_attend_windows``.
    n_windowed: int = 0

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array | None = None, positions: Array | None = None,
                 kv_windows: Array | None = None) -> Array:
        axes, bias = ("embed", "heads", "kv"), self.qkv_bias
        h, h_kv = self.num_heads, self.num_kv_heads
        if self.fused_qkv:
            qkv = dense((h + 2 * h_kv, self.head_dim), axes, name="qkv_proj", dtype=self.dtype, use_bias=bias)(x)
            q, k, v = jnp.split(qkv, [h, h + h_kv], axis=-2)
        else:
            q = dense((h, self.head_dim), axes, name="q_proj", dtype=self.dtype, use_bias=bias)(x)
            k = dense((h_kv, self.head_dim), axes, name="k_proj", dtype=self.dtype, use_bias=bias)(x)
            v = dense((h_kv, self.head_dim), axes, name="v_proj", dtype=self.dtype, use_bias=bias)(x)
        if self.qk_norm_eps is not None:
            q = RMSNorm(self.qk_norm_eps, dtype=self.dtype, name="q_norm")(q)
            k = RMSNorm(self.qk_norm_eps, dtype=self.dtype, name="k_norm")(k)
        if self.rope is not None:
            q = rotary(q, positions, self.rope)
            k = rotary(k, positions, self.rope)
        elif self.angles:
            q, k = rotate(q, positions, in_float32=True), rotate(k, positions, in_float32=True)
        q = constrain(q, (BATCH, LENGTH, ACT_HEADS, "kv"))

        if not self.causal and segment_ids is None:
            out = self._attend(q, k, v, None)
        elif not self.causal:  # bidirectional within each segment (packed images)
            if (kernel := kernels.resolve(self.attention, x.shape[1])) != "xla" and not self.is_initializing():
                scale = 1.0 / math.sqrt(self.head_dim)
                out = kernels.segment_attention(kernel, q, k, v, segment_ids, scale, (BATCH, ACT_HEADS), causal=False)
            elif kv_windows is not None and self.n_windowed:
                out = self._attend_windows(q, k, v, segment_ids, kv_windows)
            else:
                out = self._attend(q, k, v, segment_ids[:, :, None] == segment_ids[:, None, :])
        else:
            if segment_ids is None:
                segment_ids = jnp.ones(x.shape[:2], jnp.int32)
            if self.decode:
                k, v, mask = self._update_cache(k, v, segment_ids)
                out = self._attend(q, k, v, mask, kv_heads_major=True)
            elif (kernel := kernels.resolve(self.attention, x.shape[1])) != "xla" and not self.is_initializing():
                scale = 1.0 / math.sqrt(self.head_dim)
                out = kernels.segment_attention(kernel, q, k, v, segment_ids, scale, (BATCH, ACT_HEADS))
            else:
                out = self._attend_causal_blocks(q, k, v, segment_ids)
        return dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name=self.out_name, dtype=self.dtype,
                     use_bias=self.out_bias)(out)

    def _attend(self, q: Array, k: Array, v: Array, mask: Array | None, kv_heads_major: bool = False) -> Array:
        """q [B, Lq, H, D]; k, v [B, Lk, H_kv, D], or [B, H_kv, Lk, D] with ``kv_heads_major``
        (the KV cache's layout) -> [B, Lq, H, D]."""
        if not kv_heads_major:
            k, v = (t.transpose(0, 2, 1, 3) for t in (k, v))
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
        scale = 1.0 / math.sqrt(self.head_dim)
        # Heads-major operands and output: both batched dots then run on contiguous [L, D] tiles
        # (the vision tower's attention was ~25 % slower in the [B, L, H, D] layout on CPU).
        q = q.transpose(0, 2, 1, 3)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
        if mask is not None:
            # A finite floor keeps fully masked rows (padding) NaN-free.
            scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)

    def _attend_windows(self, q: Array, k: Array, v: Array, segment_ids: Array, windows: Array) -> Array:
        """Bidirectional attention within segments whose tokens are contiguous (packed images):
        query block j of the first ``n_windowed`` tokens scores the keys ``windows[:, j]`` (a
        host-computed span holding every image the block touches) and the tail tokens; the tail
        (class tokens, one per image) scores everything. Keys outside a query's segment get zero
        weight either way, so this equals the full masked softmax at a fraction of its cost:
        tokens x (window + tail) scores instead of tokens squared (the XLA path has no kernel to
        skip blocks between images)."""
        n, nb = self.n_windowed, windows.shape[1]
        bq = n // nb
        tail = self._attend(q[:, n:], k, v, segment_ids[:, n:, None] == segment_ids[:, None, :])
        k_tail, v_tail, s_tail = k[:, n:], v[:, n:], segment_ids[:, n:]
        q_blocks = q[:, :n].reshape(q.shape[0], nb, bq, *q.shape[2:]).swapaxes(0, 1)
        s_blocks = segment_ids[:, :n].reshape(q.shape[0], nb, bq).swapaxes(0, 1)

        def block(args: tuple[Array, Array, Array]) -> Array:
            qb, sb, idx = args  # [B, bq, H, D], [B, bq], [B, W]
            kw = jnp.concatenate([jnp.take_along_axis(k, idx[:, :, None, None], axis=1), k_tail], axis=1)
            vw = jnp.concatenate([jnp.take_along_axis(v, idx[:, :, None, None], axis=1), v_tail], axis=1)
            sw = jnp.concatenate([jnp.take_along_axis(segment_ids, idx, axis=1), s_tail], axis=1)
            return self._attend(qb, kw, vw, sb[:, :, None] == sw[:, None, :])

        out = jax.lax.map(block, (q_blocks, s_blocks, windows.swapaxes(0, 1)))  # [nb, B, bq, H, D]
        out = out.swapaxes(0, 1).reshape(q.shape[0], n, *out.shape[3:])
        return jnp.concatenate([out, tail], axis=1)

    def _attend_causal_blocks(self, q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
        """Causal, segment-masked attention over query blocks: block [s, e) only scores keys
        [0, e), the keys every one of its queries may see, skipping the upper triangle's blocks
        (the full-square softmax gives those keys exactly zero weight, so results are the same up
        to float summation order)."""
        n = q.shape[1]
        block = min(self.q_block, n)
        outs = []
        for s in range(0, n, block):
            e = min(s + block, n)
            same = segment_ids[:, s:e, None] == segment_ids[:, None, :e]
            causal = jnp.arange(s, e)[:, None] >= jnp.arange(e)[None, :]
            outs.append(self._attend(q[:, s:e], k[:, :e], v[:, :e], same & causal[None]))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    def _update_cache(self, k: Array, v: Array, segment_ids: Array) -> tuple[Array, Array, Array]:
        """Write the new keys and values at the cache index; return the whole cache's keys and
        values [B, H_kv, T, D] and the new queries' mask [B, n_new, T]. The cache is heads-major,
        the layout attention reads, so a decode step transposes only its new entries, not the
        cache (that transpose was ~15 % of a batch-8 step on CPU)."""
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        initialized = self.has_variable("cache", "key")
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        cached_seg = self.variable("cache", "segment_ids", jnp.zeros, segment_ids.shape, jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # init only creates the (max-length) cache; nothing is written
            n = k.shape[2]
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & jnp.tril(jnp.ones((n, n), bool))[None]
            return k, v, mask
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, 0, i, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, 0, i, 0))
        cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
        n_new, n_max = k.shape[2], cached_k.value.shape[2]
        index.value = i + n_new
        query_slot = i + jnp.arange(n_new)
        causal = jnp.arange(n_max)[None, :] <= query_slot[:, None]  # [n_new, n_max]
        same = segment_ids[:, :, None] == cached_seg.value[:, None, :]
        return cached_k.value, cached_v.value, same & causal[None]


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, both with biases (CLIP and Phi share this shape)."""

    hidden: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        h = constrain(activation(self.act)(h), (BATCH, LENGTH, "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


class GatedMlp(nn.Module):
    """down(act(gate(x)) * up(x)), no biases (StableLM-2, Phi-3, Qwen2; Phi-3 stores gate and up
    fused, which the converter splits)."""

    hidden: int
    act: str
    dtype: Any = jnp.float32
    fused_gate_up: bool = False  # one ``gate_up_proj`` matmul (KV-cache inference, as ``fused_qkv``)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.fused_gate_up:
            gate_up = dense(2 * self.hidden, ("embed", "mlp"), name="gate_up_proj", dtype=self.dtype, use_bias=False)(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = dense(self.hidden, ("embed", "mlp"), name="gate_proj", dtype=self.dtype, use_bias=False)(x)
            up = dense(self.hidden, ("embed", "mlp"), name="up_proj", dtype=self.dtype, use_bias=False)(x)
        h = constrain(activation(self.act)(gate) * up, (BATCH, LENGTH, "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="down_proj", dtype=self.dtype, use_bias=False)(h)


REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy_of(name: str) -> Any:
    if name not in REMAT_POLICIES:
        raise UserError(f"unknown remat_policy {name!r}; known: none, {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def scan_blocks(block_cls: type[nn.Module], length: int, remat_policy: str, n_broadcast_args: int) -> type:
    """``nn.scan`` over ``length`` stacked copies of a block (params and cache get a leading
    ``layers`` axis), optionally wrapped in ``nn.remat``. The block maps (carry, *broadcast) ->
    (carry, None)."""
    if remat_policy != "none":
        block_cls = nn.remat(block_cls, policy=remat_policy_of(remat_policy), prevent_cse=False)
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * n_broadcast_args,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def unrolled_blocks(block: nn.Module, stacked_params: Any, x: Array, *args: Array, remat_policy: str) -> Array:
    """What ``scan_blocks`` computes, as a Python loop over the layers of its stacked params.

    ``block`` is an unbound block module (``parent=None``); ``stacked_params`` the scanned stack's
    params (leading ``layers`` axis), so checkpoints are the same either way. The scan writes every
    activation that backprop keeps into per-layer stacked buffers and reads it back in the
    backward pass; on CPU those copies were ~12 % of a train step, and the unrolled loop has none
    (at the cost of compiling every layer separately).
    """
    n_layers = jax.tree.leaves(stacked_params)[0].shape[0]

    def layer(params: Any, x: Array) -> Array:
        return block.apply({"params": params}, x, *args)[0]

    if remat_policy != "none":
        layer = jax.checkpoint(layer, policy=remat_policy_of(remat_policy))
    for i in range(n_layers):
        x = layer(jax.tree.map(lambda a: a[i], stacked_params), x)
    return x
