"""Test-wide setup: 8 virtual CPU devices, fp32 matmuls, no network, one compilation cache."""

import atexit
import os
import shutil
import tempfile

from cli_env import CACHE_EVERY_PROGRAM, XLA_TEST_FLAGS
from gcs_fixtures import gcs, gcs_server  # noqa: F401  (the GCS emulator; also keeps clients off the cloud)

# Must run before JAX is imported anywhere: sharding tests need a real 8-device mesh.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {XLA_TEST_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.update(CACHE_EVERY_PROGRAM)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The AOT compile tests load libtpu (compile-only); let them run beside another compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A persistent XLA compilation cache for this run only, shared through the environment with the
# subprocesses the tests start: the trainer, CLI and resume tests compile the same tiny programs
# many times over, and on 2 cores compiling is most of their time. Every program still compiles
# once per run; the directory is removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="allava_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

# Parity tests compare to PyTorch fp32: use full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """CLIs called in-process (``synth``'s ``install_logging``) replace the root handlers with one
    on the test's captured stderr, which closes with the test: put the previous ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# pytest-xdist (-n 2 --dist loadfile) hands out whole files, by default the files with the most
# tests first; a long file of few tests then starts last and one worker finishes it alone. The
# longest files (seconds on the 2-core machines) go first instead, the rest in collection order.
LONGEST_FIRST = ("test_train_processes.py", "test_train.py", "test_eval.py", "test_infer_generate.py",
                 "test_train_compile.py", "test_convert_families.py", "test_serve.py", "test_cli_errors.py",
                 "test_models.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order otherwise
