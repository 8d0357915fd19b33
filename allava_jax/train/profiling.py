"""A ``jax.profiler`` trace of a window of training steps: where a step's time goes on the device
(XProf / TensorBoard's profile plugin read it). Steps are annotated with their number, so the
trace viewer's step view lines up with ``metrics.jsonl``."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, ContextManager

import jax

from allava_jax import storage

log = logging.getLogger("allava_jax.train")


class ProfileWindow:
    """Traces steps ``start_step .. start_step + num_steps - 1`` (1-based, as in the metrics).

    The trace is written to a local directory and copied to ``out_dir`` when the window closes,
    so a ``gs://`` workdir works whatever file systems the profiler itself was built with.
    Only process 0 traces unless ``all_hosts``.
    """

    def __init__(self, start_step: int, num_steps: int, out_dir: Any, all_hosts: bool = False):
        self.first = start_step
        self.last = start_step + num_steps - 1 if num_steps > 0 and start_step > 0 else 0
        self.out_dir = storage.as_path(out_dir)
        self.enabled = bool(self.last) and (all_hosts or jax.process_index() == 0)
        self._local: Path | None = None

    @property
    def active(self) -> bool:
        return self._local is not None

    def step(self, step: int) -> ContextManager:
        """Wrap the work of ``step`` (1-based): starts the trace at the window's first step and
        annotates every step inside it."""
        if not self.enabled or not self.first <= step <= self.last:
            return contextlib.nullcontext()
        if self._local is None:
            self._local = Path(tempfile.mkdtemp(prefix="allava_profile_"))
            jax.profiler.start_trace(str(self._local), create_perfetto_trace=True)
            log.info("profiling steps %d-%d", self.first, self.last)
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after_step(self, step: int) -> None:
        """Call once ``step``'s results are on the host: the window closes after its last step."""
        if self._local is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        if self._local is None:
            return
        jax.profiler.stop_trace()
        local, self._local = self._local, None
        storage.upload_dir(local, self.out_dir)
        shutil.rmtree(local, ignore_errors=True)
        log.info("profile of steps %d-%d written to %s", self.first, self.last, self.out_dir)
