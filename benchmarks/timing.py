"""Timing shared by the benchmark scripts (imported as ``timing``: a script's folder is on its path)."""

from __future__ import annotations

import time
from typing import Any, Callable


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(seconds of the fastest of ``repeats`` calls, the last call's result): this shared machine's
    noise only ever slows a run down."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result
