"""Read a model directory's tensors one at a time, without loading the whole state dict.

Safetensors (single file or sharded with ``model.safetensors.index.json``) are read with plain
``pread``-style file reads from the header's offsets, not ``mmap``: pages of an mmap'd checkpoint
would stay resident (and count in RSS) for the whole conversion. ``pytorch_model.bin`` files go
through ``torch.load(weights_only=True, mmap=True)``; anything but a flat ``{name: tensor}`` dict is
refused. Tensors come back in their stored dtype (fp32, fp16, bf16 as ``ml_dtypes.bfloat16``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from allava_jax.convert.errors import ConvertError

SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path
    start: int  # absolute byte offset in the file
    dtype: Any
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Tensor entries and ``__metadata__`` of one safetensors file (validated against its size)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConvertError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n > min(size - 8, 100_000_000):
            raise ConvertError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path}: not a safetensors file ({e})") from None
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != dtype.itemsize * int(np.prod(shape)) or base + end > size:
            raise ConvertError(f"{path}: tensor {name!r} has bad offsets {begin}..{end} (file truncated?)")
        entries[name] = _Entry(path, base + begin, dtype, shape)
    return entries, header.get("__metadata__") or {}


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def load_torch_state_dict(path: Path) -> dict:
    """A ``pytorch_model.bin`` as ``{name: torch.Tensor}``; safe (weights_only) and lazy (mmap)."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be mmap'd
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"{path}: refused: not a plain state dict (the pickle needs objects weights_only=True "
            f"does not allow; it is never unpickled unsafely): {first}"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt files surface as many types
        raise ConvertError(f"{path}: cannot read as a PyTorch checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        what = type(state).__name__
        if isinstance(state, dict):
            bad = next(k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
            what = f"dict whose entry {bad!r} is not a tensor"
        raise ConvertError(f"{path}: refused: not a plain state dict of tensors ({what})")
    return state


class TensorSource:
    """All tensors of one model directory: ``names``, ``shape(name)``, ``read(name)``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConvertError(f"{self.directory}: no such directory")
        self._safe: dict[str, _Entry] = {}
        self._torch: dict[str, Any] = {}
        self.files: list[Path] = []
        files = self._weight_files()
        for path in files:
            if path.suffix == ".safetensors":
                entries, _ = read_safetensors_header(path)
                self._safe.update(entries)
            else:
                self._torch.update(load_torch_state_dict(path))
        self.files = files
        self.names = frozenset(self._safe) | frozenset(self._torch)
        if not self.names:
            raise ConvertError(f"{self.directory}: the weight files hold no tensors")

    def _weight_files(self) -> list[Path]:
        d = self.directory
        for index_name, single in (("model.safetensors.index.json", None), (None, "model.safetensors"),
                                   ("pytorch_model.bin.index.json", None), (None, "pytorch_model.bin")):
            if index_name and (d / index_name).is_file():
                try:
                    weight_map = json.loads((d / index_name).read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise ConvertError(f"{d / index_name}: not a valid index ({e})") from None
                files = [d / f for f in dict.fromkeys(weight_map.values())]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ConvertError(f"{d / index_name}: shard file(s) {missing} missing")
                return files
            if single and (d / single).is_file():
                return [d / single]
        others = sorted(d.glob("*.safetensors"))
        if others:
            return others
        raise ConvertError(
            f"{d}: no weights found (looked for {', '.join(WEIGHT_FILES)} or *.safetensors)"
        )

    @property
    def dtypes(self) -> set[str]:
        """Stored floating dtypes ("float32", "bfloat16", ...)."""
        out = {str(e.dtype) for e in self._safe.values()}
        out |= {str(t.dtype).removeprefix("torch.") for t in self._torch.values()}
        return {d for d in out if "float" in d}

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._safe:
            return self._safe[name].shape
        if name in self._torch:
            return tuple(self._torch[name].shape)
        raise KeyError(name)

    def read(self, name: str) -> np.ndarray:
        """One tensor, freshly read (stored dtype); ``KeyError`` if absent."""
        if name in self._safe:
            e = self._safe[name]
            out = np.empty(e.shape, e.dtype)
            view = out.reshape(-1).view(np.uint8)
            with open(e.path, "rb") as f:
                f.seek(e.start)
                if f.readinto(view) != view.nbytes:
                    raise ConvertError(f"{e.path}: tensor {name!r} is truncated")
            return out
        if name in self._torch:
            return _torch_to_numpy(self._torch[name])
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return name in self.names


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing (every model directory needs its config.json)") from None
    except ValueError as e:
        raise ConvertError(f"{path}: invalid JSON ({e})") from None


def has_tokenizer(directory: str | Path) -> bool:
    d = Path(directory)
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))


def dir_size(directory: str | Path) -> int:
    """Bytes under a directory (for the benchmark's disk figures)."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)
