"""`check`: validate a dataset before spending accelerator hours on it.

Runs the exact training-time record processing (same ExampleBuilder) over every record once and
reports records read, usable, skipped by reason (with the first ids), the token-length histogram
and the packing utilisation to expect. `run_check(...)` is importable; `__main__` is a thin CLI.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from allava_jax.data import packing, pipeline, quality
from allava_jax.data.quality import BadSample


class _Summarize(grain.transforms.Map):
    """Example -> a few ints, so workers don't ship pixels back for a check."""

    def map(self, x: Any) -> dict[str, Any]:
        if isinstance(x, BadSample):
            return {"bad": x.reason, "id": x.record_id, "source": x.source, "detail": x.detail}
        return {"bad": "", "length": len(x["tokens"]), "images": len(x["images"]),
                "loss_tokens": int(x["loss_mask"].sum()),
                # native resolution: the vision patches of the sample's images (their grids)
                "patches": sum(im.grid[0] * im.grid[1] for im in x["images"] if hasattr(im, "grid"))}


@dataclasses.dataclass
class CheckReport:
    records: int = 0
    usable: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    lengths: list[int] = dataclasses.field(default_factory=list)
    num_images: list[int] = dataclasses.field(default_factory=list)
    num_patches: list[int] = dataclasses.field(default_factory=list)  # native resolution (else 0s)
    utilisation: dict[str, float] = dataclasses.field(default_factory=dict)
    max_bad_fraction: float = 0.05

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(self.records, 1)

    @property
    def ok(self) -> bool:
        return self.bad_fraction <= self.max_bad_fraction

    def format(self, seq_len: int) -> str:
        """Human-readable report."""
        lines = [f"records read: {self.records}", f"usable:       {self.usable}",
                 f"skipped:      {sum(self.skipped.values())} ({self.bad_fraction:.2%})"]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:22s} {n:8d}  e.g. {', '.join(self.first_ids[reason])}"
                         f"  ({quality.REASONS[reason]})")
        if self.lengths:
            lengths = np.asarray(self.lengths)
            edges = [0, 128, 256, 512, 768, 1024, 1536, seq_len]
            edges = sorted({e for e in edges if e <= seq_len} | {seq_len})
            hist, _ = np.histogram(lengths, bins=edges + [seq_len + 1])
            lines.append(f"token lengths (image tokens included): mean {lengths.mean():.0f}, "
                         f"p50 {np.percentile(lengths, 50):.0f}, p95 {np.percentile(lengths, 95):.0f}, "
                         f"max {lengths.max()}")
            width = max(hist.max(), 1)
            for lo, hi, n in zip(edges, edges[1:] + [seq_len + 1], hist):
                label = f"{lo}-{hi - 1}" if hi <= seq_len else f"={seq_len} (truncated)"
                lines.append(f"  {label:>18s} {n:8d} {'#' * int(40 * n / width)}")
            lines.append("expected packing utilisation (real tokens / slots): " + ", ".join(
                f"{k} {v:.1%}" for k, v in self.utilisation.items()))
        if not self.ok:
            lines.append("FAILED: " + quality.explain(
                self.skipped, self.records, self.max_bad_fraction))
        return "\n".join(lines)


def counting_image_id(tokenizer: Any) -> int:
    """The tokenizer's ``<image>`` id, or any id where it has none (lengths do not depend on it)."""
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        image_token_id = len(tokenizer)
    return image_token_id


def summaries(
    sources_cfg: Sequence[Any],
    tokenizer: Any,
    *,
    worker_count: int = 0,
    image_token_id: int | None = None,
    cache_dir: str | None = None,
    chat_template: str = "allava",
    seed: int = 0,
    read_threads: int | None = None,
    positions: slice | None = None,
    **builder_kw: Any,
) -> grain.IterDataset:
    """Every record of the mixture once (or those at ``positions``), in mixture order (no shuffle),
    processed by the training-time ExampleBuilder and reduced to a few ints (`_Summarize`).

    `read_threads` None is grain's default; 0 works in the calling thread (no thread-pool
    overhead: the fastest on one core when nothing waits on I/O, as for `plan`'s lengths)."""
    tokenizer = pipeline.load_tokenizer(tokenizer)
    ds = pipeline.build_examples(
        sources_cfg, tokenizer, num_epochs=1, shuffle=False, cache_dir=cache_dir, seed=seed,
        chat_template=chat_template,
        image_token_id=counting_image_id(tokenizer) if image_token_id is None else image_token_id,
        **builder_kw,
    )
    ds = (ds if positions is None else ds[positions]).map(_Summarize())
    it_ds = ds.to_iter_dataset(None if read_threads is None else grain.ReadOptions(num_threads=read_threads))
    if worker_count > 0:
        pipeline._ensure_absl_flags_parsed()  # pylint: disable=protected-access
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds


def tally(summary: Iterable[dict[str, Any]], *, max_bad_fraction: float = 0.05,
          first_ids: int = 5) -> tuple[CheckReport, np.ndarray]:
    """Counts records read / usable / skipped by reason (with the first ids); also returns which
    records were usable, in order."""
    report = CheckReport(max_bad_fraction=max_bad_fraction)
    skipped: collections.Counter[str] = collections.Counter()
    ids: dict[str, list[str]] = collections.defaultdict(list)
    usable = []
    for s in summary:
        report.records += 1
        usable.append(not s["bad"])
        if s["bad"]:
            skipped[s["bad"]] += 1
            if len(ids[s["bad"]]) < first_ids:
                ids[s["bad"]].append(f"{s['source']}:{s['id']}")
        else:
            report.usable += 1
            report.lengths.append(s["length"])
            report.num_images.append(s["images"])
            report.num_patches.append(s.get("patches", 0))
    report.skipped, report.first_ids = dict(skipped), dict(ids)
    return report, np.asarray(usable, bool)


def run_check(
    sources_cfg: Sequence[Any],
    tokenizer: Any,
    *,
    seq_len: int = 2048,
    image_size: int = 336,
    num_image_tokens: int = 576,
    image_token_id: int | None = None,
    max_images_per_sample: int = 4,
    decode_images: bool = True,
    worker_count: int = 0,
    max_bad_fraction: float = 0.05,
    num_packing_bins: int = 64,
    first_ids: int = 5,
    cache_dir: str | None = None,
) -> CheckReport:
    """Processes every record once (no shuffle) and returns the report."""
    report, _ = tally(summaries(
        sources_cfg, tokenizer, worker_count=worker_count, image_token_id=image_token_id,
        cache_dir=cache_dir, seq_len=seq_len, image_size=image_size, num_image_tokens=num_image_tokens,
        max_images_per_sample=max_images_per_sample, decode_images=decode_images,
    ), max_bad_fraction=max_bad_fraction, first_ids=first_ids)
    if report.lengths:
        order = np.random.default_rng(0).permutation(len(report.lengths))
        lengths = [report.lengths[i] for i in order]
        n_img = [report.num_images[i] for i in order]
        for method in ("best_fit", "first_fit"):
            report.utilisation[method] = packing.simulate_utilisation(
                lengths, seq_len=seq_len, method=method, num_bins=num_packing_bins,
                num_images=n_img, max_images=max_images_per_sample)
        report.utilisation["padding (LLaVA)"] = llava_padding(report)
    return report


def llava_padding(report: CheckReport) -> float:
    """Utilisation of LLaVA's length-grouped padded batches (16 per device x 8) for these samples."""
    return packing.padded_utilisation(report.lengths, batch_size=16, world_size=8,
                                      is_multimodal=[k > 0 for k in report.num_images])
