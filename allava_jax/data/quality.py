"""Bad-sample accounting: skip, count by reason, log with file + record id, stop above a threshold.

A bad record must never stop a long run, but a *mostly* bad dataset (typically a wrong image root)
must stop it early with a message that says so. `BadSample` is what the example builder returns
instead of raising; `SkipBadIterDataset` drops those, counts them in its (checkpointed) state and
reports the per-reason counts downstream through each good example's `skipped` vector, so the main
process can aggregate counts across worker processes.

Why a custom IterDataset rather than `grain` `filter`: `filter` cannot count or log what it drops.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from allava_jax.errors import UserError

log = logging.getLogger(__name__)

# reason -> what it usually means. Order is the layout of the `skipped` count vectors.
REASONS: dict[str, str] = {
    "bad_json": "record is not valid JSON / not an object",
    "bad_turns": "conversations missing, empty, misordered or not human/gpt pairs",
    "image_count_mismatch": "number of <image> placeholders differs from the record's images",
    "empty_answer": "an assistant turn is empty",
    "too_long": "sample does not fit in seq_len (its image tokens cannot be kept)",
    "too_many_images": "sample has more images than max_images_per_row",
    "missing_image": "image file not found under any image root",
    "image_path_escapes": "image path is absolute or leaves its image root (../)",
    "empty_image": "image file is zero bytes",
    "corrupt_image": "image cannot be decoded (corrupt, truncated, unknown format)",
    "image_too_large": "image exceeds max_pixels (decompression bomb)",
    # Native-resolution processing (LLaVA-OneVision-1.5; appended: a state's counts are by index).
    "image_aspect_ratio": "image's long side exceeds 200 x its short side (native-resolution resize refuses it)",
    "image_too_small": "image side shorter than one 14 px patch (native-resolution processing)",
    "too_many_patches": "sample's images have more vision patches than max_patches_per_row (native resolution)",
}
REASON_INDEX = {r: i for i, r in enumerate(REASONS)}
_IMAGE_FILE_REASONS = ("missing_image", "image_path_escapes")


def restore_counts(saved: Any) -> np.ndarray:
    """Per-reason counts from an iterator state. Reasons are only ever appended, so a state saved
    by an older version is shorter: its counts are the first ones."""
    saved = np.asarray(saved, np.int64)
    counts = np.zeros(len(REASONS), np.int64)
    counts[: len(saved)] = saved
    return counts


@dataclasses.dataclass(frozen=True)
class BadSample:
    """Marker returned by the example builder for a record that must be skipped."""

    reason: str
    source: str
    file: str
    record_id: str
    detail: str = ""


class BadDataError(UserError):
    """Raised when the fraction of skipped samples exceeds the configured maximum."""


def explain(counts: dict[str, int], seen: int, max_bad_fraction: float, hint: str = "") -> str:
    """A one-paragraph message naming the dominant reason and its likely cause."""
    bad = sum(counts.values())
    top = max(counts, key=counts.get) if bad else ""
    msg = (
        f"{bad} of {seen} samples ({bad / max(seen, 1):.1%}) were skipped, above "
        f"max_bad_fraction={max_bad_fraction:.1%}. By reason: "
        + ", ".join(f"{r}={n}" for r, n in counts.items() if n)
        + "."
    )
    if top in _IMAGE_FILE_REASONS:
        msg += " Most skips are unreadable image paths: the usual cause is a wrong image_root."
    elif top:
        msg += f" Most common: {top} ({REASONS[top]})."
    if hint:
        msg += " " + hint
    return msg


def log_skipped(bad: BadSample, count: int, log_first: int = 10) -> None:
    """Logs a skip with file + record id while its reason has been seen at most `log_first` times
    (`count`: this reason's skips so far, this one included)."""
    if count <= log_first:
        log.warning(
            "skipped sample: %s (%s) source=%s file=%s id=%s%s",
            bad.reason, REASONS[bad.reason], bad.source, bad.file, bad.record_id,
            "" if count < log_first else " (further ones not logged)",
        )


def counts_dict(vector: np.ndarray) -> dict[str, int]:
    """Count vector (REASONS order) -> {reason: count}."""
    return {r: int(vector[i]) for i, r in enumerate(REASONS)}


class SkipBadIterDataset(grain.IterDataset):
    """Drops `BadSample`s, logs the first `log_first` per reason, enforces `max_bad_fraction`.

    Each good element gains `skipped`: int64 [len(REASONS) + 1], the samples skipped since the
    previous good element by reason, then 1 (this sample), so totals survive packing and
    multiprocess prefetch. Skips after the last good element ride on a zero-length example at the
    end of the stream (it adds no tokens; at worst one all-padding row in the last batch).
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        max_bad_fraction: float = 0.05,
        min_samples: int = 200,
        log_first: int = 10,
    ):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_samples = min_samples
        self._log_first = log_first

    def __iter__(self) -> "_SkipBadIterator":
        return _SkipBadIterator(
            self._parent.__iter__(), self._max_bad_fraction, self._min_samples, self._log_first
        )


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent, max_bad_fraction, min_samples, log_first):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_samples = min_samples
        self._log_first = log_first
        self._counts = np.zeros(len(REASONS), np.int64)
        self._seen = 0
        self._template: dict[str, np.ndarray] | None = None

    def __next__(self) -> dict[str, Any]:
        # pending[:-1]: skips per reason since the last good element; pending[-1]: 1 = a real sample.
        pending = np.zeros(len(REASONS) + 1, np.int64)
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if pending.any() and self._template is not None:
                    # End of stream: hand the trailing skip counts downstream on an empty example.
                    carrier = {k: v[:0] for k, v in self._template.items()}
                    carrier["skipped"] = pending
                    return carrier
                raise
            self._seen += 1
            if not isinstance(element, BadSample):
                pending[-1] = 1
                element["skipped"] = pending
                if self._template is None:
                    self._template = {k: v[:0] for k, v in element.items() if k != "skipped"}
                return element
            idx = REASON_INDEX[element.reason]
            pending[idx] += 1
            self._counts[idx] += 1
            log_skipped(element, int(self._counts[idx]), self._log_first)
            self._check()

    def _check(self) -> None:
        bad = int(self._counts.sum())
        if self._seen >= self._min_samples and bad > self._max_bad_fraction * self._seen:
            raise BadDataError(explain(counts_dict(self._counts), self._seen, self._max_bad_fraction))

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "counts": self._counts.tolist(),
            "seen": self._seen,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = restore_counts(state["counts"])
        self._seen = int(state["seen"])
