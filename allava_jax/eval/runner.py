"""Run lmms-eval tasks (its own data loading and scoring) on an allava-jax checkpoint."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from allava_jax.errors import UserError

log = logging.getLogger(__name__)


def evaluate(
    checkpoint: str | None,
    tasks: Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool = True,
    limit: int | float | None = None,
    batch_size: int = 8,
    gen_kwargs: str | None = None,
    log_samples: bool = False,
    engine: Any = None,
    **model_args: Any,
) -> dict:
    """lmms-eval's ``simple_evaluate`` with our model; returns its results dict.

    ``include_path``: extra task YAML directories (local, offline task definitions);
    ``include_defaults=False`` skips indexing lmms-eval's ~2000 bundled tasks.
    """
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from allava_jax.eval.model import AllavaJax

    task_manager = TaskManager("WARNING", include_path=include_path, include_defaults=include_defaults)
    missing = [t for t in tasks if t not in task_manager.all_tasks]
    if missing:
        raise UserError(f"unknown lmms-eval tasks {missing}; pass --include-path for local task YAMLs")
    model = AllavaJax(checkpoint=checkpoint, engine=engine, batch_size=batch_size, **model_args)
    results = evaluator.simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        batch_size=batch_size,
        gen_kwargs=gen_kwargs,
        log_samples=log_samples,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    if results is None:
        raise RuntimeError("lmms-eval returned no results")
    return results
