"""What ``score`` and ``embed`` share: a run directory of atomically written JSONL chunks,
resumable, split across processes or hosts by chunk (`allava_jax.work_split`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from allava_jax import storage


CHUNKS = "chunks"


def real_paths(paths: Sequence[str]) -> list[str]:
    return [storage.canonical(p) for p in paths]


def image_roots(data: Sequence[str], roots: Sequence[str]) -> list[str]:
    """The folders image paths resolve against: the given ones, else the first data file's."""
    return [str(r) for r in roots] or [os.fspath(storage.as_path(data[0]).parent)]


def chunk_path(out: Path, index: int, suffix: str = ".jsonl") -> Path:
    return out / CHUNKS / f"{index:06d}{suffix}"


def jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_rows(path: Path, expect: Sequence[tuple]) -> list[dict] | None:
    """A finished chunk's rows, if the file is whole and its (key, id, image) match ``expect``."""
    if not path.exists():
        return None
    try:
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except json.JSONDecodeError:
        return None
    return rows if [(r.get("key"), r.get("id"), r.get("image")) for r in rows] == list(expect) else None
