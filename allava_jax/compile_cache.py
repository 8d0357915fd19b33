"""JAX's persistent compilation cache, on for every command that compiles a large program.

A restart after a preemption (or the next ``generate``) then loads the train step or decode
programs instead of compiling them again: minutes of a pod's time on every restart. The cache is
keyed by the program, the compiler and the devices, so one directory serves many runs. ``gs://``
works (JAX writes through ``etils.epath``): a pod's hosts can share one cache in its bucket.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("allava_jax")

DEFAULT_DIR = "~/.cache/allava_jax/jax_compile"
# Only programs that took at least this long to compile are stored (JAX's own default is 1 s):
# small programs compile faster than they load from a bucket.
MIN_COMPILE_SECONDS = 2.0


def enable(cache_dir: str | None = None) -> str:
    """Use ``cache_dir`` (None = the default; "" = off) unless the environment already chose one
    (``JAX_COMPILATION_CACHE_DIR``, as the tests and some launchers set). Returns the directory
    in use ("" when off)."""
    current = jax.config.jax_compilation_cache_dir
    if current or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return current or os.environ["JAX_COMPILATION_CACHE_DIR"]
    if cache_dir == "":
        return ""
    path = cache_dir or DEFAULT_DIR
    if "://" not in path:
        path = os.path.expanduser(path)
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    log.info("persistent compilation cache: %s", path)
    return path
