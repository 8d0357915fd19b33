"""Back glibc malloc's large allocations with transparent huge pages on CPU hosts.

XLA:CPU allocates a step's large buffers afresh on every call, and glibc serves every block over
32 MiB with a new ``mmap``; so each step page-faults its whole working set again, 4 KiB at a
time (about 3 GB and 0.1-0.16 s of a ~2 s mid-size train step here: ``benchmarks/train_step.py``).
glibc >= 2.35 can ask for 2 MiB pages on those mappings (the ``glibc.malloc.hugetlb=1``
tunable) when the kernel's THP mode is ``madvise`` or ``always``. glibc reads tunables only at
process start, so an entry point calls :func:`reexec_with_hugepages` first thing: it replaces the
process (same pid, same arguments) with one that has the tunable set, once.

Opt out with ``ALLAVA_HUGEPAGES=0``; a ``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb``
is left as it is. Nothing here imports jax: it must run before jax starts its threads.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "ALLAVA_HUGEPAGES"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)

log = logging.getLogger(__name__)


def thp_mode(path: Path = THP_MODE_FILE) -> str:
    """The kernel's THP mode (the bracketed word: always, madvise or never), or "" if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return ()
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def tunables_with_hugepages(env: dict[str, str]) -> str | None:
    """The ``GLIBC_TUNABLES`` value to re-execute with, or None when nothing should change."""
    if env.get(OPT_OUT, "1") == "0":
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    return ":".join(filter(None, [current, f"{TUNABLE}=1"]))


def reexec_with_hugepages() -> None:
    """Re-execute this Python command with huge-page malloc if it helps and is not yet set.

    Returns (doing nothing) off Linux, on glibc older than 2.35, when THP is off, or when the
    environment already decided; otherwise does not return.
    """
    if sys.platform != "linux" or glibc_version() < MIN_GLIBC or thp_mode() not in ("always", "madvise"):
        return
    tunables = tunables_with_hugepages(dict(os.environ))
    if tunables is None:
        return
    env = {**os.environ, "GLIBC_TUNABLES": tunables}
    log.info("re-executing with GLIBC_TUNABLES=%s (set %s=0 to skip)", tunables, OPT_OUT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
