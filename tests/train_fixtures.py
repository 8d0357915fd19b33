"""Shared trainer-test setup: a small demo dataset and the tiny training config."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from ml_collections import ConfigDict

from cli_env import cli_env
from allava_jax.data import demo

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "tests" / "configs" / "tiny_train.py"
NATIVE_CONFIG_FILE = ROOT / "tests" / "configs" / "tiny_train_ov15.py"  # tiny_ov15 on native-resolution data


def demo_dir(tmp_path_factory) -> Path:
    return demo.make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=96, num_heldout=8, seed=1)


def config(data_dir: Path, **overrides) -> ConfigDict:
    spec = importlib.util.spec_from_file_location("tiny_train", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(str(data_dir))
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def native_demo_dir(tmp_path_factory) -> Path:
    """The demo data's native-resolution variant, as small (for ``NATIVE_CONFIG_FILE``)."""
    return demo.make_demo_dataset(tmp_path_factory.mktemp("demo_native"), num_train=96, num_heldout=8, seed=1, native=True)


def train_command(data_dir: Path, workdir: Path, *flags: str, config_file: Path = CONFIG_FILE) -> list[str]:
    return [sys.executable, "-m", "allava_jax.train", f"--config={config_file}:{data_dir}", f"--workdir={workdir}", *flags]


def subprocess_env(devices: int = 1) -> dict[str, str]:
    return cli_env(devices)


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
