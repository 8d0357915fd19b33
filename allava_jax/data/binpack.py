"""Offline bin packing of samples (token length, image count) into rows of `row_len` tokens and
at most `max_images` images, for `plan` (see plan.py). Pure Python + numpy, no grain.

Two methods, both O(n log L) (L = row length), so a million samples pack in seconds (`pack`
with "best" runs both and keeps the tighter plan):

* ``bfd``: best-fit decreasing. Samples longest first; each goes into the open row with the
  least free space that still holds it (and has image slots left), else into a new row.
* ``bucket``: LLaVA-OneVision-1.5's offline packing, as its ``2_do_hashbacket.py`` does it, in
  short: samples bucketed by exact length; rounds with fill thresholds 0.96 down to 0.90, each
  opening rows with the longest remaining sample and filling them with the longest sample that
  still fits; a row that ends below the round's threshold is rolled back (its samples return to
  their buckets, and shorter seeds get their turn); a last round accepts every row. (Their rounds
  also demand a minimum item count and pick seeds by a few strategies; those are left out.)

Both searches use `_MinTree`: a segment tree over the integers 0..L whose leaf k holds the fewest
images among the rows (bfd: by free space) or samples (bucket: by length) at k, so "the nearest
k at or beyond x with an entry of at most t images" is one walk down the tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from allava_jax.errors import UserError

_NONE = 1 << 30  # an empty leaf


class _MinTree:
    """Leaves 0..size-1 each with per-image-count stacks of ids; a node holds its range's minimum
    image count, so searches skip ranges with no entry that fits."""

    def __init__(self, size: int, max_images: int):
        self._n = 1 << max(size - 1, 1).bit_length()
        self._tree = [_NONE] * (2 * self._n)
        self._stacks: dict[int, list[list[int]]] = {}
        self._width = max_images + 1

    def push(self, key: int, images: int, item: int) -> None:
        stacks = self._stacks.get(key)
        if stacks is None:
            stacks = self._stacks[key] = [[] for _ in range(self._width)]
        stacks[images].append(item)
        if images < self._tree[self._n + key]:
            self._set(key, images)

    def pop(self, key: int) -> tuple[int, int]:
        """Removes an entry at `key` with the fewest images; returns (images, item)."""
        images = self._tree[self._n + key]
        stacks = self._stacks[key]
        item = stacks[images].pop()
        if not stacks[images]:
            self._set(key, next((j for j in range(images, self._width) if stacks[j]), _NONE))
        return images, item

    def _set(self, key: int, value: int) -> None:
        i = self._n + key
        tree = self._tree
        tree[i] = value
        i >>= 1
        while i:
            v = min(tree[2 * i], tree[2 * i + 1])
            if tree[i] == v:
                break
            tree[i] = v
            i >>= 1

    def first_at_or_after(self, x: int, t: int) -> int:
        """The smallest key >= x holding an entry of <= t images, or -1."""
        tree, i = self._tree, self._n + x
        if tree[i] > t:
            while True:  # climb until a right sibling holds a fit
                if i == 1:
                    return -1
                if not i & 1 and tree[i + 1] <= t:
                    i += 1
                    break
                i >>= 1
            while i < self._n:
                i = 2 * i if tree[2 * i] <= t else 2 * i + 1
        return i - self._n

    def last_at_or_before(self, x: int, t: int) -> int:
        """The largest key <= x holding an entry of <= t images, or -1."""
        tree, i = self._tree, self._n + x
        if tree[i] > t:
            while True:
                if i == 1:
                    return -1
                if i & 1 and tree[i - 1] <= t:
                    i -= 1
                    break
                i >>= 1
            while i < self._n:
                i = 2 * i + 1 if tree[2 * i + 1] <= t else 2 * i
        return i - self._n


def _validate(lengths: np.ndarray, images: np.ndarray, row_len: int, max_images: int) -> None:
    if len(lengths) != len(images):
        raise ValueError("lengths and images differ in length")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > row_len):
        raise UserError(f"sample lengths must be in [1, row_len={row_len}]; got {lengths.min()}..{lengths.max()}")
    if len(images) and (images.min() < 0 or images.max() > max_images):
        raise UserError(f"a sample has {images.max()} images, more than the {max_images} image slots of a row")


def best_fit_decreasing(
    lengths: Sequence[int], images: Sequence[int], *, row_len: int, max_images: int
) -> list[list[int]]:
    """Rows as lists of sample indices (each row: total length <= row_len, images <= max_images)."""
    lengths, images = np.asarray(lengths, np.int64), np.asarray(images, np.int64)
    _validate(lengths, images, row_len, max_images)
    order = np.lexsort((np.arange(len(lengths)), -images, -lengths))  # longest first, stable
    free = _MinTree(row_len + 1, max_images)  # key: a row's free tokens; entry: (images used, row)
    rows: list[list[int]] = []
    for i, n, k in zip(order.tolist(), lengths[order].tolist(), images[order].tolist()):
        c = free.first_at_or_after(n, max_images - k)
        if c < 0:
            rows.append([i])
            used, r, c = k, len(rows) - 1, row_len
        else:
            used, r = free.pop(c)
            rows[r].append(i)
            used += k
        if c > n:  # a full set of image slots still takes text-only samples
            free.push(c - n, used, r)
    return rows


DEFAULT_THRESHOLDS = (0.96, 0.95, 0.94, 0.92, 0.90)


def bucket(
    lengths: Sequence[int],
    images: Sequence[int],
    *,
    row_len: int,
    max_images: int,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> list[list[int]]:
    """LLaVA-OneVision-1.5's exact-length buckets with fill thresholds (see module docstring)."""
    lengths, images = np.asarray(lengths, np.int64), np.asarray(images, np.int64)
    _validate(lengths, images, row_len, max_images)
    left = _MinTree(row_len + 1, max_images)  # key: a sample's length; entry: (its images, sample)
    for i in np.lexsort((-np.arange(len(lengths)), lengths)).tolist():  # stacks pop low indices first
        left.push(int(lengths[i]), int(images[i]), i)
    rows: list[list[int]] = []
    remaining = len(lengths)
    for threshold in (*thresholds, 0.0):
        need = threshold * row_len
        seed_len = row_len
        while remaining and (seed_len := left.last_at_or_before(seed_len, max_images)) > 0:
            k, first = left.pop(seed_len)
            row, taken = [first], [(seed_len, k, first)]
            free, slots = row_len - seed_len, max_images - k
            while free and (n := left.last_at_or_before(free, slots)) > 0:
                k, i = left.pop(n)
                row.append(i)
                taken.append((n, k, i))
                free, slots = free - n, slots - k
            if row_len - free >= need:
                rows.append(row)
                remaining -= len(row)
            else:  # below this round's threshold: put back, try shorter seeds
                for n, k, i in reversed(taken):
                    left.push(n, k, i)
                seed_len -= 1
    return rows


METHODS = {"bfd": best_fit_decreasing, "bucket": bucket}


def validate_method(method: str) -> None:
    if method not in (*METHODS, "best"):
        raise UserError(f"unknown packing method {method!r}; choose from best, {', '.join(METHODS)}")


def pack(lengths: Sequence[int], images: Sequence[int], *, row_len: int, max_images: int,
         method: str = "best") -> tuple[list[list[int]], str]:
    """(rows, the method used). "best" runs both and keeps the one with fewer rows (bfd on a tie):
    neither wins everywhere (ALLaVA-like mix: bucket 99.6 % vs bfd 98.0 % in 4096-token rows,
    bfd 99.8 % vs bucket 98.7 % in 8192-token rows of 8 images), and each takes seconds."""
    validate_method(method)
    names = list(METHODS) if method == "best" else [method]
    results = [(METHODS[m](lengths, images, row_len=row_len, max_images=max_images), m) for m in names]
    return min(results, key=lambda r: len(r[0]))


def utilisation(rows: Sequence[Sequence[int]], lengths: Sequence[int], row_len: int) -> float:
    """Real tokens / token slots of packed rows."""
    return float(np.sum(lengths)) / max(len(rows) * row_len, 1)
