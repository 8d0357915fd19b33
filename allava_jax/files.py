"""Writing output files so that a reader, or a crash, never sees half of one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary name, fsync, rename over ``path`` (the temporary name is per process,
    so two processes that write the same file, such as two shards that both merge, do not collide)."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` (no pickles) the same way: temporary name, fsync, rename."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_partial_writes(directory: Path) -> int:
    """Delete the temporary files that writers killed mid-write left in ``directory``; returns how
    many. Only for a directory no other process writes to (its owner holds a lock)."""
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if _TMP_SUFFIX.search(p.name) and p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


_TMP_SUFFIX = re.compile(r"\.tmp\d+$")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")
