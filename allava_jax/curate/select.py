"""SynthVLM's selection over scored pairs: per caption the image with the highest CLIPScore, then
the best pairs overall by CLIPScore + lambda x SSIM (lambda = 0.5 in the paper), by count or by a
threshold. Ties keep input order, as the reference's stable ``max`` / ``sorted`` do.
"""

from __future__ import annotations

from typing import Iterable

LAMBDA = 0.5


def rank_score(row: dict, lam: float = LAMBDA) -> float:
    """CLIPScore, plus ``lam`` x SSIM when the row has one."""
    return row["clipscore"] + (lam * row["ssim"] if row.get("ssim") is not None else 0.0)


def best_per_group(rows: Iterable[dict]) -> list[dict]:
    """The highest-CLIPScore row of each ``group`` (first on ties), in order of first appearance."""
    best: dict[str, dict] = {}
    for row in rows:
        kept = best.get(row["group"])
        if kept is None or row["clipscore"] > kept["clipscore"]:
            best[row["group"]] = row
    return list(best.values())


def select(rows: Iterable[dict], *, per_caption: str = "best", top: int | None = None, min_score: float | None = None,
           lam: float = LAMBDA) -> list[dict]:
    """The kept rows, best first. Rows with an ``error`` never are. ``per_caption``: "best" or "all"."""
    usable = [r for r in rows if r.get("error") is None]
    if per_caption == "best":
        usable = best_per_group(usable)
    elif per_caption != "all":
        raise ValueError(f"per_caption={per_caption!r}; expected 'best' or 'all'")
    ranked = sorted(usable, key=lambda r: rank_score(r, lam), reverse=True)
    if min_score is not None:
        ranked = [r for r in ranked if rank_score(r, lam) >= min_score]
    return ranked[:top] if top is not None else ranked
