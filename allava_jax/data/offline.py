"""The offline-packing pipeline stage: rows of a `plan` -> packer-style rows for `FinalizeRow`.

Each plan row lists its members (source id, record index, length, images); `BuildRow` reads and
builds every member with the training ExampleBuilder and concatenates them into one row of
`row_len` tokens with segment ids 1..k and positions restarting per member, images in member
order: the same row layout grain's packers emit, so `packing.FinalizeRow` turns both into the
batch contract the same way. A member that turns out bad now (a missing or corrupt image) is
dropped from its row and counted in the row's skip counts, which the batch statistics and the
bad-fraction stop see as they see the online path's.

Rows are split across hosts by slicing ([shard_index::shard_count]) and shuffled per epoch by
grain (seeded by the run's seed and the epoch), so the iterator state resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from allava_jax.data import quality, sources
from allava_jax.data.examples import ExampleBuilder
from allava_jax.data.quality import BadSample
from allava_jax.errors import UserError


def concat_row(examples: Sequence[dict[str, np.ndarray]], row_len: int, skipped: np.ndarray,
               keep_meta: bool = False) -> dict[str, Any]:
    """Examples (tokens/targets/loss_mask [T], images [n,S,S,3]) -> one row as grain's packers lay
    it out (`tokens_segment_ids`, `tokens_positions`, per-member `images`, `skipped` counts)."""
    n = sum(len(e["tokens"]) for e in examples)
    if n > row_len:
        raise UserError(f"plan row of {n} tokens > row_len {row_len}: the plan is stale; rebuild it")
    row = {k: np.zeros(row_len, dtype) for k, dtype in (
        ("tokens", np.int32), ("targets", np.int32), ("loss_mask", bool),
        ("tokens_segment_ids", np.int32), ("tokens_positions", np.int32))}
    if keep_meta:
        row["sample"] = np.zeros(row_len, np.int64)
    start = 0
    for segment, e in enumerate(examples, 1):
        end = start + len(e["tokens"])
        for k in ("tokens", "targets", "loss_mask", *(("sample",) if keep_meta else ())):
            row[k][start:end] = e[k]
        row["tokens_segment_ids"][start:end] = segment
        row["tokens_positions"][start:end] = np.arange(end - start)
        start = end
    row["images"] = [e["images"] for e in examples]
    row["skipped"] = [skipped]
    return row


class BuildRow(grain.transforms.Map):
    """Plan row bytes -> packer-style row (see module docstring). Picklable for grain workers."""

    def __init__(self, specs: Sequence[sources.SourceSpec], builder: ExampleBuilder, *, row_len: int,
                 cache_dir: str | None = None, keep_meta: bool = False, log_first: int = 10):
        self._datasets = [sources.source_dataset(s, i, cache_dir) for i, s in enumerate(specs)]
        self._builder = builder
        self._row_len = row_len
        self._keep_meta = keep_meta
        self._log_first = log_first
        self._logged = np.zeros(len(quality.REASONS), np.int64)  # per process: only limits the logging

    def map(self, raw: bytes) -> dict[str, Any]:
        members = np.frombuffer(raw, np.int64).reshape(-1, 4)
        skipped = np.zeros(len(quality.REASONS) + 1, np.int64)
        examples = []
        for source, index, length, _ in members.tolist():
            example = self._builder.map(self._datasets[source][index])
            if isinstance(example, BadSample):
                reason = quality.REASON_INDEX[example.reason]
                skipped[reason] += 1
                self._logged[reason] += 1
                quality.log_skipped(example, int(self._logged[reason]), self._log_first)
                continue
            if len(example["tokens"]) != length:
                raise UserError(f"record {index} of source {source} has {len(example['tokens'])} tokens, "
                                f"{length} in the plan: the plan is stale; rebuild it")
            examples.append(example)
        skipped[-1] = len(examples)
        return concat_row(examples, self._row_len, skipped, self._keep_meta)


def plan_rows(
    plan: str,
    manifest: dict[str, Any],
    specs: Sequence[sources.SourceSpec],
    builder: ExampleBuilder,
    *,
    seed: int,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    cache_dir: str | None = None,
    keep_meta: bool = False,
) -> grain.MapDataset:
    """This host's rows of a checked plan (`plan.open_plan`), shuffled per epoch, built."""
    rows = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([plan]))
    if len(rows) != manifest["rows"]:
        raise UserError(f"plan {plan}: {len(rows)} rows, its manifest says {manifest['rows']}; rebuild it")
    rows = rows[shard_index::shard_count]
    if not len(rows):
        raise UserError(f"plan {plan}: {manifest['rows']} rows, too few for data shard {shard_index} of "
                        f"{shard_count}; use fewer data shards or a larger plan")
    rows = rows.shuffle(seed=seed)
    if num_epochs != 1:
        rows = rows.repeat(num_epochs)
    return rows.map(BuildRow(specs, builder, row_len=manifest["row_len"], cache_dir=cache_dir, keep_meta=keep_meta))
