"""The trainer's input: a fixed number of data shards, spread over hosts.

The sample stream is defined by ``num_shards`` (virtual shards), not by the host count: shard k
packs its own slice of the data into ``batch_size / num_shards`` rows per step, and the global
batch is the shards' rows in shard order. Each host runs only its own shards, so the losses of a
run do not depend on how many hosts it is spread over, and one host never reads another's data.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from allava_jax.data import native, pipeline
from allava_jax.errors import UserError


class ShardedStream(grain.DatasetIterator):
    """Concatenates one batch from each of this host's shard pipelines (a grain iterator, so
    ``grain.checkpoint`` saves its state with the model)."""

    def __init__(self, shards: list[grain.DatasetIterator]):
        super().__init__(shards)
        self._shards = shards

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(s) for s in self._shards]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[str, Any]:
        return {"shards": [s.get_state() for s in self._shards]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["shards"]) != len(self._shards):
            raise UserError(
                f"data state has {len(state['shards'])} shards for this host, the run has {len(self._shards)}: "
                "resume with the same num_shards and process count"
            )
        for s, st in zip(self._shards, state["shards"]):
            s.set_state(st)

    def stats(self) -> dict[str, Any]:
        per = [s.stats() for s in self._shards]
        skipped: dict[str, int] = {}
        for p in per:
            for k, v in p["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        return {
            "samples": sum(p["samples"] for p in per),
            "skipped": skipped,
            "skipped_total": sum(p["skipped_total"] for p in per),
        }

    def close(self) -> None:
        for s in self._shards:
            s.close()


def local_shards(num_shards: int) -> list[int]:
    """The shard ids this host runs: a contiguous block, so global rows stay in shard order."""
    procs = jax.process_count()
    if num_shards % procs:
        raise UserError(f"data.num_shards={num_shards} must be a multiple of the process count {procs}")
    per = num_shards // procs
    return list(range(jax.process_index() * per, (jax.process_index() + 1) * per))


def make_stream(*, batch_size: int, num_shards: int, **kwargs: Any) -> ShardedStream:
    """One ``pipeline.make_pipeline`` per local shard, each giving ``batch_size / num_shards`` rows."""
    if batch_size % num_shards:
        raise UserError(f"batch_size={batch_size} must be a multiple of data.num_shards={num_shards}")
    rows = batch_size // num_shards
    return ShardedStream(
        [pipeline.make_pipeline(batch_size=rows, shard_index=k, shard_count=num_shards, **kwargs) for k in local_shards(num_shards)]
    )


def pipeline_kwargs(data_cfg: Any, model_config: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
    """``make_pipeline`` keyword arguments from the config's ``data`` block and the model (a rice
    tower: native-resolution images, packed under ``max_patches_per_row`` too)."""
    vision = model_config.vision
    if vision.kind == "rice":
        image_kw: dict[str, Any] = dict(
            native=native.NativeSpec(vision.min_pixels, vision.max_pixels, data_cfg.get("max_image_side", 0)),
            max_patches_per_row=max_patches_per_row(data_cfg), num_image_tokens=0)
    else:
        image_kw = dict(num_image_tokens=model_config.num_image_tokens)
    return dict(
        sources_cfg=list(data_cfg.sources),
        tokenizer=tokenizer,
        seq_len=data_cfg.seq_len,
        image_token_id=model_config.image_token_id,
        image_size=model_config.vision.image_size,
        **image_kw,
        max_images_per_row=data_cfg.max_images_per_row,
        seed=seed,
        worker_count=data_cfg.worker_count,
        packing_method=data_cfg.packing,
        num_packing_bins=data_cfg.packing_bins or None,
        max_bad_fraction=data_cfg.max_bad_fraction,
        chat_template=model_config.chat_template,
        plan=data_cfg.plan or None,  # packing "offline"
    )



def max_patches_per_row(data_cfg: Any) -> int:
    """The config's patch budget per row; 0 means 4 * seq_len (every token an image token)."""
    return data_cfg.get("max_patches_per_row", 0) or 4 * data_cfg.seq_len
