"""Writing output files so that a reader, or a crash, never sees half of one.

On object storage (``gs://``) a file is one object upload, which is already atomic: the object
appears whole when the upload completes, or not at all (a killed upload leaves the old object, if
any). No temporary name is needed there, and object stores have no rename to use one with.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from allava_jax import storage


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temporary name, fsync, rename over ``path`` (the temporary name is per process,
    so two processes that write the same file, such as two shards that both merge, do not collide).
    Remote: one object upload (atomic by itself)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if storage.is_remote(path):
        storage.as_path(path).write_bytes(data)
        return
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` (no pickles) the same way: temporary name, fsync, rename (remote: one upload)."""
    if storage.is_remote(path):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        storage.as_path(path).write_bytes(buf.getvalue())
        return
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_partial_writes(directory: str | os.PathLike) -> int:
    """Delete the temporary files that writers killed mid-write left in ``directory``; returns how
    many. Only for a directory no other process writes to (its owner holds a lock). Remote
    directories have none (uploads are atomic)."""
    if storage.is_remote(directory):
        return 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if _TMP_SUFFIX.search(p.name) and p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


_TMP_SUFFIX = re.compile(r"\.tmp\d+$")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")
