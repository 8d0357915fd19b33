"""Paths that may be local or on object storage (``gs://``, or any other ``etils.epath`` scheme).

The one module that knows about object storage. TPU VMs have small disks and no shared filesystem,
so every path a user gives may name a bucket: code takes ``as_path(p)`` (an ``epath.Path``, whose
``open``/``exists``/``iterdir``/... work on both) and asks ``is_remote`` only where a library needs
real local files (``local_dir``, ``upload_dir``) or where object stores behave differently (no
append: ``AppendLog``). ``gs://`` goes through gcsfs (``fsspec``), never through string tricks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

import fsspec
from etils import epath

from allava_jax.errors import UserError

PathLike = str | os.PathLike
# How long ``check_access`` waits for the storage endpoint before it calls it unreachable.
PROBE_TIMEOUT_S = float(os.environ.get("ALLAVA_STORAGE_PROBE_TIMEOUT_S", "10"))


def as_path(p: PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``: a local path or a URI such as ``gs://bucket/dir``."""
    return epath.Path(p)


def is_remote(p: PathLike) -> bool:
    """True for a URI with a scheme other than ``file`` (``gs://``, ``s3://``, ...)."""
    protocol, _ = fsspec.core.split_protocol(os.fspath(p))
    return protocol not in (None, "file", "local")


