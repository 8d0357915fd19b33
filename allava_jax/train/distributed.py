"""Multi-host start-up: ``jax.distributed.initialize`` on pods, SLURM and manual coordinators."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("allava_jax.train")


def _cluster_detected() -> bool:
    """True on a multi-process SLURM job or a multi-host TPU slice (JAX auto-detects both)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, cpu_collectives: str = "gloo") -> None:
    """Join the job's processes. A manual ``coordinator`` (``host:port``) wins; otherwise the
    cluster is auto-detected; a lone process does nothing."""
    manual = bool(coordinator)
    if not manual and not _cluster_detected():
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU-only multi-process runs (tests, laptops) need a collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if manual:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
