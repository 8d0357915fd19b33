"""Random-access sources: ALLaVA/LLaVA JSON, JSONL and prepared TFDS ArrayRecord datasets.

A source is described by a plain dict (ml_collections friendly)::

    {"name": "allava_laion_caption",            # used in logs; defaults to the file name
     "path": "/data/ALLaVA-Caption-LAION-4V.json",  # .json | .jsonl | TFDS dir (prepare output)
     "image_root": "/data" or ["/data", "/mnt/laion"],  # searched in order; not needed for TFDS
     "copies": 2,                               # mixture weight: 2 = twice per epoch, 0.5 = half
     "template": "chat",                        # the model's chat template (default), "allava",
                                                # "phi3", or "plain" (LLaVA pretraining captions)
     "subset": "laion.subset.npy",              # optional: int64 record indices to keep (in order)
     "weights": "laion.weights.npy",            # or: float32 per-record weights; each epoch draws
     "num_samples": 100000}                     # num_samples (default: len) records by weight

``subset`` and ``weights`` are what ``python -m allava_jax.curate balance`` writes. A weighted
source draws with replacement, seeded by (seed, source, epoch), so a resumed run and every host
see the same draw; the selection happens on indices (``_Select``) before any record is read.

Large JSON files are parsed once and cached as ArrayRecord (one JSON record per entry) keyed by
path, size and mtime, so a restart or a worker process opens them in milliseconds and reads only
the records it needs. Elements are ``{"source": int, "index": int, "record": bytes,
"images": list[bytes] | None}`` (images are inline only for TFDS sources).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from allava_jax import storage
from allava_jax.data.templates import TEMPLATES
from allava_jax.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "allava_jax", "index")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source of a mixture."""

    name: str
    path: str
    image_roots: tuple[str, ...] = ()
    copies: float = 1.0
    template: str = "allava"
    split: str = "train"
    subset: str = ""  # .npy of int64 record indices
    weights: str = ""  # .npy of float32 per-record weights
    num_samples: int | None = None  # draws per epoch of a weighted source (default: its length)

    @property
    def is_tfds(self) -> bool:
        return is_prepared_dir(self.path)


@functools.lru_cache(maxsize=256)
def is_prepared_dir(path: str) -> bool:
    """Whether ``path`` (local or ``gs://``) is a prepared TFDS directory (cached: on a bucket each
    check is a request, and the specs are asked many times)."""
    return (storage.as_path(path) / "dataset_info.json").is_file()


def _as_dict(x: Any) -> dict[str, Any]:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def parse_sources(sources: Sequence[Mapping[str, Any] | str], chat_template: str = "allava") -> list[SourceSpec]:
    """Plain dicts (or bare paths) -> SourceSpecs, validating keys early with clear errors.

    A source's ``template`` "chat" (the default) becomes ``chat_template``, the model's.
    """
    specs = []
    for s in sources:
        d = {"path": s} if isinstance(s, str) else _as_dict(s)
        unknown = set(d) - {"name", "path", "image_root", "image_roots", "copies", "template", "split",
                            "subset", "weights", "num_samples"}
        if unknown or "path" not in d:
            raise UserError(f"source {d}: needs 'path'; unknown keys {sorted(unknown)}")
        roots = d.get("image_roots", d.get("image_root")) or ()
        roots = (roots,) if isinstance(roots, str) else tuple(roots)
        name = d.get("name") or storage.as_path(d["path"]).name
        copies = float(d.get("copies", 1.0))
        if copies <= 0:
            raise UserError(f"source {name}: copies must be > 0, got {copies}")
        template = d.get("template", "chat")
        template = chat_template if template == "chat" else template
        if template not in TEMPLATES:
            raise UserError(f"source {name}: template {template!r}; choose from {('chat', *TEMPLATES)}")
        subset, weights, num_samples = str(d.get("subset") or ""), str(d.get("weights") or ""), d.get("num_samples")
        if subset and weights:
            raise UserError(f"source {name}: give either 'subset' or 'weights', not both")
        if num_samples is not None and (not weights or int(num_samples) <= 0):
            raise UserError(f"source {name}: num_samples={num_samples} needs 'weights' and must be > 0")
        specs.append(SourceSpec(name, str(d["path"]), roots, copies, template, d.get("split", "train"),
                                subset, weights, None if num_samples is None else int(num_samples)))
    if not specs:
        raise UserError("no data sources given")
    return specs


