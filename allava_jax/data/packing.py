"""Packing examples into fixed [L] rows with grain's first-fit / best-fit packers.

Images ride through the packer as a per-row list (a grain "meta feature"): the packer appends a
sample's tokens and its images to the same row in the same order, so image slots follow
placeholder order by construction. A tiny packed feature `image_slots` (one int8 per image, row
capacity M = max images per row) makes the packer itself refuse a row more than M images, without
M-image buffers per bin (which would cost bins x M x 336 x 336 x 3 bytes). `FinalizeRow` then
stacks and pads images to M, renames grain's `tokens_segment_ids` / `tokens_positions` to the batch
contract, sums the per-sample skip counts and normalises images.

At native resolution (a rice tower, ``max_patches`` > 0) a second budget rides the same way: a
packed feature `patch_slots` (one int8 per vision patch of the sample's images, row capacity
``max_patches``), so a row holds at most ``seq_len`` LLM tokens and at most ``max_patches``
patches; `FinalizeRow` then lays the row's images out as one packed patch sequence
(`native.pack_images`: `patches`, `patch_segments`, `coords`, `cls_segments`) instead of `images`.

Also: `simulate_utilisation` / `padded_utilisation` estimate real-tokens / slots for a length mix
(used by `check` and `benchmarks/data.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from allava_jax.data import images as images_lib
from allava_jax.data import native
from allava_jax.errors import UserError

PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}


def pack(
    ds: grain.IterDataset,
    *,
    method: str,
    seq_len: int,
    max_images: int,
    num_bins: int,
    seed: int,
    keep_meta: bool = False,
    max_patches: int = 0,
) -> grain.IterDataset:
    """Packs example dicts (tokens/targets/loss_mask [T], images [n,S,S,3] or a list of
    `native.NativeImage`) into rows; ``max_patches`` > 0 adds the vision-patch budget. Method
    "none": one sample per row, in stream order (unpacked training, padded to ``seq_len``)."""
    one_per_row = method == "none"
    if one_per_row:
        method, num_bins = "first_fit", 1
    if method not in PACKERS:
        raise UserError(f"unknown packing method {method!r}; choose from {sorted([*PACKERS, 'none'])}")
    length_struct = {"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len, "image_slots": max_images}
    if max_patches:
        length_struct["patch_slots"] = max_patches
    if keep_meta:
        length_struct["sample"] = seq_len
    return PACKERS[method](
        ds.map(_add_patch_slots if max_patches else _add_image_slots),
        length_struct=length_struct,
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=True,
        meta_features=("images", "skipped"),
        max_sequences_per_bin=1 if one_per_row else None,
    )


def _add_image_slots(example: dict[str, Any]) -> dict[str, Any]:
    example["image_slots"] = np.ones(len(example["images"]), np.int8)
    return example


def _add_patch_slots(example: dict[str, Any]) -> dict[str, Any]:
    example["patch_slots"] = np.ones(sum(im.grid[0] * im.grid[1] for im in example["images"]), np.int8)
    return _add_image_slots(example)


class FinalizeRow(grain.transforms.Map):
    """grain packer output row -> batch-contract row (+ `skipped` counts, `sample` if kept)."""

    def __init__(self, *, max_images: int, image_size: int, normalize: bool = True,
                 keep_meta: bool = False, max_patches: int = 0):
        if max_patches % (native.MERGE * native.MERGE):
            raise UserError(f"max_patches_per_row={max_patches} must be a multiple of {native.MERGE**2} (2 x 2 blocks)")
        self._max_images = max_images
        self._image_size = image_size
        self._normalize = normalize
        self._keep_meta = keep_meta
        self._max_patches = max_patches  # > 0: native resolution (a packed patch sequence per row)

    def map(self, row: dict[str, Any]) -> dict[str, Any]:
        real = [im for sample_images in row["images"] for im in sample_images]  # placeholder order
        n = len(real)
        out = {
            "tokens": row["tokens"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(bool),
            "segment_ids": row["tokens_segment_ids"].astype(np.int32),
            "positions": row["tokens_positions"].astype(np.int32),
        }
        if self._max_patches:
            patches = sum(im.grid[0] * im.grid[1] for im in real)
            if patches > self._max_patches or n > self._max_images:
                raise UserError(f"a row of {patches} patches and {n} images > max_patches_per_row "
                                f"{self._max_patches} / max_images_per_row {self._max_images}: a stale plan? rebuild it")
            buckets = native.Buckets(patch_multiple=self._max_patches, max_images=self._max_images)
            pack = native.pack_images([[(native.normalize_patches(im.patches), im.grid) for im in real]], buckets,
                                      with_windows=False)
            out.update({k: v[0] for k, v in pack.items()})
        else:
            s = self._image_size
            dtype = np.float32 if self._normalize else np.uint8
            images = np.zeros((self._max_images, s, s, 3), dtype)
            if n:  # normalise only the real slots: most rows hold 0-2 of M images
                stacked = np.stack(real)
                images[:n] = images_lib.normalize(stacked) if self._normalize else stacked
            out["images"] = images
        out["image_mask"] = np.arange(self._max_images) < n
        counts = np.sum([np.asarray(s) for s in row["skipped"]], axis=0)
        out["skipped"] = counts[:-1]  # per reason (see quality.SkipBadIterDataset)
        out["num_samples"] = counts[-1]
        if self._keep_meta:
            out["sample"] = row["sample"]
        return out


def simulate_utilisation(
    lengths: Sequence[int],
    *,
    seq_len: int,
    method: str,
    num_bins: int,
    num_images: Sequence[int] | None = None,
    max_images: int = 8,
    seed: int = 0,
    num_patches: Sequence[int] | None = None,
    max_patches: int = 0,
) -> float:
    """Real tokens / token slots when grain packs samples of these lengths (in this order); with
    ``num_patches`` and ``max_patches``, under the patch budget too (native resolution: the patch
    utilisation is then sum(num_patches) / (rows * max_patches), rows = sum(lengths) / (this * seq_len))."""
    n_img = num_images if num_images is not None else [0] * len(lengths)
    n_patch = num_patches if num_patches is not None and max_patches else None
    elements = [
        {"tokens": np.zeros(int(n), np.int32), "images": np.zeros((int(k), 1), np.uint8)}
        for n, k in zip(lengths, n_img)
    ]
    length_struct = {"tokens": seq_len, "images": max_images}
    if n_patch is not None:
        for e, p in zip(elements, n_patch):
            e["patches"] = np.zeros(int(p), np.int8)
        length_struct["patches"] = max_patches
    ds = grain.MapDataset.source(elements).to_iter_dataset()
    ds = PACKERS[method](ds, length_struct=length_struct, num_packing_bins=num_bins, seed=seed)
    rows = real = 0
    for row in ds:
        rows += 1
        real += int((row["tokens_segment_ids"] > 0).sum())
    return real / max(rows * seq_len, 1)


def padded_utilisation(
    lengths: Sequence[int],
    *,
    batch_size: int,
    world_size: int,
    is_multimodal: Sequence[bool] | None = None,
    seed: int = 0,
) -> float:
    """Real tokens / slots for LLaVA's unpacked training: pad to the longest in each batch.

    Mirrors LLaVA's `LengthGroupedSampler(group_by_modality_length=True)`: shuffle, megabatches of
    world_size * batch_size, sorted by length, split into world_size balanced chunks (greedy by
    total length, `split_to_even_chunks`), each chunk a device batch padded to its longest sample.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    groups = [np.arange(len(lengths))]
    if is_multimodal is not None:
        mm = np.asarray(is_multimodal, bool)
        groups = [np.nonzero(mm)[0], np.nonzero(~mm)[0]]
    mega = world_size * batch_size
    real = slots = 0
    for group in groups:
        idx = rng.permutation(group)
        for start in range(0, len(idx), mega):
            block = sorted(idx[start:start + mega], key=lambda i: -lengths[i])
            chunks: list[list[int]] = [[] for _ in range(world_size)]
            totals = [0] * world_size
            for i in block:  # split_to_even_chunks
                c = min((c for c in range(world_size) if len(chunks[c]) < batch_size),
                        key=lambda c: totals[c], default=None)
                if c is None:
                    break
                chunks[c].append(i)
                totals[c] += lengths[i]
            for chunk in chunks:
                if chunk:
                    real += int(sum(lengths[chunk]))
                    slots += len(chunk) * int(max(lengths[chunk]))
    return real / max(slots, 1)
