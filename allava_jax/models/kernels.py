"""Pallas attention kernels for attention over packed rows: the decoder's causal attention and the
native-resolution vision tower's bidirectional attention within each image (``causal=False``).

``LlavaConfig.attention`` picks the kernel: "xla" (``Attention``'s own masked softmax), "splash"
(TPU splash attention), "flash" (Pallas's GPU flash attention, Triton) or "auto" (splash on TPU,
flash on GPU, for sequences of whole 128-token tiles; else XLA).
Both the choice and Pallas's interpret flag are settled at trace time from the platform of the
current mesh's devices, the devices the program is built for: an AOT compile for a TPU topology
on a CPU host gets the real Mosaic kernel, while the same program on CPU devices runs a kernel in
interpret mode (for tests; it is slow); likewise a deviceless compile for NVIDIA GPUs gets the
Triton flash kernel. ``jax.default_backend()`` is never consulted: it names
the host's backend, not the target's. So trace inside ``jax.set_mesh(mesh)``, as the trainer does:
``jit``'s shardings alone set no mesh for the trace, and outside one the kernels take the default
device's platform and run unsharded.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from allava_jax.errors import UserError
from allava_jax.models.config import ATTENTION_KINDS

Array = jax.Array

KERNEL_PLATFORM = {"splash": "tpu", "flash": "gpu"}
AUTO_KERNEL = {platform: kind for kind, platform in KERNEL_PLATFORM.items()}  # what "auto" picks where
SPLASH_BLOCKS = (512, 256, 128)  # largest first; 512 is MaxText's default tile
LANES = 128  # both kernels tile the sequence in multiples of 128


def target_platform() -> str:
    """The platform of the current mesh's devices (of the default device outside a mesh)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.devices()[0].platform


def resolve(kind: str, length: int | None = None) -> str:
    """The attention ``kind`` runs as here: "auto" is the platform's kernel (splash on TPU, flash on
    GPU) for sequences of whole tiles (``length`` a multiple of 128, or not given; both kernels
    tile by 128 and take any head size) and XLA otherwise. A kernel for another accelerator is an
    error, except on CPU, where either runs interpreted."""
    if kind not in ATTENTION_KINDS:
        raise UserError(f"attention={kind!r}; choose from {ATTENTION_KINDS}")
    platform = target_platform()
    if kind == "auto":
        kernel = AUTO_KERNEL.get(platform)
        return kernel if kernel is not None and (length is None or length % LANES == 0) else "xla"
    needs = KERNEL_PLATFORM.get(kind)
    if needs is not None and platform not in (needs, "cpu"):
        raise UserError(f"attention={kind!r} is a {needs.upper()} kernel but the mesh's devices are {platform}: use 'auto' or 'xla'")
    return kind


def segment_attention(kind: str, q: Array, k: Array, v: Array, segment_ids: Array, scale: float, axes: tuple[str, str],
                     causal: bool = True) -> Array:
    """Causal (or, ``causal=False``, bidirectional) attention within packed segments (equal ids
    attend; 0 = padding sees padding) through the Pallas kernel ``kind`` ("splash" or "flash").
    q [B, L, H, D], k and v [B, L, KV, D] with KV dividing H (grouped-query heads), segment_ids
    [B, L] -> [B, L, H, D]. ``axes`` are the logical names of the batch and heads dims, which the
    kernel is sharded over."""
    check_length(kind, q.shape[1])
    local = functools.partial(KERNELS[kind], scale=scale, interpret=target_platform() == "cpu", causal=causal)
    return sharded(local, q, k, v, segment_ids, axes)


def check_length(kind: str, length: int) -> None:
    if length % LANES:
        raise UserError(f"attention={kind!r} needs a sequence length that is a multiple of {LANES}; got {length} "
                        "(set the data's seq_len to one, or attention='xla')")


def sharded(local: Callable[..., Array], q: Array, k: Array, v: Array, segment_ids: Array, axes: tuple[str, str]) -> Array:
    """``local`` on each device's rows and heads: a shard_map over the mesh axes that the logical
    rules in effect give the batch and heads dims (the length and head dims stay whole: the
    kernels need complete rows). Outside a mesh, one call on the whole arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    batch, heads = axes
    spec = fitted_spec(nn.logical_to_mesh_axes((batch, None, heads, None)), q.shape, mesh)
    if k.shape[2] % axes_size(spec[2], mesh):  # fewer kv heads than head shards: give each q head its own
        k, v = (jnp.repeat(t, q.shape[2] // k.shape[2], axis=2) for t in (k, v))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)), out_specs=spec,
                           check_vma=False)
    return mapped(q, k, v, segment_ids)


def axes_size(entry: str | tuple[str, ...] | None, mesh: jax.sharding.AbstractMesh) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def fitted_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.AbstractMesh) -> PartitionSpec:
    """``spec`` with every dim the mesh axes do not divide left whole (e.g. an eval batch of one
    row on many devices): shard_map needs even shards."""
    return PartitionSpec(*(e if dim % axes_size(e, mesh) == 0 else None for e, dim in zip(spec, shape)))


def splash_local(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float, interpret: bool,
                 causal: bool = True) -> Array:
    """TPU splash attention on one device's shard, [b, L, H, D] in and out. Splash does not scale
    q, so it is scaled here; grouped kv heads go in as they are (splash's MHA kernel maps q head h
    to kv head h // groups, as ``jnp.repeat`` does in the XLA path). The causal mask and the
    segment ids let it skip the blocks above the diagonal and those between segments."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # local: ~0.3 s of imports

    _, length, heads, _ = q.shape
    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    mask = splash.MultiHeadMask([one] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q = (q * scale).astype(q.dtype)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    segments = splash.SegmentIds(segment_ids, segment_ids)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, splash.SegmentIds(0, 0)))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)


def flash_local(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float, interpret: bool,
                causal: bool = True) -> Array:
    """Pallas's GPU flash attention on one device's shard, [b, L, H, D] in and out (its own
    layout). It wants as many kv heads as q heads, so grouped ones are repeated."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # local: ~0.5 s of imports

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = (jnp.repeat(t, groups, axis=2) for t in (k, v))
    return gpu_attention.mha(q, k, v, segment_ids, sm_scale=scale, causal=causal, interpret=interpret)


KERNELS: dict[str, Callable[..., Array]] = {"splash": splash_local, "flash": flash_local}