def iter_json_records(path: str):
    """Yields each record of a JSON list or JSONL file (local or ``gs://``) as bytes (JSONL lines
    kept verbatim)."""
    if path.endswith(".jsonl"):
        with storage.as_path(path).open("rb") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
        return
    with storage.as_path(path).open("rb") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a JSON file ({e}); a JSONL file needs the .jsonl suffix") from None
    if isinstance(data, dict):  # {"data": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    for record in data:
        yield json.dumps(record, ensure_ascii=False).encode()


def index_json(path: str, cache_dir: str | None = None) -> str:
    """Parses a JSON/JSONL file once into an ArrayRecord file and returns its path (cached).

    Safe for many hosts writing concurrently: each writes a private temp file and renames it. The
    index is local (the cache dir) also for a ``gs://`` file: one download, then local reads.
    """
    from array_record.python import array_record_module  # local: heavy import

    name, size, version = storage.file_version(path)
    key = hashlib.sha256(f"{name}|{size}|{version}".encode())
    cache_dir = cache_dir or os.environ.get("ALLAVA_JAX_CACHE", DEFAULT_CACHE_DIR)
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"{storage.as_path(path).name}.{key.hexdigest()[:16]}.array_record")
    if os.path.exists(out):
        return out
    tmp = f"{out}.tmp{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    n = 0
    for raw in iter_json_records(path):
        writer.write(raw)
        n += 1
    writer.close()
    os.replace(tmp, out)
    log.info("indexed %s: %d records -> %s", path, n, out)
    return out


class _Tag(grain.transforms.MapWithIndex):
    """Wraps a raw source element into the common element dict with its record index.

    grain reads past the end of a source modulo its length (that is how `repeat` works), so the
    record index is `index % length`. With `keys_only` the element is just (source, index).
    """

    def __init__(self, source: int, is_tfds: bool, length: int, keys_only: bool = False):
        self._source = source
        self._is_tfds = is_tfds
        self._length = length
        self._keys_only = keys_only

    def map_with_index(self, index: int, element: Any) -> dict[str, Any]:
        out = {"source": self._source, "index": index % self._length}
        if self._keys_only:
            return out
        if self._is_tfds:
            return {**out, "record": element["record"], "images": list(element["images"])}
        return {**out, "record": element, "images": None}


def open_source(spec: SourceSpec, cache_dir: str | None = None) -> Any:
    """A random-access data source (len + getitem) for one spec."""
    if spec.is_tfds:
        import tensorflow_datasets as tfds  # local: heavy import

        return tfds.builder_from_directory(spec.path).as_data_source(split=spec.split)
    if not storage.as_path(spec.path).is_file():
        raise FileNotFoundError(f"source {spec.name}: {spec.path} does not exist")
    return grain.sources.ArrayRecordDataSource([index_json(spec.path, cache_dir)])


def source_dataset(
    spec: SourceSpec, source_id: int, cache_dir: str | None = None, *, keys_only: bool = False
) -> grain.MapDataset:
    """One source as a MapDataset of element dicts, with its record index attached.

    `keys_only` gives just {"source", "index"} per record, reading nothing (for `plan`).
    """
    src = open_source(spec, cache_dir)
    base = grain.MapDataset.range(len(src)) if keys_only else grain.MapDataset.source(src)
    return base.map_with_index(_Tag(source_id, spec.is_tfds, len(src), keys_only))


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        with storage.as_path(path).open("rb") as f:
            arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} file {path}: cannot read it as .npy ({e})") from None
    if arr.ndim != 1:
        raise UserError(f"{what} file {path}: needs a 1-D array, got shape {arr.shape}")
    return arr


