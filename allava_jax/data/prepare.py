"""Prepare a TFDS ArrayRecord dataset (record JSON + image bytes) for fast random access.

Why: 1.4M small JPEGs on a network filesystem make every host do millions of opens per epoch;
ArrayRecord shards put each record and its encoded images together for one random read. TFDS
writes them without TensorFlow because every feature is a plain bytes tensor, and reads them back
with `tfds.builder_from_directory(dir).as_data_source("train")` (used by `sources` when a source
`path` is a prepared directory).

    python -m allava_jax.data prepare --data A.json --image-root DIR --out /data/tfds

Records whose images are missing/unsafe/empty are skipped and counted here already.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from allava_jax import storage
from allava_jax.data import images as images_lib
from allava_jax.data import sources, templates
from allava_jax.data.examples import record_id

log = logging.getLogger(__name__)


class AllavaRecords(tfds.core.GeneratorBasedBuilder):
    """ALLaVA/LLaVA conversations with their encoded images inlined."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, specs: Sequence[sources.SourceSpec] = (), cache_dir: str | None = None, **kw):
        self._specs = list(specs)
        self._cache_dir = cache_dir
        self.skipped: collections.Counter[str] = collections.Counter()
        self.first_ids: dict[str, list[str]] = collections.defaultdict(list)
        super().__init__(**kw)

    def _info(self) -> tfds.core.DatasetInfo:
        raw = tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(
            builder=self,
            description="ALLaVA/LLaVA records (JSON) with inlined encoded images.",
            features=tfds.features.FeaturesDict({
                "id": raw,
                "source": raw,
                "record": raw,
                "images": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            }),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for si, spec in enumerate(self._specs):
            src = sources.open_source(spec, self._cache_dir)
            for i in range(len(src)):
                raw = src[i]
                rid = f"#{i}"
                try:
                    record = json.loads(raw)
                    rid = record_id(record, i)
                    paths = templates.image_paths(record)
                    data = [images_lib.read_image_bytes(p, list(spec.image_roots)) for p in paths]
                except (templates.SampleError, images_lib.ImageError) as e:
                    self._skip(e.reason, spec, rid)
                    continue
                except (ValueError, AttributeError):
                    self._skip("bad_json", spec, rid)
                    continue
                yield f"{si}:{i}", {
                    "id": rid,
                    "source": spec.name,
                    "record": raw,
                    "images": np.array(data, dtype=object) if data else np.zeros((0,), object),
                }

    def _skip(self, reason: str, spec: sources.SourceSpec, rid: str) -> None:
        self.skipped[reason] += 1
        if len(self.first_ids[reason]) < 5:
            self.first_ids[reason].append(rid)
        log.warning("prepare: skipped %s in %s (id %s)", reason, spec.path, rid)


def prepare_tfds(
    sources_cfg: Sequence[Any],
    out_dir: str,
    *,
    num_shards: int | None = None,
    cache_dir: str | None = None,
) -> tuple[str, dict[str, int]]:
    """Writes the ArrayRecord dataset; returns (dataset dir to use as a source path, skips).

    ``out_dir`` on object storage: the ArrayRecord writer writes local files only, so the dataset
    is prepared in a temporary directory under ``storage.cache_root()`` and then uploaded (training
    reads it from the bucket directly)."""
    specs = sources.parse_sources(sources_cfg)
    if storage.is_remote(out_dir):
        storage.cache_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="prepare_", dir=storage.cache_root()) as tmp:
            local, skipped = _prepare(specs, tmp, num_shards, cache_dir)
            storage.upload_dir(tmp, out_dir)
        return os.fspath(storage.as_path(out_dir) / os.path.relpath(local, tmp)), skipped
    return _prepare(specs, out_dir, num_shards, cache_dir)


def _prepare(specs: list[sources.SourceSpec], out_dir: str, num_shards: int | None,
             cache_dir: str | None) -> tuple[str, dict[str, int]]:
    builder = AllavaRecords(specs=specs, cache_dir=cache_dir, data_dir=out_dir,
                            file_format="array_record")
    config = tfds.download.DownloadConfig(num_shards=num_shards) if num_shards else None
    builder.download_and_prepare(download_config=config)
    return str(builder.data_dir), dict(builder.skipped)


def is_prepared(path: str) -> bool:
    """Whether `path` (local or ``gs://``) is a prepared TFDS directory."""
    return sources.is_prepared_dir(path)