def filesystem(p: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``p`` and ``p`` as that filesystem spells it (no scheme)."""
    return fsspec.core.url_to_fs(os.fspath(p))


def reset_clients() -> None:
    """Forget cached storage clients (gcsfs and epath keep one per process), so the next call reads
    the environment again: tests that point ``STORAGE_EMULATOR_HOST`` at a new emulator need it."""
    import fsspec.config
    from etils.epath import backend

    # fsspec reads its FSSPEC_<PROTOCOL>_<OPTION> variables once, at import.
    fsspec.config.conf.clear()
    fsspec.config.set_conf_files(fsspec.config.conf_dir, fsspec.config.conf)
    fsspec.config.set_conf_env(fsspec.config.conf)
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    for cls in _loaded_filesystem_classes():
        cls.clear_instance_cache()


def _loaded_filesystem_classes() -> list[type]:
    out = []
    for name in ("gcs", "gs", "s3", "file"):
        try:
            out.append(fsspec.get_filesystem_class(name))
        except (ImportError, ValueError):
            pass
    return out


def canonical(p: PathLike) -> str:
    """A path's stable name for run identities: the real path locally, the URI remotely."""
    return os.fspath(p) if is_remote(p) else os.path.realpath(p)


def file_version(p: PathLike) -> tuple[str, int, int]:
    """(canonical name, size, version) of a file, for cache keys that must change when the file
    does: the real path and mtime_ns locally; the URI and the object generation remotely (changes
    with every upload; mtime when a store has no generations). FileNotFoundError if missing."""
    if not is_remote(p):
        st = os.stat(p)
        return os.path.realpath(p), st.st_size, st.st_mtime_ns
    fs, key = filesystem(p)
    fs.invalidate_cache(key)
    info = fs.info(key)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{os.fspath(p)}: is a directory, not a file")
    version = info.get("generation") or info.get("mtime") or 0
    if not isinstance(version, (int, str)):  # a datetime
        version = int(version.timestamp() * 1e9)
    return os.fspath(p), int(info.get("size") or 0), int(version)


# --------------------------------------------------------------------------------------------------
# Failing fast on a bad bucket


def check_access(p: PathLike, *, write: bool = False) -> None:
    """Fail in seconds, with one ``UserError`` naming ``p`` and the cause, when ``p`` cannot be read
    (or, with ``write``, written): missing bucket, no permission, unreachable endpoint. Storage
    clients retry such errors for a minute or more before they give up; a job should not spend a
    pod's startup learning that a bucket name has a typo. Local: an unwritable directory."""
    if not is_remote(p):
        _check_local(pathlib.Path(p), write)
        return
    protocol, _ = fsspec.core.split_protocol(os.fspath(p))
    if protocol not in ("gs", "gcs"):
        return  # other schemes: their clients report errors themselves
    _check_gcs(os.fspath(p), write)


def _check_local(path: pathlib.Path, write: bool) -> None:
    if not write:
        return
    existing = path.parent if path.is_file() else path  # an output file may be replaced
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: no permission to write in {existing}")


def _check_gcs(uri: str, write: bool) -> None:
    import gcsfs  # only needed for gs://

    # A new client, not the shared one: short timeouts, and each request tried once (the class's
    # ``_request`` retries six times with backoff; ``__wrapped__`` is the single attempt).
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, requests_timeout=PROBE_TIMEOUT_S)
    bucket, key, _ = fs.split_path(uri)
    request = getattr(type(fs)._request, "__wrapped__", type(fs)._request)  # pylint: disable=protected-access

    async def probe() -> None:
        await request(fs, "GET", "b/{}/o", bucket, prefix=key, maxResults=1)

    try:
        fsspec.asyn.sync(fs.loop, asyncio.wait_for, probe(), PROBE_TIMEOUT_S)
        if write:  # reachable and readable: the write itself fails at once if forbidden
            probe_name = f".allava_write_probe-{os.getpid()}-{time.time_ns()}"
            name = "/".join(part for part in (bucket, key.strip("/"), probe_name) if part)
            fs.pipe_file(name, b"")
            fs.rm_file(name)
    except FileNotFoundError:
        raise UserError(f"{uri}: bucket gs://{bucket} does not exist") from None
    except (TimeoutError, asyncio.TimeoutError):
        raise UserError(f"{uri}: cannot reach the storage endpoint {fs._location} within "
                        f"{PROBE_TIMEOUT_S:g} s") from None
    except Exception as e:  # noqa: BLE001 - OSError, HTTP and auth errors of the client library
        if isinstance(e, PermissionError) or "Forbidden" in str(e) or getattr(e, "code", None) in (401, 403):
            said = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"{uri}: no permission to {'write' if write else 'read'} it (storage said: "
                            f"{said})") from None
        if isinstance(e, OSError):
            raise UserError(f"{uri}: cannot reach the storage endpoint {fs._location} ({e})") from None
        raise UserError(f"{uri}: cannot use this path ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------
# Libraries that need local files


def cache_root() -> pathlib.Path:
    """Where remote directories are copied for libraries that need local files: ``$ALLAVA_CACHE``,
    else ``~/.cache/allava_jax``."""
    return pathlib.Path(os.environ.get("ALLAVA_CACHE") or "~/.cache/allava_jax").expanduser()


def local_dir(p: PathLike) -> pathlib.Path:
    """A local directory with the contents of ``p``, for libraries that only read local files (HF
    tokenizers, ``from_pretrained``, safetensors memory-maps). Local: ``p`` itself. Remote: a copy
    under ``cache_root()/remote/<hash>``, downloaded once; a file already there with the remote
    size is not fetched again (each file lands under a temporary name first, so a killed download
    leaves no file of the right name and the wrong content)."""
    if not is_remote(p):
        return pathlib.Path(p)
    uri = os.fspath(p).rstrip("/")
    fs, root = filesystem(uri)
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        if fs.exists(root):
            raise UserError(f"{uri}: is a file, expected a directory")
        raise UserError(f"{uri}: no such directory")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache_root() / "remote" / f"{digest}-{pathlib.PurePosixPath(root).name}"
    for name, info in fs.find(root, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = pathlib.PurePosixPath(name).relative_to(root)
        target = dest / rel
        if target.is_file() and target.stat().st_size == int(info.get("size") or 0):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        fs.get_file(name, str(tmp))
        os.replace(tmp, target)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def upload_dir(local: PathLike, remote: PathLike) -> None:
    """Copy the files under the local directory ``local`` to ``remote`` (same relative names), for
    outputs that a library writes to local disk (``save_pretrained``). Each file becomes one object,
    which appears whole or not at all; files already at ``remote`` and not in ``local`` stay."""
    local = pathlib.Path(local)
    if not is_remote(remote):  # streamed file by file, not read whole into memory
        shutil.copytree(local, pathlib.Path(remote), dirs_exist_ok=True)
        return
    fs, root = filesystem(remote)
    for src in sorted(local.rglob("*")):
        if src.is_file():
            fs.put_file(str(src), f"{root.rstrip('/')}/{src.relative_to(local).as_posix()}")
    fs.invalidate_cache(root)


# --------------------------------------------------------------------------------------------------
# Append-only JSON lines


_PART = re.compile(r"^(\d{10})-(\d+)-(\d+)\.jsonl$")
_COMPACTING = "compacting.json"


class AppendLog:
    """JSON-lines rows appended over a run (metrics, journals) that survive kill -9, on local disk
    and on object stores.

    Local: one file, appended and flushed (``flush()`` also fsyncs); a torn last line left by a
    kill mid-write is ignored by ``read`` and cut off before the next append.

    Remote: object stores have no append, and gcsfs's ``"a"`` mode silently rewrites the object, so
    each ``flush()`` uploads the rows since the previous one as ONE NEW object
    ``<path>.parts/<seq>-<pid>-<time_ns>.jsonl`` and never rewrites an object. Rewriting ``<path>``
    whole at each flush would cost O(rows) per flush (O(rows^2) a run) and a kill between writing
    and confirming could lose rows; new objects are atomic (an upload appears whole or not at all),
    so every flushed row is kept exactly once. ``<seq>`` continues after the parts already there, so
    name order is write order across restarts. ``read()`` = the object ``<path>`` (if any) + all
    parts in name order. ``compact()`` writes ``<path>`` whole and deletes the parts; a marker
    object written first (with the new ``<path>``'s digest) makes a compaction killed half way read
    back correctly. Rows appended since the last flush are lost on kill -9: ``append`` flushes by
    itself every ``flush_every_s`` (``clock`` is injectable for tests). One writer per path.
    """

    def __init__(self, path: PathLike, *, flush_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.uri = os.fspath(path)
        self.remote = is_remote(path)
        self.flush_every_s = flush_every_s
        self._clock = clock
        self._last_flush = clock()
        self._pending: list[str] = []
        self._file = None  # local: the open append handle
        self._next_seq: int | None = None  # remote: lazily read from the parts already there
        if self.remote:
            self._fs, self._key = filesystem(self.uri)
            self._parts = f"{self._key}.parts"

    # -- writing

    def append(self, row: dict[str, Any]) -> None:
        """Add one row; flush too if ``flush_every_s`` has passed since the last flush."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        if self.remote:
            self._pending.append(line)
        else:  # to the OS at once (survives kill -9 of this process); fsync waits for flush()
            handle = self._local_handle()
            handle.write(line)
            handle.flush()
        if self._clock() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Make every appended row durable: fsync (local) or one new part object (remote)."""
        self._last_flush = self._clock()
        if not self.remote:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
            return
        if not self._pending:
            return
        if self._next_seq is None:  # after every part there, and after a killed compaction's
            names = self._part_names()
            if _COMPACTING in names:
                names.append(self._marker().get("through", ""))
            self._next_seq = max((int(m.group(1)) for m in map(_PART.match, names) if m), default=-1) + 1
        name = f"{self._parts}/{self._next_seq:010d}-{os.getpid()}-{time.time_ns()}.jsonl"
        self._fs.pipe_file(name, "".join(self._pending).encode("utf-8"))
        self._next_seq += 1
        self._pending = []

    def close(self) -> None:
        """Flush, and release the local file handle."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading

    def read(self) -> list[dict[str, Any]]:
        """Every durable row, in order (this writer's pending rows are flushed first)."""
        self.flush()
        if not self.remote:
            return _parse_lines(self._local_bytes(), self.uri, torn_ok=True)
        base, parts = self._read_remote()
        rows = _parse_lines(base, self.uri)
        for name, data in parts:
            rows.extend(_parse_lines(data, name))
        return rows

    def compact(self, rows: list[dict[str, Any]] | None = None) -> None:
        """Rewrite ``<path>`` whole, with all rows or with ``rows`` (e.g. what a resume kept), and
        drop the parts. Remote: marker, then ``<path>``, then parts, then marker, so a kill at any
        point reads back either the old rows or the new ones."""
        rows = self.read() if rows is None else rows
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        if not self.remote:
            from allava_jax.files import atomic_write

            if self._file is not None:
                self._file.close()
                self._file = None
            pathlib.Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(pathlib.Path(self.uri), data)
            return
        names = [n for n in self._part_names() if _PART.match(n)]
        marker = f"{self._parts}/{_COMPACTING}"
        self._fs.pipe_file(marker, json.dumps({"through": names[-1] if names else "",
                                               "sha256": hashlib.sha256(data).hexdigest()}).encode())
        self._fs.pipe_file(self._key, data)
        if names:
            self._fs.rm([f"{self._parts}/{n}" for n in names])
        self._fs.rm_file(marker)
        self._fs.invalidate_cache(self._parts)

    # -- internals

    def _local_handle(self):
        if self._file is None:
            path = pathlib.Path(self.uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a+b")  # noqa: SIM115 - held for the log's life
            self._file.seek(0, os.SEEK_END)
            size = self._file.tell()
            if size:  # cut a torn last line (a kill mid-write) so the next row starts clean
                self._file.seek(0)
                data = self._file.read()
                keep = data.rfind(b"\n") + 1
                if keep < size:
                    self._file.truncate(keep)
            self._file.close()
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        return self._file

    def _local_bytes(self) -> bytes:
        path = pathlib.Path(self.uri)
        return path.read_bytes() if path.exists() else b""

    def _part_names(self) -> list[str]:
        self._fs.invalidate_cache(self._parts)
        try:
            return sorted(pathlib.PurePosixPath(p).name for p in self._fs.ls(self._parts, detail=False))
        except FileNotFoundError:
            return []

    def _marker(self) -> dict[str, str]:
        try:
            return json.loads(self._fs.cat_file(f"{self._parts}/{_COMPACTING}"))
        except FileNotFoundError:
            return {}

    def _read_remote(self) -> tuple[bytes, list[tuple[str, bytes]]]:
        names = self._part_names()
        self._fs.invalidate_cache(self._key)
        try:
            base = self._fs.cat_file(self._key)
        except FileNotFoundError:
            base = b""
        through = ""
        if _COMPACTING in names:  # a compaction was killed: did it write <path> already?
            marker = self._marker()
            if marker.get("sha256") == hashlib.sha256(base).hexdigest():
                through = marker.get("through", "")
        parts = [n for n in names if _PART.match(n) and n > through]
        return base, [(f"{self.uri}.parts/{n}", self._fs.cat_file(f"{self._parts}/{n}")) for n in parts]


def _parse_lines(data: bytes, where: str, *, torn_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSON-lines blob. ``torn_ok``: a last line with no newline (a kill mid-write of a
    local file) is dropped; remote objects are whole, so any bad line there is corruption."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline
    rows = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: line {i + 1} is not JSON ({e.msg})") from None
    if tail.strip():
        if not torn_ok:
            raise UserError(f"{where}: last line has no newline (a torn write)")
    return rows



@contextlib.contextmanager
def local_output(p: PathLike) -> Iterator[pathlib.Path]:
    """A local temporary file for a library that writes ``p`` itself (ArrayRecord writers, ...):
    on success it is renamed to ``p`` (local) or uploaded as one object (remote), so a reader never
    sees half a file; on error it is removed."""
    if is_remote(p):
        tmpdir = tempfile.mkdtemp(prefix="allava_out_")
        tmp = pathlib.Path(tmpdir) / as_path(p).name
    else:
        tmpdir = None
        pathlib.Path(p).absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(f"{os.fspath(p)}.tmp{os.getpid()}")
    try:
        yield tmp
        if tmpdir is None:
            os.replace(tmp, p)
        else:
            fs, key = filesystem(p)
            fs.put_file(os.fspath(tmp), key)
            fs.invalidate_cache(key)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
