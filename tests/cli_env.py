"""The environment the tests give JAX: in this process (conftest.py) and in the CLI subprocesses
they start (``cli_env``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The tests run tiny models, so compiling is most of their time on 2 cores. LLVM at -O0 and the CPU
# backend's older elemental emitters instead of its MLIR fusion emitters cut the backend compile of
# a tiny train() run's programs from 14.7 to about 5.4 s on the AMD EPYC machine (XLA's HLO passes,
# fusion included, still run; numbers agree with the default build to float rounding, and every
# comparison in the suite is made within one setting). Every program is also kept in the run's
# persistent cache (conftest.py), however fast it compiled, so that CLI subprocesses and reruns load
# it instead of compiling it again.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
CACHE_EVERY_PROGRAM = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def cli_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """os.environ for ``python -m allava_jax.<cli>``: this checkout importable, the CPU backend with
    ``devices`` fake devices, the suite's compile flags and cache, plus ``extra``. Inside a test
    that uses the ``gcs`` fixture, os.environ already holds ``gcs.env`` (the emulator's variables),
    so subprocesses use the emulator too; ``cli_env(**gcs.env)`` says so explicitly."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count={devices}", **extra}
