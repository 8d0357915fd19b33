"""Image-caption pairs from LLaVA/ALLaVA JSON or JSONL, for scoring.

A record is ``{"id", "image", "conversations": [...]}`` (the caption is the first ``gpt`` turn) or
``{"id", "image", "caption"}``. Pairs are grouped for best-of-N by ``caption_id`` (what ``synth
images`` writes, one record per image) or, without one, by the caption text. A record that cannot
be a pair (no image, no caption, not a JSON object) is skipped with its file, index and reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from allava_jax.data.sources import iter_json_records


@dataclass(frozen=True)
class Pair:
    """One scorable record; ``key`` is unique over all inputs (file index : record index)."""

    key: str
    id: str
    image: str
    caption: str
    group: str
    record: dict


def caption_of(record: dict) -> str | None:
    """The caption: a ``caption`` field, else the first ``gpt`` turn's text."""
    if isinstance(record.get("caption"), str):
        return record["caption"]
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
            return turn["value"]
    return None


def _pair(file_index: int, index: int, record: Any, need_caption: bool = True) -> Pair | str:
    """The pair of one record, or the reason it is not one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    image = record.get("image")
    if isinstance(image, list):
        image = image[0] if len(image) == 1 else None
    if not isinstance(image, str) or not image:
        return "no single image"
    caption = caption_of(record) or ""
    if need_caption and not caption.strip():
        return "no caption"
    rid = str(record.get("id", record.get("idx", index)))
    group = str(record["caption_id"]) if "caption_id" in record else caption
    return Pair(f"{file_index}:{index}", rid, image, caption.strip(), group, record)


def read_pairs(paths: Sequence[str], need_caption: bool = True) -> tuple[list[Pair], list[dict]]:
    """(pairs in input order, skipped records as ``{file, index, id, reason}``). Without
    ``need_caption`` (embedding images) a record needs only its image."""
    pairs, skipped = [], []
    for f, path in enumerate(paths):
        for i, raw in enumerate(iter_json_records(str(path))):
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                skipped.append({"file": str(path), "index": i, "id": None, "reason": f"bad JSON: {e}"})
                continue
            result = _pair(f, i, record, need_caption)
            if isinstance(result, str):
                rid = record.get("id") if isinstance(record, dict) else None
                skipped.append({"file": str(path), "index": i, "id": rid, "reason": result})
            else:
                pairs.append(result)
    return pairs, skipped