def load_subset(path: str, length: int) -> np.ndarray:
    """A subset file: distinct int record indices in [0, length), kept in file order."""
    arr = _load_npy(path, "subset")
    if arr.size and arr.dtype.kind not in "iu":
        raise UserError(f"subset file {path}: needs integer record indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.nonzero((arr < 0) | (arr >= length))[0]
    if bad.size:
        raise UserError(f"subset file {path}: index {arr[bad[0]]} (entry {bad[0]}) is out of range for a "
                        f"source of {length} records")
    if len(np.unique(arr)) != len(arr):
        raise UserError(f"subset file {path}: repeats record indices (a subset is drawn without "
                        "replacement; use 'weights' for draws with replacement)")
    return arr


def load_weights(path: str, length: int) -> np.ndarray:
    """A weights file: one finite weight >= 0 per record of the source, not all zero."""
    arr = _load_npy(path, "weights")
    if arr.dtype.kind not in "fiu":
        raise UserError(f"weights file {path}: needs numbers, got dtype {arr.dtype}")
    if len(arr) != length:
        raise UserError(f"weights file {path}: has {len(arr)} weights for a source of {length} records")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all() or (arr < 0).any():
        i = int(np.nonzero(~np.isfinite(arr) | (arr < 0))[0][0])
        raise UserError(f"weights file {path}: weight {arr[i]} at record {i}; weights must be finite and >= 0")
    if arr.sum() <= 0:
        raise UserError(f"weights file {path}: all weights are zero")
    return arr


class _Select(grain.MapDataset):
    """Records `indices` of a source; a weighted source draws new indices each epoch.

    grain passes `epoch * len + i` down through concatenate/slice/shuffle/repeat, so the epoch is
    `index // len`; the draw of an epoch is a pure function of (seed, source, epoch), hence the
    same on every host and after a restore.
    """

    def __init__(self, parent: grain.MapDataset, *, indices: np.ndarray | None = None,
                 weights: np.ndarray | None = None, num_samples: int = 0, seed: int = 0, source_id: int = 0):
        super().__init__(parent)
        self._indices = indices
        self._cdf = None if weights is None else np.cumsum(weights)
        self._last = 0 if weights is None else int(np.flatnonzero(weights)[-1])  # u * total may round up
        self._length = len(indices) if indices is not None else num_samples
        self._seed = (seed, source_id)
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, draw); threads may race: same result

    def __len__(self) -> int:
        return self._length

    def draw(self, epoch: int) -> np.ndarray:
        """The record indices of one epoch."""
        if self._cdf is None:
            return self._indices
        cached = self._cached
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([*self._seed, epoch])
            u = rng.random(self._length) * self._cdf[-1]
            # side="right": a zero-weight record (cdf equal to its predecessor's) is never drawn.
            drawn = np.minimum(np.searchsorted(self._cdf, u, side="right"), self._last).astype(np.int64)
            cached = self._cached = (epoch, drawn)
        return cached[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self._length)
        return self._parent[int(self.draw(epoch)[i])]

    def __str__(self) -> str:
        return f"_Select(len={self._length}, weighted={self._cdf is not None})"


def select(ds: grain.MapDataset, spec: SourceSpec, *, seed: int, source_id: int) -> grain.MapDataset:
    """A source restricted to its `subset` or drawn by its `weights` (as given: unchanged)."""
    if spec.subset:
        return _Select(ds, indices=load_subset(spec.subset, len(ds)))
    if spec.weights:
        weights = load_weights(spec.weights, len(ds))
        return _Select(ds, weights=weights, num_samples=spec.num_samples or len(ds), seed=seed,
                       source_id=source_id)
    return ds


def mixture(
    specs: Sequence[SourceSpec], *, seed: int, cache_dir: str | None = None, keys_only: bool = False
) -> grain.MapDataset:
    """All sources concatenated, each selected (subset / weights), then repeated `copies` times
    (fractions take a seeded subset).

    This is how the paper mixes its stages (e.g. stage 1: captions + 2 copies of text data).
    """
    parts = []
    for i, spec in enumerate(specs):
        ds = select(source_dataset(spec, i, cache_dir, keys_only=keys_only), spec, seed=seed, source_id=i)
        n = round(spec.copies * len(ds))
        if n == 0:
            continue
        whole = math.ceil(spec.copies)
        if n == whole * len(ds):
            parts.append(ds.repeat(whole) if whole > 1 else ds)
        else:
            parts.append(ds.shuffle(seed=(seed + 7919 * (i + 1)) % 2**32).repeat(whole)[:n])
    if not parts:
        raise UserError("all data sources are empty")
    return grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
