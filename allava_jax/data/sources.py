"""Random-access sources: ALLaVA/LLaVA JSON, JSONL and prepared TFDS ArrayRecord datasets.

A source is described by a plain dict (ml_collections friendly)::

    {"name": "allava_laion_caption",            # used in logs; defaults to the file name
     "path": "/data/ALLaVA-Caption-LAION-4V.json",  # .json | .jsonl | TFDS dir (prepare output)
     "image_root": "/data" or ["/data", "/mnt/laion"],  # searched in order; not needed for TFDS
     "copies": 2,                               # mixture weight: 2 = twice per epoch, 0.5 = half
     "template": "chat"}                        # the model's chat template (default), "allava",
                                                # "phi3", or "plain" (LLaVA pretraining captions)

Large JSON files are parsed once and cached as ArrayRecord (one JSON record per entry) keyed by
path, size and mtime, so a restart or a worker process opens them in milliseconds and reads only
the records it needs. Elements are ``{"source": int, "index": int, "record": bytes,
"images": list[bytes] | None}`` (images are inline only for TFDS sources).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain

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

    @property
    def is_tfds(self) -> bool:
        return os.path.isdir(self.path) and os.path.exists(os.path.join(self.path, "dataset_info.json"))


def _as_dict(x: Any) -> dict[str, Any]:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def parse_sources(sources: Sequence[Mapping[str, Any] | str], chat_template: str = "allava") -> list[SourceSpec]:
    """Plain dicts (or bare paths) -> SourceSpecs, validating keys early with clear errors.

    A source's ``template`` "chat" (the default) becomes ``chat_template``, the model's.
    """
    specs = []
    for s in sources:
        d = {"path": s} if isinstance(s, str) else _as_dict(s)
        unknown = set(d) - {"name", "path", "image_root", "image_roots", "copies", "template", "split"}
        if unknown or "path" not in d:
            raise UserError(f"source {d}: needs 'path'; unknown keys {sorted(unknown)}")
        roots = d.get("image_roots", d.get("image_root")) or ()
        roots = (roots,) if isinstance(roots, str) else tuple(roots)
        name = d.get("name") or os.path.basename(os.path.normpath(d["path"]))
        copies = float(d.get("copies", 1.0))
        if copies <= 0:
            raise UserError(f"source {name}: copies must be > 0, got {copies}")
        template = d.get("template", "chat")
        template = chat_template if template == "chat" else template
        if template not in TEMPLATES:
            raise UserError(f"source {name}: template {template!r}; choose from {('chat', *TEMPLATES)}")
        specs.append(SourceSpec(name, str(d["path"]), roots, copies, template, d.get("split", "train")))
    if not specs:
        raise UserError("no data sources given")
    return specs


def iter_json_records(path: str):
    """Yields each record of a JSON list or JSONL file as bytes (JSONL lines kept verbatim)."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
        return
    with open(path, "rb") as f:
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

    Safe for many hosts writing concurrently: each writes a private temp file and renames it.
    """
    from array_record.python import array_record_module  # local: heavy import

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_dir = cache_dir or os.environ.get("ALLAVA_JAX_CACHE", DEFAULT_CACHE_DIR)
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, f"{os.path.basename(path)}.{key.hexdigest()[:16]}.array_record")
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
    record index is `index % length`.
    """

    def __init__(self, source: int, is_tfds: bool, length: int):
        self._source = source
        self._is_tfds = is_tfds
        self._length = length

    def map_with_index(self, index: int, element: Any) -> dict[str, Any]:
        out = {"source": self._source, "index": index % self._length}
        if self._is_tfds:
            return {**out, "record": element["record"], "images": list(element["images"])}
        return {**out, "record": element, "images": None}


def open_source(spec: SourceSpec, cache_dir: str | None = None) -> Any:
    """A random-access data source (len + getitem) for one spec."""
    if spec.is_tfds:
        import tensorflow_datasets as tfds  # local: heavy import

        return tfds.builder_from_directory(spec.path).as_data_source(split=spec.split)
    if not os.path.isfile(spec.path):
        raise FileNotFoundError(f"source {spec.name}: {spec.path} does not exist")
    return grain.sources.ArrayRecordDataSource([index_json(spec.path, cache_dir)])


def source_dataset(spec: SourceSpec, source_id: int, cache_dir: str | None = None) -> grain.MapDataset:
    """One source as a MapDataset of element dicts, with its record index attached."""
    src = open_source(spec, cache_dir)
    return grain.MapDataset.source(src).map_with_index(_Tag(source_id, spec.is_tfds, len(src)))


def mixture(specs: Sequence[SourceSpec], *, seed: int, cache_dir: str | None = None) -> grain.MapDataset:
    """All sources concatenated, each repeated `copies` times (fractions take a seeded subset).

    This is how the paper mixes its stages (e.g. stage 1: captions + 2 copies of text data).
    """
    parts = []
    for i, spec in enumerate(specs):
        ds = source_dataset(spec, i, cache_dir)
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
