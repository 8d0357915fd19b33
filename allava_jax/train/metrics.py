"""Where training metrics go: ``metrics.jsonl``, TensorBoard event files, optionally Weights &
Biases, and a progress bar; any of them local or on object storage (``gs://``).

``metrics.jsonl`` is an ``allava_jax.storage.AppendLog``: rows are flushed before every
checkpoint save, and a resumed run first drops the rows after the step it resumes from (it is
about to log those steps again), so the file holds every step's row exactly once however often
the run was killed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import jax
from tqdm import tqdm

from allava_jax import storage

log = logging.getLogger("allava_jax.train")

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Process 0 writes; other processes only keep the bar quiet.

    ``wandb`` is the config's ``wandb`` block (``project`` empty = off); the run's id is derived
    from the workdir, so a resumed run continues the same W&B run.

    TensorBoard events for a remote workdir are written to a local directory and uploaded (whole
    files, through ``allava_jax.storage``) at each ``flush`` and at most every
    ``TB_UPLOAD_EVERY_S`` seconds: tensorboardX's own GCS writer uses a second client library and
    uploads again from ``__del__``, after the run (and in tests after the emulator) is gone.
    """

    TB_UPLOAD_EVERY_S = 60.0

    def __init__(self, workdir: Any, total_steps: int, initial_step: int, enabled: bool = True,
                 wandb: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None):
        workdir = storage.as_path(workdir)
        self.enabled = enabled and jax.process_index() == 0
        self._jsonl = self._tb = self._wandb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = storage.AppendLog(workdir / METRICS_FILE)
            self._jsonl.compact([r for r in self._jsonl.read() if r["step"] <= initial_step])
            self._tb_remote = workdir / "tensorboard" if storage.is_remote(workdir) else None
            self._tb_local = Path(tempfile.mkdtemp(prefix="allava_tb_")) if self._tb_remote else None
            self._tb = SummaryWriter(str(self._tb_local or workdir / "tensorboard"))
            self._tb_uploaded = time.monotonic()
            if wandb and wandb.get("project"):
                self._wandb = _start_wandb(workdir, dict(wandb), dict(config or {}))
        self.bar = tqdm(
            total=total_steps, initial=initial_step, desc="train", unit="step", file=sys.stderr,
            disable=not self.enabled, dynamic_ncols=True,
        )

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._jsonl.append(row)
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb_remote is not None and time.monotonic() - self._tb_uploaded >= self.TB_UPLOAD_EVERY_S:
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        self._tb.flush()
        storage.upload_dir(self._tb_local, self._tb_remote)
        self._tb_uploaded = time.monotonic()

    def show(self, values: Mapping[str, Any]) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()}, refresh=False)

    def flush(self) -> None:
        """Make every row so far durable (called before each checkpoint save)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
            if self._tb_remote is not None:
                self._upload_tensorboard()

    def close(self) -> None:
        self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl.compact()
        if self._tb is not None:
            self._tb.close()
            if self._tb_remote is not None:
                storage.upload_dir(self._tb_local, self._tb_remote)
                shutil.rmtree(self._tb_local, ignore_errors=True)
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(workdir: Any, settings: dict, config: dict) -> Any:
    """A W&B run for this workdir (resumed when it exists); ``WANDB_MODE=offline`` works offline."""
    try:
        import wandb
    except ImportError:
        from allava_jax.errors import UserError

        raise UserError("config.wandb.project is set but wandb is not installed: pip install wandb") from None
    run_id = settings.get("id") or hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
    return wandb.init(
        project=settings["project"], entity=settings.get("entity") or None, name=settings.get("name") or None,
        id=run_id, resume="allow", config=json.loads(json.dumps(config, default=str)),
        dir=settings.get("dir") or None, tags=list(settings.get("tags") or ()) or None,
    )


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_jsonl(path: Any) -> list[dict]:
    """Rows of a metrics file (local or remote, flushed parts included); a step logged twice
    keeps its last value."""
    rows: dict[int, dict] = {}
    for row in storage.AppendLog(path).read():
        rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def device_memory_gib() -> dict[str, float]:
    """Device memory in use and its peak (GiB, the largest over this host's devices), where the
    backend reports it (TPU and GPU do; the CPU backend does not: then nothing)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if not stats or any(not s for s in stats):
        return {}
    return {
        "memory_in_use_gib": max(s.get("bytes_in_use", 0) for s in stats) / 2**30,
        "memory_peak_gib": max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**30,
    }
