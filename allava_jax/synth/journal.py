"""The append-only journal: the single source of truth of a run directory.

Every response is journaled (one JSON line, one ``write`` call) before anything else happens, so a
crash loses at most the requests in flight. Reading tolerates a torn last line (a kill mid-write):
it is ignored and cut off, so the next append starts on a clean line. Outputs and the failures
file are regenerated from the journal, never edited in place.

Entry kinds (``k``): ``done`` (parsed result), ``bad`` (unusable output; one attempt used),
``failed`` (gave up on the item; ``retryable`` if no usable answer was paid for), ``batch_file`` (an
uploaded Batch API input file and its item ids), ``batch`` (a created batch), ``batch_closed``.
In images mode ``done`` and ``bad`` carry ``n_images`` (the images paid for), and a ``done`` entry
is written only after the image files it points at.

On object storage (``--out gs://...``) the journal is a ``storage.AppendLog``: object stores have no
append, so entries are uploaded as one new object per flush (every ``flush_every_s``, and at
close); a kill -9 loses the entries since the last flush, whose items are requested again on
resume. Nothing flushed is requested again. Closing compacts the parts into ``journal.jsonl``.
There is no lock there: one runner per ``--out``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from allava_jax import storage

from .redact import redact
from .usage import Totals

log = logging.getLogger(__name__)


@dataclass
class JournalState:
    """What the journal says so far, folded entry by entry."""

    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)  # latest failure of items not done
    bad: Counter = field(default_factory=Counter)  # unusable outputs since the last failure
    totals: Totals = field(default_factory=Totals)
    batch_files: dict[str, dict] = field(default_factory=dict)  # file id -> its batch_file entry
    batches: dict[str, str] = field(default_factory=dict)  # file id -> batch id
    closed: set[str] = field(default_factory=set)  # batch ids fully processed
    batch_lines: set[tuple[str, str]] = field(default_factory=set)  # (batch id, item id) seen

    def apply(self, e: dict) -> None:
        k = e["k"]
        if k in ("done", "bad", "failed") and "usage" in e:
            self.totals.add(e.get("usage"), float(e.get("cost", 0.0)), int(e.get("n_images", 0)))
        if k in ("done", "bad", "failed") and e.get("batch"):
            self.batch_lines.add((e["batch"], e["id"]))
        if k == "done":
            self.done.setdefault(e["id"], e)
            self.failed.pop(e["id"], None)
        elif k == "bad":
            self.bad[e["id"]] += 1
        elif k == "failed":
            if e["id"] not in self.done:
                self.failed[e["id"]] = e
            self.bad[e["id"]] = 0
        elif k == "batch_file":
            self.batch_files[e["file_id"]] = e
        elif k == "batch":
            self.batches[e["file_id"]] = e["batch_id"]
        elif k == "batch_closed":
            self.closed.add(e["batch_id"])

    def finished(self, item_id: str, retry_failed: bool = False) -> bool:
        """Never request again: done, or failed after a paid-for unusable answer (unless asked)."""
        if item_id in self.done:
            return True
        f = self.failed.get(item_id)
        return f is not None and not f.get("retryable", False) and not retry_failed

    def open_batch_items(self) -> set[str]:
        """Items inside uploaded/created batches whose results are not processed yet."""
        out: set[str] = set()
        for file_id, e in self.batch_files.items():
            if self.batches.get(file_id) not in self.closed:
                out.update(e["ids"])
        return out


# Entries that name server-side jobs (uploaded files, created batches): on object storage they are
# uploaded at once, so a resume adopts those jobs instead of creating and paying for new ones.
_FLUSH_AT_ONCE = frozenset({"batch_file", "batch", "batch_closed"})


class Journal:
    """Append-only JSONL journal with an exclusive lock (one runner per output directory); a remote
    path goes through ``storage.AppendLog`` (see the module docstring)."""

    def __init__(self, path: str | Path, *, flush_every_s: float = 5.0):
        self.state = JournalState()
        self._log: storage.AppendLog | None = None
        self._fd = -1
        if storage.is_remote(path):
            self.path = storage.as_path(path)
            self._log = storage.AppendLog(path, flush_every_s=flush_every_s)
            for entry in self._log.read():
                self.state.apply(entry)
            return
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(f"{self.path} is locked: another synth run is using this --out directory")
        self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                log.warning("journal: ignoring torn last line (%d bytes)", len(data) - pos)
                break
            line = data[pos:nl]
            try:
                entry = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                if data.find(b"\n", nl + 1) < 0 and not data[nl + 1 :].strip():
                    log.warning("journal: ignoring torn last line")
                    break
                raise RuntimeError(f"{self.path}: corrupt line at byte {pos} (not the last line)")
            if entry is not None:
                self.state.apply(entry)
            pos = good_end = nl + 1
        if good_end < len(data):
            os.ftruncate(self._fd, good_end)

    def append(self, entry: dict) -> None:
        """Write one entry as one line (redacted) and fold it into the state."""
        line = redact(json.dumps(entry, ensure_ascii=False)) + "\n"
        if self._log is not None:
            entry = json.loads(line)
            self._log.append(entry)
            self.state.apply(entry)
            if entry["k"] in _FLUSH_AT_ONCE:
                self._log.flush()
            return
        buf = line.encode("utf-8")
        while buf:  # a regular-file write may be short; never leave half a line behind
            buf = buf[os.write(self._fd, buf):]
        self.state.apply(json.loads(line))

    def sync(self) -> None:
        if self._log is not None:
            self._log.flush()
        else:
            os.fsync(self._fd)

    def close(self, compact: bool = True) -> None:
        """Flush (remote: and compact the parts into one object, which a user reads whole and a
        resume in one request; not after an error, which the compaction's requests would hide)."""
        if self._log is not None:
            self._log.close()
            if compact:
                self._log.compact()
            self._log = None
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close(compact=exc[0] is None)
