"""What ``score`` and ``embed`` share: a run directory of atomically written chunks, resumable, and
split across processes or hosts by chunk.

A run is refused in a directory made with other inputs (``check_identity``). With ``num_shards``
processes (``--shard-index/--num-shards``, or ``jax.distributed``'s process index and count where
the job was started that way), process ``i`` computes the chunks ``c`` with ``c % n == i`` into the
same directory on a shared filesystem; whoever finds every chunk present merges.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from allava_jax.errors import UserError
from allava_jax.files import atomic_write

CHUNKS = "chunks"


def check_identity(out: Path, name: str, ident: dict, what: str) -> None:
    """Write ``ident`` to ``out/name``, or refuse if the directory holds a run with another one."""
    path = out / name
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in ident if old.get(k) != ident[k]]
        if changed:
            raise UserError(f"{out} holds {what} made with other {', '.join(changed)}; use another --out")
    else:
        atomic_write(path, json.dumps(ident, indent=1))


def real_paths(paths: Sequence[str]) -> list[str]:
    return [os.path.realpath(p) for p in paths]


def image_roots(data: Sequence[str], roots: Sequence[str]) -> list[str]:
    """The folders image paths resolve against: the given ones, else the first data file's."""
    return [str(r) for r in roots] or [str(Path(data[0]).parent)]


def shard_of(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """(index, count): the flags, else this process's place in a ``jax.distributed`` job."""
    if num_shards is None:
        import jax

        return jax.process_index(), jax.process_count()
    if not 0 <= (shard_index or 0) < num_shards:
        raise UserError(f"--shard-index {shard_index} must be in [0, --num-shards {num_shards})")
    return shard_index or 0, num_shards


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
