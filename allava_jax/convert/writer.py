"""Write a sharded safetensors checkpoint from a stream of tensors, one tensor in memory at a time.

The shard plan (names, shapes, dtype) is known before any data is produced, so every shard's
header is written first and tensors are appended as the generator yields them: no shard is ever
assembled in memory (``safetensors.numpy.save_file`` would need the whole shard).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from allava_jax.convert.errors import ConvertError

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
INDEX_NAME = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or bytes -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for suffix, scale in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * scale)
    return int(t)


def plan_shards(planned: Sequence[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Greedy contiguous groups of tensor indices, each under ``max_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, shape) in enumerate(planned):
        size = int(np.prod(shape)) * itemsize
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: str, itemsize: int) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks for 8-byte aligned data
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(
    out_dir: str | Path,
    planned: Sequence[tuple[str, tuple[int, ...]]],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 10**9,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``tensors`` (yielded in ``planned`` order) as ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + index; returns the files written."""
    if dtype not in NUMPY_DTYPES:
        raise ConvertError(f"unsupported output dtype {dtype!r}; choose from {sorted(NUMPY_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    shards = plan_shards(planned, np_dtype.itemsize, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    stream = iter(tensors)
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        entries = [planned[i] for i in shard]
        with open(out_dir / file_name, "wb") as f:
            f.write(_header(entries, dtype, np_dtype.itemsize))
            for name, shape in entries:
                got_name, value = next(stream)
                if got_name != name or tuple(value.shape) != tuple(shape):
                    raise ConvertError(f"internal: expected {name} {shape}, got {got_name} {value.shape}")
                data = np.ascontiguousarray(value, dtype=np_dtype)
                f.write(data.reshape(-1).view(np.uint8).data)
                weight_map[name] = file_name
                total += data.nbytes
                if progress:
                    progress(1)
    if next(stream, None) is not None:
        raise ConvertError("internal: more tensors than planned")
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [out_dir / name for name in names]
