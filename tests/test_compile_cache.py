"""The persistent compilation cache every compiling command turns on (allava_jax/compile_cache.py)."""

import os
import subprocess
import sys

from cli_env import cli_env

PROGRAM = """
import sys, jax, jax.numpy as jnp
from allava_jax import compile_cache
print(compile_cache.enable(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
"""


def _run(cache_dir, **env):
    base = cli_env()
    base.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own cache would win
    base.update(env)
    return subprocess.run([sys.executable, "-c", PROGRAM, cache_dir], env=base, capture_output=True, text=True, timeout=120)


def test_the_configured_directory_receives_the_compiled_programs(tmp_path):
    cache = tmp_path / "cache"
    out = _run(str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache)
    assert any(cache.iterdir())  # a restart loads this instead of compiling


def test_the_environment_wins_and_empty_turns_it_off(tmp_path):
    out = _run(str(tmp_path / "mine"), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "env"))
    assert out.stdout.strip() == str(tmp_path / "env") and not (tmp_path / "mine").exists()
    out = _run("")
    assert out.returncode == 0 and out.stdout.strip() == ""
    assert not os.path.exists(tmp_path / "mine")
