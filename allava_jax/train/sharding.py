"""The device mesh and the logical-axis rules that place params and activations on it."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from allava_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). FSDP shards weights on their
# embedding dim, tensor parallelism splits heads / MLP / vocab, the batch spans data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve ``{"data": -1, "fsdp": 4, "tensor": 2}`` (one -1 = "the rest") to a full shape."""
    unknown = [a for a in MESH_AXES if spec.get(a, 1) == -1]
    if len(unknown) > 1:
        raise UserError(f"mesh {dict(spec)}: at most one axis may be -1")
    fixed = math.prod(spec.get(a, 1) for a in MESH_AXES if a not in unknown)
    if num_devices % fixed:
        raise UserError(f"mesh {dict(spec)} does not divide {num_devices} devices")
    shape = tuple(num_devices // fixed if a in unknown else spec.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != num_devices:
        raise UserError(f"mesh {dict(spec)} -> {shape} uses {math.prod(shape)} of {num_devices} devices")
    return shape


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (so linen's logical constraints apply).

    On TPUs the device order follows the physical topology (``jax.make_mesh``). Devices of several
    slices (multi-slice: ``slice_index`` differs) form a hybrid mesh: ``spec`` lays out each slice
    (ICI) and ``dcn`` the slices (default: data parallelism across them, ``{"data": -1}``), each
    axis the product of the two."""
    devices = list(devices if devices is not None else jax.devices())
    types = (AxisType.Auto,) * len(MESH_AXES)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1:
        from jax.experimental import mesh_utils

        if len(devices) % len(slices):
            raise UserError(f"{len(devices)} devices do not split evenly into {len(slices)} slices")
        ici = mesh_shape(spec, len(devices) // len(slices))
        across = mesh_shape(dcn or {"data": -1}, len(slices))
        grid = mesh_utils.create_hybrid_device_mesh(ici, across, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)
    shape = mesh_shape(spec, len(devices))
    if devices == jax.devices() or devices[0].platform == "tpu":
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Config rule lists (lists from ml_collections) -> hashable tuples."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def logical_shardings(boxed_abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a tree of ``nn.Partitioned`` abstract values (e.g. ``abstract_params``)."""
    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces ``batch_sharding`` cuts the batch's rows into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
