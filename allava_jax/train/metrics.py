"""Where training metrics go: ``metrics.jsonl``, TensorBoard event files and a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
from tqdm import tqdm


class MetricWriter:
    """Process 0 writes; other processes only keep the bar quiet."""

    def __init__(self, workdir: Path, total_steps: int, initial_step: int, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._jsonl = open(workdir / "metrics.jsonl", "a") if self.enabled else None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self.bar = tqdm(
            total=total_steps, initial=initial_step, desc="train", unit="step", file=sys.stderr,
            disable=not self.enabled, dynamic_ncols=True,
        )

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def show(self, values: Mapping[str, Any]) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a metrics file; a step logged twice (before a crash and after the resume) keeps
    its last value."""
    rows: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
