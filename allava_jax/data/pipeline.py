"""The training input pipeline: data sources -> packed, host-local numpy batches (grain).

Stages (all grain)::

    sources (JSON/JSONL indexed as ArrayRecord, or TFDS ArrayRecord)  -> mixture with copies
    -> per-host slice [shard_index::shard_count] -> global seeded shuffle -> repeat(num_epochs)
    -> map(ExampleBuilder: parse, images, template)          (random access, thread-prefetched)
    -> to_iter_dataset -> SkipBad (count/log/threshold) -> first-fit|best-fit packing
    -> FinalizeRow -> batch -> mp_prefetch(worker_count)  -> BatchStats (main process)

With ``packing_method="offline"`` the rows come from a plan (``python -m allava_jax.data plan``)::

    plan rows (ArrayRecord) -> per-host slice -> seeded per-epoch shuffle -> repeat
    -> map(offline.BuildRow: ExampleBuilder per member, concatenated) -> FinalizeRow -> ...

Usage from the trainer::

    it = make_pipeline(config.data.sources, tokenizer, seq_len=2048, batch_size=per_host_rows,
                       image_size=336, num_image_tokens=576, image_token_id=image_id,
                       max_images_per_row=4, seed=0, worker_count=8)
    batch = next(it)                      # dict of host-local numpy arrays, batch contract
    batch = to_global_batch(batch, mesh)  # jax.Arrays sharded over ("data", "fsdp")
    state = it.get_state(); it.set_state(state)   # resume the exact remaining stream
    it.stats()                            # {"samples": .., "skipped": {reason: n}, ...}

Every iterator is a `grain.DatasetIterator`, so `grain.checkpoint.CheckpointHandler` /
orbax save its state with the model. Determinism: same seed, shard and worker_count => same
stream (packing is per worker, so changing worker_count changes the stream, not its content).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from allava_jax.data import images as images_lib
from allava_jax.data import native as native_lib
from allava_jax.data import packing, quality, sources
from allava_jax.data.examples import ExampleBuilder
from allava_jax.data.tokenizer import load_tokenizer
from allava_jax.errors import UserError

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "images", "image_mask")
# At native resolution (``native`` given) a row's images are one packed patch sequence
# (``native.pack_images``) instead of ``images``; ``image_mask`` [B, K] marks the class-token slots in use.
NATIVE_BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "patches", "patch_segments",
                     "coords", "cls_segments", "image_mask")


def example_builder(
    specs: Sequence[sources.SourceSpec],
    tokenizer: Any,
    *,
    seq_len: int,
    image_size: int = 336,
    num_image_tokens: int = 576,
    image_token_id: int,
    max_images_per_sample: int = 4,
    truncate: bool = True,
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
    jpeg_draft: bool = False,
    decode_images: bool = True,
    read_images: bool = True,
    native: native_lib.NativeSpec | None = None,
    max_patches_per_sample: int = 0,
) -> ExampleBuilder:
    """The per-record transform every path shares (online packing, `check`, `plan`, offline rows)."""
    return ExampleBuilder(
        specs, load_tokenizer(tokenizer), seq_len=seq_len, image_size=image_size,
        num_image_tokens=num_image_tokens, image_token_id=image_token_id,
        max_images_per_sample=max_images_per_sample, truncate=truncate, max_pixels=max_pixels,
        jpeg_draft=jpeg_draft, decode_images=decode_images, read_images=read_images,
        native=native, max_patches_per_sample=max_patches_per_sample,
    )


def build_examples(
    sources_cfg: Sequence[Mapping[str, Any] | str],
    tokenizer: Any,
    *,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    cache_dir: str | None = None,
    chat_template: str = "allava",
    **builder_kw: Any,
) -> grain.MapDataset:
    """The random-access part: a MapDataset of examples or `BadSample`s (one host's slice).

    `builder_kw` are `example_builder`'s (seq_len, image_token_id, ...).
    """
    specs = sources.parse_sources(sources_cfg, chat_template)
    ds = sources.mixture(specs, seed=seed, cache_dir=cache_dir)
    ds = ds[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(example_builder(specs, tokenizer, **builder_kw))


def make_pipeline(
    sources_cfg: Sequence[Mapping[str, Any] | str],
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    image_token_id: int,
    image_size: int = 336,
    num_image_tokens: int = 576,
    max_images_per_row: int = 4,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    packing_method: str = "best_fit",
    num_packing_bins: int | None = None,
    drop_remainder: bool = True,
    truncate: bool = True,
    max_bad_fraction: float = 0.05,
    min_samples_for_bad_check: int = 200,
    max_pixels: int = images_lib.DEFAULT_MAX_PIXELS,
    jpeg_draft: bool = False,
    normalize_images: bool = True,
    keep_meta: bool = False,
    cache_dir: str | None = None,
    chat_template: str = "allava",
    plan: str | None = None,
    native: native_lib.NativeSpec | None = None,
    max_patches_per_row: int = 0,
) -> "BatchStatsIterator":
    """Builds the packed-batch iterator for this host (see module docstring).

    Args:
      sources_cfg: list of source dicts (see `sources`), e.g. from an ml_collections config.
      tokenizer: HF fast tokenizer or local directory (its `eos_token_id` ends every answer, or
        the chat template's own answer-end token does).
      seq_len: L, tokens per row, image tokens included (2048 in the paper).
      batch_size: rows per batch on this host (global batch / process count).
      image_token_id: id written num_image_tokens times per image (the model's placeholder).
      max_images_per_row: M, image slots per row; also the most images one sample may have.
      shard_index, shard_count: this host's slice; default jax.process_index()/process_count().
      num_epochs: None repeats forever (training); 1 gives one pass (evaluation, tests).
      worker_count: grain worker processes (0 = in-process).
      packing_method: "best_fit" or "first_fit"; "none" = one sample per row; num_packing_bins (rows packed at once; more
        bins pack tighter, see benchmarks/data.py) defaults to max(batch_size, 128). "offline"
        reads the rows of `plan` (`python -m allava_jax.data plan`; rows are the plan's row_len
        long, seq_len stays the per-sample maximum the plan was made with).
      max_bad_fraction: stop with `quality.BadDataError` when more samples than this are bad.
      jpeg_draft: decode JPEGs at reduced scale (faster; pixels differ slightly from reference).
      normalize_images: False keeps uint8 images (normalise on device with `images.normalize`).
      keep_meta: also return `sample` [B, L] (source key + 1 per token; for tests and debugging).
      chat_template: the model's conversation template, for sources whose template is "chat".
      native: a native-resolution (rice) model's image processing: each image costs its own
        grid_h * grid_w / 4 tokens, and rows carry one packed patch sequence (NATIVE_BATCH_KEYS)
        of max_patches_per_row patches (a multiple of 4), a second packing budget beside seq_len.
    """
    if native is not None and max_patches_per_row <= 0:
        raise UserError("native-resolution images need data.max_patches_per_row > 0 (vision patches per row)")
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    builder_kw = dict(seq_len=seq_len, image_size=image_size, num_image_tokens=num_image_tokens,
                      image_token_id=image_token_id, max_images_per_sample=max_images_per_row,
                      truncate=truncate, max_pixels=max_pixels, jpeg_draft=jpeg_draft)
    max_patches = max_patches_per_row if native is not None else 0
    if native is not None:
        builder_kw.update(native=native, max_patches_per_sample=max_patches)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * read_threads, 1))
    if packing_method == "offline":
        it_ds = _offline_rows(sources_cfg, tokenizer, plan, chat_template=chat_template, seed=seed,
                              shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                              cache_dir=cache_dir, keep_meta=keep_meta, **builder_kw).to_iter_dataset(read)
    else:
        ds = build_examples(
            sources_cfg, tokenizer, seed=seed, shard_index=shard_index, shard_count=shard_count,
            num_epochs=num_epochs, cache_dir=cache_dir, chat_template=chat_template, **builder_kw,
        )
        it_ds = quality.SkipBadIterDataset(
            ds.to_iter_dataset(read), max_bad_fraction=max_bad_fraction, min_samples=min_samples_for_bad_check
        )
        it_ds = packing.pack(
            it_ds, method=packing_method, seq_len=seq_len, max_images=max_images_per_row,
            num_bins=num_packing_bins or max(batch_size, 128), seed=seed, keep_meta=keep_meta,
            max_patches=max_patches,
        )
    it_ds = it_ds.map(packing.FinalizeRow(max_images=max_images_per_row, image_size=image_size,
                                          normalize=normalize_images, keep_meta=keep_meta, max_patches=max_patches))
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
    return BatchStatsDataset(it_ds, max_bad_fraction, min_samples_for_bad_check).__iter__()


def _offline_rows(sources_cfg: Sequence[Mapping[str, Any] | str], tokenizer: Any, plan: str | None, *,
                  chat_template: str, seed: int, shard_index: int, shard_count: int, num_epochs: int | None,
                  cache_dir: str | None, keep_meta: bool, **builder_kw: Any) -> grain.MapDataset:
    """The rows of a plan that matches these sources and settings (`plan.open_plan` says why not)."""
    from allava_jax.data import offline, plan as plan_lib  # local: plan imports check, which imports this

    if not plan:
        raise UserError('packing "offline" needs data.plan: the output of python -m allava_jax.data plan')
    specs = sources.parse_sources(sources_cfg, chat_template)
    tokenizer = load_tokenizer(tokenizer)
    builder = example_builder(specs, tokenizer, **builder_kw)
    manifest = plan_lib.open_plan(
        plan, specs, tokenizer, seq_len=builder_kw["seq_len"], num_image_tokens=builder_kw["num_image_tokens"],
        max_images_per_row=builder_kw["max_images_per_sample"], truncate=builder_kw["truncate"],
        native=builder_kw.get("native"), max_patches_per_row=builder_kw.get("max_patches_per_sample", 0))
    return offline.plan_rows(plan, manifest, specs, builder, seed=seed, shard_index=shard_index,
                             shard_count=shard_count, num_epochs=num_epochs, cache_dir=cache_dir, keep_meta=keep_meta)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app (tests, notebooks) use defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class BatchStatsDataset(grain.IterDataset):
    """Main-process tail: strips bookkeeping fields and aggregates skip counts over workers."""

    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, min_samples: int):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_samples = min_samples

    def __iter__(self) -> "BatchStatsIterator":
        return BatchStatsIterator(self._parent.__iter__(), self._max_bad_fraction, self._min_samples)


class BatchStatsIterator(grain.DatasetIterator):
    """Yields batch-contract dicts; `stats()` reports samples used and skipped by reason."""

    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float, min_samples: int):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_samples = min_samples
        self._skipped = np.zeros(len(quality.REASONS), np.int64)
        self._samples = 0
        self._real_tokens = 0
        self._slots = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self._skipped += batch.pop("skipped").sum(axis=0)
        self._samples += int(batch.pop("num_samples").sum())
        self._real_tokens += int((batch["segment_ids"] > 0).sum())
        self._slots += batch["segment_ids"].size
        seen = self._samples + int(self._skipped.sum())
        if seen >= self._min_samples and self._skipped.sum() > self._max_bad_fraction * seen:
            raise quality.BadDataError(quality.explain(
                quality.counts_dict(self._skipped), seen, self._max_bad_fraction))
        return batch

    def stats(self) -> dict[str, Any]:
        """Totals since the start of the run (restored with the iterator state)."""
        return {
            "samples": self._samples,
            "skipped": quality.counts_dict(self._skipped),
            "skipped_total": int(self._skipped.sum()),
            "packing_utilisation": self._real_tokens / max(self._slots, 1),
        }

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": self._skipped.tolist(),
                "samples": self._samples, "real_tokens": self._real_tokens, "slots": self._slots}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = quality.restore_counts(state["skipped"])
        self._samples = int(state["samples"])
        self._real_tokens = int(state["real_tokens"])
        self._slots = int(state["slots"])

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def to_global_batch(
    batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays, leading dim sharded over `batch_axes`.

    Each host passes its own rows; the global batch is the concatenation over processes. Axes not
    in the mesh are ignored, so the same call works for a data-only mesh.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    sharding = NamedSharding(mesh, PartitionSpec(axes or None))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
